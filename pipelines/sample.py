"""python pipelines/sample.py --recipe recipes/ml100k_smollm2.yaml --round 1

The sample stage of round k: sample.n preference profiles per user of sample.splits from generator
k-1 (round 1: the base model sample.model; round k > 1: runs/<run>/round_<k-1>/dpo/merged, at the temperature
round k-1's check measured it at where sample.temperature_from_check is set), written
as the `profiles` artifact to runs/<run>/round_<k>/sample/. Sharded by user (sample.shards): a killed
run resumes where it stopped, and `--shard i/n` runs one slice so a Slurm array or Ray job can run
slices side by side (the last slice to finish writes stage.json). Each user's samples are seeded from
(seed, user_id, round, sample_idx), so every way of running it gives the same texts.

    python pipelines/sample.py --recipe recipes/tiny.yaml --round 1 --shard 0/2 sample.threads=1
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.sample import sample_stage


def main() -> None:
    recipe, args = stage_args(__doc__, shards=True)
    generator = runs.generator_for_round(recipe, args.round)
    at = runs.for_generator(recipe, args.round - 1)  # sample.temperature_from_check: generator k-1's own decoding
    if at.sample != recipe.sample:
        a, r = at.sample, recipe.sample
        cut = (f", top_p {a.top_p:g}, min_p {a.min_p:g}" if (a.top_p, a.min_p) != (r.top_p, r.min_p) else "")
        print(f"sample: round {args.round} samples generator {args.round - 1} at temperature {a.temperature:g}{cut}, "
              f"the decoding round {args.round - 1}'s check measured it at (sample.temperature_from_check; "
              f"sample.temperature is {r.temperature:g}, top_p {r.top_p:g}, min_p {r.min_p:g})")
    recipe = at
    out = runs.stage_dir(recipe, "sample", args.round)
    sample_stage(recipe, out, generator, args.round, force=args.force, shard=args.shard)


if __name__ == "__main__":
    run_main(main)
