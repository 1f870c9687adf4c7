"""python benchmarks/evaluate_rerankers.py --recipe recipes/ml100k_smollm2.yaml [--knowledge DIR] [--backbones dlcm]
       [--seeds 1,2,3,4] [--workers 0] [--baseline one-by-one|float32]

make evaluate's reranker half, timed: the same rerankers (each backbone x seed, the recipe's reranker section with
evaluate.history, and the knowledge of --knowledge, an encode stage such as runs/<run>/evaluate/gen_0/encode, or
none: the base model) trained one by one in this process (the baseline: how make evaluate trained them before) and
--workers at a time in spawned processes (how it trains them now; 0 = one per core, as evaluate.workers), each into
a directory of its own under a temporary root, in the same run. Prints both wall times, the ratio, and whether the
two wrote the same test metrics (they must: same seeds, one torch thread each). Needs the recipe's prepare output.

--baseline float32: the baseline is the same rerankers at --workers in fp32 (reranker.dtype=float32), against the
recipe's reranker.dtype (auto: bf16 autocast where the CPU has AVX512-bf16/AMX); prints the mean test NDCG@5 and MAP@5
of each (bf16 rounds differently, so the metrics move within the seeds' spread rather than match).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from rlrf.config import load_recipe
from rlrf.evaluate import RerankJob, reranker_workers, train_rerankers
from rlrf.machine import machine
from rlrf.rerank import precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--knowledge", default=None, help="an encode stage dir (the profiles as knowledge); none = base")
    ap.add_argument("--backbones", default="dlcm")
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--baseline", choices=["one-by-one", "float32"], default="one-by-one")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    recipe = load_recipe(args.recipe, [*args.overrides, f"evaluate.workers={args.workers}"])
    know = Path(args.knowledge) if args.knowledge else None
    todo = [(b, int(s)) for b in args.backbones.split(",") for s in args.seeds.split(",")]
    workers = reranker_workers(recipe, len(todo))
    ours_name = f"{workers} at a time, reranker.dtype={recipe.reranker.dtype} ({precision(recipe.reranker.dtype)})"
    if args.baseline == "one-by-one":
        plan = [("one by one", recipe, 1), (ours_name, recipe, workers)]
    else:
        plan = [(f"{workers} at a time, float32", dataclasses.replace(
            recipe, reranker=dataclasses.replace(recipe.reranker, dtype="float32")), workers), (ours_name, recipe, workers)]
    walls, metrics = {}, {}
    with tempfile.TemporaryDirectory(prefix="rlrf-rerankers-") as root:
        for i, (name, r, n) in enumerate(plan):
            jobs = [RerankJob(Path(root) / str(i) / f"{b}_{s}", know, b, s) for b, s in todo]
            t0 = time.perf_counter()
            metrics[name] = train_rerankers(r, jobs, n)
            walls[name] = time.perf_counter() - t0
    (base, b_wall), (ours, o_wall) = walls.items()
    print(f"\n{len(todo)} rerankers ({args.backbones}, seeds {args.seeds}, "
          f"{'knowledge ' + str(know) if know else 'no knowledge'}, reranker.threads={recipe.reranker.threads}; "
          f"CPU {machine()['cpu']}, flags {', '.join(machine()['cpu_flags'])})")
    for name, wall in walls.items():
        m = metrics[name]
        ndcg, map5 = np.array([x["ndcg@5"] for x in m]), np.array([x["map@5"] for x in m])
        sd = f" (sd {ndcg.std(ddof=1):.4f})" if len(m) > 1 else ""
        print(f"  {'baseline' if name == base else 'rlrf'}, {name}: {wall:.1f} s; test NDCG@5 {ndcg.mean():.4f}{sd}, "
              f"MAP@5 {map5.mean():.4f}")
    print(f"  ratio {b_wall / o_wall:.2f}x; the same test metrics: {metrics[base] == metrics[ours]}")


if __name__ == "__main__":
    main()
