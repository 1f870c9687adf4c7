"""python pipelines/score.py --recipe recipes/ml100k_smollm2.yaml --round 1

Round k's rewards: each sampled profile's embedding is the user vector of the reward reranker, and
its reward is the reranker's score.metric (NDCG@5) averaged over that user's own lists, with exact ties
broken by the reranker's positive-vs-negative score margin (score.tie_break, 1e-6). One
batched forward per score.batch_size profiles. Writes runs/<run>/round_<k>/score/scores/ (reward
plus every MAP/NDCG@1,3,5,7) and a summary in stage.json: reward mean, the spread among a user's N
profiles, and the share of users whose N profiles all tie (they give the pairs stage nothing).
"""

from rlrf import runs
from rlrf.cli import run_main, stage_args
from rlrf.score import score_stage


def main() -> None:
    recipe, args = stage_args(__doc__)
    k = args.round
    score_stage(recipe, runs.stage_dir(recipe, "sample", k), runs.stage_dir(recipe, "encode", k),
                runs.reranker_dir(recipe, k), runs.stage_dir(recipe, "score", k), force=args.force)


if __name__ == "__main__":
    run_main(main)
