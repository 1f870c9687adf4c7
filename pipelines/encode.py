"""python pipelines/encode.py --recipe recipes/ml100k_smollm2.yaml --round 1

Round k's text embeddings: every sampled profile (the LLM's answer only, not the prompt: the encoder
truncates at encode.max_seq_length tokens) and every item text, with encode.encoder
(all-MiniLM-L6-v2 offline by default). Embeddings go to the run's shared cache
runs/<run>/embeddings/ keyed by hash(encoder, text), so no text is encoded twice across rounds;
runs/<run>/round_<k>/encode/ gets user_texts and item_texts pointing into it.
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.encode import encode_stage


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    encode_stage(recipe, runs.stage_dir(recipe, "sample", k), runs.stage_dir(recipe, "encode", k), force=args.force)


if __name__ == "__main__":
    run_main(main)
