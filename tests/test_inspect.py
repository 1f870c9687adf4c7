"""`rlrf inspect` on a small hand-made run: what a person reads in the terminal."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from rlrf.cli import main as cli_main
from rlrf.errors import StageError
from rlrf.files import write_json
from rlrf.inspect import columns, main, resolve_run, wrap
from rlrf.schema import SCHEMAS
from rlrf.store import Stage

REPO = Path(__file__).resolve().parent.parent

CHOSEN = {7: "Loves slow noir thrillers with moral ambiguity.", 9: "Enjoys Westerns and war epics."}
REJECTED = {7: "Likes movies.", 9: "Watches films sometimes, rather random."}
MARGIN = {7: 0.30, 9: 0.05}


def _stage(d: Path, name: str, frames: dict[str, list[dict]], dropped: dict | None = None) -> None:
    with Stage(d, name, {"hand-made": name}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {a: pl.DataFrame(rows, schema=SCHEMAS[a]) for a, rows in frames.items()},
                           counters=dropped)
        st.finish()


def _msg(role, content):
    return [{"role": role, "content": content}]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "runs" / "handmade"
    _stage(run / "prepare", "prepare", {"users": [{"user_id": u, "raw_user_id": str(u), "split": "train", "gender": "F",
                                                  "age": "25", "occupation": "writer", "n_interactions": 20,
                                                  "n_history": 10, "n_lists": 2} for u in (7, 9)]},
           dropped={"too_short_history": 3})
    profiles, scores = [], []
    for u in (7, 9):
        for i, (text, reward) in enumerate([(REJECTED[u], 0.4), (CHOSEN[u], 0.4 + MARGIN[u])]):
            profiles.append({"run": "handmade", "round": 1, "split": "train", "user_id": u, "sample_idx": i,
                             "prompt": "Given a user ...", "text": text, "n_tokens": len(text.split()),
                             "finish_reason": "eos", "n_history_trimmed": 0, "generator": "base-llm",
                             "generator_hash": "abc", "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 32,
                             "seed": 100 * u + i})
            scores.append({"run": "handmade", "round": 1, "split": "train", "user_id": u, "sample_idx": i,
                           "reward": reward, "n_lists": 2, "empty_text": False})
    _stage(run / "round_1" / "sample", "sample", {"profiles": profiles})
    _stage(run / "round_1" / "score", "score", {"scores": scores})
    pairs = [{"prompt": _msg("user", "Given a user ..."), "chosen": _msg("assistant", CHOSEN[u]),
              "rejected": _msg("assistant", REJECTED[u]), "user_id": u, "round": 1,
              "chosen_reward": 0.4 + MARGIN[u], "rejected_reward": 0.4, "margin": MARGIN[u],
              "chosen_idx": 1, "rejected_idx": 0} for u in (7, 9)]
    _stage(run / "round_1" / "pairs", "pairs", {"pairs": pairs}, dropped={"tie": 1})
    # a stage killed half way: fingerprint and one shard marker, no stage.json
    write_json(run / "round_1" / "dpo" / "_fingerprint.json", {"fingerprint": "x", "config": {}})
    write_json(run / "round_1" / "dpo" / "_shards" / "00000.json", {"rows": {}, "dropped": {}})
    return run


def test_wrap_keeps_line_breaks_and_width():
    assert wrap("one two three four\nfive", 9) == ["one two", "three", "four", "five"]
    out = columns(["a " * 30, "b"], ["LEFT", "RIGHT"], 40)
    lines = out.splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("LEFT") and " | RIGHT" in lines[0] and set(lines[1]) == {"-", "+"}
    assert lines[2].startswith("a a a") and lines[2].endswith("| b")


def test_pairs_side_by_side_with_rewards(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    main(["pairs", str(run_dir)])
    out = capsys.readouterr().out
    assert "round 1: 2 pairs" in " ".join(out.split())
    assert "CHOSEN #1  reward 0.7000" in out and "REJECTED #0  reward 0.4000" in out
    # chosen and rejected texts share a line, in that order
    line = next(l for l in out.splitlines() if "noir" in l)
    assert line.index("noir") < line.index(" | ") < line.index("Likes movies.")
    # largest margin first by default
    assert out.index("user 7") < out.index("user 9")
    assert all(len(l) <= 120 for l in out.splitlines())


def test_pairs_worst_margin_user_and_limit(run_dir, capsys):
    main(["pairs", str(run_dir), "--worst-margin", "--limit", "1"])
    out = capsys.readouterr().out
    assert "user 9  margin +0.0500" in out and "user 7" not in out
    main(["pairs", str(run_dir), "--user", "7"])
    out = capsys.readouterr().out
    assert "user 7  margin +0.3000" in out and "user 9" not in out
    main(["pairs", str(run_dir), "--user", "8"])
    assert "no pair for user 8" in capsys.readouterr().out


def test_profiles_with_rewards_and_unscored(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    main(["profiles", str(run_dir), "--round", "1", "--user", "9"])
    out = capsys.readouterr().out
    assert "user 9 (train)  generator base-llm" in out
    assert re.search(r"#0  reward 0\.4000 +\| Watches films", out)
    assert re.search(r"#1  reward 0\.4500 +\| Enjoys Westerns", out)
    assert "user 7" not in out
    # without a score stage the profiles still print, with a pointer to the stage that scores them
    import shutil
    shutil.rmtree(run_dir / "round_1" / "score")
    main(["profiles", str(run_dir)])
    out = capsys.readouterr().out
    assert "not scored yet" in " ".join(out.split()) and "reward —" in out and "Loves slow noir" in out


def test_summary_rows_drops_timings_unfinished(run_dir, capsys, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)
    cli_main(["inspect", "summary", "handmade"])  # a run name under runs/, through the console script
    out = capsys.readouterr().out
    assert re.search(r"prepare\s+prepare\s+\d+\.\ds", out)
    assert "rows: users=2" in out and "dropped: too_short_history=3" in out
    assert "rows: pairs=2" in out and "dropped: tie=1" in out
    assert "rows: profiles=4" in out
    assert re.search(r"round_1/dpo\s+UNFINISHED\s+1 shard\(s\) done", out)


def test_unknown_run_names_the_runs_there(run_dir, capsys):
    with pytest.raises(StageError, match=r"no run 'nope'.*runs there: handmade"):
        resolve_run("nope", str(run_dir.parent))
    with pytest.raises(SystemExit) as e:
        main(["pairs", "nope", "--runs-dir", str(run_dir.parent)])
    assert e.value.code == 2 and "no run 'nope'" in capsys.readouterr().err


def test_missing_pairs_stage_says_what_to_run(run_dir, capsys):
    import shutil
    shutil.rmtree(run_dir / "round_1" / "pairs")
    with pytest.raises(SystemExit):
        main(["pairs", str(run_dir)])
    assert "no finished 'pairs' stage" in capsys.readouterr().err


def test_artifacts_doc_lists_every_column():
    """docs/artifacts.md documents every artifact of rlrf/schema.py with every column and dtype."""
    doc = (REPO / "docs" / "artifacts.md").read_text()
    for artifact, cols in SCHEMAS.items():
        assert f"### `{artifact}`" in doc, f"docs/artifacts.md lacks artifact {artifact}"
        section = doc.split(f"### `{artifact}`", 1)[1].split("\n### ", 1)[0]
        for col, dt in cols.items():
            assert re.search(rf"^\| `{re.escape(col)}` \| {re.escape(str(dt))} \| \S", section, re.M), \
                f"docs/artifacts.md: {artifact}.{col} ({dt}) missing or with another dtype"


def test_rollouts_audit_shows_the_highest_rewarded_first(run_dir, capsys):
    from rlrf.files import write_parquet

    with pytest.raises(SystemExit):
        main(["rollouts", str(run_dir)])
    assert "no finished 'grpo' stage" in capsys.readouterr().err
    d = run_dir / "round_1" / "grpo"
    write_parquet(d / "rollouts.parquet", pl.DataFrame(
        {"step": [1, 1, 2], "user_id": [7, 9, 7], "reward": [0.10, 0.90, 0.50],
         "text": ["A plain profile.", "Drama Drama Drama Drama.", "Loves noir."]}))
    write_json(d / "stage.json", {"stage": "grpo"})
    main(["rollouts", str(run_dir), "--limit", "2"])
    out = capsys.readouterr().out
    assert "3 profiles sampled during GRPO" in out and "reward mean 0.5000" in out
    assert out.index("Drama Drama") < out.index("Loves noir") and "A plain profile" not in out
    main(["rollouts", str(run_dir), "--user", "7", "--limit", "0"])
    out = capsys.readouterr().out
    assert "Drama Drama" not in out and out.index("Loves noir") < out.index("A plain profile")
