"""The report scripts in benchmarks/ that only read finished stages: run on hand-made stage.json files."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.fixtures_llm import smollm2_dir, tiny_model  # noqa: F401


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_derangement_has_no_fixed_point():
    d = load("check_personal").derangement
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 94):
        p = d(n, rng)
        assert sorted(p.tolist()) == list(range(n)) and not (p == np.arange(n)).any()
    with pytest.raises(ValueError, match="at least 2"):
        d(1, rng)


def test_check_personal_splits_own_from_swapped():
    """A judge that pays 1 only for a profile naming the user it is judged for: own 1, swapped 0, per user."""
    m = load("check_personal")
    users = np.array([3, 5, 8, 9])
    uid = np.repeat(users, 2)
    texts = [f"u{u}" if j == 0 else "generic" for u in users for j in range(2)]

    def reward(texts, judged_for):
        return {"reward": np.array([1.0 if t == f"u{v}" else 0.0 for t, v in zip(texts, judged_for)])}

    perms = [m.derangement(len(users), np.random.default_rng(s)) for s in range(3)]
    own, swapped = m.own_and_swapped(reward, texts, uid, users, perms)
    assert own == {3: 0.5, 5: 0.5, 8: 0.5, 9: 0.5} and swapped == {3: 0.0, 5: 0.0, 8: 0.0, 9: 0.0}


def _stage(d, **kw):
    d.mkdir(parents=True, exist_ok=True)
    (d / "stage.json").write_text(json.dumps(kw))


def test_dpo_vs_grpo_reads_costs_and_figures(tmp_path, monkeypatch, capsys):
    diff = lambda m: {"mean": m, "low": m - 0.01, "high": m + 0.01, "n": 94}  # noqa: E731
    order = ["retrieval (encoder cosine)", "lexical (TF-IDF cosine) - picked the pairs"]
    dpo, grpo = tmp_path / "d", tmp_path / "g"
    for s, w in (("sample", 600), ("encode", 60), ("score", 6), ("pairs", 1), ("dpo", 300)):
        _stage(dpo / "round_1" / s, wall_s=w, config={"score": {"reward": "lexical"}})
    _stage(dpo / "reranker", wall_s=999)  # not counted: a lexical reward trains no judge
    _stage(dpo / "round_1" / "check", judge_order=order, judges={order[0]: {"diff": diff(-0.004)},
                                                                  order[1]: {"diff": diff(0.013)}})
    _stage(grpo / "round_1" / "grpo", wall_s=1200)
    g_order = ["retrieval (encoder cosine)", "lexical (TF-IDF cosine) - GRPO's reward"]
    _stage(grpo / "round_1" / "check", judge_order=g_order, judges={g_order[0]: {"diff": diff(0.002)},
                                                                     g_order[1]: {"diff": diff(0.02)}})
    out = tmp_path / "cmp.png"
    monkeypatch.setattr(sys, "argv", ["dpo_vs_grpo", "--dpo", f"{dpo}:DPO", "--grpo", f"{grpo}:GRPO", "--out", str(out)])
    load("dpo_vs_grpo").main()
    text = capsys.readouterr().out
    assert "DPO (dpo): 16.1 min" in text and "reranker" not in text and "GRPO (grpo): 20.0 min" in text
    assert "+0.0130 [+0.0030, +0.0230]" in text and out.is_file() and out.stat().st_size > 1000


def test_grpo_curve_minutes_checkpoints_and_paired_figures(tmp_path):
    """The curve's x (training minutes summed to a step), the checkpoints it finds, and its per-judge paired
    difference (the check's own judge_diffs): only users both sides scored, each user's profiles averaged first."""
    import polars as pl

    from rlrf.check import judge_diffs
    from rlrf.config import load_recipe
    from rlrf.reward import REWARDS

    m = load("grpo_curve")
    log = tmp_path / "train_log.csv"
    log.write_text("step,reward,step_time\n1,0.1,60\n2,0.2,30\n3,0.2,\n4,0.3,90\n")
    assert m.minutes_at(log) == {1: 1.0, 2: 1.5, 3: 1.5, 4: 3.0}
    for name, adapter in (("checkpoint-10", True), ("checkpoint-5", True), ("checkpoint-15", False)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if adapter:  # a checkpoint a kill cut before its adapter was written is not a generator
            (tmp_path / "checkpoints" / name / "adapter_config.json").write_text("{}")
    assert list(m.checkpoints(tmp_path)) == [5, 10]
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [])
    lex = REWARDS["lexical"].column  # a judge independent of the tiny recipe's pair-picking reward (reranker)
    old = pl.DataFrame({"user_id": [1, 1, 2, 2, 3], lex: [0.1, 0.3, 0.5, 0.5, 0.9]})
    new = pl.DataFrame({"user_id": [1, 1, 2, 2, 4], lex: [0.3, 0.5, 0.4, 0.6, 0.0]})
    (name, (col, pairs, ci)), = judge_diffs(recipe, old, new, 1).items()
    assert name == REWARDS["lexical"].label and col == lex and pairs["user_id"].to_list() == [1, 2]
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(0.1)
    assert ci["low"] <= 0.1 <= ci["high"]


def test_check_perplexity_ratios_separate_length_from_fluency():
    """Both generators equally fluent at each length (3 nats a token in short profiles, 1 in long ones); the new one
    writes more short profiles: its plain perplexity rises, at the old lengths it does not."""
    import polars as pl

    m = load("check_perplexity")
    old = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 4, 4], "tokens": [10, 90] * 4,
                        "nll": [30.0, 90.0] * 4})
    new = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 4, 4], "tokens": [10, 10, 10, 90] * 2,
                        "nll": [30.0, 30.0, 30.0, 90.0] * 2})
    r = m.paired_quality(old, new, resamples=50, seed=0, bins=2)  # the ratios the benchmark prints (the check's)
    plain, matched = r["perplexity"], r["perplexity_at_old_lengths"]
    assert set(r) == {"perplexity", "perplexity_at_old_lengths"}  # no text, no names-history column: no such figure
    assert plain["mean"] > 1.3 and matched["mean"] == pytest.approx(1.0)
    assert plain["n"] == 4 and plain["low"] <= plain["mean"] <= plain["high"]
    assert matched["low"] == pytest.approx(1.0) and matched["high"] == pytest.approx(1.0)  # equal in every draw
    # the table's bins are the ones the ratio matches on: per bin, both sides read e^3 (short) and e^1 (long)
    table = m.quartile_table(old, new, bins=2)
    assert table == [f"  tokens [0, 50): old {math.e ** 3:6.2f} (  4 profiles), new {math.e ** 3:6.2f} (  6 profiles)",
                     f"  tokens [50, inf): old {math.e:6.2f} (  4 profiles), new {math.e:6.2f} (  2 profiles)"]


def test_check_against_pairs_two_runs_new_generators_by_user(tmp_path):
    """check_against: run - control per judge over the users both checks scored (each user's profiles averaged
    first), worked by hand; checks from different generators k-1 are refused."""
    import polars as pl

    from rlrf.config import load_recipe
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage
    from tests.loop_fixtures import score_rows

    def check(run, lexical, retrieval, old="g0"):
        d = tmp_path / run / "round_1" / "check"
        rows = score_rows({u: [0.0] * len(v) for u, v in lexical.items()}, split="valid")
        df = pl.DataFrame(rows, schema=SCHEMAS["scores"]).with_columns(
            lexical=pl.Series([x for u in lexical for x in lexical[u]]),
            retrieval=pl.Series([x for u in retrieval for x in retrieval[u]]))
        with Stage(d / "new" / "score", "score", {"synthetic": run}, quiet=True) as st:
            for i in st.todo(1):
                st.write_shard(i, {"scores": df})
            st.finish()
        _stage(d, config={"old": old, "new": run})

    m = load("check_against")
    recipe = lambda run: load_recipe(None, [f"runs_dir={tmp_path}", f"run={run}", "score.reward=lexical"])  # noqa: E731
    check("h3", {1: [0.3, 0.5], 2: [0.2, 0.2], 3: [0.9, 0.9]}, {1: [0.1, 0.1], 2: [0.4, 0.2], 3: [0.5, 0.5]})
    check("coinflip", {1: [0.1, 0.1], 2: [0.2, 0.0]}, {1: [0.1, 0.1], 2: [0.1, 0.1]})
    judges, q = m.against(recipe("h3"), recipe("coinflip"), 1, quality=False)
    assert q == {} and list(judges) == ["retrieval (encoder cosine)", "lexical (TF-IDF cosine) - picked the pairs"]
    lex = judges["lexical (TF-IDF cosine) - picked the pairs"]
    assert lex["n"] == 2 and lex["mean"] == pytest.approx(((0.4 - 0.1) + (0.2 - 0.1)) / 2)
    assert judges["retrieval (encoder cosine)"]["mean"] == pytest.approx((0.0 + 0.2) / 2)
    check("other", {1: [0.1]}, {1: [0.1]}, old="g0-elsewhere")
    with pytest.raises(SystemExit, match="different generators"):
        m.against(recipe("h3"), recipe("other"), 1, quality=False)
    with pytest.raises(SystemExit, match="not a finished check stage"):
        m.against(recipe("h3"), recipe("absent"), 1, quality=False)


def test_round_flops_counts_what_each_llm_stage_fed():
    """benchmarks/round_flops.py on hand-counted shapes: a body of 100 and a head of 10 parameters (2 FLOPs each a
    token): a prompt of 7 tokens sampled twice, 3 and 4 new tokens; a pair of prompt 5, chosen 2, rejected 3."""
    m = load("round_flops")
    # prefill 7 x 200 + its last position's head 20; decode (3+1 + 4+1) tokens x 220
    assert m.sample_flops([7], [3, 4], 100, 10) == 7 * 200 + 20 + 9 * 220
    # one trained pair, prompt once: 10 tokens x 200 x (2 forwards + 2 x backward share); head over 5 tokens x 20 x 3
    assert m.dpo_flops([(5, 2, 3)], [], 100, 10, 1.0, True) == 10 * 200 * 4 + 5 * 20 * 3
    # the backward through half the layers, and the reference from the policy's frozen half: 2.5 forwards' worth
    assert m.dpo_flops([(5, 2, 3)], [], 100, 10, 0.5, True) == 10 * 200 * 2.5 + 5 * 20 * 3
    assert m.dpo_flops([(5, 2, 3)], [], 100, 10, 0.5, False) == 15 * 200 * 3 + 5 * 20 * 3  # TRL's rows: no reuse
    assert m.dpo_flops([(5, 2, 3)], [], 100, 10, 0.5, True, reuse=False) == 10 * 200 * 3 + 5 * 20 * 3  # a run before it
    # TRL's two rows feed the prompt twice; a held-out pair costs a policy and a reference forward
    assert m.dpo_flops([(5, 2, 3)], [], 100, 10, 1.0, False) == 15 * 200 * 4 + 5 * 20 * 3
    assert m.dpo_flops([], [(5, 2, 3)], 100, 10, 1.0, True) == 10 * 200 * 2 + 5 * 20 * 2
    assert m.perplexity_flops([3, 0], 100, 10) == (4 + 1) * 220


def test_evaluate_sampling_names_each_stages_baseline():
    """benchmarks/evaluate_sampling.py: --stage sample times the stage's own N and rows against the sampler before
    (whole prompts leaving), --stage evaluate one profile a user against the static batch; ours leaves by rows."""
    from rlrf.config import load_recipe

    m = load("evaluate_sampling")
    recipe = load_recipe(REPO / "recipes" / "ml100k_smollm2.yaml", ["sample.batch_size=96", "evaluate.batch_size=32"])
    n, splits, ((_, b_rows, b_leave), (_, o_rows, o_leave)) = m.variants("sample", recipe)
    assert (n, splits, b_rows, o_rows, b_leave, o_leave) == (recipe.sample.n, ["train"], 96, 96, "prompts", "rows")
    n, splits, ((_, b_rows, b_leave), (_, o_rows, o_leave)) = m.variants("evaluate", recipe)
    assert (n, b_rows, o_rows, b_leave, o_leave) == (1, 96, 32, "", "rows") and "test" in splits


def test_gain_by_genres_splits_a_gain_into_the_genre_count_and_the_rest():
    """A judge paying 0.01 a genre within each user (plus a user effect): new profiles naming 2 more genres and
    0.005 better otherwise split into explained +0.02 and rest +0.005 exactly (no noise: every bootstrap draw agrees);
    a user on one side only, and a NaN reward, are left out."""
    import polars as pl

    m = load("gain_by_genres")
    rng = np.random.default_rng(1)
    rows = [(u, int(g)) for u in range(30) for g in rng.integers(0, 6, 4)]
    old = pl.DataFrame({"user_id": [u for u, _ in rows], "genres": [g for _, g in rows],
                        "reward": [0.01 * u + 0.01 * g for u, g in rows]})
    new = old.with_columns(genres=pl.col("genres") + 2,
                           reward=pl.col("reward") + 0.02 + 0.005)
    new = pl.concat([new, pl.DataFrame({"user_id": [99], "genres": [9], "reward": [5.0]}),
                     pl.DataFrame({"user_id": [0], "genres": [0], "reward": [float("nan")]})])
    d = m.decompose(old, new, resamples=200)
    assert d["n"] == 30
    for key, want in (("gain", 0.025), ("explained", 0.02), ("rest", 0.005), ("slope", 0.01), ("genres", 2.0)):
        assert d[key]["mean"] == pytest.approx(want) and d[key]["lo"] == pytest.approx(want) \
            and d[key]["hi"] == pytest.approx(want), key
    # noise in the judge: the point split holds on average and the intervals open around it
    noisy = old.with_columns(reward=pl.col("reward") + pl.Series(rng.normal(0, 0.003, old.height)))
    d = m.decompose(noisy, new, resamples=200)
    assert d["slope"]["lo"] < 0.01 < d["slope"]["hi"] and d["rest"]["lo"] < d["rest"]["mean"] < d["rest"]["hi"]
    with pytest.raises(ValueError, match="no user"):
        m.decompose(old, new.filter(pl.col("user_id") == 99))


def test_check_power_is_the_normal_approximation():
    p = load("check_power").power
    assert p(0.0, 0.01) == pytest.approx(0.025, abs=1e-3)  # no gain: the one-sided 2.5% of reading "improved"
    assert p(0.01, 0.01) == pytest.approx(0.5)  # the gain one half-width away: a coin toss
    assert p(0.02, 0.01) == pytest.approx(0.975, abs=1e-3)
    assert p(0.01, 0.0) == 1.0 and p(-0.01, 0.0) == 0.0


def test_calibration_shape_reads_distinct_2_at_each_shape_of_one_cost():
    """calibration_shape: the shapes of one profile count (capped at the users there are), and per shape the corpus
    distinct-2 of each user's first k profiles on the same users of both sides: a generator that repeats itself within
    a user loses to one that varies there the more profiles a user are counted."""
    import polars as pl

    from rlrf.quality import distinct_n

    m = load("calibration_shape")
    assert m.shapes_at(384, 16, 94) == [(1, 94), (2, 94), (4, 94), (8, 48), (12, 32), (16, 24)]
    assert m.shapes_at(64, 4, 10) == [(1, 10), (2, 10), (4, 10)]
    users = np.repeat(np.arange(1, 9), 4)
    slots = np.tile(np.arange(4), 8)
    old = pl.DataFrame({"user_id": users, "sample_idx": slots, "text": [f"user u{u} likes g{u}" for u in users]})
    new = pl.DataFrame({"user_id": users, "sample_idx": slots,
                        "text": [f"user likes w{i} w{i + 100}" for i in range(32)]})
    rows = m.shape_diffs(old, new, [(1, 8), (4, 8), (2, 4)], draws=5, seed=0)
    assert [(r["k"], r["users"], r["draws"]) for r in rows] == [(1, 8, 1), (4, 8, 1), (2, 4, 5)]
    want = {k: distinct_n(new.filter(pl.col("sample_idx") < k)["text"].to_list())
            - distinct_n(old.filter(pl.col("sample_idx") < k)["text"].to_list()) for k in (1, 4)}
    assert rows[0]["mean"] == pytest.approx(want[1]) and rows[1]["mean"] == pytest.approx(want[4])
    assert rows[0]["mean"] < rows[2]["mean"] < rows[1]["mean"] and rows[0]["std"] == 0.0


def test_finished_check_names_the_command_or_returns_the_check(tmp_path):
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.errors import StageError

    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=r"])
    with pytest.raises(StageError, match=r"not a finished check stage: run `python pipelines/check.py .* --round 2`"):
        runs.finished_check(recipe, 2)
    check = runs.stage_dir(recipe, "check", 2)
    check.mkdir(parents=True)
    (check / "stage.json").write_text("{}")
    assert runs.finished_check(recipe, 2) == check
    # check_sides: both sides' artifact of one sub-stage of the check; fewest_per_user: the profiles a user all hold
    import polars as pl

    from rlrf.stats import fewest_per_user
    from tests.loop_fixtures import profile_rows, write_stage

    write_stage(check / "old" / "sample", "sample", "profiles", profile_rows({1: ["a b", "c d"], 2: ["e f", "g h"]}))
    write_stage(check / "new" / "sample", "sample", "profiles", profile_rows({1: ["a c"], 2: ["e g", "f h"]}))
    got, old, new = runs.check_sides(recipe, 2, "sample", "profiles")
    assert got == check and old.height == 4 and new.height == 3 and new["text"].to_list()[0] == "a c"
    assert fewest_per_user(old, new) == 1 and fewest_per_user(old) == 2
    assert fewest_per_user(pl.DataFrame({"user_id": [3, 3, 3]})) == 3


def test_pool_draws_reads_checks_pools_their_figures_and_names_bad_input(tmp_path, capsys):
    """pool_draws on three hand-made check stages: each draw's line, the pooled figures (the judge's fixed mean the
    inverse-variance mean of the three), the criteria read on the random-effects figures; missing or foreign stages
    and an unknown judge are refused by name."""
    m = load("pool_draws")
    judge = "retrieval (encoder cosine)"
    ci = lambda mean, se: {"mean": mean, "low": mean - 1.96 * se, "high": mean + 1.96 * se, "n": 94}  # noqa: E731
    ratio = lambda r: {"mean": r, "low": r * 0.95, "high": r * 1.05, "n": 94}  # noqa: E731
    dirs = []
    for i, (g, se) in enumerate(((0.014, 0.004), (0.008, 0.004), (0.005, 0.003))):
        d = tmp_path / f"runs_{i}" / "round_1" / "check"
        _stage(d, stage="check", round=1, judge=judge, judges={judge: {"diff": ci(g, se)}, "other": {"diff": ci(0, 1)}},
               temperature={"old": 0.7, "new": 0.9 + i / 40},
               quality={"diff": {"distinct_2_across": ci(0.01, 0.005), "names_history": ci(0.02, 0.01),
                                 "perplexity": ratio(1.1 + i / 10)}})
        dirs.append(str(d))
    assert m.main(dirs) == 0
    out = capsys.readouterr().out
    w = np.array([1 / 0.004 ** 2, 1 / 0.004 ** 2, 1 / 0.003 ** 2])
    fixed = float((w * np.array([0.014, 0.008, 0.005])).sum() / w.sum())
    assert f"pooled (fixed): {judge} {fixed:+.4f}" in out and out.count("(T 0.7 -> ") == 3
    assert "pooled (random) distinct-2 across users new - old +0.0100" in out
    geo = (1.1 * 1.2 * 1.3) ** (1 / 3)  # ratios pool on the log scale: equal weights, the geometric mean
    assert f"pooled (random) perplexity new / old {geo:.3f}" in out and "between draws" in out
    assert "perplexity at old's lengths" not in out  # no draw carries it
    nan = {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 94}
    assert "perplexity" not in m.pooled([m.read_check(d, None) for d in dirs[:1]] + [
        {"diff": ci(0.01, 0.004), "quality": {"perplexity": nan}}])  # one draw did not measure it: left out
    with pytest.raises(SystemExit, match="is missing"):
        m.main([dirs[0], str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no judge 'genres'"):
        m.main(dirs + ["--judge", "genres"])
    with pytest.raises(SystemExit, match="2 or more"):
        m.main(dirs[:1])
    _stage(tmp_path / "dpo", stage="dpo", wall_s=1)
    with pytest.raises(SystemExit, match="not a check stage"):
        m.main([dirs[0], str(tmp_path / "dpo")])


def test_perplexity_by_part_splits_the_checks_token_nll_into_named_and_rest(tiny_model):
    """perplexity_by_part: a genre (any spelling) or a history title is named as whole words only, its tokens are the
    ones overlapping it, and the two parts add up, user by user, to the check's own token NLL (quality.token_nll);
    the ratio of a stage to itself is 1 in every resample."""
    import polars as pl

    from rlrf.llm import load_generator
    from rlrf.quality import token_nll

    m = load("perplexity_by_part")
    assert m.names(["Drama", "Sci-Fi"]) == ["drama", "sci-fi", "science fiction", "science-fiction"]
    text = "Loves Science Fiction and melodrama, and The Usual Suspects."
    spans = m.named_spans(text, ["drama", "science fiction", "the usual suspects"])
    assert [text[s:e] for s, e in sorted(spans)] == ["Science Fiction", "The Usual Suspects"]  # not 'melodrama'
    assert m.named_mask([(0, 5), (6, 13), (13, 21), (22, 25)], [(6, 21)]).tolist() == [False, True, True, False]
    items = pl.DataFrame({"item_id": [1, 2, 3], "title": ["Usual Suspects, The (1995)", "M (1931)", "unknown"]})
    inter = pl.DataFrame({"user_id": [7, 7, 7, 8], "item_id": [1, 2, 3, 1], "in_history": [True, True, True, False]})
    assert m.history_titles(items, inter) == {7: {"the usual suspects"}}

    model, tok = load_generator(str(tiny_model), dtype="float32")
    texts = ["This user likes drama and The Usual Suspects.", "Comedy, comedy, and more comedy!", "sci-fi fan", ""]
    prof = pl.DataFrame({"user_id": [7, 7, 8, 8], "text": texts})
    parts = m.split_nll(prof, {7: {"the usual suspects"}}, m.names(["Drama", "Comedy", "Sci-Fi"]), model, tok,
                        batch_size=2)
    nll, count = token_nll(texts, model, tok)
    assert parts["user_id"].to_list() == [7, 8]
    assert (parts["nll_named"] + parts["nll_rest"]).to_list() == pytest.approx([nll[:2].sum(), nll[2:].sum()],
                                                                               rel=1e-4)
    assert (parts["n_named"] + parts["n_rest"]).to_list() == [count[:2].sum(), count[2:].sum()]
    assert 0 < parts["n_named"][1] < count[2]  # user 8: 'sci-fi' named, ' fan' the rest
    r = m.ratio(parts, parts, "rest", resamples=50)
    assert r["mean"] == pytest.approx(1.0) and r["low"] == pytest.approx(1.0) and r["high"] == pytest.approx(1.0)
