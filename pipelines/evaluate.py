"""python pipelines/evaluate.py --recipe recipes/ml100k_smollm2.yaml

The evaluate stage: for the base model and each round's generator (evaluate.rounds), profiles for every
user, a reranker per backbone x seed trained with that knowledge, and the paper's Table I / Table II /
Figure 4 on our data, plus reward distributions and profile quality, in runs/<run>/evaluate/results.md.
Resumable: each generator's sample/encode and each reranker is its own sub-stage, redone only if missing.
"""

from rlrf.cli import run_main, stage_args
from rlrf.evaluate import evaluate_stage


def main() -> None:
    recipe, args = stage_args(__doc__, rounds=False)
    out = evaluate_stage(recipe, force=args.force, recipe_path=args.recipe)
    print(f"evaluate: results in {out / 'results.md'} (tables), {out / 'rounds.png'}, {out / 'rewards.png'}")


if __name__ == "__main__":
    run_main(main)
