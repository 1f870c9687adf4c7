"""python benchmarks/round_flops.py [--recipe R] [--round 1] [--ceiling GFLOP/s] [ARGS key=value ...]

How far a finished round is from its machine, and what another machine could do with it: the LLM FLOPs of each
stage counted from what the stage really processed (its prompts' and profiles' tokens, the pairs DPO trained on),
against the stage's measured wall time (stage.json `wall_s`), as a share of the box's matmul ceiling in the dtype the
recipe's LLM stages pick there (`sample.dtype`: bf16 where the CPU does it natively, else fp32;
benchmarks/matmul_ceiling.py, measured here, or `--ceiling` for another box's figure). The floor is the time the
FLOPs take at the ceiling: no implementation of this recipe can run its LLM stages faster on that box.

Counted (the weights' matmuls, 2 x parameters per token, the convention of docs/performance.md; attention's own
FLOPs are left out, about a tenth more at ~300-token contexts):
  sample   each prompt's prefill through the body, and every sampled token (its stop token included) through body
           and LM head;
  dpo      each trained pair's [prompt | chosen | rejected] tokens (dpo.share_prompt: the prompt once) x (policy
           forward + reference forward + the backward's activation gradients through the adapted layers,
           2 forwards' worth over those layers), the held-out pairs' policy and reference forwards; where the
           stage's reference passes reused the policy's frozen layers (rlrf.dpo_packed.FrozenBottom, recorded in
           its stage.json) the reference forward counts only the adapted layers;
           a checkpointed run's recomputed forward is not counted (it is what checkpointing costs, not what the
           recipe needs);
  check    the new generator's sampling as above (the old side is taken from the round's sample, no FLOPs), and the
           perplexity of both sides' profiles under the base model.
The other stages (prepare, encode, train-reranker, score, pairs) are not LLM matmuls: their measured time is shown
and carried into a projected round as it is.

The ratio printed per stage is floor / measured, the share of the ceiling the stage reached. The last lines say
what the round needs at the ceiling: the LLM stages' floor plus the other stages' measured time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import polars as pl  # noqa: E402

from rlrf import runs  # noqa: E402
from rlrf.artifacts import read_stage_json  # noqa: E402
from rlrf.config import load_recipe  # noqa: E402

LLM_STAGES = ("sample", "dpo", "check")


def sample_flops(prompt_tokens: list[int], new_tokens: list[int], body: int, head: int) -> float:
    """Prefill of each prompt through the body (its last position through the LM head) + each sampled token, its
    stop token included, through body and head."""
    prefill = sum(prompt_tokens) * 2 * body + len(prompt_tokens) * 2 * head
    return prefill + sum(t + 1 for t in new_tokens) * 2 * (body + head)


def dpo_flops(rows: list[tuple[int, int, int]], heldout: list[tuple[int, int, int]], body: int, head: int,
              backward: float, share_prompt: bool, reuse: bool | None = None) -> float:
    """rows, heldout: (prompt, chosen, rejected) tokens of each trained / held-out pair. A trained pair: policy
    forward + reference forward + 2 x forward over the `backward` share of the layers (the adapted ones); the LM
    head over the completions (x3, its backward counted once). A held-out pair: policy + reference forward. With
    `reuse` (default: share_prompt) the reference forward starts at the lowest adapted layer
    (rlrf.dpo_packed.FrozenBottom)."""
    def tokens(p, c, r):
        return p + c + r if share_prompt else 2 * p + c + r

    reference = backward if (share_prompt if reuse is None else reuse) else 1.0
    train = sum(tokens(*x) * 2 * body * (1 + reference + 2 * backward) + (x[1] + x[2]) * 2 * head * 3 for x in rows)
    held = sum(tokens(*x) * 2 * body * (1 + reference) + (x[1] + x[2]) * 2 * head * 2 for x in heldout)
    return train + held


def perplexity_flops(text_tokens: list[int], body: int, head: int) -> float:
    """rlrf.quality.token_nll: each profile on its own after a BOS token, every position through body and head."""
    return sum(t + 1 for t in text_tokens) * 2 * (body + head)


def _wall(stage_dir: Path) -> float | None:
    return read_stage_json(stage_dir).get("wall_s") if (stage_dir / "stage.json").is_file() else None


def count(recipe, k: int, model_dir: Path, tok, body: int, head: int, n_layers: int) -> dict[str, float]:
    from rlrf.artifacts import read_artifact
    from rlrf.llamafactory import expected_token_ids
    from rlrf.sample import chat_ids

    def profiles_flops(sample_dir: Path) -> float:
        if read_stage_json(sample_dir).get("taken_from"):
            return 0.0  # the profiles came from another stage's output: nothing was sampled here
        df = read_artifact(sample_dir, "profiles", "sample")
        first = df.filter(pl.col("sample_idx") == 0)  # one prefill per prompt
        return sample_flops([len(chat_ids(tok, p)) for p in first["prompt"].to_list()], df["n_tokens"].to_list(),
                            body, head)

    def pair_tokens(df: pl.DataFrame) -> list[tuple[int, int, int]]:
        # the ids DPO trains on: the prompt as the sample stage tokenized it, each answer as TRL's template adds it
        return [(len(r["prompt"]), len(r["chosen"]), len(r["rejected"])) for r in expected_token_ids(model_dir, df)]

    flops = {}
    flops["sample"] = profiles_flops(runs.stage_dir(recipe, "sample", k))
    pairs_dir, dpo_dir = runs.stage_dir(recipe, "pairs", k), runs.stage_dir(recipe, "dpo", k)
    st = read_stage_json(dpo_dir)
    cfg = recipe.dpo
    pairs = read_artifact(pairs_dir, "pairs", "pairs")
    used = min(pairs.height, st.get("pairs_used", pairs.height))
    held = st.get("heldout") or {}
    held_rows = []
    if held.get("pairs"):
        held_rows = pair_tokens(read_artifact(pairs_dir, "heldout_pairs", "pairs").head(held["pairs"]))
    backward = (min(cfg.lora_layers, n_layers) if cfg.lora_layers else n_layers) / n_layers
    # a stage run before the reference reuse existed records no such counter: its reference ran every layer
    reuse = bool((st.get("packed_forward") or {}).get("reference_passes_reusing"))
    flops["dpo"] = dpo_flops(pair_tokens(pairs.head(used)), held_rows, body, head, backward, cfg.share_prompt, reuse)
    check_dir = runs.stage_dir(recipe, "check", k)
    check = sum(profiles_flops(check_dir / side / "sample") for side in ("old", "new")
                if (check_dir / side / "sample" / "stage.json").is_file())
    for side in ("old", "new"):
        if (check_dir / side / "sample").is_dir():
            texts = read_artifact(check_dir / side / "sample", "profiles", "sample")["text"].to_list()
            check += perplexity_flops([len(tok(t)["input_ids"]) for t in texts if t and t.strip()], body, head)
    flops["check"] = check
    return flops


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="the round's recipe (default: the embedded demo)")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--ceiling", type=float, default=0, help="GFLOP/s to measure against (0: measure this box's, in "
                                                            "the dtype sample.dtype picks here)")
    p.add_argument("overrides", nargs="*", help="recipe overrides the round ran with (runs_dir=..., dpo.lora_layers=...)")
    a = p.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    from rlrf.llm import SAFE_TOKENIZER, pick_dtype, resolve_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from matmul_ceiling import matmul_gflops, param_counts

    recipe = load_recipe(a.recipe, a.overrides)
    model_dir = resolve_model(recipe.sample.model)
    body, head = param_counts(model_dir)
    n_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    tok = AutoTokenizer.from_pretrained(model_dir, **SAFE_TOKENIZER)
    dtype = pick_dtype(recipe.sample.dtype)
    ceiling = a.ceiling or matmul_gflops(dtype=dtype)
    where = "given" if a.ceiling else f"{str(dtype).replace('torch.', '')}, measured on this box"
    flops = count(recipe, a.round, model_dir, tok, body, head, n_layers)
    k = a.round
    walls = {s: _wall(runs.stage_dir(recipe, s, k)) for s in LLM_STAGES}
    others = {"prepare": _wall(runs.prepare_dir(recipe)), "encode": _wall(runs.stage_dir(recipe, "encode", k)),
              "train-reranker": _wall(runs.reranker_dir(recipe, k)),
              "score": _wall(runs.stage_dir(recipe, "score", k)), "pairs": _wall(runs.stage_dir(recipe, "pairs", k))}
    print(f"round {k} of {recipe.run_dir}; matmul ceiling {ceiling:.0f} GFLOP/s ({where}); "
          f"{recipe.sample.model}: {body / 1e6:.1f}M body, {head / 1e6:.1f}M LM head parameters")
    print(f"{'stage':16s} {'TFLOP':>7s} {'floor':>8s} {'measured':>9s} {'of ceiling':>10s}")
    floor_total = 0.0
    for s in LLM_STAGES:
        floor = flops[s] / (ceiling * 1e9)
        floor_total += floor
        w = walls[s]
        share = f"{floor / w:9.0%}" if w else "        -"
        print(f"{s:16s} {flops[s] / 1e12:7.3g} {floor:7.0f}s {(f'{w:8.0f}s' if w else '        -')} {share}")
    other = sum(w for w in others.values() if w)
    for s, w in others.items():
        print(f"{s:16s} {'-':>7s} {'-':>8s} {(f'{w:8.0f}s' if w else '        -')}")
    llm = sum(w for w in walls.values() if w)
    measured = llm + other
    print(f"\nLLM stages: {sum(flops.values()) / 1e12:.1f} TFLOP, floor {floor_total / 60:.1f} min at {ceiling:.0f} "
          f"GFLOP/s; measured {llm / 60:.1f} min ({floor_total / max(llm, 1e-9):.0%} of the ceiling)")
    print(f"the round's stages measured {measured / 60:.1f} min; at the ceiling they would take at least "
          f"{(floor_total + other) / 60:.1f} min (LLM floor + the other stages as measured)")


if __name__ == "__main__":
    main()
