"""python benchmarks/evaluate_rerankers.py --recipe recipes/ml100k_smollm2.yaml [--knowledge DIR] [--backbones dlcm]
       [--seeds 1,2,3,4] [--workers 0]

make evaluate's reranker half, timed: the same rerankers (each backbone x seed, the recipe's reranker section with
evaluate.history, and the knowledge of --knowledge, an encode stage such as runs/<run>/evaluate/gen_0/encode, or
none: the base model) trained one by one in this process (the baseline: how make evaluate trained them before) and
--workers at a time in spawned processes (how it trains them now; 0 = one per core, as evaluate.workers), each into
a directory of its own under a temporary root, in the same run. Prints both wall times, the ratio, and whether the
two wrote the same test metrics (they must: same seeds, one torch thread each). Needs the recipe's prepare output.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rlrf.config import load_recipe
from rlrf.evaluate import RerankJob, reranker_workers, train_rerankers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--knowledge", default=None, help="an encode stage dir (the profiles as knowledge); none = base")
    ap.add_argument("--backbones", default="dlcm")
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    recipe = load_recipe(args.recipe, [*args.overrides, f"evaluate.workers={args.workers}"])
    know = Path(args.knowledge) if args.knowledge else None
    todo = [(b, int(s)) for b in args.backbones.split(",") for s in args.seeds.split(",")]
    workers = reranker_workers(recipe, len(todo))
    walls, metrics = {}, {}
    with tempfile.TemporaryDirectory(prefix="rlrf-rerankers-") as root:
        for name, n in (("one by one", 1), (f"{workers} at a time", workers)):
            jobs = [RerankJob(Path(root) / name.replace(" ", "_") / f"{b}_{s}", know, b, s) for b, s in todo]
            t0 = time.perf_counter()
            metrics[name] = train_rerankers(recipe, jobs, n)
            walls[name] = time.perf_counter() - t0
    (base, b_wall), (ours, o_wall) = walls.items()
    same = metrics[base] == metrics[ours]
    print(f"\n{len(todo)} rerankers ({args.backbones}, seeds {args.seeds}, "
          f"{'knowledge ' + str(know) if know else 'no knowledge'}, reranker.threads={recipe.reranker.threads})")
    print(f"  baseline, {base}: {b_wall:.1f} s")
    print(f"  rlrf, {ours}: {o_wall:.1f} s")
    print(f"  ratio {b_wall / o_wall:.2f}x; the same test metrics: {same}")


if __name__ == "__main__":
    main()
