"""python pipelines/check.py --recipe recipes/ml100k_smollm2.yaml --round 1

Is it learning? Samples profiles for the valid users from generator k-1 and generator k with the same
seeds (check.users users, check.n profiles each), scores both with round
k's reward reranker and reports the paired difference of mean reward (new - old) with a bootstrap 95%
interval: runs/<run>/round_<k>/check/{stage.json, summary.md, check.png}.
"""

from rlrf.check import check_stage
from rlrf.cli import run_main, stage_args


def main() -> None:
    recipe, args = stage_args(__doc__)
    check_stage(recipe, args.round, force=args.force)


if __name__ == "__main__":
    run_main(main)
