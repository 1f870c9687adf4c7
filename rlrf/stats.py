"""The statistics every report shares (the check, the evaluation, the judges' reliability): per-user means of a
reward, paired old/new differences, and their percentile bootstrap interval with users resampled."""

from __future__ import annotations

import numpy as np
import polars as pl


def ci_text(ci: dict) -> str:
    """A paired_bootstrap figure as reports print it: "+0.0123 [+0.0045, +0.0201]"."""
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"


def paired_bootstrap(diff, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of paired differences with a percentile bootstrap interval (users resampled with replacement)."""
    d = np.asarray(diff, dtype=np.float64)
    if d.size == 0:
        raise ValueError("paired_bootstrap: no paired differences (no user was scored under both generators)")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size),
            "level": level, "resamples": resamples}


def per_user_means(scores: pl.DataFrame, col: str = "reward") -> pl.DataFrame:
    """Mean of `col` per user over its profiles (profiles with nothing to be judged on carry NaN, left out)."""
    return (scores.filter(pl.col(col).is_not_nan())
            .group_by("user_id").agg(pl.col(col).mean().alias("reward"), pl.len().alias("n"))
            .sort("user_id"))


def paired(old: pl.DataFrame, new: pl.DataFrame, col: str = "reward") -> pl.DataFrame:
    """user_id, old, new, diff for users scored under both generators."""
    return (per_user_means(old, col).select("user_id", pl.col("reward").alias("old"))
            .join(per_user_means(new, col).select("user_id", pl.col("reward").alias("new")), on="user_id")
            .with_columns((pl.col("new") - pl.col("old")).alias("diff")).sort("user_id"))


def verdict(ci: dict, up: str = "improved", down: str = "got worse") -> str:
    """A difference read off its interval; `up` / `down` name the two directions (a reward improves, a quality
    figure is higher or lower)."""
    if ci["low"] > 0:
        return f"{up}: the whole 95% interval is above 0"
    if ci["high"] < 0:
        return f"{down}: the whole 95% interval is below 0"
    return "no detectable change: the 95% interval contains 0"


def noise_split(old: pl.DataFrame, new: pl.DataFrame, col: str = "reward") -> dict:
    """How much of the check's per-user paired difference is sampling noise, the part more profiles a user removes.

    `old` and `new` hold one row per profile (user_id, `col`). A user's difference of means carries, besides what
    the generators really differ by for that user, each side's sampling noise: its within-user variance over its
    profile count. Returns {"users", "n" (profiles a user, the median of both sides), "var_diff" (variance of the
    per-user differences across users), "within" (the mean over users of s2_old/n_old + s2_new/n_new: the sampling
    part), "between" (var_diff - within, at least 0: what more profiles cannot remove)}. Treating the two sides'
    draws as independent (they share seeds, not texts) is an assumption: `benchmarks/check_power.py` checks the
    projection it gives against the interval measured on subsets of a larger check."""
    def stats(f: pl.DataFrame) -> pl.DataFrame:
        return (f.filter(pl.col(col).is_not_nan()).group_by("user_id")
                .agg(m=pl.col(col).mean(), v=pl.col(col).var(), k=pl.len()).filter(pl.col("k") >= 2))
    j = stats(old).join(stats(new), on="user_id", suffix="_n")
    if j.height < 2:
        raise ValueError(f"noise_split: {j.height} user(s) with at least 2 profiles on both sides; need 2 or more")
    diff = (j["m_n"] - j["m"]).to_numpy()
    within = float(np.mean((j["v"] / j["k"] + j["v_n"] / j["k_n"]).to_numpy()))
    var_diff = float(diff.var(ddof=1))
    n = float(np.median(np.concatenate([j["k"].to_numpy(), j["k_n"].to_numpy()])))
    return {"users": j.height, "n": n, "var_diff": var_diff, "within": within, "between": max(var_diff - within, 0.0)}


def projected_half_width(split: dict, n: int, level_z: float = 1.96) -> float:
    """The paired interval's half-width (normal approximation) a check of `n` profiles a user would have over the
    same users, from `noise_split`: the sampling part shrinks as split["n"] / n, the between-user part stays."""
    var = split["between"] + split["within"] * split["n"] / n
    return float(level_z * np.sqrt(var / split["users"]))


def fewest_per_user(*frames) -> int:
    """The fewest rows any user has in any of the frames (each with a user_id column): the profiles a user every
    side of a check holds."""
    return int(min(f.group_by("user_id").len()["len"].min() for f in frames))


def pool(figures: list[dict], log: bool = False, level: float = 0.95) -> dict:
    """Several independent draws' figures of one quantity pooled, as a meta-analysis does (each figure a
    paired_bootstrap dict: mean, low, high; its standard error read off the interval, (high - low) / 2z).

    `log`: the figures are ratios (perplexity new / old), pooled on the log scale and returned as ratios.
    Returns {"k", "fixed": the inverse-variance mean with its interval (the draws taken as one effect measured k
    times), "random": DerSimonian-Laird's between-draw variance tau2 added to each draw's, the interval from
    Hartung-Knapp's t on k - 1 degrees of freedom (its scale factor at least 1): what a new draw of the recipe would
    have on average, the figure a recipe's claim needs, "q" (Cochran's Q), "i2" (the share of the spread between
    draws that their own intervals do not explain, 0 to 1)}. Two draws or more."""
    from scipy import stats as st

    k = len(figures)
    if k < 2:
        raise ValueError(f"pool: {k} figure(s); pooling needs the figures of 2 or more independent draws")
    z = float(st.norm.ppf(0.5 + level / 2))
    f = (lambda x: np.log(np.asarray(x, dtype=np.float64))) if log else (lambda x: np.asarray(x, dtype=np.float64))
    y = f([g["mean"] for g in figures])
    se = (f([g["high"] for g in figures]) - f([g["low"] for g in figures])) / (2 * z)
    if not (se > 0).all():
        raise ValueError("pool: every figure needs an interval of positive width (high > low)")
    back = np.exp if log else (lambda x: x)
    w = 1 / se**2
    fixed = float((w * y).sum() / w.sum())
    fixed_se = float(np.sqrt(1 / w.sum()))
    q = float((w * (y - fixed) ** 2).sum())
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q - (k - 1)) / c)
    wr = 1 / (se**2 + tau2)
    mu = float((wr * y).sum() / wr.sum())
    scale = max(1.0, float((wr * (y - mu) ** 2).sum() / (k - 1)))
    half = float(st.t.ppf(0.5 + level / 2, k - 1) * np.sqrt(scale / wr.sum()))
    return {"k": k, "level": level, "q": q, "i2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0,
            "fixed": {"mean": float(back(fixed)), "low": float(back(fixed - z * fixed_se)),
                      "high": float(back(fixed + z * fixed_se)), "n": k},
            "random": {"mean": float(back(mu)), "low": float(back(mu - half)), "high": float(back(mu + half)),
                       "tau2": tau2, "n": k}}
