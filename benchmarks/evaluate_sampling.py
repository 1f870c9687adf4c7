"""python benchmarks/evaluate_sampling.py --recipe recipes/ml100k_smollm2.yaml [--users 128] [--repeats 3]

make evaluate's sampling, timed: one profile for each of the first --users users (the recipe's seeded order,
their prompts as the sample stage fits them, the recipe's decoding and seeds, the profiles ending where they end),
sampled in one process, the two taking turns --repeats times (medians), by
  (a) baseline: rlrf's sampler as make evaluate ran it before, sample.batch_size rows a batch, every row decoded
      until the batch's longest profile ends (HFBackend.leave_ended = False);
  (b) ours: evaluate.batch_size rows a batch, a prompt leaving the batch once it has ended (as make evaluate runs).
Prints users/s of each, the ratio, how many of the texts are the same (all must be: a row's text depends on its
prompt and seed only; bf16 where the CPU has it, as the stage runs) and the process's peak memory after each (the
peak never falls: the second figure is above the first only where ours needed more).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.generate import HFBackend, Sampling
from rlrf.llm import resolve_model
from rlrf.machine import machine
from rlrf.prepare import prepare_stage
from rlrf.sample import fit_prompt, select_users, user_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--users", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="turns of (baseline, ours); medians are printed")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    recipe = load_recipe(a.recipe, a.overrides)
    cfg = recipe.sample
    prepare_stage(recipe)
    users = select_users(read_artifact(runs.prepare_dir(recipe), "prompts", "prepare"), ["train", "valid", "test"], -1,
                         recipe.seed)
    users = users.head(a.users)
    be = HFBackend(str(resolve_model(cfg.model)), cfg.dtype, cfg.batch_size, cfg.threads, pad_to=cfg.max_prompt_tokens)
    ids = [fit_prompt(be.tokenizer, r["prompt_head"], r["history_lines"], r["prompt_tail"], cfg.max_prompt_tokens)[1]
           for r in users.iter_rows(named=True)]
    seeds = [user_seed(recipe.seed, u, 1) for u in users["user_id"]]
    sp = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    be.generate(ids[:1], seeds[:1], Sampling(n=1, max_new_tokens=2))  # warm-up (first-call allocations)
    out, walls, peak = {}, {}, {}
    variants = ((f"static batches of {cfg.batch_size} rows (sample.batch_size)", cfg.batch_size, False),
                (f"batches of {recipe.evaluate.batch_size} rows (evaluate.batch_size), ended prompts leaving",
                 recipe.evaluate.batch_size, True))
    for _ in range(a.repeats):  # the two take turns: a shared box's slow minute falls on both
        for name, batch, leave in variants:
            be.batch_size, be.leave_ended = batch, leave
            t0 = time.perf_counter()
            out[name] = [c[0] for c in be.generate(ids, seeds, sp)]
            walls.setdefault(name, []).append(time.perf_counter() - t0)
            peak.setdefault(name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB; never falls
    (base, b_walls), (ours, o_walls) = walls.items()
    b_wall, o_wall = float(np.median(b_walls)), float(np.median(o_walls))
    hw = machine()
    tokens = sum(c.n_tokens for c in out[ours])
    print(f"\n{len(ids)} users, one profile each ({tokens / len(ids):.0f} new tokens on average, at most "
          f"{cfg.max_new_tokens}; {sum(map(len, ids)) / len(ids):.0f} prompt tokens); CPU {hw['cpu']}, flags "
          f"{', '.join(hw['cpu_flags'])}, {hw.get('torch_threads')} torch threads, dtype {cfg.dtype}")
    for tag, name, w, ws in (("baseline", base, b_wall, b_walls), ("rlrf", ours, o_wall, o_walls)):
        print(f"  {tag}, {name}: median {w:.1f} s of {', '.join(f'{x:.1f}' for x in ws)}, {len(ids) / w:.2f} users/s; "
              f"peak memory after its first run {peak[name]:.2f} GiB")
    same = sum(x.token_ids == y.token_ids for x, y in zip(out[base], out[ours]))
    ratios = [b / o for b, o in zip(b_walls, o_walls)]
    print(f"  ratio {b_wall / o_wall:.2f}x (turn by turn: {', '.join(f'{r:.2f}' for r in ratios)}); the same text for "
          f"{same} of {len(ids)} users")


if __name__ == "__main__":
    main()
