"""The evaluate stage: table assembly on synthetic metrics (values worked out by hand), the whole stage
with the sub-stages replaced by fakes that write schema-true outputs, the missing-round error, and (in
the integration tier) a real round plus evaluate on the tiny recipe."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import evaluate_fakes
import numpy as np
import polars as pl
import pytest

from rlrf import runs
from rlrf.config import load_recipe
from rlrf.errors import StageError
from rlrf.evaluate import (
    assemble_tables,
    check_rounds,
    evaluate_stage,
    markdown_table,
    paired_rewards,
    read_test_metrics,
    reward_summary,
    summarize,
)
from rlrf.files import write_json
from rlrf.store import Stage

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- pure assembly


def test_summarize_mean_and_sample_std():
    s = summarize([{"map@5": 0.5, "ndcg@5": 0.6}, {"map@5": 0.7, "ndcg@5": 0.6}])
    assert s["map@5"]["mean"] == pytest.approx(0.6)
    assert s["map@5"]["std"] == pytest.approx(np.sqrt(0.02))  # ddof=1: ((0.1^2 + 0.1^2) / 1) ** 0.5
    assert s["ndcg@5"]["std"] == 0.0 and s["map@5"]["n"] == 2
    assert summarize([{"map@5": 0.4}])["map@5"]["std"] == 0.0  # one seed: no spread, not NaN
    assert "map@3" not in s


def _cond(base, kar, rlrf):
    return {"base": summarize([{"map@5": base, "ndcg@5": base + 0.1}]), 0: summarize([{"map@5": kar, "ndcg@5": kar + 0.1}]),
            2: summarize([{"map@5": rlrf, "ndcg@5": rlrf + 0.1}])}


def test_tables_map_conditions_to_rows():
    t = assemble_tables({"dlcm": _cond(0.30, 0.35, 0.40), "prm": _cond(0.31, 0.36, 0.41)}, last=2)
    rows = [(r["backbone"], r["method"], r["map@5"]["mean"]) for r in t["table1"]]
    assert rows == [("DLCM", "base", 0.30), ("DLCM", "KAR", 0.35), ("DLCM", "RLRF", 0.40),
                    ("PRM", "base", 0.31), ("PRM", "KAR", 0.36), ("PRM", "RLRF", 0.41)]
    ablation = {(r["backbone"], r["variant"]): r for r in t["table2"]}
    assert ablation[("DLCM", "RLRF")]["map@5"]["mean"] == 0.40
    assert ablation[("DLCM", "RLRF w/o knowledge")]["map@5"]["mean"] == 0.30  # = base
    assert ablation[("DLCM", "RLRF w/o DPO")]["map@5"]["mean"] == 0.35        # = KAR
    assert "= KAR" in ablation[("DLCM", "RLRF w/o DPO")]["maps_to"]
    assert sorted(t["per_round"]["prm"]) == [0, 2] and t["base"]["prm"]["map@5"]["mean"] == 0.31
    md = markdown_table(t["table1"], ["backbone", "method", "map@5", "ndcg@5"], ["b", "m", "MAP@5", "NDCG@5"])
    assert md.splitlines()[0] == "| b | m | MAP@5 | NDCG@5 |"
    assert "| DLCM | RLRF | 0.4000 ± 0.0000 | 0.5000 ± 0.0000 |" in md


def test_list_counts_note_warns_when_rows_saw_different_lists():
    from rlrf.evaluate import list_counts_note
    same = {"dlcm": {"base": summarize([{"map@5": 0.1, "test_lists": 170}]), 0: summarize([{"map@5": 0.2, "test_lists": 170}])}}
    assert "same 170 test lists" in list_counts_note(same)
    same["dlcm"][1] = summarize([{"map@5": 0.2, "test_lists": 40}])
    note = list_counts_note(same)
    assert note.startswith("**Warning") and "DLCM 1: 40" in note and "evaluate.max_users=-1" in note


def test_read_test_metrics_from_train_reranker_json(tmp_path):
    write_json(tmp_path / "metrics.json", {"seeds": [1, 2], "per_seed": {
        "1": {"valid": {"map@5": 0.9}, "test": {"map@5": 0.3, "ndcg@5": 0.4}},
        "2": {"valid": {"map@5": 0.9}, "test": {"map@5": 0.5, "ndcg@5": 0.6}}},
        "test": {"map@5": {"mean": 0.4, "std": 0.1}}, "n_lists": {"test": 12}})
    assert read_test_metrics(tmp_path, 2) == {"map@5": 0.5, "ndcg@5": 0.6, "test_lists": 12.0}
    with pytest.raises(StageError, match="no test metrics for seed 3"):
        read_test_metrics(tmp_path, 3)


def test_paired_rewards_and_bootstrap_by_hand():
    def scores(rewards, split="test"):
        return pl.DataFrame({"user_id": list(rewards), "split": [split] * len(rewards), "reward": list(rewards.values())})
    s0 = pl.concat([scores({1: 0.2, 2: 0.4, 3: 0.6, 6: float("nan")}), scores({4: 0.9}, "train")])
    sk = pl.concat([scores({1: 0.3, 2: 0.4, 3: 0.9, 6: 0.5}), scores({4: 0.0}, "train")])
    paired = paired_rewards(s0, sk)
    # the train user is not a test user; user 6's profile was scored on no list (NaN) under generator 0
    assert paired["user_id"].to_list() == [1, 2, 3]
    r = reward_summary(paired, k=1, resamples=500, seed=0)
    assert r["mean_diff"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert r["share_improved"] == pytest.approx(2 / 3)
    lo, hi = r["ci95"]
    assert -1e-12 <= lo < r["mean_diff"] < hi <= 0.3 + 1e-12  # bootstrap means of {0.1, 0, 0.3} stay in [0, 0.3]
    assert r == reward_summary(paired, k=1, resamples=500, seed=0)  # seeded: the same figures again
    constant = reward_summary(pl.DataFrame({"user_id": range(7), "reward_0": [0.0] * 7, "reward_k": [0.25] * 7}),
                              k=1, resamples=100, seed=1)
    assert constant["ci95"] == pytest.approx([0.25, 0.25]) and constant["verdict"].startswith("improved")
    empty = reward_summary(paired.head(0), k=1, resamples=100, seed=1)
    assert empty["users"] == 0 and empty["verdict"] == "no test user scored under both generators"


# ----------------------------------------------------------------------------- rounds


def _recipe(tmp_path, *over):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}", *over])


def _finished(d: Path, name: str, config=None) -> Path:
    with Stage(d, name, config or {"synthetic": name}, quiet=True) as st:
        st.finish()
    return d


def test_missing_round_says_which_stage_to_run(tmp_path):
    r = _recipe(tmp_path, "evaluate.rounds=[1,2,3]")
    _finished(runs.stage_dir(r, "dpo", 1), "dpo")
    with pytest.raises(StageError) as e:
        check_rounds(r, "recipes/tiny.yaml")
    msg = str(e.value)
    assert "round(s) [2, 3]" in msg and "make round2" in msg and "make round3" in msg
    assert "python pipelines/dpo.py --recipe recipes/tiny.yaml --round 2" in msg
    assert "evaluate.rounds=[1]" in msg  # what can be evaluated now
    with pytest.raises(StageError, match="make round2"):
        evaluate_stage(r)  # refuses before doing any work
    assert not (r.run_dir / "evaluate").exists()
    assert check_rounds(_recipe(tmp_path, "evaluate.rounds=[1]")) == [0, 1]


def test_evaluate_rounds_validated_in_config(tmp_path):
    from rlrf.config import ConfigError
    with pytest.raises(ConfigError, match="evaluate.rounds"):
        _recipe(tmp_path, "evaluate.rounds=[0]")
    with pytest.raises(ConfigError, match="evaluate.backbones"):
        _recipe(tmp_path, "evaluate.backbones=[gru]")


# ----------------------------------------------------------------------------- the whole stage, sub-stages faked

@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    work = evaluate_fakes.WorkLog()
    for name, mod in evaluate_fakes.modules(work).items():
        monkeypatch.setitem(sys.modules, name, mod)
    r = evaluate_fakes.make_run(tmp_path / "runs")
    return types.SimpleNamespace(recipe=r, work=work, loads=work.loads)


def test_evaluate_stage_writes_tables_figures_and_resumes(fake_stages):
    r, work = fake_stages.recipe, fake_stages.work
    out = evaluate_stage(r, recipe_path="recipes/tiny.yaml")
    assert out == r.run_dir / "evaluate"
    # 2 generators x (sample + encode), 2 backbones x 3 conditions x 3 seeds, 2 score sub-stages
    assert sorted({name for name, _ in work}) == ["encode", "sample", "score", "train-reranker"]
    assert len(work) == 4 + 18 + 2
    assert (out / "rerank" / "prm" / "gen_1" / "seed_3" / "metrics.json").is_file()

    res = json.loads((out / "results.json").read_text())
    t1 = {(row["backbone"], row["method"]): row for row in res["table1"]}
    # DLCM base: 0.30 + 0.01 * seed over seeds 1, 2, 3 -> mean 0.32, std 0.01
    assert t1[("DLCM", "base")]["map@5"]["mean"] == pytest.approx(0.32)
    assert t1[("DLCM", "base")]["map@5"]["std"] == pytest.approx(0.01)
    assert t1[("DLCM", "KAR")]["map@5"]["mean"] == pytest.approx(0.37)   # + knowledge of generator 0
    assert t1[("PRM", "RLRF")]["map@5"]["mean"] == pytest.approx(0.49)   # + 0.10 PRM + 0.05 + 0.02 round 1
    assert t1[("PRM", "RLRF")]["ndcg@5"]["mean"] == pytest.approx(0.59)
    assert set(res["conditions"]["dlcm"]["1"]) >= {"map@3", "ndcg@3", "map@7", "ndcg@7"}
    # rewards: generator 1 is exactly 0.10 above generator 0 for both test users
    rw = res["reward"]
    assert rw["users"] == 2 and rw["mean_diff"] == pytest.approx(0.10) and rw["ci95"] == pytest.approx([0.10, 0.10])
    assert rw["reranker"] == str(runs.reranker_dir(r, 1))
    q = res["quality"]
    assert q["0"]["profiles"] == 5 and q["1"]["mean_tokens"] == pytest.approx(8.0)
    assert q["0"]["names_history"] == pytest.approx(4 / 5)  # user 5's Comedy is not in its history
    assert q["0"]["perplexity"] == pytest.approx(10.0)      # uniform over 10 tokens
    assert fake_stages.loads == [r.sample.model]           # the base model, loaded once for both generators
    # round 1 against the original, paired by user: the fake generators write alike ("... round k user u"), the
    # same shared bigrams, the same history names and lengths under a uniform model: no change in any draw
    d = res["quality_diff"]["1"]
    assert set(d) == {"distinct_2", "names_history", "perplexity", "perplexity_at_old_lengths"}
    assert d["distinct_2"]["n"] == 5 and d["perplexity"]["n"] == 2  # every user; the test users for perplexity
    assert all(d[x][b] == pytest.approx(0.0) for x in ("distinct_2", "names_history") for b in ("mean", "low", "high"))
    assert all(d[x][b] == pytest.approx(1.0) for x in ("perplexity", "perplexity_at_old_lengths")
               for b in ("mean", "low", "high"))

    md = (out / "results.md").read_text()
    assert "Round 1 (new) against the original (old)" in md and "- perplexity new / old 1.000 [1.000, 1.000]" in md
    assert "## Table I" in md and "## Table II" in md
    assert "| DLCM | base | none | 0.3200 ± 0.0100 | 0.4200 ± 0.0100 |" in md
    assert "| PRM | RLRF w/o DPO | = KAR: knowledge from the untuned LLM (round 0) | 0.4700 ± 0.0100 |" in md
    assert "recipes/tiny.yaml" in md and "rounds.png" in md and "rewards.png" in md
    assert "+0.1000" in md and "improved: the whole 95% interval is above 0" in md
    assert "same 2 test lists" in md
    for png in ("rounds.png", "rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "stage.json").read_text())
    assert set(info["hardware"]) >= {"cpu", "cores", "torch_threads", "gpu"}
    assert info["recipe"] == "recipes/tiny.yaml" and info["rows"]["rerankers"] == 18

    # a finished evaluate is a no-op; losing only the results re-assembles them without redoing sub-stages
    n = len(work)
    evaluate_stage(r)
    assert len(work) == n
    for f in ("stage.json", "results.md", "results.json"):
        (out / f).unlink()
    evaluate_stage(r)
    assert len(work) == n and (out / "results.md").is_file()
    assert (out / "gen_0" / "quality.json").is_file() and fake_stages.loads == [r.sample.model]  # cached
    assert (out / "gen_1" / "quality_profiles.parquet").is_file()


def _comparable(res: dict) -> dict:
    """results.json without what differs between two runs dirs or machines (paths, hardware)."""
    return {k: v for k, v in res.items() if k not in ("hardware", "generators")} | {
        "reward": {k: v for k, v in res["reward"].items() if k != "reranker"}}


@pytest.mark.faults
def test_evaluate_resumes_after_kill_9(tmp_path):
    """Killed with -9 half way (after its 3rd shard: gen 0's sample and encode, gen 1's sample), evaluate
    resumes without redoing finished sub-stages and writes exactly the results of a clean run."""
    import os
    import subprocess

    script = str(REPO / "tests" / "evaluate_fakes.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(root, log, kill=None):
        e = {**env, **({"RLRF_KILL_AFTER_SHARDS": str(kill)} if kill else {})}
        return subprocess.run([sys.executable, script, str(root), str(log)], env=e, capture_output=True, text=True)

    evaluate_fakes.make_run(tmp_path / "clean")
    assert run(tmp_path / "clean", tmp_path / "clean.log").returncode == 0
    evaluate_fakes.make_run(tmp_path / "killed")
    log = tmp_path / "killed.log"
    died = run(tmp_path / "killed", log, kill=3)
    assert died.returncode == -9, died.stderr[-2000:]
    before = log.read_text().splitlines()
    assert [line.split("\t")[0] for line in before] == ["sample", "encode", "sample"]
    out = tmp_path / "killed" / "tiny" / "evaluate"
    assert not (out / "stage.json").exists() and not (out / "results.json").exists()

    again = run(tmp_path / "killed", log)
    assert again.returncode == 0, again.stderr[-2000:]
    redone = log.read_text().splitlines()[len(before):]
    assert not any("gen_0" in line for line in redone if line.startswith(("sample", "encode")))  # not redone
    assert sum(line.startswith("train-reranker") for line in redone) == 18  # each reranker once
    clean = json.loads((tmp_path / "clean" / "tiny" / "evaluate" / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert _comparable(resumed) == _comparable(clean)


def test_evaluate_refuses_results_of_another_config(fake_stages):
    r = fake_stages.recipe
    evaluate_stage(r)
    # round 1 redone (same config, new weights): the finished results are not reported as its results
    gen1 = runs.generator_dir(r, 1)
    gen1.mkdir(parents=True)
    (gen1 / "weights.txt").write_text("w1")
    with pytest.raises(StageError, match="different config"):
        evaluate_stage(r)
    (gen1 / "weights.txt").write_text("w0")
    evaluate_stage(r)  # the same weights again: up to date
    other = load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={r.runs_dir}", "evaluate.backbones=[dlcm,prm]",
                                                         "evaluate.seeds=[1,2]", "evaluate.rounds=[1]",
                                                         "evaluate.workers=1"])
    with pytest.raises(StageError, match="different config"):
        evaluate_stage(other)
    before = json.loads((r.run_dir / "evaluate" / "results.json").read_text())
    assert before["conditions"]["dlcm"]["base"]["map@5"]["n"] == 3  # untouched
    evaluate_stage(other, force=True)
    after = json.loads((r.run_dir / "evaluate" / "results.json").read_text())
    assert after["conditions"]["dlcm"]["base"]["map@5"]["n"] == 2
    assert not (r.run_dir / "evaluate" / "rerank" / "dlcm" / "base" / "seed_3").exists()


def test_evaluate_samples_each_generator_at_its_own_check_temperature(fake_stages):
    """sample.temperature_from_check: generator k's evaluation profiles at the temperature round k's check measured it
    at (the base model at sample.temperature); refused, before any work, while that check is missing."""
    r, work = fake_stages.recipe, fake_stages.work
    carry = dataclasses.replace(r, sample=dataclasses.replace(r.sample, temperature_from_check=True))
    with pytest.raises(StageError, match="pipelines/check.py --recipe <recipe> --round 1"):
        evaluate_stage(carry)
    assert not work and not (r.run_dir / "evaluate").exists()
    with Stage(runs.stage_dir(r, "check", 1), "check", {"synthetic": 1}, quiet=True) as st:
        st.finish(extra={"temperature": {"old": r.sample.temperature, "new": 0.85}})
    out = evaluate_stage(carry)
    assert work.temperatures == {0: r.sample.temperature, 1: 0.85}
    assert json.loads((out / "results.json").read_text())["temperatures"] == {"0": r.sample.temperature, "1": 0.85}
    assert f"generator 0 {r.sample.temperature:g}, generator 1 0.85" in (out / "results.md").read_text()
    with pytest.raises(StageError, match="different config"):  # the temperatures are part of what it measured
        evaluate_stage(r)


def test_rerankers_in_worker_processes_write_what_one_process_writes(tmp_path):
    """make evaluate trains its rerankers two at a time in spawned processes: each writes the metrics and
    predictions it writes alone, one by one (the same seeds, one torch thread each), in job order; a reranker that
    fails in a worker stops the stage with its own message, and the finished ones are kept."""
    from rlrf.artifacts import read_artifact
    from rlrf.evaluate import RerankJob, reranker_workers, train_rerankers
    from tests.reward_fixtures import make_recipe, profile_texts, write_fake_encode, write_prepare, write_profiles

    recipe = make_recipe(tmp_path, "reranker.epochs=3")
    write_prepare(recipe)
    enc = write_fake_encode(recipe, write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), profile_texts()),
                            runs.stage_dir(recipe, "encode", 1))

    def jobs(root):
        return [RerankJob(tmp_path / root / f"{b}_{k}_{s}", enc if k else None, b, s)
                for b, k, s in (("dlcm", 0, 1), ("dlcm", 1, 1), ("prm", 1, 2))]

    alone = train_rerankers(recipe, jobs("alone"), workers=1)
    apart = train_rerankers(recipe, jobs("apart"), workers=2)
    assert apart == alone
    preds = [read_artifact(j.out, "predictions") for j in jobs("alone")]
    assert not preds[0].equals(preds[1]) and not preds[1].equals(preds[2])  # three different models, in job order
    for a, b in zip(preds, jobs("apart")):
        assert a.equals(read_artifact(b.out, "predictions"))
    assert reranker_workers(recipe, 18) >= 1 and reranker_workers(recipe, 1) == 1
    assert reranker_workers(load_recipe(None, ["evaluate.workers=3"]), 18) == 3

    bad = [*jobs("alone")[:1], RerankJob(tmp_path / "bad", tmp_path / "no_such_encode", "dlcm", 1)]
    with pytest.raises(StageError, match="no_such_encode"):
        train_rerankers(recipe, bad, workers=2)
    assert read_artifact(bad[0].out, "predictions").equals(read_artifact(jobs("apart")[0].out, "predictions"))


@pytest.mark.faults
def test_a_kill_9_of_the_evaluation_stops_its_reranker_workers_and_the_rerun_resumes(tmp_path):
    """make evaluate killed with -9 while two workers train: the workers stop with it (they would otherwise train
    on, holding their sub-stages' locks against the rerun), and the rerun trains both rerankers, as they train
    alone."""
    import subprocess
    import time

    from rlrf.evaluate import RerankJob, train_rerankers
    from tests.reward_fixtures import make_recipe, profile_texts, write_fake_encode, write_prepare, write_profiles

    over = ["reranker.epochs=100", "reranker.patience=100"]
    recipe = make_recipe(tmp_path, *over)
    write_prepare(recipe)
    enc = write_fake_encode(recipe, write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), profile_texts()),
                            runs.stage_dir(recipe, "encode", 1))
    jobs = [RerankJob(tmp_path / "ev" / f"dlcm_{s}", enc, "dlcm", s) for s in (1, 2)]
    code = ("import sys; from pathlib import Path; from rlrf.config import load_recipe; "
            "from rlrf.evaluate import RerankJob, train_rerankers; "
            "train_rerankers(load_recipe(None, sys.argv[3:]), "
            "[RerankJob(Path(sys.argv[1]) / f'dlcm_{s}', Path(sys.argv[2]), 'dlcm', s) for s in (1, 2)], 2)")
    args = [sys.executable, "-c", code, str(tmp_path / "ev"), str(enc), f"runs_dir={tmp_path}", "run=t",
            "reranker.epochs=8", "reranker.patience=3", "reranker.batch_size=16", "reranker.lr=0.005",
            "score.shards=3", "encode.shards=2", *over]
    parent = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not all((j.out / "metrics").is_dir() or (j.out / "_fingerprint.json").is_file() for j in jobs):
        assert time.time() - t0 < 120 and parent.poll() is None, "the workers never started"
        time.sleep(0.2)
    time.sleep(1.0)
    parent.kill()
    parent.wait()
    assert not any((j.out / "stage.json").is_file() for j in jobs)  # killed half way
    time.sleep(2.0)  # the workers' SIGTERM, and their sub-stages' cleanup
    again = train_rerankers(recipe, jobs, workers=1)  # no "another process is running stage ..."
    alone = train_rerankers(recipe, [RerankJob(tmp_path / "alone" / j.out.name, enc, "dlcm", j.seed) for j in jobs])
    assert again == alone


# ----------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_round1_then_evaluate_on_tiny_recipe(tiny_round1):
    """After a real round 1 on the tiny recipe (the session's `tiny_round1`: prepare, sample, encode,
    reward reranker, score, pairs, dpo, check), evaluate: both tables, both figures, quality with a real
    perplexity."""
    r = load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={tiny_round1.parent}",
                                                     f"data.path={REPO / 'data' / 'raw' / 'ml-100k'}",
                                                     "evaluate.max_users=4"])
    out = evaluate_stage(r, recipe_path="recipes/tiny.yaml")
    res = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in res["table1"]] == ["base", "KAR", "RLRF"]
    for row in res["table1"]:
        assert 0.0 <= row["map@5"]["mean"] <= 1.0 and 0.0 <= row["ndcg@5"]["mean"] <= 1.0
    assert res["reward"]["users"] >= 1
    assert np.isfinite(res["quality"]["0"]["perplexity"]) and res["quality"]["1"]["profiles"] == 12
    assert np.isfinite(res["quality_diff"]["1"]["perplexity"]["mean"]) and res["quality_diff"]["1"]["distinct_2"]["n"] >= 1
    md = (out / "results.md").read_text()
    assert "## Table I" in md and "## Table II" in md
    # evaluate.max_users=4: knowledge rerankers see only those users' lists, and results.md says so
    assert "Warning: the rerankers were scored on different numbers of test lists" in md
    assert (out / "rounds.png").is_file() and (out / "rewards.png").is_file()
