"""The score stage: every profile of the round judged by the reward (score.reward, which picks the pairs) and by the
other judges beside it (retrieval, lexical, genres and, where trained, the cross-fitted reranker judges a and b),
with each judge's reliability (its twin's agreement) and how far each confirms the reward's pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from rlrf import runs, schema
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.reward import METRICS, REWARDS, judge_scorer, retrieval_scorer, text_space


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


def reward_column(cfg) -> str:
    """The scores column that is score.reward's reward: its personal part when score.contrast is on."""
    return REWARDS[cfg.reward].column + ("_personal" if cfg.contrast > 0 else "")


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
    inputs = [profiles_dir, encode_dir, prep] + ([reranker_dir] if reranker_dir is not None else [])
    with (runs.STAGES["score"].open(recipe, out_dir, inputs=inputs, extra={"splits": splits}, force=force,
                                    summary=_line) as st,
          torch_threads(recipe.reranker.threads)):
        if not st.done:
            profiles = read_artifact(profiles_dir, "profiles", "sample")
            if splits is not None:
                profiles = profiles.filter(pl.col("split").is_in(splits))
            ut, it, cache = load_knowledge(recipe, encode_dir, sample_idx=None)
            items = read_artifact(prep, "items", "prepare")
            item_vecs = np.zeros((int(items["item_id"].max()) + 1, cache.vectors.shape[1]), np.float32)
            item_vecs[it["item_id"].to_numpy()] = cache.get(it["text_hash"].to_list())
            retrieval = retrieval_scorer(recipe, item_vecs)
            spaces = {name: text_space(recipe, name) for name, j in REWARDS.items() if j.space is not None}
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
                       + (f", personal: own user minus {_times(cfg.contrast_weight)}the mean of {cfg.contrast} others"
                          if cfg.contrast else ""),
                       "tie_break": cfg.tie_break, **spread_summary(scores)}
            if "ndcg@5" in scores.columns and cfg.reward == "reranker":
                # the same without the tie break: how often the metric alone cannot tell a user's profiles apart
                summary["metric_all_tie_share"] = spread_summary(
                    scores.with_columns(pl.col(cfg.metric).alias("reward")))["all_tie_share"]
            twins = {name: j.halves for name, j in REWARDS.items()}  # each judge's two halves
            twins.update({f"{n} personal": (f"{n}_personal_a", f"{n}_personal_b") for n, j in REWARDS.items()
                          if j.personal and f"{n}_personal_a" in scores.columns})
            rel = reliability(scores, twins, trained_on="judge_a" if "judge_a" in scores.columns else None,
                              resamples=recipe.rounds.bootstrap, seed=recipe.seed)
            from rlrf.reliability import agreement

            # do the other judges confirm the pairs the reward picks? (the reward's pairs, each other judge's verdict)
            mine = reward_column(cfg)
            for other in (*(j.column for j in REWARDS.values()), *(c for c in scores.columns if c.endswith("_personal"))):
                if other != mine and {mine, other} <= set(scores.columns):
                    rel[f"{mine} pairs under {other}"] = {
                        "agreement": agreement(scores, mine, other, recipe.rounds.bootstrap, recipe.seed)}
            st.finish({"summary": summary, "reliability": rel, "reliability_line": describe(rel)})
    return out_dir


def _line(info: dict) -> str:
    s = info["summary"]
    spread = "n/a" if s["within_user_range_mean"] is None else f"{s['within_user_range_mean']:.4f}"
    return (f"reward {s['metric']} mean {(s['reward_mean'] or float('nan')):.4f}, within-user range {spread}, "
            f"all-tie users {'n/a' if s['all_tie_share'] is None else format(s['all_tie_share'], '.1%')} | "
            f"{info['reliability_line']}")


def _times(w: float) -> str:
    return "" if w == 1 else f"{w:g} x "
