"""python pipelines/pairs.py --recipe recipes/ml100k_smollm2.yaml --round 1

Round k's preference pairs: per training user, the best and the worst of the N scored profiles become
(chosen, rejected); ties and gaps <= pairs.min_margin are dropped and counted. Writes
runs/<run>/round_<k>/pairs/pairs/*.parquet (TRL conversational format) and, with
pairs.llamafactory_export, pairs/llamafactory/{rlrf_pairs_round<k>.json, dataset_info.json}.
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.pairs import pairs_stage


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    pairs_stage(recipe, runs.stage_dir(recipe, "sample", k), runs.stage_dir(recipe, "score", k),
                runs.stage_dir(recipe, "pairs", k), k, force=args.force)


if __name__ == "__main__":
    run_main(main)
