"""python benchmarks/evaluate_sampling.py --recipe recipes/ml100k_smollm2.yaml [--stage evaluate|sample] [--users 128]
       [--repeats 3]

A stage's sampling, timed: --users users (the recipe's seeded order, their prompts as the sample stage fits them,
the recipe's decoding and seeds, the profiles ending where they end), sampled in one process, the two variants
taking turns --repeats times (medians).
  --stage evaluate (default; make evaluate's one profile a user, the first users of train, valid and test):
    (a) baseline: rlrf's sampler as make evaluate ran it before, sample.batch_size rows a batch, every row decoded
        until the batch's longest profile ends (HFBackend.leave = "");
    (b) ours: evaluate.batch_size rows a batch, a profile leaving the batch once it has ended (as make evaluate runs).
  --stage sample (the sample stage's sample.n profiles a user, the first train users, sample.batch_size rows):
    (a) baseline: the sampler before 2026-12-06, a prompt leaving the batch once all its samples have ended
        (HFBackend.leave = "prompts");
    (b) ours: each sample leaving the model's batch as soon as it ends (leave = "rows", as the stages run).
Prints users/s of each, the ratio, the rows the model was fed (decode row-steps: what leaving saves), how many of
the texts are the same (all must be: a row's text depends on its prompt and seed only; bf16 where the CPU has it,
as the stage runs) and the process's peak memory after each (the peak never falls: the second figure is above the
first only where ours needed more).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from rlrf.config import load_recipe
from rlrf.generate import HFBackend, Sampling
from rlrf.llm import resolve_model
from rlrf.machine import machine
from rlrf.sample import bench_prompts


def variants(stage: str, recipe) -> tuple[int, list[str], tuple]:
    """(profiles a user, splits, ((name, rows a batch, HFBackend.leave), baseline first))."""
    rows = recipe.sample.batch_size
    if stage == "evaluate":
        return 1, ["train", "valid", "test"], (
            (f"static batches of {rows} rows (sample.batch_size)", rows, ""),
            (f"batches of {recipe.evaluate.batch_size} rows (evaluate.batch_size), ended profiles leaving",
             recipe.evaluate.batch_size, "rows"))
    return recipe.sample.n, ["train"], (
        (f"{rows} rows a batch (sample.batch_size), a prompt leaving once its samples have ended", rows, "prompts"),
        (f"{rows} rows a batch, each sample leaving as it ends", rows, "rows"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--stage", choices=["evaluate", "sample"], default="evaluate")
    ap.add_argument("--users", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="turns of (baseline, ours); medians are printed")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    recipe = load_recipe(a.recipe, a.overrides)
    cfg = recipe.sample
    n, splits, runs = variants(a.stage, recipe)
    be = HFBackend(str(resolve_model(cfg.model)), cfg.dtype, cfg.batch_size, cfg.threads, pad_to=cfg.max_prompt_tokens)
    ids, seeds = bench_prompts(recipe, be.tokenizer, splits, a.users)
    sp = Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                  min_new_tokens=cfg.min_new_tokens)
    be.generate(ids[:1], seeds[:1], Sampling(n=1, max_new_tokens=2))  # warm-up (first-call allocations)
    fed = [0]  # rows through the model, decode steps only (a prefill is one row of many tokens)
    be.model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: fed.__setitem__(0, fed[0] + (i[0].shape[0] if i[0].shape[1] == 1 else 0)))
    out, walls, peak, row_steps = {}, {}, {}, {}
    for _ in range(a.repeats):  # the two take turns: a shared box's slow minute falls on both
        for name, batch, leave in runs:
            be.batch_size, be.leave = batch, leave
            fed[0] = 0
            t0 = time.perf_counter()
            out[name] = [c for cs in be.generate(ids, seeds, sp) for c in cs]
            walls.setdefault(name, []).append(time.perf_counter() - t0)
            row_steps[name] = fed[0]
            peak.setdefault(name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB; never falls
    (base, b_walls), (ours, o_walls) = walls.items()
    b_wall, o_wall = float(np.median(b_walls)), float(np.median(o_walls))
    hw = machine()
    tokens = sum(c.n_tokens for c in out[ours])
    print(f"\n{len(ids)} users, {n} profile(s) each ({tokens / len(out[ours]):.0f} new tokens on average, at most "
          f"{cfg.max_new_tokens}; {sum(map(len, ids)) / len(ids):.0f} prompt tokens); CPU {hw['cpu']}, flags "
          f"{', '.join(hw['cpu_flags'])}, {hw.get('torch_threads')} torch threads, dtype {cfg.dtype}")
    for tag, name, w, ws in (("baseline", base, b_wall, b_walls), ("rlrf", ours, o_wall, o_walls)):
        print(f"  {tag}, {name}: median {w:.1f} s of {', '.join(f'{x:.1f}' for x in ws)}, {len(ids) / w:.2f} users/s; "
              f"{row_steps[name]} decode row-steps; peak memory after its first run {peak[name]:.2f} GiB")
    same = sum(x.token_ids == y.token_ids for x, y in zip(out[base], out[ours]))
    ratios = [b / o for b, o in zip(b_walls, o_walls)]
    print(f"  ratio {b_wall / o_wall:.2f}x (turn by turn: {', '.join(f'{r:.2f}' for r in ratios)}); the same text for "
          f"{same} of {len(out[ours])} profiles")


if __name__ == "__main__":
    main()
