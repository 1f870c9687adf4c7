"""The is-it-learning check: the bootstrap interval, the pairing of users, and the stage's outputs."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from rlrf import check
from rlrf.errors import StageError
from rlrf.stats import paired, paired_bootstrap, verdict
from tests.loop_fixtures import profile_rows, score_rows, write_stage

REPO = Path(__file__).resolve().parents[1]


def test_bootstrap_of_a_constant_difference_collapses_to_it():
    ci = paired_bootstrap(np.full(50, 0.02), resamples=500, seed=1)
    assert ci["mean"] == pytest.approx(0.02) and ci["low"] == pytest.approx(0.02) and ci["high"] == pytest.approx(0.02)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 differences: mean 0.01, sd 0.1 -> standard error 0.005, so the 95% interval is about 0.01 +- 0.0098
    d = np.random.default_rng(0).normal(0, 0.1, 400)
    d = (d - d.mean()) / d.std() * 0.1 + 0.01
    ci = paired_bootstrap(d, resamples=4000, seed=3)
    assert ci["mean"] == pytest.approx(0.01)
    assert ci["low"] == pytest.approx(0.01 - 1.96 * 0.005, abs=0.0012)
    assert ci["high"] == pytest.approx(0.01 + 1.96 * 0.005, abs=0.0012)
    assert paired_bootstrap(d, 4000, seed=3) == ci  # seeded: the same interval every time
    assert verdict(ci) == "improved: the whole 95% interval is above 0"


def test_bootstrap_two_users_worked_by_hand():
    # resampling two users gives means -1 (1/4), 0 (1/2), 1 (1/4): the 2.5% / 97.5% quantiles are -1 and 1
    ci = paired_bootstrap([-1.0, 1.0], resamples=4000, seed=0)
    assert ci["mean"] == 0.0 and ci["low"] == -1.0 and ci["high"] == 1.0
    assert verdict(ci).startswith("no detectable change")
    with pytest.raises(ValueError, match="no paired differences"):
        paired_bootstrap([], 10)


def test_pairing_averages_profiles_per_user_and_keeps_users_scored_twice():
    old = pl.DataFrame(score_rows({1: [0.2, 0.4], 2: [0.5, 0.5], 3: [0.1, float("nan")]}, split="valid"))
    new = pl.DataFrame(score_rows({1: [0.6, 0.4], 3: [0.3, 0.2], 4: [0.9]}, split="valid"))
    p = paired(old, new)
    assert p["user_id"].to_list() == [1, 3]
    assert p["old"].to_list() == pytest.approx([0.3, 0.1])  # user 3's NaN (no lists) left out
    assert p["diff"].to_list() == pytest.approx([0.2, 0.15])


def _two_sides(users: int, n: int, sd_user: float, sd_profile: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Profiles whose reward is the user's own gain (sd_user across users) plus sampling noise (sd_profile)."""
    rng = np.random.default_rng(seed)
    gain = rng.normal(0.01, sd_user, users)
    frame = lambda shift: pl.DataFrame({  # noqa: E731
        "user_id": np.repeat(np.arange(users), n), "sample_idx": np.tile(np.arange(n), users),
        "reward": np.repeat(shift, n) + rng.normal(0, sd_profile, users * n)})
    return frame(np.zeros(users)), frame(gain)


def test_noise_split_recovers_known_sampling_and_between_user_variance():
    from rlrf.stats import noise_split, projected_half_width

    old, new = _two_sides(4000, 4, sd_user=0.02, sd_profile=0.06, seed=0)
    s = noise_split(old, new)
    assert s["users"] == 4000 and s["n"] == 4
    assert s["within"] == pytest.approx(2 * 0.06 ** 2 / 4, rel=0.05)  # each side's s2 / 4
    assert s["between"] == pytest.approx(0.02 ** 2, rel=0.2)
    # the projection for 16 profiles matches what 16 profiles a user measure on a fresh draw
    big_old, big_new = _two_sides(4000, 16, sd_user=0.02, sd_profile=0.06, seed=1)
    d = (big_new.group_by("user_id").agg(pl.col("reward").mean()).sort("user_id")["reward"]
         - big_old.group_by("user_id").agg(pl.col("reward").mean()).sort("user_id")["reward"]).to_numpy()
    assert projected_half_width(s, 16) == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(4000), rel=0.06)
    assert projected_half_width(s, 4) > projected_half_width(s, 16) > projected_half_width(s, 10 ** 6) > 0
    with pytest.raises(ValueError, match="at least 2 profiles"):
        noise_split(old.filter(pl.col("sample_idx") == 0), new)


def _fig(mean: float, se: float) -> dict:
    return {"mean": mean, "low": mean - 1.959964 * se, "high": mean + 1.959964 * se}


def test_pool_by_hand_homogeneous_and_heterogeneous_draws():
    """pool: draws that agree pool to their mean with sqrt(k) the narrower interval and no between-draw variance;
    two that disagree by 10 of their standard errors get DerSimonian-Laird's tau2 and Hartung-Knapp's t on 1 df."""
    from rlrf.stats import pool

    same = pool([_fig(0.01, 0.004)] * 4)
    assert same["fixed"]["mean"] == pytest.approx(0.01) and same["random"]["mean"] == pytest.approx(0.01)
    assert same["fixed"]["high"] - same["fixed"]["mean"] == pytest.approx(1.959964 * 0.004 / 2, rel=1e-4)
    assert same["q"] == pytest.approx(0) and same["i2"] == 0 and same["random"]["tau2"] == 0
    # k - 1 = 3 df: t(0.975, 3) = 3.182, scale factor floored at 1
    assert same["random"]["high"] - 0.01 == pytest.approx(3.182446 * 0.004 / 2, rel=1e-4)
    two = pool([_fig(0.0, 0.1), _fig(1.0, 0.1)])
    # w = 100 each: Q = 50, C = 200 - 20000/200 = 100, tau2 = 49/100; w* = 2 each, HK scale = 1
    assert two["q"] == pytest.approx(50) and two["i2"] == pytest.approx(0.98)
    assert two["random"]["tau2"] == pytest.approx(0.49) and two["random"]["mean"] == pytest.approx(0.5)
    assert two["random"]["high"] - 0.5 == pytest.approx(12.7062 * 0.5, rel=1e-4)
    assert two["fixed"]["high"] - 0.5 == pytest.approx(1.959964 * 0.1 / np.sqrt(2), rel=1e-4)
    ratio = pool([{"mean": 1.2, "low": 1.2 * np.exp(-0.196), "high": 1.2 * np.exp(0.196)}] * 2, log=True)
    assert ratio["fixed"]["mean"] == pytest.approx(1.2) and ratio["fixed"]["high"] / 1.2 == pytest.approx(
        np.exp(0.196 / np.sqrt(2)), rel=1e-3)
    with pytest.raises(ValueError, match="2 or more independent draws"):
        pool([_fig(0.0, 0.1)])
    with pytest.raises(ValueError, match="positive width"):
        pool([_fig(0.0, 0.1), {"mean": 0.0, "low": 0.0, "high": 0.0}])


def test_pool_random_interval_covers_the_recipe_mean_where_fixed_does_not():
    """Draws whose true gains spread (tau 0.01) around a recipe mean of 0.01, each measured with se 0.004: over
    400 simulated sets of 5 draws, the random-effects interval covers 0.01 about 95% of the time, the fixed one far
    less (it treats the draws as one effect)."""
    from rlrf.stats import pool

    rng = np.random.default_rng(0)
    cover = {"fixed": 0, "random": 0}
    for _ in range(400):
        truth = rng.normal(0.01, 0.01, 5)
        p = pool([_fig(float(t + rng.normal(0, 0.004)), 0.004) for t in truth])
        for kind in cover:
            cover[kind] += p[kind]["low"] <= 0.01 <= p[kind]["high"]
    assert cover["random"] / 400 >= 0.92 and cover["fixed"] / 400 < 0.75


def test_check_stage_writes_figure_summary_and_interval(tmp_path, monkeypatch):
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.store import Stage

    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "rounds.bootstrap=300"])
    # generator 1 and a finished reward reranker, as the earlier stages leave them
    gen = runs.generator_dir(recipe, 1)
    gen.mkdir(parents=True)
    (gen / "config.json").write_text("{}")
    monkeypatch.setattr("rlrf.llm.weights_hash", lambda p: "h-" + str(p)[-6:])
    with Stage(runs.reranker_dir(recipe, 1), "train-reranker", {"x": 1}, quiet=True) as st:
        st.finish(rows={})
    rng = np.random.default_rng(0)
    base = {u: [float(x) for x in rng.uniform(0.3, 0.6, 2)] for u in range(1, 41)}
    sides = {"old": base, "new": {u: [r + 0.05 for r in rs] for u, rs in base.items()}}
    calls = []

    def fake_side(recipe, root, generator, k, reranker):
        calls.append((root.name, generator, k))
        return write_stage(root / "score", "score", "scores", score_rows(sides[root.name], split="valid"))

    monkeypatch.setattr(check, "_side", fake_side)
    out = check.check_stage(recipe, 1)
    assert calls == [("old", "smollm2-135m-instruct", 1), ("new", str(gen), 1)]  # same round: same seeds
    info = json.loads((out / "stage.json").read_text())
    ci = info["reward_diff"]
    assert ci["mean"] == pytest.approx(0.05) and ci["low"] == pytest.approx(0.05) and ci["n"] == 40
    assert info["improved_share"] == 1.0 and info["verdict"].startswith("improved")
    md = (out / "summary.md").read_text()
    assert "+0.0500" in md and "| 40 |" in md
    assert (out / "check.png").stat().st_size > 1000
    calls.clear()
    check.check_stage(recipe, 1)  # finished: a no-op that still prints the figure
    assert calls == []


def test_check_temperature_samples_only_generator_k_at_it(tmp_path, monkeypatch):
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.store import Stage

    def prepared(extra):
        recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "rounds.bootstrap=300", *extra])
        gen = runs.generator_dir(recipe, 1)
        gen.mkdir(parents=True, exist_ok=True)
        (gen / "config.json").write_text("{}")
        with Stage(runs.reranker_dir(recipe, 1), "train-reranker", {"x": 1}, quiet=True) as st:
            if not st.done:
                st.finish(rows={})
        return recipe

    monkeypatch.setattr("rlrf.llm.weights_hash", lambda p: "h-" + str(p)[-6:])
    rows = {u: [0.4, 0.5] for u in range(1, 11)}
    temps = {}

    def fake_side(recipe, root, generator, k, reranker):
        temps[root.name] = recipe.sample.temperature
        return write_stage(root / "score", "score", "scores", score_rows(rows, split="valid"))

    monkeypatch.setattr(check, "_side", fake_side)
    recipe = prepared([])
    check.check_stage(recipe, 1)
    assert temps == {"old": recipe.sample.temperature, "new": recipe.sample.temperature}
    hot = prepared(["check.temperature=0.9"])
    assert check.new_side(hot).sample.temperature == 0.9 and hot.sample.temperature == recipe.sample.temperature
    with pytest.raises(StageError, match="--force"):  # another setting: the finished check is not reused
        check.check_stage(hot, 1)
    temps.clear()
    out = check.check_stage(hot, 1, force=True)
    assert temps == {"old": recipe.sample.temperature, "new": 0.9}
    info = json.loads((out / "stage.json").read_text())
    assert info["temperature"] == {"old": recipe.sample.temperature, "new": 0.9}
    assert f"old {recipe.sample.temperature}, new 0.9" in (out / "summary.md").read_text()
    with pytest.raises(Exception, match="check.temperature"):
        load_recipe(None, ["check.temperature=0"])


def test_match_distinct_picks_the_lowest_temperature_that_gives_back_the_old_diversity(tmp_path, monkeypatch):
    """check.match_distinct: both generators sample train users outside the round's sample (the seeded draw's users
    after the sample.max_users it took), generator k at the temperatures a bisection tries; the lowest one whose
    corpus distinct-2 reaches generator k-1's is chosen, never from valid users; none reaching it measures at the
    highest and says so. A round that sampled every train user, and the two ways of setting the temperature at once,
    are refused."""
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.quality import distinct_n
    from rlrf.sample import select_users
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage

    words = [f"w{i}" for i in range(400)]

    def texts(distinct_words: int, users: int = 12) -> dict[int, list[str]]:
        # every user's 2 profiles drawn from the first `distinct_words` words: more words, more distinct bigrams
        rng = np.random.default_rng(0)
        return {u: [" ".join(rng.choice(words[:distinct_words], 12)) for _ in range(2)] for u in range(1, users + 1)}

    by_temperature = {0.7: 6, 0.75: 10, 0.8: 16, 0.85: 30, 0.9: 60, 0.95: 120, 1.0: 200}
    calls = []

    def fake_sample(recipe, out_dir, generator, k, *, splits, n, max_users, skip_users=0, **kw):
        calls.append((out_dir.name, generator, tuple(splits), n, max_users, skip_users))
        t = recipe.sample.temperature if generator == "new" else "old"
        rows = texts(20 if t == "old" else by_temperature[t])
        return write_stage(out_dir, "sample", "profiles", profile_rows(rows))

    monkeypatch.setattr("rlrf.sample.sample_stage", fake_sample)
    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "check.match_distinct=true", "check.n=2",
                                "check.match_users=12", "sample.max_users=20",
                                "check.match_temperatures=[0.7,0.75,0.8,0.85,0.9,0.95,1.0]"])
    prompts = pl.DataFrame([{"user_id": u, "split": "train" if u <= 40 else "valid", "domain": "movies",
                             "prompt_head": "h", "history_lines": ["l"], "prompt_tail": "t", "prompt": "p"}
                            for u in range(1, 51)], schema=SCHEMAS["prompts"])
    with Stage(runs.prepare_dir(recipe), "prepare", {"x": 1}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"prompts": prompts})
        st.finish()
    # the calibration users: 12 train users, none of the round's 20
    mine = set(select_users(prompts, ["train"], 12, recipe.seed, skip=20)["user_id"])
    assert len(mine) == 12 and not mine & set(select_users(prompts, ["train"], 20, recipe.seed)["user_id"])
    assert select_users(prompts, ["train"], 32, recipe.seed).equals(select_users(prompts, ["train"], 20, recipe.seed)
                                                                      .vstack(select_users(prompts, ["train"], 12,
                                                                                           recipe.seed, skip=20))
                                                                      .sort("user_id"))
    target = distinct_n([t for ts in texts(20).values() for t in ts])
    assert distinct_n([t for ts in texts(16).values() for t in ts]) < target <= distinct_n(
        [t for ts in texts(30).values() for t in ts])
    cal = check.match_distinct(recipe, tmp_path / "cal", "old", "new", 1, log=lambda *a: None)
    assert cal["temperature"] == 0.85 and cal["reached"] and cal["target_distinct_2"] == pytest.approx(target)
    assert [x["temperature"] for x in cal["tried"]] == [0.75, 0.8, 0.85]  # a bisection: 3 of the 7
    assert calls[0] == ("old", "old", ("train",), 2, 12, 20)
    assert all(c[2] == ("train",) and c[4] == 12 and c[5] == 20 for c in calls)
    calls.clear()
    by_temperature.update({t: 8 for t in by_temperature})  # never as diverse as the old side
    cal = check.match_distinct(recipe, tmp_path / "cal2", "old", "new", 1, log=lambda *a: None)
    assert cal["temperature"] == 1.0 and not cal["reached"]
    # check.match_n: a check of many profiles a user calibrates at fewer (null = check.n, as above)
    calls.clear()
    few = dataclasses.replace(recipe, check=dataclasses.replace(recipe.check, n=16, match_n=2))
    assert check.match_distinct(few, tmp_path / "cal5", "old", "new", 1, log=lambda *a: None)["n"] == 2
    assert calls and all(c[3] == 2 for c in calls)
    with pytest.raises(ValueError, match="check.match_n"):
        load_recipe(None, ["check.match_n=0"])
    assert load_recipe(None, []).check.match_temperatures[:3] == [0.7, 0.725, 0.75]
    every = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "check.match_distinct=true", "sample.max_users=-1"])
    with pytest.raises(StageError, match="sample.max_users"):
        check.match_distinct(every, tmp_path / "cal3", "old", "new", 1, log=lambda *a: None)
    late = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "check.match_distinct=true", "sample.max_users=40"])
    with pytest.raises(StageError, match="no train users are left"):
        check.match_distinct(late, tmp_path / "cal4", "old", "new", 1, log=lambda *a: None)
    with pytest.raises(ValueError, match="check.match_distinct"):
        load_recipe(None, ["check.match_distinct=true", "check.temperature=0.9"])
    with pytest.raises(ValueError, match="check.match_temperatures"):
        load_recipe(None, ["check.match_temperatures=[0.9,0.8]"])


def test_match_figure_across_matches_the_variety_between_users_not_within(tmp_path, monkeypatch):
    """check.match_figure=across: the calibration matches distinct-2 across users (each profile slot's corpus, one
    profile a user), not the corpus figure, which a generator that varies within a user but writes every user the
    same template reaches at a lower temperature. Here the old generator writes each user one personal text twice,
    the new one a shared template plus words drawn per profile (more of them the hotter): the corpus figure is
    matched at a lower temperature than the across-users one, and each choice is the lowest temperature whose figure
    reaches the old side's."""
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.quality import distinct_across, distinct_n
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage

    temps = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    rng_words = [f"v{i}" for i in range(1000)]

    def texts(t) -> dict[int, list[str]]:
        if t == "old":  # a frame and three personal words, the same text in both slots
            return {u: ["this user enjoys the films of " + " ".join(f"u{u}w{i}" for i in range(3))] * 2
                    for u in range(1, 13)}
        m = temps.index(t)  # words drawn a profile, rising with the temperature
        rng = np.random.default_rng(7)
        return {u: ["the user likes films of every kind " + " ".join(rng.choice(rng_words, m)) for _ in range(2)]
                for u in range(1, 13)}

    def fake_sample(recipe, out_dir, generator, k, *, splits, n, max_users, skip_users=0, **kw):
        return write_stage(out_dir, "sample", "profiles",
                           profile_rows(texts("old" if generator == "old" else recipe.sample.temperature)))

    def figures(t):
        rows = pl.DataFrame(profile_rows(texts(t)))
        return distinct_n(rows["text"].to_list()), distinct_across(rows["text"].to_list(), rows["sample_idx"].to_list())

    monkeypatch.setattr("rlrf.sample.sample_stage", fake_sample)
    prompts = pl.DataFrame([{"user_id": u, "split": "train", "domain": "movies", "prompt_head": "h",
                             "history_lines": ["l"], "prompt_tail": "t", "prompt": "p"} for u in range(1, 51)],
                           schema=SCHEMAS["prompts"])
    chosen = {}
    for figure, at in (("corpus", 0), ("across", 1)):
        recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "check.match_distinct=true", "check.n=2",
                                    "check.match_users=12", "sample.max_users=20", f"check.match_figure={figure}",
                                    f"check.match_temperatures={temps}"])
        if figure == "corpus":
            with Stage(runs.prepare_dir(recipe), "prepare", {"x": 1}, quiet=True) as st:
                for i in st.todo(1):
                    st.write_shard(i, {"prompts": prompts})
                st.finish()
        cal = check.match_distinct(recipe, tmp_path / figure, "old", "new", 1, log=lambda *a: None)
        target = figures("old")[at]
        lowest = next(t for t in temps if figures(t)[at] >= target)
        assert cal["figure"] == figure and cal["reached"] and cal["temperature"] == lowest
        assert cal["target_distinct_2"] == pytest.approx(target)
        chosen[figure] = cal["temperature"]
    assert chosen == {"corpus": 0.9, "across": 1.1}
    with pytest.raises(Exception, match="check.match_figure"):
        load_recipe(None, ["check.match_figure=within"])


def two_generators(recipe, monkeypatch) -> None:
    """Generators 1 and 2 (empty, weights hashed by path) and round 1's finished reranker stage: what check_stage
    needs to exist before its sides (faked by the caller) run."""
    from rlrf import runs
    from rlrf.store import Stage

    monkeypatch.setattr("rlrf.llm.weights_hash", lambda p: "h-" + str(p)[-6:])
    for k in (1, 2):
        gen = runs.generator_dir(recipe, k)
        gen.mkdir(parents=True)
        (gen / "config.json").write_text("{}")
    with Stage(runs.reranker_dir(recipe, 1), "train-reranker", {"x": 1}, quiet=True) as st:
        st.finish(rows={})


def test_temperature_from_check_samples_each_round_at_the_last_checks_temperature(tmp_path, monkeypatch):
    """sample.temperature_from_check: round k samples generator k-1 at the temperature round k-1's check measured it
    at, and round k's check measures (and calibrates against) generator k-1 there; round 1 keeps sample.temperature;
    a round whose previous check is missing is refused with the command that makes it."""
    import runpy
    import sys

    from rlrf import runs
    from rlrf.config import load_recipe

    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "rounds.bootstrap=300", "sample.temperature=0.7",
                                "check.match_distinct=true", "sample.temperature_from_check=true"])
    two_generators(recipe, monkeypatch)
    rows = {u: [0.4, 0.5] for u in range(1, 11)}
    seen = []
    chosen = {1: 0.85, 2: 0.95}

    def fake_calibration(rec, root, old_gen, new_gen, k, log=print):
        seen.append(("calibrate", k, rec.sample.temperature))
        return {"temperature": chosen[k], "reached": True, "target_distinct_2": 0.3, "users": 96,
                "tried": [{"temperature": chosen[k], "distinct_2": 0.31}]}

    def fake_side(rec, root, generator, k, reranker):
        seen.append((root.name, k, rec.sample.temperature))
        return write_stage(root / "score", "score", "scores", score_rows(rows, split="valid"))

    def fake_sample(rec, out_dir, generator, k, **kw):
        seen.append(("sample", k, rec.sample.temperature))
        return out_dir

    monkeypatch.setattr(check, "match_distinct", fake_calibration)
    monkeypatch.setattr(check, "_side", fake_side)
    monkeypatch.setattr("rlrf.sample.sample_stage", fake_sample)

    def sample_round(k):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--round", str(k), f"runs_dir={tmp_path}", "run=r",
                                          "sample.temperature=0.7", "check.match_distinct=true",
                                          "sample.temperature_from_check=true"])
        runpy.run_path(str(REPO / "pipelines" / "sample.py"), run_name="__main__")

    assert runs.generator_temperature(recipe, 0) == 0.7
    with pytest.raises(StageError, match="pipelines/check.py --recipe <recipe> --round 1"):
        runs.generator_temperature(recipe, 1)
    with pytest.raises(SystemExit):  # the stage script turns the refusal into a one-line error
        sample_round(2)
    assert seen == []
    sample_round(1)
    check.check_stage(recipe, 1)
    assert seen == [("sample", 1, 0.7), ("calibrate", 1, 0.7), ("old", 1, 0.7), ("new", 1, 0.85)]
    assert runs.generator_temperature(recipe, 1) == 0.85 and runs.for_generator(recipe, 1).sample.temperature == 0.85
    seen.clear()
    sample_round(2)
    out = check.check_stage(recipe, 2)
    assert seen == [("sample", 2, 0.85), ("calibrate", 2, 0.85), ("old", 2, 0.85), ("new", 2, 0.95)]
    info = json.loads((out / "stage.json").read_text())
    assert info["temperature"]["old"] == 0.85 and info["temperature"]["new"] == 0.95
    assert info["config"]["sample"]["temperature"] == 0.85  # generator 1's temperature is part of what was measured
    plain = dataclasses.replace(recipe, sample=dataclasses.replace(recipe.sample, temperature_from_check=False))
    assert runs.generator_temperature(plain, 1) == 0.7


def test_check_min_p_is_generator_ks_in_calibration_and_check_and_the_next_round_samples_with_it(tmp_path,
                                                                                                 monkeypatch, capsys):
    """check.min_p and check.top_p: generator k is calibrated and measured with them, generator k-1 keeps the sample
    section's; the check records both sides' decoding and says so in summary.md; with sample.temperature_from_check
    the next round samples generator k at the check's temperature, top_p and min_p; a check from before the record
    (no `decoding`) leaves them at the recipe's."""
    import runpy
    import sys

    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage

    over = [f"runs_dir={tmp_path}", "run=r", "rounds.bootstrap=300", "sample.temperature=0.7",
            "check.match_distinct=true", "sample.temperature_from_check=true", "check.min_p=0.05", "check.top_p=1.0",
            "check.match_users=4", "check.match_temperatures=[0.9,1.2]", "check.n=2", "sample.max_users=10"]
    recipe = load_recipe(None, over)
    two_generators(recipe, monkeypatch)
    prompts = pl.DataFrame([{"user_id": u, "split": "train", "domain": "movies", "prompt_head": "h",
                             "history_lines": ["l"], "prompt_tail": "t", "prompt": "p"} for u in range(1, 21)],
                           schema=SCHEMAS["prompts"])
    with Stage(runs.prepare_dir(recipe), "prepare", {"x": 1}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"prompts": prompts})
        st.finish()
    seen = []

    def fake_sample(rec, out_dir, generator, k, **kw):
        s = rec.sample
        seen.append((Path(out_dir).name, k, s.temperature, s.top_p, s.min_p))
        if Path(out_dir).parent.name == "calibrate":  # generator 1 as personal as generator 0 only at 1.2
            personal = Path(out_dir).name == "old" or s.temperature >= 1.2
            return write_stage(out_dir, "sample", "profiles", profile_rows(
                {u: [f"a b c{u if personal else ''}"] * 2 for u in range(11, 15)}))
        return out_dir

    def fake_side(rec, root, generator, k, reranker):
        s = rec.sample
        seen.append((root.name, k, s.temperature, s.top_p, s.min_p))
        return write_stage(root / "score", "score", "scores",
                           score_rows({u: [0.4, 0.5] for u in range(1, 11)}, split="valid"))

    monkeypatch.setattr(check, "_side", fake_side)
    monkeypatch.setattr("rlrf.sample.sample_stage", fake_sample)
    out = check.check_stage(recipe, 1)
    assert ("old", 1, 0.7, 0.95, 0.0) in seen  # the calibration's generator 0
    assert [x for x in seen if x[0].startswith("new_t")] and all(
        x[3:] == (1.0, 0.05) for x in seen if x[0].startswith("new_t"))
    assert seen[-2:] == [("old", 1, 0.7, 0.95, 0.0), ("new", 1, 1.2, 1.0, 0.05)]
    info = json.loads((out / "stage.json").read_text())
    assert info["decoding"] == {"old": {"temperature": 0.7, "top_p": 0.95, "min_p": 0.0},
                                "new": {"temperature": 1.2, "top_p": 1.0, "min_p": 0.05}}
    assert info["config"]["check"]["min_p"] == 0.05  # fingerprinted: another cut is another check
    assert "generator 1 sampled at top_p 1, min_p 0.05" in (out / "summary.md").read_text()
    assert runs.generator_decoding(recipe, 1) == {"temperature": 1.2, "top_p": 1.0, "min_p": 0.05}
    seen.clear()
    monkeypatch.setattr(sys, "argv", ["sample.py", "--round", "2", *over])
    capsys.readouterr()
    runpy.run_path(str(REPO / "pipelines" / "sample.py"), run_name="__main__")
    assert seen == [("sample", 2, 1.2, 1.0, 0.05)]
    assert "samples generator 1 at temperature 1.2, top_p 1, min_p 0.05" in capsys.readouterr().out
    # a check written before the decoding record: generator 1 at its temperature, the recipe's top_p and min_p
    info.pop("decoding")
    (out / "stage.json").write_text(json.dumps(info))
    assert runs.generator_decoding(recipe, 1) == {"temperature": 1.2, "top_p": 0.95, "min_p": 0.0}
    for bad in ("check.min_p=1.0", "check.top_p=0", "sample.min_p=-0.1"):
        with pytest.raises(Exception, match=bad.split("=")[0]):
            load_recipe(None, [bad])


def test_quality_criteria_are_read_off_their_intervals(tmp_path):
    """The check's quality lines: distinct-2 and names-history 'lower' only when the whole interval is below 0, the
    perplexity ratio against the +25% bound; summary.md carries them under the quality table."""
    def ci(mean, low, high):
        return {"mean": mean, "low": low, "high": high, "n": 94, "level": 0.95, "resamples": 2000}

    side = {"mean_tokens": 50.0, "distinct_2": 0.37, "names_history": 0.9, "perplexity": 20.0}
    quality = {"old": side, "new": side, "diff": {
        "distinct_2": ci(-0.077, -0.0975, -0.0556), "distinct_2_across": ci(-0.036, -0.048, -0.022),
        "names_history": ci(0.02, -0.01, 0.05),
        "perplexity": ci(1.08, 1.01, 1.16), "perplexity_at_old_lengths": ci(1.31, 1.15, 1.48)}}
    lines = check.criteria_lines(quality["diff"])
    assert lines == ["distinct-2 new - old -0.0770 [-0.0975, -0.0556] -> lower: the whole 95% interval is below 0",
                     "distinct-2 across users new - old -0.0360 [-0.0480, -0.0220] -> lower: the whole 95% interval is "
                     "below 0",
                     "names-history share new - old +0.0200 [-0.0100, +0.0500] -> no detectable change: the 95% interval "
                     "contains 0",
                     "perplexity new / old 1.080 [1.010, 1.160] -> within +25%",
                     "perplexity at old's lengths new / old 1.310 [1.150, 1.480] -> +25% inside the interval"]
    quality["diff"]["perplexity"] = ci(1.4, 1.3, 1.5)
    assert check.criteria_lines(quality["diff"])[3].endswith("-> over +25%")
    assert check.criteria_lines(None) == []  # a check finished before the intervals
    # a length bin of old's that no new profile reaches leaves the matched ratio NaN: said so, never read as a verdict
    nan = float("nan")
    assert check.criteria_lines({"perplexity_at_old_lengths": ci(nan, nan, nan)}) == [
        "perplexity at old's lengths new / old: not measured (some length bin of the old profiles holds no new profile)"]
    check.write_summary(tmp_path / "summary.md", 1, {}, "old", "new", None, quality)
    md = (tmp_path / "summary.md").read_text()
    assert "| old | 50.0000 | 0.3700 |" in md and "- distinct-2 new - old -0.0770 [-0.0975, -0.0556]" in md


def test_old_side_profiles_are_taken_from_the_rounds_sample_when_it_has_them(tmp_path, monkeypatch):
    """The check's old side (generator k-1, valid users, round k's seeds) is a subset of round k's own sample
    stage; it is copied from there when decoding, seeds and weights match, and sampled otherwise."""
    import polars as pl

    from rlrf import runs, sample
    from rlrf.artifacts import read_artifact
    from rlrf.config import load_recipe
    from rlrf.config.keys import fingerprint
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage

    monkeypatch.setattr(sample, "weights_hash", lambda p: "w0")
    monkeypatch.setattr(sample, "resolve_model", lambda g: g)
    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "sample.n=4", "sample.max_users=-1"])
    splits = {1: "train", 2: "valid", 3: "valid", 4: "test", 5: "valid"}
    prompts = pl.DataFrame([{"user_id": u, "split": s, "domain": "movies", "prompt_head": "h", "history_lines": ["l"],
                             "prompt_tail": "t", "prompt": "p"} for u, s in splits.items()], schema=SCHEMAS["prompts"])
    with Stage(runs.prepare_dir(recipe), "prepare", {"x": 1}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"prompts": prompts})
        st.finish()
    base = fingerprint(recipe.sample)  # as the sample stage fingerprints it: no speed keys, no late keys at default
    src_config = {"seed": recipe.seed, "run": "r", "round": 1, "generator": "g0", "generator_hash": "w0", "sample": base}
    rows = [{"run": "r", "round": 1, "split": s, "user_id": u, "sample_idx": i, "prompt": "p", "text": f"u{u} s{i}",
             "n_tokens": 3, "finish_reason": "eos", "n_history_trimmed": 0, "generator": "g0", "generator_hash": "w0",
             "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 96, "seed": 7} for u, s in splits.items() for i in range(4)]
    src = runs.stage_dir(recipe, "sample", 1)
    with Stage(src, "sample", src_config, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"profiles": pl.DataFrame(rows, schema=SCHEMAS["profiles"])})
        st.finish()

    out = sample.sample_stage(recipe, tmp_path / "old" / "sample", "g0", 1, splits=["valid"], n=2, max_users=-1,
                              source=src)
    got = read_artifact(out, "profiles", "sample").sort("user_id", "sample_idx")
    assert got["text"].to_list() == [f"u{u} s{i}" for u in (2, 3, 5) for i in (0, 1)]
    info = json.loads((out / "stage.json").read_text())
    assert info["taken_from"] == str(src)
    # the config (so the fingerprint) is what sampling would record: it says which texts, not where they came from
    cfg = sample._sample_config(recipe, ["valid"], 2, -1)
    assert info["config"] == sample._stage_config(recipe, cfg, "g0", 1, "w0") and "taken_from" not in info["config"]

    # anything that changes the texts, or users / profiles the source lacks: the source cannot serve (so the stage
    # samples instead)
    def serves(r, round_, n):
        c = sample._sample_config(r, ["valid"], n, -1)
        users = sample.select_users(prompts, c.splits, c.max_users, r.seed)
        return sample.from_source(r, src, users, c, sample._stage_config(r, c, "g0", round_, sample.weights_hash("g0")))

    assert serves(recipe, 1, 2) is not None
    assert serves(recipe, 2, 2) is None
    assert serves(recipe, 1, 5) is None
    hot = load_recipe(None, [f"runs_dir={tmp_path}", "run=r", "sample.n=4", "sample.max_users=-1", "sample.temperature=0.7"])
    assert serves(hot, 1, 2) is None
    monkeypatch.setattr(sample, "weights_hash", lambda p: "w1")  # generator weights changed since
    assert serves(recipe, 1, 2) is None


def test_the_check_leads_with_the_judges_independent_of_the_pair_picker():
    from rlrf.check import judges
    from rlrf.config import load_recipe

    cols = ["reward", "retrieval", "lexical", "genres", "judge_a", "judge_b", "judge_ab"]
    for picked, col in (("retrieval", "retrieval"), ("lexical", "lexical"), ("genres", "genres"),
                        ("reranker", "judge_ab")):
        got = judges(load_recipe(None, [f"score.reward={picked}"]), cols)
        assert list(got.values())[-1] == col and list(got)[-1].endswith("picked the pairs")
        assert sorted(got.values()) == ["genres", "judge_ab", "lexical", "retrieval"]
    # scores without judge columns (an older score stage): the round's reward alone
    assert judges(load_recipe(None, []), ["reward"]) == {"the round's reward": "reward"}
    # a judge that vetoed pairs (pairs.agree_with) is not independent of them: it goes last but one, so marked
    got = judges(load_recipe(None, ["score.reward=lexical", "pairs.agree_with=[genres]"]), cols)
    assert list(got.values()) == ["retrieval", "judge_ab", "genres", "lexical"]
    assert list(got)[2].endswith("vetoed the pairs") and list(got)[3].endswith("picked the pairs")


def test_generator_k_has_one_name_everywhere(tmp_path):
    """Generator 0 is the base model, generator k is round k's merged model, and round k samples from k-1."""
    from rlrf import runs
    from rlrf.config import load_recipe

    r = load_recipe(None, [f"runs_dir={tmp_path}", "run=r"])
    assert runs.generator(r, 0) == r.sample.model == runs.generator_for_round(r, 1)
    assert runs.generator(r, 2) == str(tmp_path / "r" / "round_2" / "dpo" / "merged") == runs.generator_for_round(r, 3)
    with pytest.raises(ValueError, match="from 0"):
        runs.generator(r, -1)
    with pytest.raises(ValueError, match="from 1"):
        runs.generator_for_round(r, 0)
