"""How far a reward can be trusted to pick preference pairs: small pure functions over a scores frame
(user_id, sample_idx and one column per judge).

- agreement(a, b): judge a picks each user's chosen (best) and rejected (worst) profile; the share of users
  for whom judge b also scores chosen above rejected (a tie in b counts one half). Chance is 50%; below
  about 70% DPO mostly learns noise. A bootstrap over users gives its 95% interval.
- best_share(col, sample_idx=0): the share of users whose best profile is the given one. The reranker judge
  trains on sample 0 of each user; an in-sample judge prefers it (well above 1/N), an out-of-sample one sits
  near 1/N.
- within-user Kendall tau between two judges, for the same question asked of the whole order.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def _per_user(scores: pl.DataFrame, cols: list[str]) -> list[np.ndarray]:
    """One (n_profiles, len(cols)) array per user with >= 2 profiles scored by every col (NaN rows dropped)."""
    df = scores.select("user_id", "sample_idx", *cols).drop_nans(cols).drop_nulls(cols).sort("user_id", "sample_idx")
    out = []
    for _, g in df.group_by("user_id", maintain_order=True):
        if g.height >= 2:
            out.append(g.select(cols).to_numpy().astype(np.float64))
    return out


def bootstrap_mean(x: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of x with its percentile bootstrap interval (rlrf.stats.paired_bootstrap); None figures when empty."""
    from rlrf.stats import paired_bootstrap

    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    ci = paired_bootstrap(x, resamples, seed, level)
    return {k: ci[k] for k in ("mean", "low", "high", "n")}


def agreement(scores: pl.DataFrame, a: str, b: str, resamples: int = 2000, seed: int = 0) -> dict:
    """Share of users whose chosen > rejected under judge `a` holds under judge `b` (ties in b: 1/2).
    Users whose profiles all tie under `a` have no pair and are left out (counted in `a_ties`)."""
    per, ties = [], 0
    for v in _per_user(scores, [a, b]):
        best, worst = int(np.argmax(v[:, 0])), int(np.argmin(v[:, 0]))
        if v[best, 0] <= v[worst, 0]:
            ties += 1
            continue
        d = v[best, 1] - v[worst, 1]
        per.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
    return {**bootstrap_mean(np.array(per), resamples, seed), "a": a, "b": b, "a_ties": ties}


def best_share(scores: pl.DataFrame, col: str, sample_idx: int = 0) -> dict:
    """Share of users whose best profile under `col` is `sample_idx`, next to chance (mean 1/N)."""
    df = scores.select("user_id", "sample_idx", col).drop_nans([col]).drop_nulls([col])
    wins, chance = [], []
    for _, g in df.sort("user_id", "sample_idx").group_by("user_id", maintain_order=True):
        if g.height < 2:
            continue
        v = g[col].to_numpy()
        top = g["sample_idx"].to_numpy()[v == v.max()]  # a tie for best shares the win
        wins.append(float(sample_idx in top) / len(top))
        chance.append(1.0 / g.height)
    return {"share": float(np.mean(wins)) if wins else None, "chance": float(np.mean(chance)) if chance else None,
            "users": len(wins), "sample_idx": sample_idx}


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-a between two score vectors of the same profiles (ties count 0)."""
    i, j = np.triu_indices(len(x), 1)
    if len(i) == 0:
        return float("nan")
    return float((np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])).mean())


def within_user_tau(scores: pl.DataFrame, a: str, b: str) -> float | None:
    taus = [kendall_tau(v[:, 0], v[:, 1]) for v in _per_user(scores, [a, b])]
    taus = [t for t in taus if not np.isnan(t)]
    return float(np.mean(taus)) if taus else None


def within_user_range(scores: pl.DataFrame, col: str) -> dict:
    """Mean max-min of `col` among a user's profiles, next to the std of the user means (across users)."""
    per = _per_user(scores, [col])
    if not per:
        return {"within_range": None, "across_std": None}
    return {"within_range": float(np.mean([v.max() - v.min() for v in per])),
            "across_std": float(np.std([v.mean() for v in per]))}


def reliability(scores: pl.DataFrame, judges: dict[str, tuple[str, str]], trained_on: str | None = None,
                resamples: int = 2000, seed: int = 0) -> dict:
    """Every reliability figure of a score stage. `judges`: name -> (column of judge a, column of judge b)."""
    out: dict = {}
    for name, (a, b) in judges.items():
        if a not in scores.columns or b not in scores.columns:
            continue
        out[name] = {"agreement": agreement(scores, a, b, resamples, seed),
                     "within_user_tau": within_user_tau(scores, a, b), **within_user_range(scores, a)}
    if trained_on is not None and trained_on in scores.columns:
        out["best_is_trained_on"] = best_share(scores, trained_on, 0)
    return out


def describe(rel: dict) -> str:
    """One line: agreement per judge with its interval, and the best-is-trained-on share."""
    parts = []
    for name, r in rel.items():
        if name == "best_is_trained_on":
            continue
        ag = r["agreement"]
        if ag["mean"] is None:
            parts.append(f"{name}: no pairs")
            continue
        spread = "" if r.get("within_range") is None else f", within-user range {r['within_range']:.4f}"
        parts.append(f"{name}: {ag['a']} vs {ag['b']} agree on chosen > rejected {ag['mean']:.0%} "
                     f"[{ag['low']:.0%}, {ag['high']:.0%}] of {ag['n']} users{spread}")
    b = rel.get("best_is_trained_on")
    if b and b["share"] is not None:
        parts.append(f"best is the trained-on profile {b['share']:.0%} (chance {b['chance']:.0%})")
    return "; ".join(parts)
