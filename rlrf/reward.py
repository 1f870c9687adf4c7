"""The reward of a profile: one interface and the judges behind it (REWARDS); the score stage (rlrf/score.py) calls it.

The interface: `ProfileReward(texts, user_ids) -> {"reward": (P,), <metric>: (P,), ...}` embeds the profile
texts with the run's encoder (through the embedding cache) and scores them; `as_reward_func()` wraps it as
TRL's reward function `f(prompts, completions, user_id, **kwargs) -> list[float]` for GRPO/RLOO trainers.
Underneath, a scorer maps profile embeddings to rewards, `score_vectors(vecs, user_ids) -> {"reward": ...}`:

- `retrieval` (rlrf.retrieval.RetrievalReward): NDCG of the user's held-out positives ranked by cosine
  similarity in the encoder's space; nothing trained, nothing in-sample.
- `lexical`: the same in a word TF-IDF space fitted on the item texts (rlrf.retrieval.Lexical).
- `genres`: the same in the catalogue's genre space (rlrf.retrieval.Genres: the genres a profile names in words
  against each item's genre labels, ties broken by popularity in the prompt histories).
- `reranker` (rlrf.judge.RerankerJudge): KAR rerankers cross-fitted over users; each profile is scored only
  by members that never saw its user, by what follows.

The reranker reward of a profile = the reranker's ranking quality (score.metric, NDCG@5 by default) averaged
over the profile's user's own lists (the lists of its split), with the profile's embedding as the
user vector, plus score.tie_break * tanh(margin), margin = the mean score of the positives minus that of
the negatives. NDCG@k is a step function of the scores: a user's entirely different profiles often get the
exact same NDCG@5, and the pairs stage would drop that user. The margin is continuous and never ties, and a
weight of 1e-6 keeps it from reordering profiles whose metric differs (their gaps are far larger). All profiles of
a shard go through one batched forward per `score.batch_size` profiles:
each list row carries the index of the profile it is scored for, the adaptor's user task runs once per
profile and its item task once per distinct item, so a profile costs almost nothing beside encoding it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.errors import StageError

METRICS = tuple(f"{m}@{k}" for m in ("ndcg", "map") for k in (1, 3, 5, 7))


def list_metric(scores: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    """Per-list values of `ndcg@k` or `map@k` (rlrf.metrics: KAR's definitions)."""
    from rlrf import metrics

    kind, k = re.fullmatch(r"(ndcg|map)@(\d+)", name).groups()
    fn = metrics.ndcg_at_k if kind == "ndcg" else metrics.map_at_k
    return np.asarray(fn(scores, labels, int(k)), dtype=np.float64)


@torch.no_grad()
def score_lists(model, user_vecs: np.ndarray, owner: np.ndarray, item_ids: np.ndarray,
                batch_profiles: int = 512, progress: bool = False, row_users: np.ndarray | None = None) -> np.ndarray:
    """Reranker scores (R, L) of list rows `item_ids`, row r scored with profile `owner[r]`'s embedding
    (and, for a reranker with history features, user `row_users[r]`'s history).

    `owner` must be sorted (rows grouped by profile); one forward per `batch_profiles` profiles.
    """
    if len(owner) == 0:
        return np.zeros(item_ids.shape, dtype=np.float32)
    if np.any(np.diff(owner) < 0):
        raise ValueError("owner must be sorted: group each profile's list rows together")
    P = len(user_vecs)
    bounds = np.searchsorted(owner, np.arange(0, P + batch_profiles, batch_profiles).clip(max=P))
    out = np.zeros(item_ids.shape, dtype=np.float32)
    vecs = torch.from_numpy(np.ascontiguousarray(user_vecs, dtype=np.float32))
    users = None if row_users is None else torch.from_numpy(np.asarray(row_users, dtype=np.int64))
    for b in tqdm(range(len(bounds) - 1), desc="reward forward", leave=False, disable=not progress):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        p0 = b * batch_profiles
        p1 = min(p0 + batch_profiles, P)
        idx = torch.from_numpy(owner[lo:hi] - p0)
        kw = {} if users is None else {"user_ids": users[lo:hi]}
        out[lo:hi] = model(torch.from_numpy(item_ids[lo:hi]), vecs[p0:p1], idx, **kw).float().numpy()
    return out


def list_margin(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per list: mean logit of the positives minus mean logit of the negatives (NaN without both).

    Continuous where NDCG@k is a step function of the scores, so it tells apart two profiles whose
    rankings come out the same (the `margin` column of scores)."""
    y = labels > 0
    n_pos, n_neg = y.sum(1), (~y).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0),
                        (scores * y).sum(1) / n_pos - (scores * ~y).sum(1) / n_neg, np.nan)


def profile_rewards(scores: np.ndarray, labels: np.ndarray, owner: np.ndarray, n_profiles: int,
                    metrics: tuple[str, ...] = METRICS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each metric averaged over each profile's lists: ({metric: (P,)}, n_lists (P,)); NaN where no lists."""
    n = np.bincount(owner, minlength=n_profiles).astype(np.int64)
    out = {}
    for m in metrics:
        if m == "margin":
            per = list_margin(scores, labels) if len(scores) else np.zeros(0)
            ok = ~np.isnan(per)
            cnt = np.bincount(owner[ok], minlength=n_profiles)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m] = np.where(cnt > 0, np.bincount(owner[ok], weights=per[ok], minlength=n_profiles) / np.maximum(cnt, 1), np.nan)
            continue
        per_list = list_metric(scores, labels, m) if len(scores) else np.zeros(0)
        total = np.bincount(owner, weights=per_list, minlength=n_profiles)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[m] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return out, n


def with_tie_break(metric: np.ndarray, margin: np.ndarray, tie_break: float) -> np.ndarray:
    """metric + tie_break * tanh(margin): equal metrics are ordered by the margin, different ones never swap
    (as long as their gap exceeds 2 * tie_break)."""
    return metric + tie_break * np.tanh(np.nan_to_num(margin))


def reward_profiles(model, user_vecs: np.ndarray, profile_users: np.ndarray, lists: pl.DataFrame,
                    metric: str = "ndcg@5", batch_profiles: int = 512,
                    progress: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The reward API: score P profiles (embeddings `user_vecs`, owners `profile_users`) on their users' lists.

    Returns ({metric: (P,)} for `metric`, every metric in METRICS and "margin", n_lists (P,)).
    """
    from rlrf.rerank_data import lists_arrays

    P = len(profile_users)
    prof = pl.DataFrame({"user_id": np.asarray(profile_users, dtype=np.int64), "p": np.arange(P, dtype=np.int64)})
    rows = prof.join(lists.select("list_id", "user_id", "item_ids", "labels"), on="user_id", how="inner").sort("p", "list_id")
    arr = lists_arrays(rows, "lists")
    owner = rows["p"].to_numpy()
    uses_history = getattr(getattr(model, "spec", None), "history", 0)
    scores = score_lists(model, user_vecs, owner, arr["item_ids"], batch_profiles, progress,
                         row_users=arr["user_id"] if uses_history else None)
    names = tuple(dict.fromkeys((metric, *METRICS, "margin")))
    return profile_rewards(scores, arr["labels"], owner, P, names)


# ----------------------------------------------------------------------------- the interface


class ProfileReward:
    """reward(profile_texts, user_ids) -> {"reward": (P,), ...}: texts embedded by the run's encoder, then scored.

    NaN where the user has nothing to be judged on (no held-out positive, no list)."""

    def __init__(self, scorer, embed, name: str | None = None):
        self.scorer, self.embed = scorer, embed
        self.name = name or scorer.name

    def __call__(self, texts, user_ids) -> dict[str, np.ndarray]:
        texts = ["" if t is None else str(t) for t in texts]
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if len(texts) != len(user_ids):
            raise ValueError(f"reward: {len(texts)} profile texts but {len(user_ids)} user ids")
        if not texts:
            return {"reward": np.zeros(0)}
        return self.scorer.score_vectors(self.embed(texts), user_ids)

    def as_reward_func(self, nan_as: float = 0.0):
        """TRL's reward function: `f(prompts, completions, user_id, **kwargs) -> list[float]` (GRPOTrainer's
        `reward_funcs`); `user_id` is the dataset column of that name, a completion is a string or a
        conversational list whose last message is the profile. A user with nothing to judge gets `nan_as`."""
        def reward_func(prompts=None, completions=None, user_id=None, **kwargs) -> list[float]:
            if user_id is None:
                raise ValueError("rlrf reward: the dataset needs a `user_id` column (TRL passes it as a keyword)")
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            r = self(texts, user_id)["reward"]
            return [nan_as if np.isnan(v) else float(v) for v in r]

        reward_func.__name__ = f"rlrf_{self.name}"
        return reward_func


def text_embedder(recipe: Recipe):
    """texts -> embeddings with the recipe's encoder, through the run's embedding cache (no text encoded twice)."""
    from rlrf.encode import encode_texts, load_encoder, open_cache

    cache = []  # opened on first use, then kept: reading every cache part again per call would dominate a trainer's loop

    def embed(texts: list[str]) -> np.ndarray:
        if not cache:
            cache.append(open_cache(recipe))
        keys, _ = encode_texts(load_encoder(recipe.encode), cache[0], list(texts), recipe.encode.batch_size,
                               progress=False)
        return cache[0].get(keys)

    return embed


def retrieval_scorer(recipe: Recipe, item_vecs: np.ndarray | None = None, embed=None, tie_break: bool = False):
    """The retrieval reward of a run: items embedded by `embed` (default: the recipe's encoder through the cache)
    unless their vectors are given; `tie_break` orders equal cosines by item popularity (a coarse space's ties)."""
    from rlrf.retrieval import RetrievalReward, popularity_tie_break

    prep = runs.prepare_dir(recipe)
    items = read_artifact(prep, "items", "prepare").sort("item_id")
    inter = read_artifact(prep, "interactions", "prepare")
    if item_vecs is None:
        vecs = (embed or text_embedder(recipe))(items["text"].to_list())
        item_vecs = np.zeros((int(items["item_id"].max()) + 1, vecs.shape[1]), np.float32)
        item_vecs[items["item_id"].to_numpy()] = vecs
    scorer = RetrievalReward.from_artifacts(item_vecs, read_artifact(prep, "lists", "prepare"), inter, items,
                                            recipe.score.retrieval_candidates, recipe.score.retrieval_k,
                                            tie_break=popularity_tie_break(inter, len(item_vecs)) if tie_break else None)
    scorer.contrast, scorer.contrast_seed = recipe.score.contrast, recipe.seed
    scorer.contrast_weight = recipe.score.contrast_weight
    return scorer


def lexical_embedder(recipe: Recipe):
    """texts -> word TF-IDF vectors fitted on the run's item texts (rlrf.retrieval.Lexical)."""
    from rlrf.retrieval import Lexical

    return Lexical(read_artifact(runs.prepare_dir(recipe), "items", "prepare").sort("item_id")["text"].to_list())


def _lexical_space(recipe: Recipe):
    embed = lexical_embedder(recipe)
    return retrieval_scorer(recipe, embed=embed), embed


def _genres_space(recipe: Recipe):
    from rlrf.retrieval import Genres

    embed = Genres(read_artifact(runs.prepare_dir(recipe), "items", "prepare"))
    return retrieval_scorer(recipe, item_vecs=embed.item_vecs, tie_break=True), embed


def text_space(recipe: Recipe, kind: str):
    """(scorer, texts -> vectors) of a judge that reads the profile text in a space of its own (REWARDS[kind].space)."""
    judge = REWARDS.get(kind)
    if judge is None or judge.space is None:
        raise ValueError(f"no text space {kind!r}: {' | '.join(k for k, j in REWARDS.items() if j.space)}")
    scorer, embed = judge.space(recipe)
    scorer.name = kind
    return scorer, embed


def judge_scorer(recipe: Recipe, reranker_dir: str | Path, judge: str = "a", know_dim: int | None = None):
    """Judge `judge` (a: the reward, b: its independent twin) of a cross-fitted train-reranker stage."""
    from rlrf.judge import RerankerJudge
    from rlrf.rerank import RerankerSpec

    prep = runs.prepare_dir(recipe)
    lists = read_artifact(prep, "lists", "prepare")
    spec_path = Path(reranker_dir) / "model.json"
    if not spec_path.is_file():
        raise StageError(f"{reranker_dir} holds no trained judge (model.json missing): run "
                         f"`python pipelines/train_reranker.py --recipe <recipe> --round <k>` first")
    spec = RerankerSpec.from_dict(json.loads(spec_path.read_text()))
    if not spec.knowledge:
        raise StageError(f"{reranker_dir} is a base reranker (reranker.knowledge=false): it ignores the profile, "
                         f"so every profile would get the same reward. Train the reward reranker with "
                         f"reranker.knowledge=true.")
    n_users = int(read_artifact(prep, "users", "prepare")["user_id"].max() or 0) + 1
    expect = _expected_spec(recipe, read_artifact(prep, "items", "prepare"), lists,
                            spec.know_dim if know_dim is None else know_dim, spec, n_users)
    return RerankerJudge.load(reranker_dir, judge, lists, recipe.score.metric, recipe.score.tie_break,
                              recipe.score.batch_size, expect=expect)


def load_reward(recipe: Recipe, round: int = 1, kind: str | None = None) -> ProfileReward:
    """The reward of round `round` as a plain function of profile texts and user ids (score.reward by default)."""
    kind = kind or recipe.score.reward
    if kind not in REWARDS:
        raise ValueError(f"no reward {kind!r}; choose one of {', '.join(REWARDS)}")
    if kind == "reranker":
        return ProfileReward(judge_scorer(recipe, runs.reranker_dir(recipe, round)), text_embedder(recipe), kind)
    if kind == "retrieval":
        return ProfileReward(retrieval_scorer(recipe), text_embedder(recipe), kind)
    scorer, embed = text_space(recipe, kind)
    return ProfileReward(scorer, embed, kind)


@dataclass(frozen=True)
class Judge:
    """One judge of a profile, as the score stage writes it and the check names it."""
    column: str                  # its reward column in the scores artifact (as score.reward: the pair-picking one)
    halves: tuple[str, str]      # its two independent halves (twins), whose agreement is its reliability
    label: str                   # how the check and the reports name it
    check_column: str = ""       # the column the check compares ("" = column)
    space: Callable | None = None  # recipe -> (scorer, texts -> vectors): a judge reading the text in its own space
    personal: bool = True        # has a personal part (score.contrast: own user minus other users)


# score.reward -> its judge: adding a reward that reads the text in a space of its own is one `space` function and
# one line here (and its name in rlrf/config/keys.py's Reward, from which grpo.reward's and pairs.agree_with's
# values follow)
REWARDS: dict[str, Judge] = {
    "retrieval": Judge("retrieval", ("retrieval_a", "retrieval_b"), "retrieval (encoder cosine)"),
    "genres": Judge("genres", ("genres_a", "genres_b"), "genres (catalogue genres named)", space=_genres_space),
    "lexical": Judge("lexical", ("lexical_a", "lexical_b"), "lexical (TF-IDF cosine)", space=_lexical_space),
    "reranker": Judge("judge_a", ("judge_a", "judge_b"), "reranker judges a+b (cross-fitted)", check_column="judge_ab",
                      personal=False),
}


def _expected_spec(recipe: Recipe, items: pl.DataFrame, lists: pl.DataFrame, know_dim: int, spec, n_users: int):
    from rlrf.encode import encoder_id
    from rlrf.rerank import RerankerSpec
    from rlrf.rerank_data import item_tables

    attr = item_tables(items)
    sizes = lists["item_ids"].list.len().unique().to_list()
    return RerankerSpec(backbone=spec.backbone, knowledge=True, n_items=len(attr), n_attributes=int(attr.max()) + 1,
                        list_size=max(sizes) if sizes else 0, know_dim=know_dim, encoder=encoder_id(recipe.encode),
                        history=spec.history, n_users=n_users if spec.history else 0)
