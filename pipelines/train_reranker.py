"""python pipelines/train_reranker.py --recipe recipes/ml100k_smollm2.yaml --round 1

The reward judge: KAR rerankers (DLCM or PRM + hybrid-expert adaptor over profile and item-text
embeddings) cross-fitted over the users with a profile (reranker.folds), so no profile is ever judged by a
model that trained on its user. Judge a (score.judges seeds x folds, averaged) is the reranker reward;
judge b, as many other seeds and fold splits, measures its reliability. Each member trains on the other
folds' users (BCE per item) and early-stops on a held-out share of them (reranker.stop_share). Knowledge:
round k's profiles when reranker.retrain_each_round, else round 1's (sample_idx 0 of each user). Writes
runs/<run>/reranker/: checkpoints/<member>.safetensors, model.json, members.json (who each member saw
and judges), metrics.json (held-out NDCG/MAP@5 of the members next to item popularity on the same lists).
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.judge import train_reranker_stage


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    knowledge = runs.stage_dir(recipe, "encode", runs.reranker_knowledge_round(recipe, k))
    train_reranker_stage(recipe, runs.reranker_dir(recipe, k), knowledge, force=args.force)


if __name__ == "__main__":
    run_main(main)
