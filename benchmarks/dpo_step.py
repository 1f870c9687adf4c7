"""python benchmarks/dpo_step.py [--steps 2] [--pairs 32] [--batch 4] [--history 9-13]

Seconds per DPO optimizer step on SmolLM2-135M-Instruct (LoRA r16 on q/k/v/o) at the demo recipe's shapes
(batch 4, KAR prompts of ~320 tokens, profiles of 40-75 words, max_length 416): TRL's default DPOConfig
(gradient checkpointing on, bf16 autocast over fp32 weights, a reference forward every step) against the
dpo stage's settings (rlrf.dpo.trl_args: frozen base weights in the machine's dtype (bf16 only where the
CPU does it natively), no checkpointing, batches grouped by length, each pair's prompt encoded once
(dpo.share_prompt); reference log-probs precomputed once as an optional last step, since that pays only
over several epochs), measured in one process on the same pairs, with each setting added one at a time
so its effect shows. The ceiling: the FLOPs of a step (policy forward + backward + reference forward over
the tokens the variant feeds) over the box's matmul rate in the stage's dtype (benchmarks/matmul_ceiling.py: fp32,
or bf16 where the CPU does it natively), measured in the same run.

The pairs are KAR prompts built from real MovieLens-100K titles with profiles of 40-75 words. Variants take turns, one optimizer step each
per round, so the load of neighbours on a shared machine falls on all of them alike; round 0 is
warm-up. Precomputing the reference costs one no-grad pass over the pairs up front: it is reported
separately (trainer init) and also amortised over one epoch.

Two rows come after the chain, each against the dpo stage's row: the stage with LoRA on the top half of the layers
(dpo.lora_layers: the backward stops below them, and the reference pass reuses the policy's frozen layers, so a
step's FLOPs are 2.5 forwards' worth instead of 4), and the stage
with every layer adapted and checkpointed (the demo recipe's DPO before dpo.lora_layers, checkpointed to stay under
4 GB); the last line is their ratio, the demo's DPO step before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rlrf.config import load_recipe  # noqa: E402
from rlrf.prompts import history_line, join_prompt, prompt_head, prompt_tail  # noqa: E402

WORDS = ("enjoys character driven dramas with strong performances and a soft spot for classic Hollywood "
         "romance while thrillers with twisty plots keep this viewer engaged action is fine when the story "
         "matters critically acclaimed films and memorable soundtracks rate highly slow paced art house "
         "titles and broad comedies rate low the user favours the nineties and films about friendship").split()


def make_pairs(n: int, seed: int = 0, history: tuple[int, int] = (9, 13)):
    import datasets
    import polars as pl

    items = pl.read_csv("data/raw/ml-100k/ml-100k.item", separator="\t", quote_char=None, infer_schema=False)
    titles = items[items.columns[1]].to_list()
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        hist = [history_line(titles[i], int(rng.integers(1, 6))) for i in rng.choice(len(titles), rng.integers(history[0], history[1] + 1))]
        prompt = join_prompt(prompt_head("movies", "male", "25-34", "programmer"), hist, prompt_tail("movies"))
        c, r = (" ".join(rng.choice(WORDS, rng.integers(40, 75))).capitalize() + "." for _ in range(2))
        rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]})
    return datasets.Dataset.from_list(rows)


def build_variant(name: str, ds, model_dir: Path, ours: dict, out: Path, batch: int, max_length: int):
    """A DPOTrainer for one variant, with its optimizer and its batches (the first two of its epoch order).

    ours: which of the dpo stage's settings are on: no_ckpt, stage_dtype, group, share, precompute, and top (LoRA on
    the top half of the layers only, dpo.lora_layers).
    """
    from trl import DPOConfig

    from rlrf.dpo import dpo_trainer, group_by_length, lora_config, share_prompt, trl_args, use_bf16
    from rlrf.llm import load_generator

    recipe = load_recipe(None, [f"dpo.per_device_train_batch_size={batch}", "dpo.gradient_accumulation_steps=1",
                                f"dpo.max_length={max_length}", "dpo.lora_r=16", "dpo.lora_alpha=32",
                                "dpo.learning_rate=5e-5",
                                f"dpo.gradient_checkpointing={str(not ours['no_ckpt']).lower()}",
                                f"dpo.precompute_ref_log_probs={str(ours['precompute']).lower()}",
                                f"dpo.group_by_length={str(ours['group']).lower()}"])
    cfg = recipe.dpo
    bf16 = ours["stage_dtype"] and use_bf16(cfg.dtype)
    model, tok = load_generator(model_dir, dtype="bfloat16" if bf16 else "float32")
    tok.padding_side = "right"
    if not any(ours.values()):
        # what a user gets from DPOConfig(output_dir=...) with the shared batch / length / lr
        args = DPOConfig(output_dir=str(out / "default"), per_device_train_batch_size=batch, max_length=max_length,
                         learning_rate=5e-5, report_to=[], use_cpu=not torch.cuda.is_available(), seed=recipe.seed)
    else:
        args = trl_args(cfg, out / name.replace(" ", "_"), recipe.seed, bf16=bf16)
        # TRL's bf16 autocast (its default) until the stage's dtype choice is on
        args.bf16 = not ours["stage_dtype"]
    t0 = time.perf_counter()
    n_layers = model.config.num_hidden_layers
    if ours.get("top"):
        cfg = dataclasses.replace(cfg, lora_layers=n_layers // 2)
    # the recipe's dpo.token_kl rides on the shared-prompt forward: the variants with it train the recipe's loss
    token_kl = cfg.token_kl if ours["share"] else 0.0
    trainer = dpo_trainer(token_kl, cfg.beta)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                              peft_config=lora_config(cfg, n_layers))
    init_s = time.perf_counter() - t0
    if ours["share"]:
        trainer.packed = share_prompt(trainer, cfg.entropy_alpha, token_kl > 0)
    if ours["group"]:
        trainer.train_dataset = group_by_length(trainer.train_dataset, batch, recipe.seed)
    if args.gradient_checkpointing:  # what Trainer.train() switches on before its loop
        trainer.model.activation_checkpointing_enable()
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
    batches = list(trainer.get_train_dataloader())[:2]
    return {"name": name, "trainer": trainer, "batches": batches, "init_s": init_s, "times": [], "share": ours["share"],
            "backward": 0.5 if ours.get("top") else 1.0, "extra": bool(ours.get("top") or not ours["no_ckpt"] and ours["share"])}


def step_flops(batch: dict, share: bool, body: int, head: int, backward: float = 1.0) -> float:
    """FLOPs of one step over the tokens this variant feeds: 2*body*tokens per forward (policy, reference),
    2x that for the backward's activation gradients through the `backward` share of the layers it runs through,
    plus the LM head over the completion tokens (x3). A checkpointed step's recomputed forward is not counted.
    With LoRA on the top layers only and the prompt once per pair, the reference forward runs only those layers
    (rlrf.dpo_packed.FrozenBottom)."""
    mask, comp = batch["attention_mask"], batch["completion_mask"]
    tokens = mask.sum().item()
    if share:  # the prompt once per pair: subtract the rejected rows' prompts
        b = mask.shape[0] // 2
        tokens -= (mask[b:].sum() - comp[b:].sum()).item()
    reference = backward if share else 1.0
    return 2 * body * tokens * (1 + reference + 2 * backward) + 2 * head * comp.sum().item() * 3


def optimizer_step(v: dict, i: int) -> float:
    """One optimizer step (no accumulation) the way Trainer runs it; returns seconds."""
    tr = v["trainer"]
    batch = v["batches"][i % len(v["batches"])]
    t = time.perf_counter()
    tr.training_step(tr.model, batch)
    tr.optimizer.step()
    tr.optimizer.zero_grad()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant (after 1 warm-up)")
    p.add_argument("--pairs", type=int, default=32, help="pairs in the dataset (one epoch = pairs/batch steps)")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (the demo recipe's)")
    p.add_argument("--max-length", type=int, default=416, help="prompt + profile tokens (the demo recipe's)")
    p.add_argument("--history", default="9-13", help="history lines per prompt, lo-hi (9-13: ~320 tokens)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--only", default=None, help="comma-separated variant numbers to run (debugging)")
    a = p.parse_args()
    import tempfile

    from rlrf.dpo import use_bf16
    from rlrf.llm import resolve_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from matmul_ceiling import matmul_gflops, param_counts

    torch.manual_seed(0)
    model_dir = resolve_model(a.model)
    body, head = param_counts(model_dir)
    lo, hi = (int(x) for x in a.history.split("-"))
    ds = make_pairs(a.pairs, history=(lo, hi))
    off = dict(no_ckpt=False, stage_dtype=False, group=False, share=False, precompute=False)
    dtype = "bf16" if use_bf16("auto") else "fp32"
    variants = [
        ("TRL default DPOConfig", off),
        ("+ no gradient checkpointing", {**off, "no_ckpt": True}),
        (f"+ {dtype} frozen weights, no autocast", {**off, "no_ckpt": True, "stage_dtype": True}),
        ("+ group by length", {**off, "no_ckpt": True, "stage_dtype": True, "group": True}),
        ("+ prompt once per pair (= the dpo stage)", {**off, "no_ckpt": True, "stage_dtype": True, "group": True,
                                                     "share": True}),
        ("+ precomputed reference log-probs", {"no_ckpt": True, "stage_dtype": True, "group": True, "share": True,
                                               "precompute": True}),
        ("the dpo stage + LoRA on the top half of the layers", {**off, "no_ckpt": True, "stage_dtype": True,
                                                               "group": True, "share": True, "top": True}),
        ("the dpo stage, every layer, checkpointed", {**off, "stage_dtype": True, "group": True, "share": True}),
    ]
    pick = {int(x) for x in a.only.split(",")} if a.only else set(range(len(variants)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.pairs} pairs, batch {a.batch}, "
          f"max_length {a.max_length}, {a.steps} timed steps each, stage dtype {dtype}", flush=True)
    # the ceiling in the dtype the stage's frozen weights take here (bf16 where the CPU does it natively): on such a
    # box an fp32 ceiling would put the stage above 100%
    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    ceiling = matmul_gflops(dtype=mm_dtype)
    print(f"{dtype} matmul ceiling (2048^2, {torch.get_num_threads()} threads): {ceiling:.0f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        built = [build_variant(name, ds, model_dir, ours, Path(tmp), a.batch, a.max_length)
                 for i, (name, ours) in enumerate(variants) if i in pick]
        # round-robin, one step of each variant per round: a neighbour's load on this shared machine then
        # falls on every variant alike (run back to back, a busy minute would land on one of them)
        for r in range(a.steps + 1):
            took = [optimizer_step(v, r) for v in built]
            if r > 0:  # round 0 is warm-up
                for v, dt in zip(built, took):
                    v["times"].append(dt)
            print(f"  round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(f"{dt:.1f}s" for dt in took), flush=True)
    # the ceiling again after the steps: a neighbour on the shared host can hold it down at either end; the best counts
    ceiling = max(ceiling, matmul_gflops(dtype=mm_dtype))
    print(f"{dtype} matmul ceiling, best of before and after: {ceiling:.0f} GFLOP/s")
    results = []
    for v in built:
        flops = np.mean([step_flops(b, v["share"], body, head, v["backward"]) for b in v["batches"]])
        s = float(np.mean(v["times"]))
        results.append({"name": v["name"], "extra": v["extra"], "s_per_step": s, "init_s": v["init_s"], "spread": float(np.std(v["times"])),
                        "gflops": flops / 1e9, "ceiling": flops / 1e9 / s / ceiling})
    base = results[0]
    print()
    print(f"{'variant':42s} {'s/step':>7s} {'+-':>5s} {'GFLOP':>6s} {'of ceiling':>10s} {'vs default':>10s} "
          f"{'vs previous':>11s}")
    stage = next((r for r in results if r["name"].endswith("(= the dpo stage)")), None)
    for prev, r in zip([None] + results[:-1], results):
        if r["extra"]:  # not one more setting on the row above: compared with the dpo stage's row
            prev = stage
        step_ratio = base["s_per_step"] / r["s_per_step"]
        prev_ratio = "" if prev is None else f"{prev['s_per_step'] / r['s_per_step']:10.2f}x"
        print(f"{r['name']:42s} {r['s_per_step']:7.2f} {r['spread']:5.2f} {r['gflops']:6.0f} {r['ceiling']:9.0%} "
              f"{step_ratio:9.2f}x {prev_ratio:>11s}")
    last = next((r for r in results if r["name"].endswith("(= the dpo stage)")), results[-1])
    epoch = a.pairs / a.batch
    # one epoch including the up-front reference pass (init time difference) for an honest comparison
    base_epoch = base["s_per_step"] * epoch + base["init_s"]
    ours_epoch = last["s_per_step"] * epoch + last["init_s"]
    print(f"\nratio (TRL default / dpo stage), seconds per optimizer step: {base['s_per_step'] / last['s_per_step']:.2f}x")
    print(f"ratio over one epoch of {a.pairs} pairs incl. trainer init and reference precompute: "
          f"{base_epoch:.0f} s / {ours_epoch:.0f} s = {base_epoch / ours_epoch:.2f}x")
    top = next((r for r in results if "top half" in r["name"]), None)
    ckpt = next((r for r in results if r["name"].endswith("checkpointed")), None)
    if top and ckpt:  # the demo recipe's DPO before (every layer, checkpointed for memory) and after dpo.lora_layers
        print(f"ratio (every layer checkpointed / top half of the layers, no checkpointing): "
              f"{ckpt['s_per_step'] / top['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
