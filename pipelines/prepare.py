"""python pipelines/prepare.py --recipe recipes/ml100k_smollm2.yaml

The prepare stage: reads the dataset named by the recipe's data section (ML-100K by default, from
data/raw/ml-100k; `make data` fetches it) and writes KAR's reranking data to runs/<run>/prepare/:
users, items, interactions, lists (4 rated + 6 never-rated items, shuffled) and prompts (the KAR
user prompt in parts). The protocol is in rlrf/prepare.py's docstring; drops are counted in
stage.json. A rerun with the same recipe does nothing; a killed run resumes its missing shards.
"""

from rlrf.artifacts import read_stage_json
from rlrf.cli import run_main, stage_args
from rlrf.prepare import prepare_stage


def main() -> None:
    recipe, args = stage_args(__doc__, rounds=False)
    out = prepare_stage(recipe, force=args.force)
    info = read_stage_json(out, "prepare")
    drops = ", ".join(f"{k}={v}" for k, v in sorted(info["dropped"].items())) or "none"
    print(f"prepare: {info['n_users']} users ({info['users_by_split']}), {info['n_items']} items, "
          f"{info['n_interactions']} ratings, lists {info['lists_by_split']} "
          f"({info['partial_chunk_lists']} from a final partial chunk); dropped: {drops} -> {out}")


if __name__ == "__main__":
    run_main(main)
