"""python pipelines/grpo.py --recipe recipes/ml100k_smollm2.yaml --round 1 rounds.trainer=grpo

GRPO on the train users' KAR prompts: TRL's GRPOTrainer with a LoRA adapter samples grpo.num_generations
profiles per prompt with the current policy (rlrf's sampler), rewards each with grpo.reward (default
score.reward; training-free judges only) and tunes generator k-1 into generator k, online. Writes
runs/<run>/round_<k>/grpo/{adapter/, merged/ (generator k), train_log.csv, grpo.png, rollouts.parquet,
checkpoints/}. A killed run resumes from its last checkpoint (grpo.save_steps). Needs rounds.trainer=grpo, so
that the check, the next round and evaluate take this stage's generator as generator k (`make grpo1` sets it).
"""

from rlrf.cli import run_main, stage_args
from rlrf.trainers import train_round


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    out = train_round(recipe, "grpo", k, force=args.force)  # rlrf.grpo.make_generator, when rounds.trainer=grpo
    print(f"grpo: generator {k} -> {out / 'merged'}")


if __name__ == "__main__":
    run_main(main)
