"""python pipelines/train_reranker.py --recipe recipes/ml100k_smollm2.yaml --round 1

The reward reranker (KAR: DLCM or PRM + hybrid-expert adaptor over profile and item-text
embeddings), trained on train users' lists with BCE per item and early-stopped on valid MAP@5,
one model per reranker.seeds. Knowledge: round k's profiles when reranker.retrain_each_round, else
round 1's (sample_idx 0 of each user). reranker.knowledge=false trains the base model. Writes
runs/<run>/reranker/: checkpoints/seed_<s>.safetensors, model.json, metrics.json (MAP/NDCG@1,3,5,7
on valid and test, per seed and mean/std) and predictions/ (one row per list).
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.rerank import train_stage


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    knowledge = runs.stage_dir(recipe, "encode", runs.reranker_knowledge_round(recipe, k)) if recipe.reranker.knowledge else None
    train_stage(recipe, runs.reranker_dir(recipe, k), knowledge, force=args.force)


if __name__ == "__main__":
    run_main(main)
