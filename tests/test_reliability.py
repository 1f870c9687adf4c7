"""Reliability of a reward (rlrf/reliability.py): synthetic judges whose agreement is known by construction."""

import math

import numpy as np
import polars as pl
import pytest

from rlrf.reliability import (agreement, best_share, bootstrap_mean, describe, kendall_tau, reliability,
                              within_user_range, within_user_tau)

USERS, N = 200, 4
RS = 500  # bootstrap resamples: enough for a stable interval, fast


def frame(a: np.ndarray, b: np.ndarray | None = None, **cols) -> pl.DataFrame:
    """Scores of USERS x N profiles: a and b are (USERS, N) arrays."""
    a = np.asarray(a, dtype=np.float64)
    users, n = a.shape
    data = {"user_id": np.repeat(np.arange(1, users + 1), n), "sample_idx": np.tile(np.arange(n), users),
            "a": a.ravel()}
    if b is not None:
        data["b"] = np.asarray(b, dtype=np.float64).ravel()
    data.update({k: np.asarray(v, dtype=np.float64).ravel() for k, v in cols.items()})
    return pl.DataFrame(data)


def judge_a(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(USERS, N))


# ----------------------------------------------------------------------------- agreement


def test_identical_judges_agree_always():
    a = judge_a()
    r = agreement(frame(a, a), "a", "b", RS)
    assert r["mean"] == 1.0 and r["low"] == 1.0 and r["high"] == 1.0
    assert r["n"] == USERS and r["a_ties"] == 0 and (r["a"], r["b"]) == ("a", "b")


def test_opposite_judges_never_agree():
    a = judge_a()
    r = agreement(frame(a, -a), "a", "b", RS)
    assert r["mean"] == 0.0 and r["high"] == 0.0 and r["n"] == USERS


def test_monotone_transform_of_a_agrees_always():
    a = judge_a()
    assert agreement(frame(a, np.exp(3 * a) + 7), "a", "b", RS)["mean"] == 1.0


def test_independent_judges_agree_at_chance():
    a, b = judge_a(0), judge_a(1)
    r = agreement(frame(a, b), "a", "b", RS, seed=3)
    assert abs(r["mean"] - 0.5) < 0.1
    assert r["low"] <= 0.5 <= r["high"]
    assert r["low"] < r["mean"] < r["high"]
    # the interval is about +- 1.96 * sqrt(.25 / 200) = +- 0.069 wide
    assert 0.08 < r["high"] - r["low"] < 0.2


def test_agreement_for_exactly_seventy_percent_of_users():
    a = judge_a()
    agree = np.zeros(USERS, bool)
    agree[np.random.default_rng(5).permutation(USERS)[:140]] = True  # 140 / 200 = 70%
    b = np.where(agree[:, None], a, -a)
    r = agreement(frame(a, b), "a", "b", RS)
    assert r["mean"] == pytest.approx(0.70, abs=1e-12) and r["n"] == USERS
    assert r["low"] <= 0.70 <= r["high"]
    assert r["low"] < 0.70 < r["high"]  # a real interval around it, not a point
    # the bootstrap is seeded: the same seed gives the same interval, another seed (almost surely) another
    assert agreement(frame(a, b), "a", "b", RS)["low"] == r["low"]


def test_only_the_chosen_and_rejected_profiles_matter_to_b():
    # a ranks sample 3 best and sample 0 worst; b agrees on that pair but disagrees on everything else
    a = np.tile([0.0, 1.0, 2.0, 3.0], (10, 1))
    b = np.tile([0.5, 9.0, -9.0, 0.6], (10, 1))
    assert agreement(frame(a, b), "a", "b", RS)["mean"] == 1.0
    b2 = np.tile([0.6, -9.0, 9.0, 0.5], (10, 1))
    assert agreement(frame(a, b2), "a", "b", RS)["mean"] == 0.0


def test_ties_in_b_count_one_half():
    a = judge_a()[:10]
    b = np.ones_like(a)  # b cannot tell any profile apart
    assert agreement(frame(a, b), "a", "b", RS)["mean"] == 0.5
    # half of the users tied in b, half agreeing: (5 * 0.5 + 5 * 1) / 10
    b = np.where(np.arange(10)[:, None] < 5, 1.0, a)
    assert agreement(frame(a, b), "a", "b", RS)["mean"] == pytest.approx(0.75)


def test_users_whose_a_values_all_tie_are_left_out_and_counted():
    a = judge_a()[:10]
    a[:3] = 0.25  # users 1..3: a cannot choose
    r = agreement(frame(a, a), "a", "b", RS)
    assert r["a_ties"] == 3 and r["n"] == 7 and r["mean"] == 1.0
    # everyone tied: no pairs at all
    r = agreement(frame(np.zeros((4, N)), judge_a()[:4]), "a", "b", RS)
    assert r["mean"] is None and r["low"] is None and r["n"] == 0 and r["a_ties"] == 4


def test_single_profile_and_nan_users_are_skipped():
    df = pl.DataFrame({
        "user_id":    [1,   1,   2,   3,   3,          4,   4,   4],
        "sample_idx": [0,   1,   0,   0,   1,          0,   1,   2],
        "a":          [1.0, 0.0, 5.0, 1.0, 0.0,        3.0, 2.0, 1.0],
        "b":          [1.0, 0.0, 5.0, 1.0, float("nan"), float("nan"), 0.0, 1.0],
    })
    # user 1 agrees; user 2 has a single profile; user 3 keeps one non-NaN profile -> skipped;
    # user 4 loses its a-best profile (NaN b): chosen = sample 1 (a=2), rejected = sample 2 (a=1), b 0 < 1 -> 0
    r = agreement(df, "a", "b", RS)
    assert r["n"] == 2 and r["mean"] == 0.5 and r["a_ties"] == 0
    # nulls are skipped like NaNs
    df_null = df.with_columns(pl.when(pl.col("b").is_nan()).then(None).otherwise(pl.col("b")).alias("b"))
    assert agreement(df_null, "a", "b", RS)["n"] == 2


def test_row_order_does_not_matter():
    a, b = judge_a(0), judge_a(1)
    df = frame(a, b)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=7)
    assert agreement(shuffled, "a", "b", RS) == agreement(df, "a", "b", RS)


def test_bootstrap_mean_empty_and_constant():
    assert bootstrap_mean(np.array([])) == {"mean": None, "low": None, "high": None, "n": 0}
    r = bootstrap_mean(np.ones(5), resamples=50)
    assert r == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 5}


# ----------------------------------------------------------------------------- best_share


def test_best_share_of_a_judge_that_always_picks_sample_zero():
    rng = np.random.default_rng(0)
    col = rng.uniform(0, 1, (USERS, N))
    col[:, 0] = 2.0  # sample 0 always best
    r = best_share(frame(col), "a", 0)
    assert r["share"] == 1.0 and r["chance"] == pytest.approx(0.25) and r["users"] == USERS
    assert r["sample_idx"] == 0
    assert best_share(frame(col), "a", 1)["share"] == 0.0


def test_best_share_of_a_random_judge_is_near_chance():
    r = best_share(frame(judge_a(4)), "a", 0)
    assert abs(r["share"] - 0.25) < 0.1 and r["chance"] == pytest.approx(0.25)


def test_best_share_chance_mixes_profile_counts_and_skips_singletons():
    df = pl.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 3], "sample_idx": [0, 1, 2, 3, 0, 1, 0],
                       "a": [0.9, 0.1, 0.2, 0.3, 0.0, 1.0, 5.0]})
    r = best_share(df, "a", 0)
    assert r["users"] == 2 and r["share"] == 0.5 and r["chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    empty = best_share(df.filter(pl.col("user_id") == 3), "a", 0)
    assert empty["share"] is None and empty["chance"] is None and empty["users"] == 0


# ----------------------------------------------------------------------------- tau and range


def test_kendall_tau_by_hand():
    x = np.array([1.0, 2.0, 3.0])
    assert kendall_tau(x, np.array([10.0, 20.0, 30.0])) == 1.0
    assert kendall_tau(x, np.array([3.0, 2.0, 1.0])) == -1.0
    # one swapped pair out of three: (1 + 1 - 1) / 3
    assert kendall_tau(x, np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    # tau-a: a tie counts 0: pairs (0,1) tie, (0,2) +1, (1,2) +1
    assert kendall_tau(np.array([1.0, 1.0, 2.0]), x) == pytest.approx(2 / 3)
    assert math.isnan(kendall_tau(np.array([1.0]), np.array([2.0])))


def test_within_user_tau_averages_users():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert within_user_tau(frame(a, b), "a", "b") == 0.0
    assert within_user_tau(frame(a, a), "a", "b") == 1.0
    assert within_user_tau(frame(a[:, :1], a[:, :1]), "a", "b") is None  # one profile each: no pair


def test_within_user_range_by_hand():
    df = pl.DataFrame({"user_id": [1, 1, 2, 2, 2, 3], "sample_idx": [0, 1, 0, 1, 2, 0],
                       "a": [0.1, 0.5, 0.2, 0.2, 0.8, 9.0]})
    r = within_user_range(df, "a")
    # user 1: range 0.4, mean 0.3; user 2: range 0.6, mean 0.4; user 3 has one profile (skipped)
    assert r["within_range"] == pytest.approx(0.5)
    assert r["across_std"] == pytest.approx(0.05)
    assert within_user_range(df.filter(pl.col("user_id") == 3), "a") == {"within_range": None, "across_std": None}


# ----------------------------------------------------------------------------- reliability and describe


def scores_frame():
    a = judge_a(0)
    agree = np.arange(USERS) < 140
    rng = np.random.default_rng(9)
    ja = rng.uniform(0, 1, (USERS, N))
    ja[:, 0] += 1.0  # the trained-on profile always wins under judge a
    return frame(a, None, judge_a=ja, judge_b=ja + 0.01, retrieval_a=a,
                 retrieval_b=np.where(agree[:, None], a, -a))


def test_reliability_returns_per_judge_figures_and_best_is_trained_on():
    df = scores_frame()
    judges = {"retrieval": ("retrieval_a", "retrieval_b"), "reranker": ("judge_a", "judge_b"),
              "missing": ("nope_a", "nope_b")}
    rel = reliability(df, judges, trained_on="judge_a", resamples=RS, seed=0)
    assert set(rel) == {"retrieval", "reranker", "best_is_trained_on"}
    assert rel["retrieval"]["agreement"]["mean"] == pytest.approx(0.70)
    assert rel["reranker"]["agreement"]["mean"] == 1.0
    assert rel["reranker"]["within_user_tau"] == 1.0
    assert set(rel["retrieval"]) == {"agreement", "within_user_tau", "within_range", "across_std"}
    assert rel["best_is_trained_on"]["share"] == 1.0 and rel["best_is_trained_on"]["chance"] == 0.25
    # no trained_on (or an absent column): no best_is_trained_on
    assert "best_is_trained_on" not in reliability(df, judges, resamples=RS)
    assert "best_is_trained_on" not in reliability(df, judges, trained_on="absent", resamples=RS)


def test_describe_is_one_line_with_the_agreement():
    df = scores_frame()
    rel = reliability(df, {"retrieval": ("retrieval_a", "retrieval_b")}, trained_on="judge_a", resamples=RS)
    line = describe(rel)
    assert isinstance(line, str) and "\n" not in line
    assert "70%" in line and "retrieval_a vs retrieval_b" in line and f"of {USERS} users" in line
    assert "within-user range" in line
    assert "best is the trained-on profile 100% (chance 25%)" in line
    # a judge with no pairs says so
    tied = frame(np.zeros((3, N)), np.zeros((3, N)))
    assert "no pairs" in describe(reliability(tied, {"j": ("a", "b")}, resamples=RS))
    assert describe({}) == ""
