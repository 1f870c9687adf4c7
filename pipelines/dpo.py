"""python pipelines/dpo.py --recipe recipes/ml100k_smollm2.yaml --round 1

DPO on round k's pairs: TRL DPOTrainer with a LoRA adapter (the reference is the base with the adapter
disabled) tunes generator k-1 (round 1: the base model) into generator k. Writes
runs/<run>/round_<k>/dpo/{adapter/, merged/ (generator k), train_log.csv, loss.png, checkpoints/}.
A killed run resumes from its last checkpoint (dpo.save_steps). `dpo.backend=llamafactory` writes a
LLaMA-Factory recipe there instead and runs `llamafactory-cli train` on it (`make llamafactory-env`).
"""

from rlrf.cli import run_main, stage_args
from rlrf.trainers import train_round


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    out = train_round(recipe, "dpo", k, force=args.force)  # rlrf.dpo.make_generator, when rounds.trainer=dpo
    scaled = "" if recipe.dpo.merge_scale == 1 else f" (generator {k - 1} + {recipe.dpo.merge_scale:g} x the update)"
    print(f"dpo: generator {k} -> {out / 'merged'}{scaled}")


if __name__ == "__main__":
    run_main(main)
