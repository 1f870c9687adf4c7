"""The reward of a profile, and the score stage that gives one to every sampled profile.

reward(profile) = the reward reranker's ranking quality (score.metric, NDCG@5 by default) averaged
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

from rlrf import runs
from rlrf.config import Recipe
from rlrf.store import Stage, StageError, read_artifact

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
    from rlrf.rerank import lists_arrays

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


# ----------------------------------------------------------------------------- the stage


def _expected_spec(recipe: Recipe, items: pl.DataFrame, lists: pl.DataFrame, know_dim: int, spec, n_users: int):
    from rlrf.encode import encoder_id
    from rlrf.rerank import RerankerSpec, item_tables

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


def score_stage(recipe: Recipe, profiles_dir: str | Path, encode_dir: str | Path, reranker_dir: str | Path,
                out_dir: str | Path, *, force: bool = False) -> Path:
    """One reward per profile of `profiles_dir` (embeddings from `encode_dir`), judged by `reranker_dir`."""
    from rlrf.encode import load_knowledge
    from rlrf.rerank import load_reranker
    from rlrf.threads import torch_threads

    cfg = recipe.score
    prep = runs.prepare_dir(recipe)
    out_dir = Path(out_dir)
    config = {"seed": recipe.seed, "score": recipe.to_dict()["score"]}
    with (Stage(out_dir, "score", config, inputs=[profiles_dir, encode_dir, reranker_dir, prep], force=force) as st,
          torch_threads(recipe.reranker.threads)):
        if st.done:
            return out_dir
        profiles = read_artifact(profiles_dir, "profiles", "sample")
        ut, _, cache = load_knowledge(recipe, encode_dir, sample_idx=None)
        lists = read_artifact(prep, "lists", "prepare")
        items = read_artifact(prep, "items", "prepare")
        spec = json.loads((Path(reranker_dir) / "model.json").read_text()) if (Path(reranker_dir) / "model.json").is_file() else {}
        if not spec.get("knowledge", False):
            raise StageError(f"{reranker_dir} is a base reranker (reranker.knowledge=false): it ignores the profile, "
                             f"so every profile would get the same reward. Train the reward reranker with "
                             f"reranker.knowledge=true.")
        from rlrf.rerank import RerankerSpec
        n_users = int(read_artifact(prep, "users", "prepare")["user_id"].max() or 0) + 1
        expect = _expected_spec(recipe, items, lists, cache.vectors.shape[1] if len(cache) else 0,
                                RerankerSpec.from_dict(spec), n_users)
        model, _ = load_reranker(reranker_dir, expect=expect)
        prof = (profiles.select("run", "round", "split", "user_id", "sample_idx", "text")
                .join(ut.select("user_id", "sample_idx", "text_hash"), on=["user_id", "sample_idx"], how="left"))
        missing = prof.filter(pl.col("text_hash").is_null())
        if missing.height:
            raise StageError(f"{missing.height} profiles of {profiles_dir} have no embedding in {encode_dir} "
                             f"(e.g. user {missing['user_id'][0]}); rerun the encode stage on these profiles")
        for i in tqdm(st.todo(cfg.shards), desc="score shards", disable=st.quiet):
            part = prof.filter((pl.col("user_id") % cfg.shards) == i).sort("user_id", "sample_idx")
            vecs = cache.get(part["text_hash"].to_list()) if part.height else np.zeros((0, 1), np.float32)
            values, n = reward_profiles(model, vecs, part["user_id"].to_numpy(), lists, cfg.metric, cfg.batch_size)
            reward = with_tie_break(values[cfg.metric], values["margin"], cfg.tie_break)
            df = part.select("run", "round", "split", "user_id", "sample_idx").with_columns(
                pl.Series("reward", reward, dtype=pl.Float64),
                pl.Series("n_lists", n, dtype=pl.Int32),
                (part["text"].fill_null("").str.strip_chars().str.len_chars() == 0).alias("empty_text"),
                *[pl.Series(m, values[m], dtype=pl.Float64) for m in (*METRICS, "margin")],
            )
            st.write_shard(i, {"scores": df}, counters={"profiles_without_lists": int((n == 0).sum())})
        scores = pl.concat([pl.read_parquet(p) for p in sorted((out_dir / "scores").glob("part-*.parquet"))])
        summary = {"metric": cfg.metric, "tie_break": cfg.tie_break, **spread_summary(scores),
                   # the same without the tie break: how often the metric alone cannot tell a user's profiles apart
                   "metric_all_tie_share": spread_summary(scores.with_columns(pl.col(cfg.metric).alias("reward")))["all_tie_share"]}
        st.finish({"summary": summary})
    s = summary
    tie = "n/a" if s["all_tie_share"] is None else (f"{s['all_tie_share']:.1%} ({s['metric_all_tie_share']:.1%} before "
                                                     f"the margin tie break)")
    spread = "n/a" if s["within_user_range_mean"] is None else f"{s['within_user_range_mean']:.4f}"
    print(f"score: {scores.height} profiles, reward ({cfg.metric}) mean {s['reward_mean']:.4f}, within-user range "
          f"{spread}, all-tie users {tie}, empty texts {s['empty_text']} -> {out_dir}")
    return out_dir
