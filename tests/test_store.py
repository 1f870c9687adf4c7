"""The stage runner: shards, markers, resume after kill -9, locks, up-to-date and changed-config reruns."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from rlrf.store import Stage, StageError, atomic_path, parse_shard, read_artifact, read_stage_json

TOY = textwrap.dedent("""
    import sys, time, polars as pl
    from rlrf.store import Stage
    out, n_shards, shard, sleep = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    sl = None if shard == "-" else tuple(int(x) for x in shard.split("/"))
    with Stage(out, "toy", {"n": n_shards}, shard=sl, quiet=True) as st:
        if st.done:
            print("UP-TO-DATE"); sys.exit(0)
        for i in st.todo(n_shards):
            time.sleep(sleep)
            df = pl.DataFrame({"user_id": [i * 10 + j for j in range(3)], "v": [float(i)] * 3})
            st.write_shard(i, {"users": df}, counters={"too_short": 1})
        st.finish()
""")


def run_toy(tmp_path, out, n_shards=5, shard="-", sleep=0.0, env=None, wait=True):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    cmd = [sys.executable, str(script), str(out), str(n_shards), shard, str(sleep)]
    e = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True)


def rows(out):
    return pl.concat([pl.read_parquet(f) for f in sorted((out / "users").glob("part-*.parquet"))]).sort("user_id")


def test_clean_run_writes_shards_markers_and_summary(tmp_path):
    out = tmp_path / "stage"
    r = run_toy(tmp_path, out)
    assert r.returncode == 0, r.stderr
    info = read_stage_json(out)
    assert info["rows"] == {"users": 15}
    assert info["dropped"] == {"too_short": 5}
    assert info["stage"] == "toy" and len(info["fingerprint"]) == 16
    assert "polars" in info["packages"] and info["wall_s"] >= 0
    assert info["peak_rss_mb"] > 0 and info["machine"]["cores"] == os.cpu_count()
    cpu_flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    assert set(info["machine"]["cpu_flags"]) == cpu_flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert len(list((out / "users").glob("part-*.parquet"))) == 5
    assert not list(out.rglob("*.tmp*")), "no temporary files left behind"


def test_kill_9_half_way_then_rerun_gives_exactly_the_clean_rows(tmp_path):
    clean = tmp_path / "clean"
    assert run_toy(tmp_path, clean).returncode == 0
    out = tmp_path / "killed"
    r = run_toy(tmp_path, out, env={"RLRF_KILL_AFTER_SHARDS": "2"})
    assert r.returncode == -9
    assert not (out / "stage.json").exists(), "a killed stage must not look finished"
    assert len(list((out / "_shards").glob("*.json"))) == 2
    with pytest.raises(StageError, match="did not finish"):
        read_stage_json(out)
    r = run_toy(tmp_path, out)
    assert r.returncode == 0, r.stderr
    assert rows(out).equals(rows(clean))
    assert read_stage_json(out)["rows"] == {"users": 15}


def test_rerun_same_config_is_a_no_op(tmp_path):
    out = tmp_path / "s"
    assert run_toy(tmp_path, out).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    r = run_toy(tmp_path, out)
    assert r.returncode == 0 and "UP-TO-DATE" in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}


def test_changed_config_is_refused_unless_forced(tmp_path):
    out = tmp_path / "s"
    with Stage(out, "toy", {"a": 1}, quiet=True) as st:
        st.finish(rows={"x": 1})
    with pytest.raises(StageError, match="--force"):
        with Stage(out, "toy", {"a": 2}, quiet=True):
            pass
    (out / "keep.txt").write_text("old output")
    with Stage(out, "toy", {"a": 2}, force=True, quiet=True) as st:
        assert not st.done and not (out / "keep.txt").exists(), "--force starts from scratch"
        st.finish(rows={"x": 2})
    assert read_stage_json(out)["config"] == {"a": 2}


def test_second_run_on_the_same_stage_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "s"
    first = run_toy(tmp_path, out, n_shards=3, sleep=1.5, wait=False)
    try:
        for _ in range(100):  # wait until the first run holds the lock
            if (out / "_fingerprint.json").exists():
                break
            import time; time.sleep(0.05)
        second = run_toy(tmp_path, out)
        assert second.returncode != 0
        assert "another process is running stage 'toy'" in second.stderr
    finally:
        first.wait(timeout=60)
    assert first.returncode == 0
    assert rows(out).height == 9


def test_slices_run_side_by_side_and_the_last_one_finishes_the_stage(tmp_path):
    clean = tmp_path / "clean"
    run_toy(tmp_path, clean, n_shards=6)
    out = tmp_path / "sliced"
    procs = [run_toy(tmp_path, out, n_shards=6, shard=f"{i}/3", sleep=0.3, wait=False) for i in range(3)]
    for p in procs:
        p.wait(timeout=60)
        assert p.returncode == 0, p.stderr.read()
    assert (out / "stage.json").exists()
    assert rows(out).equals(rows(clean))


def test_the_same_slice_twice_is_refused(tmp_path):
    out = tmp_path / "s"
    first = run_toy(tmp_path, out, n_shards=2, shard="0/2", sleep=1.5, wait=False)
    try:
        for _ in range(100):
            if (out / "_fingerprint.json").exists():
                break
            import time; time.sleep(0.05)
        r = run_toy(tmp_path, out, n_shards=2, shard="0/2")
        assert r.returncode != 0 and "slice 0/2" in r.stderr
    finally:
        first.wait(timeout=60)


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_read_artifact_refuses_unfinished_stage_and_checks_schema(tmp_path):
    out = tmp_path / "prepare"
    with Stage(out, "prepare", {}, quiet=True) as st:
        st.todo(1)
        st.write_shard(0, {"users": pl.DataFrame({"user_id": [1]})})
        with pytest.raises(StageError, match="pipelines/prepare.py"):
            read_artifact(out, "users")
        st.finish()
    from rlrf.schema import SchemaError
    with pytest.raises(SchemaError, match="missing column 'raw_user_id'.*prepare"):
        read_artifact(out, "users")


def test_fingerprint_changes_when_an_input_stage_changes(tmp_path):
    up = tmp_path / "up"
    with Stage(up, "up", {"a": 1}, quiet=True) as st:
        st.finish(rows={})
    f1 = Stage(tmp_path / "down", "down", {"b": 1}, inputs=[up]).fingerprint
    with Stage(up, "up", {"a": 2}, force=True, quiet=True) as st:
        st.finish(rows={})
    f2 = Stage(tmp_path / "down", "down", {"b": 1}, inputs=[up]).fingerprint
    assert f1 != f2


@pytest.mark.parametrize("text,want", [("0/4", (0, 4)), ("3/4", (3, 4)), (None, None)])
def test_parse_shard(text, want):
    assert parse_shard(text) == want


@pytest.mark.parametrize("text", ["4/4", "a/b", "1", "-1/2"])
def test_parse_shard_rejects(text):
    with pytest.raises(StageError, match="--shard"):
        parse_shard(text)


def test_a_run_that_failed_before_writing_anything_does_not_need_force(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(ValueError):
        with Stage(out, "toy", {"path": "typo"}, quiet=True):
            raise ValueError("bad data path")  # fails before any shard or output
    with Stage(out, "toy", {"path": "fixed"}, quiet=True) as st:
        assert not st.done
        st.finish(rows={})
    assert read_stage_json(out)["config"] == {"path": "fixed"}


def test_atomic_path_replaces_a_directory_left_by_an_interrupted_run(tmp_path):
    """A stage stopped after writing a directory (e.g. the DPO adapter) and resumed writes it again: the new one
    replaces the old whole, and nothing else is left beside it."""
    from rlrf.store import atomic_path

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
