"""A whole RLRF round on the tiny recipe, through the stage scripts exactly as `make round1` runs them:
real ML-100K, real SmolLM2, a real reranker, real DPO. Killed half way, it resumes and finishes
(the `tiny_round1` fixture in conftest.py builds it once per session)."""

import json
import os

import polars as pl
import pytest

from conftest import ROUND_STAGES, run_stage, stage_ok

pytestmark = pytest.mark.integration


def test_round1_leaves_a_generator_and_an_inspectable_preference_parquet(tiny_round1):
    r1 = tiny_round1 / "round_1"
    profiles = pl.read_parquet(r1 / "sample" / "profiles" / "*.parquet")
    assert profiles.select(["user_id", "sample_idx"]).is_duplicated().sum() == 0, "resume duplicated rows"
    assert profiles.height == profiles["user_id"].n_unique() * 2  # tiny recipe: n=2 per user
    assert (profiles["text"].str.len_chars() > 0).mean() > 0.5
    pairs = pl.read_parquet(r1 / "pairs" / "pairs" / "*.parquet")
    assert pairs.height >= 1 and (pairs["chosen_reward"] > pairs["rejected_reward"]).all()
    merged = r1 / "dpo" / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert "loss" in (r1 / "dpo" / "train_log.csv").read_text().splitlines()[0]
    check = json.loads((r1 / "check" / "stage.json").read_text())
    assert check["rows"]["users"] >= 1
    # every judge scored both generators, the independent one first; profile quality of both sides
    assert check["judge"].startswith("retrieval") and len(check["judges"]) == 4 and {"old", "new"} <= set(check["quality"])
    assert check["quality"]["new"]["perplexity"] > 1
    diff = check["quality"]["diff"]  # each quality figure paired by user, with its interval
    assert set(diff) == {"distinct_2", "distinct_2_across", "names_history", "perplexity", "perplexity_at_old_lengths"}
    assert all(d["low"] <= d["high"] and d["n"] >= check["rows"]["users"] for d in diff.values())
    # the score stage reports its judges' reliability; DPO its accuracy on the held-out users' pairs
    score = json.loads((r1 / "score" / "stage.json").read_text())
    assert {"retrieval", "lexical", "genres", "reranker", "best_is_trained_on"} <= set(score["reliability"])
    scores = pl.read_parquet(r1 / "score" / "scores" / "*.parquet")
    assert {"retrieval", "retrieval_a", "retrieval_b", "lexical", "genres", "genres_a", "judge_a", "judge_b"} <= set(scores.columns)
    members = json.loads((tiny_round1 / "reranker" / "members.json").read_text())
    assert all(not set(m["judged_users"]) & set(m["seen_users"]) for m in members)
    dpo = json.loads((r1 / "dpo" / "stage.json").read_text())
    held = pl.read_parquet(r1 / "pairs" / "heldout_pairs" / "*.parquet")
    assert (dpo["heldout"] is None) == (held.height == 0)
    if held.height:
        assert 0 <= dpo["heldout"]["accuracy"] <= 1 and dpo["heldout"]["pairs"] == min(held.height, 64)
    # the check's old side (generator 0, valid users, round 1's seeds) came from round 1's own sample stage
    old = json.loads((r1 / "check" / "old" / "sample" / "stage.json").read_text())
    assert old["taken_from"].endswith("round_1/sample") and "taken_from" not in old["config"]
    old_rows = pl.read_parquet(r1 / "check" / "old" / "sample" / "profiles" / "*.parquet")
    same = profiles.join(old_rows.select("user_id", "sample_idx", "text"), on=["user_id", "sample_idx"])
    assert same.height == old_rows.height >= 1 and (same["text"] == same["text_right"]).all()


def test_rerunning_the_round_is_a_no_op(tiny_round1):
    for name in ROUND_STAGES:
        r = stage_ok(run_stage(name, tiny_round1.parent))
        assert "up to date" in r.stdout + r.stderr, name


def test_round2_samples_from_the_round1_generator(tiny_round1):
    stage_ok(run_stage("sample", tiny_round1.parent, round_=2))
    profiles = pl.read_parquet(tiny_round1 / "round_2" / "sample" / "profiles" / "*.parquet")
    assert set(profiles["round"].unique()) == {2}
    assert profiles["generator"][0].endswith(os.path.join("round_1", "dpo", "merged"))


def test_round_flops_reads_the_finished_round(tiny_round1, capsys):
    """benchmarks/round_flops.py on the real tiny round: every LLM stage counted from its outputs (the check's old
    side, taken from the round's sample, costs nothing), each set against its measured wall time."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("round_flops", REPO / "benchmarks" / "round_flops.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    m.main(["--recipe", str(REPO / "recipes" / "tiny.yaml"), "--ceiling", "100", f"runs_dir={tiny_round1.parent}"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["sample"], ["dpo"],
                                                                                            ["check"])}
    assert set(rows) == {"sample", "dpo", "check"}
    for name, cells in rows.items():
        assert float(cells[1]) > 0 and cells[3].endswith("s"), (name, cells)
    assert "matmul ceiling 100 GFLOP/s (given)" in out and "at the ceiling they would take at least" in out
