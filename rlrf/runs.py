"""Where every stage of a run lives, and which generator a round samples from.

    runs/<run>/prepare/                     users, items, interactions, lists, prompts
    runs/<run>/round_<k>/sample/            profiles sampled from generator k-1 (round 1: the base model)
    runs/<run>/round_<k>/encode/            user_texts (+ the shared cache runs/<run>/embeddings/)
    runs/<run>/reranker/                    the reward reranker (round_<k>/reranker/ when retrained each round)
    runs/<run>/round_<k>/score/             one reward per profile
    runs/<run>/round_<k>/pairs/             preference pairs + LLaMA-Factory export
    runs/<run>/round_<k>/dpo/               adapter, merged model (= generator k), training log
    runs/<run>/round_<k>/check/             is-it-learning: generator k-1 vs k on valid users
    runs/<run>/evaluate/                    results.md, results.json, plots
"""

from __future__ import annotations

from pathlib import Path

from rlrf.config import Recipe

# Every stage, in the order a round runs them (grpo makes the generator instead of pairs + dpo when
# rounds.trainer=grpo): each is `rlrf <name>` and pipelines/<name, "-" as "_">.py.
STAGES = ("prepare", "sample", "encode", "train-reranker", "score", "pairs", "dpo", "grpo", "check", "evaluate")


def script(stage: str) -> str:
    """The stage's script under pipelines/ (shipped as rlrf.pipelines)."""
    return stage.replace("-", "_")


def prepare_dir(r: Recipe) -> Path:
    return r.run_dir / "prepare"


def round_dir(r: Recipe, k: int) -> Path:
    if k < 1:
        raise ValueError(f"rounds count from 1 (round k samples from generator k-1); got round {k}")
    return r.run_dir / f"round_{k}"


def stage_dir(r: Recipe, stage: str, k: int) -> Path:
    return round_dir(r, k) / stage


def embeddings_cache(r: Recipe) -> Path:
    return r.run_dir / "embeddings"


def reranker_dir(r: Recipe, k: int) -> Path:
    """The reward reranker used to score round k (trained once in round 1 unless retrained each round)."""
    if r.reranker.retrain_each_round:
        return round_dir(r, k) / "reranker"
    return r.run_dir / "reranker"


def reranker_knowledge_round(r: Recipe, k: int) -> int:
    """Whose profiles the reward reranker of round k learns from (the round whose sample it reads)."""
    return k if r.reranker.retrain_each_round else 1


def trainer_stage(r: Recipe) -> str:
    """The stage that makes a round's generator: dpo (RLRF4Rec, from the pairs) or grpo (online, rounds.trainer)."""
    return r.rounds.trainer


def generator_dir(r: Recipe, k: int) -> Path:
    """Generator k's merged model (k >= 1): written by round k's dpo stage (whichever backend trained it), or by
    its grpo stage when rounds.trainer=grpo."""
    return stage_dir(r, trainer_stage(r), k) / "merged"


def generator(r: Recipe, k: int) -> str:
    """Generator k, the one name for it everywhere: the base model (sample.model) for k = 0, round k's merged
    model after that. Round k samples from generator k-1 and writes generator k."""
    if k < 0:
        raise ValueError(f"generators count from 0 (the base model); got generator {k}")
    return r.sample.model if k == 0 else str(generator_dir(r, k))


def generator_for_round(r: Recipe, k: int) -> str:
    """What round k samples from: generator k-1 (the base model for round 1)."""
    round_dir(r, k)  # refuses k < 1
    return generator(r, k - 1)


def cache_dir() -> Path:
    """Models converted once, wheels, and other reusable downloads: $RLRF_CACHE or ~/.cache/rlrf."""
    import os

    return Path(os.environ.get("RLRF_CACHE", Path.home() / ".cache" / "rlrf"))
