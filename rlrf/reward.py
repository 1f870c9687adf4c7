"""The reward of a profile: one interface, three judges behind it, and the score stage that calls them.

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
the negatives. NDCG@k is a step function of the scores: with SmolLM2-135M round-1 profiles, 28% of
ML-100K valid/test users got the exact same NDCG@5 from four entirely different profiles (DLCM KAR;
PRM 9%), so the pairs stage would drop them. The margin is continuous and never ties, and a 1e-6
weight keeps it from reordering profiles whose metric differs (their gaps are >= 2e-5 measured). All profiles of a shard go through one batched forward per `score.batch_size` profiles:
each list row carries the index of the profile it is scored for, the adaptor's user task runs once per
profile and its item task once per distinct item, so a profile costs almost nothing beside encoding it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from rlrf import runs, schema
from rlrf.config import Recipe, fingerprint
from rlrf.store import Stage, StageError, read_artifact, read_stage_json

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
    return scorer


def lexical_embedder(recipe: Recipe):
    """texts -> word TF-IDF vectors fitted on the run's item texts (rlrf.retrieval.Lexical)."""
    from rlrf.retrieval import Lexical

    return Lexical(read_artifact(runs.prepare_dir(recipe), "items", "prepare").sort("item_id")["text"].to_list())


def text_space(recipe: Recipe, kind: str):
    """(scorer, texts -> vectors) of a judge that reads the profile text itself: lexical or genres."""
    from rlrf.retrieval import Genres

    if kind == "lexical":
        embed = lexical_embedder(recipe)
        scorer = retrieval_scorer(recipe, embed=embed)
    elif kind == "genres":
        embed = Genres(read_artifact(runs.prepare_dir(recipe), "items", "prepare"))
        scorer = retrieval_scorer(recipe, item_vecs=embed.item_vecs, tie_break=True)
    else:
        raise ValueError(f"no text space {kind!r}: lexical | genres")
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
    return REWARDS[kind](recipe, round, kind)


def _text_reward(recipe: Recipe, round: int, kind: str) -> ProfileReward:
    scorer, embed = text_space(recipe, kind)
    return ProfileReward(scorer, embed, kind)


def _retrieval_reward(recipe: Recipe, round: int, kind: str) -> ProfileReward:
    return ProfileReward(retrieval_scorer(recipe), text_embedder(recipe), kind)


def _reranker_reward(recipe: Recipe, round: int, kind: str) -> ProfileReward:
    return ProfileReward(judge_scorer(recipe, runs.reranker_dir(recipe, round)), text_embedder(recipe), kind)


# score.reward -> loader(recipe, round, kind) -> ProfileReward
REWARDS = {"reranker": _reranker_reward, "retrieval": _retrieval_reward, "lexical": _text_reward,
           "genres": _text_reward}


# ----------------------------------------------------------------------------- the stage


def _expected_spec(recipe: Recipe, items: pl.DataFrame, lists: pl.DataFrame, know_dim: int, spec, n_users: int):
    from rlrf.encode import encoder_id
    from rlrf.rerank import RerankerSpec
    from rlrf.rerank_data import item_tables

    attr = item_tables(items)
    sizes = lists["item_ids"].list.len().unique().to_list()
    return RerankerSpec(backbone=spec.backbone, knowledge=True, n_items=len(attr), n_attributes=int(attr.max()) + 1,
                        list_size=max(sizes) if sizes else 0, know_dim=know_dim, encoder=encoder_id(recipe.encode),
                        history=spec.history, n_users=n_users if spec.history else 0)


def spread_summary(scores: pl.DataFrame) -> dict:
    """Reward mean, within-user spread (max-min, std among a user's N) and the share of users whose N tie."""
    ok = scores.filter(pl.col("reward").is_not_nan())
    per_user = ok.group_by("user_id").agg(
        pl.len().alias("n"), (pl.col("reward").max() - pl.col("reward").min()).alias("range"),
        pl.col("reward").std(ddof=0).alias("std"))
    multi = per_user.filter(pl.col("n") >= 2)
    tie = multi.filter(pl.col("range") <= 1e-12)
    f = lambda x: None if x is None else float(x)  # noqa: E731
    return {
        "reward_mean": f(ok["reward"].mean()), "reward_std": f(ok["reward"].std(ddof=0)),
        "within_user_range_mean": f(multi["range"].mean()), "within_user_std_mean": f(multi["std"].mean()),
        "users": per_user.height, "users_with_2plus": multi.height,
        "all_tie_share": (tie.height / multi.height) if multi.height else None,
        "empty_text": int(scores["empty_text"].sum()), "no_lists": int(scores["reward"].is_nan().sum()),
    }


# the judges that read the profile text in a space of their own (not the encoder's)
TEXT_SPACES = ("lexical", "genres")
# judge columns of the scores artifact: name -> (judge a's column, judge b's column)
JUDGE_COLUMNS = {"retrieval": ("retrieval_a", "retrieval_b"), "lexical": ("lexical_a", "lexical_b"),
                 "genres": ("genres_a", "genres_b"), "reranker": ("judge_a", "judge_b")}
# the column of each score.reward
REWARD_COLUMN = {"retrieval": "retrieval", "lexical": "lexical", "genres": "genres", "reranker": "judge_a"}


def reward_column(cfg) -> str:
    """The scores column that is score.reward's reward: its personal part when score.contrast is on."""
    return REWARD_COLUMN[cfg.reward] + ("_personal" if cfg.contrast > 0 else "")


def score_profiles(vecs: np.ndarray, user_ids: np.ndarray, retrieval, judges: dict, texts: list[str] | None = None,
                   spaces: dict | None = None) -> dict[str, np.ndarray]:
    """Every judge's reward of P profiles (embeddings `vecs`, `texts`): retrieval and each text space's (lexical,
    genres; + their halves a, b) and the reranker judges a, b (with judge a's per-metric values); a judge that is
    None is skipped. `spaces` = {name: (its RetrievalReward, texts -> vectors)}."""
    out: dict[str, np.ndarray] = {}
    sides = [("retrieval", retrieval, vecs)]
    if texts is not None:
        for name, (ret, embed) in (spaces or {}).items():
            sides.append((name, ret, embed(texts) if len(texts) else np.zeros((0, 1), np.float32)))
    for name, ret, v in sides:
        if ret is None:
            continue
        out[name] = ret.ndcg(v, user_ids)
        out[f"{name}_a"] = ret.ndcg(v, user_ids, "a")
        out[f"{name}_b"] = ret.ndcg(v, user_ids, "b")
        if ret.contrast > 0:  # the personal reward (score.contrast) of every training-free judge, halves too
            for half, suffix in ((None, ""), ("a", "_a"), ("b", "_b")):
                out[f"{name}_personal{suffix}"] = ret.personal(v, user_ids, half)
    for j, judge in judges.items():
        if judge is None:
            continue
        r = judge.score_vectors(vecs, user_ids)
        out[f"judge_{j}"] = r["reward"]
        if j == "a":
            out.update({m: r[m] for m in (*METRICS, "margin")})
            out["n_lists"] = r["n_lists"]
    return out


def score_stage(recipe: Recipe, profiles_dir: str | Path, encode_dir: str | Path, reranker_dir: str | Path | None,
                out_dir: str | Path, *, force: bool = False, splits: list[str] | None = None) -> Path:
    """One reward per profile of `profiles_dir` (embeddings from `encode_dir`): score.reward picks the `reward`
    column; the retrieval reward and both reranker judges (`reranker_dir`, when given) are written beside it,
    and the stage's summary holds their reliability. `splits` limits which users are scored."""
    from rlrf.encode import load_knowledge
    from rlrf.reliability import describe, reliability
    from rlrf.threads import torch_threads

    cfg = recipe.score
    prep = runs.prepare_dir(recipe)
    out_dir = Path(out_dir)
    if cfg.reward == "reranker" and reranker_dir is None:
        raise StageError("score.reward=reranker needs a trained judge (train-reranker stage); or set score.reward=retrieval")
    config = {"seed": recipe.seed, "score": fingerprint(recipe.score), "splits": splits}
    inputs = [profiles_dir, encode_dir, prep] + ([reranker_dir] if reranker_dir is not None else [])
    with (Stage(out_dir, "score", config, inputs=inputs, force=force) as st, torch_threads(recipe.reranker.threads)):
        if st.done:
            info = read_stage_json(out_dir)
        else:
            profiles = read_artifact(profiles_dir, "profiles", "sample")
            if splits is not None:
                profiles = profiles.filter(pl.col("split").is_in(splits))
            ut, it, cache = load_knowledge(recipe, encode_dir, sample_idx=None)
            items = read_artifact(prep, "items", "prepare")
            item_vecs = np.zeros((int(items["item_id"].max()) + 1, cache.vectors.shape[1]), np.float32)
            item_vecs[it["item_id"].to_numpy()] = cache.get(it["text_hash"].to_list())
            retrieval = retrieval_scorer(recipe, item_vecs)
            spaces = {name: text_space(recipe, name) for name in TEXT_SPACES}
            judges = ({j: judge_scorer(recipe, reranker_dir, j, item_vecs.shape[1]) for j in ("a", "b")}
                      if reranker_dir is not None else {})
            prof = (profiles.select("run", "round", "split", "user_id", "sample_idx", "text")
                    .join(ut.select("user_id", "sample_idx", "text_hash"), on=["user_id", "sample_idx"], how="left"))
            missing = prof.filter(pl.col("text_hash").is_null())
            if missing.height:
                raise StageError(f"{missing.height} profiles of {profiles_dir} have no embedding in {encode_dir} "
                                 f"(e.g. user {missing['user_id'][0]}); rerun the encode stage on these profiles")
            for i in tqdm(st.todo(cfg.shards), desc="score shards", disable=st.quiet):
                part = prof.filter((pl.col("user_id") % cfg.shards) == i).sort("user_id", "sample_idx")
                vecs = cache.get(part["text_hash"].to_list()) if part.height else np.zeros((0, 1), np.float32)
                cols = score_profiles(vecs, part["user_id"].to_numpy(), retrieval, judges,
                                      part["text"].fill_null("").to_list(), spaces)
                reward = cols[reward_column(cfg)]
                n_lists = cols.get("n_lists", np.zeros(part.height, np.int64))
                df = part.select("run", "round", "split", "user_id", "sample_idx").with_columns(
                    pl.Series("reward", reward, dtype=pl.Float64),
                    pl.Series("n_lists", n_lists, dtype=pl.Int32),
                    (part["text"].fill_null("").str.strip_chars().str.len_chars() == 0).alias("empty_text"),
                    *[pl.Series(c, v, dtype=pl.Float64) for c, v in cols.items() if c != "n_lists"],
                )
                st.write_shard(i, {"scores": df},
                               counters={"profiles_without_heldout": int(np.isnan(reward).sum())})
            scores = st.written("scores")
            scores = schema.empty("scores") if scores is None else scores
            summary = {"reward": cfg.reward, "metric": cfg.metric if cfg.reward == "reranker" else
                       f"{cfg.reward} ndcg@{cfg.retrieval_k} ({cfg.retrieval_candidates})"
                       + (f", personal: own user minus {cfg.contrast} others" if cfg.contrast else ""),
                       "tie_break": cfg.tie_break, **spread_summary(scores)}
            if "ndcg@5" in scores.columns and cfg.reward == "reranker":
                # the same without the tie break: how often the metric alone cannot tell a user's profiles apart
                summary["metric_all_tie_share"] = spread_summary(
                    scores.with_columns(pl.col(cfg.metric).alias("reward")))["all_tie_share"]
            twins = dict(JUDGE_COLUMNS)
            twins.update({f"{n} personal": (f"{n}_personal_a", f"{n}_personal_b") for n in ("retrieval", *TEXT_SPACES)
                          if f"{n}_personal_a" in scores.columns})
            rel = reliability(scores, twins, trained_on="judge_a" if "judge_a" in scores.columns else None,
                              resamples=recipe.rounds.bootstrap, seed=recipe.seed)
            from rlrf.reliability import agreement

            # do the other judges confirm the pairs the reward picks? (the reward's pairs, each other judge's verdict)
            mine = reward_column(cfg)
            for other in ("retrieval", "lexical", "genres", "judge_a", *(c for c in scores.columns
                                                                        if c.endswith("_personal"))):
                if other != mine and {mine, other} <= set(scores.columns):
                    rel[f"{mine} pairs under {other}"] = {
                        "agreement": agreement(scores, mine, other, recipe.rounds.bootstrap, recipe.seed)}
            info = st.finish({"summary": summary, "reliability": rel, "reliability_line": describe(rel)})
    s = info["summary"]
    spread = "n/a" if s["within_user_range_mean"] is None else f"{s['within_user_range_mean']:.4f}"
    print(f"score: {info['rows'].get('scores', 0)} profiles, reward {s['metric']} mean "
          f"{(s['reward_mean'] or float('nan')):.4f}, within-user range {spread}, all-tie users "
          f"{'n/a' if s['all_tie_share'] is None else format(s['all_tie_share'], '.1%')} | {info['reliability_line']} "
          f"-> {out_dir}")
    return out_dir
