"""The stage runner: shards, markers, resume after kill -9, locks, up-to-date and changed-config reruns."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from rlrf.artifacts import part_path, part_paths, read_artifact, read_stage_json
from rlrf.errors import StageError
from rlrf.files import atomic_path
from rlrf.store import Stage, parse_shard

pytestmark = pytest.mark.faults

TOY = textwrap.dedent("""
    import os, sys, time, polars as pl
    from rlrf.store import Stage
    out, n_shards, shard, sleep = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    sl = None if shard == "-" else tuple(int(x) for x in shard.split("/"))
    with Stage(out, "toy", {"n": n_shards}, shard=sl, quiet=True) as st:
        if st.done:
            print("UP-TO-DATE"); sys.exit(0)
        hold = os.environ.get("TOY_HOLD")  # hold the lock until this file exists (lock tests: no race on load)
        if hold:
            open(hold + ".held", "w").close()
            t0 = time.time()
            while not os.path.exists(hold) and time.time() - t0 < 120:
                time.sleep(0.02)
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
    # the one shard layout, as every reader finds it
    assert part_paths(out, "users") == [part_path(out, "users", i) for i in range(5)]
    assert part_path(out, "users", 3) == out / "users" / "part-00003.parquet"
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


def _hold_lock(tmp_path, out, **kw):
    """A toy run that holds its stage lock until release() is called (however slow the machine is)."""
    import time

    hold = tmp_path / "release"
    first = run_toy(tmp_path, out, env={"TOY_HOLD": str(hold)}, wait=False, **kw)
    t0 = time.time()
    while not Path(str(hold) + ".held").exists():
        assert first.poll() is None and time.time() - t0 < 120, "the first run never took the lock"
        time.sleep(0.02)
    return first, hold.touch


def test_second_run_on_the_same_stage_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "s"
    first, release = _hold_lock(tmp_path, out, n_shards=3)
    try:
        second = run_toy(tmp_path, out)
        assert second.returncode != 0
        assert "another process is running stage 'toy'" in second.stderr
    finally:
        release()
        first.wait(timeout=120)
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
    first, release = _hold_lock(tmp_path, out, n_shards=2, shard="0/2")
    try:
        r = run_toy(tmp_path, out, n_shards=2, shard="0/2")
        assert r.returncode != 0 and "slice 0/2" in r.stderr
    finally:
        release()
        first.wait(timeout=120)


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
    from rlrf.files import atomic_path

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# ----------------------------------------------------------------------------- checksummed artifacts


def _finished_toy(tmp_path, name="round_1/sample"):
    out = tmp_path / "runs" / "demo" / name
    r = run_toy(tmp_path, out, n_shards=3)
    assert r.returncode == 0, r.stderr
    return out


def test_markers_and_stage_json_record_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    out = _finished_toy(tmp_path)
    info = read_stage_json(out)
    part = out / "users" / "part-00001.parquet"
    want = {"bytes": part.stat().st_size, "sha256": hashlib.sha256(part.read_bytes()).hexdigest()}
    assert info["files"]["users/part-00001.parquet"] == want
    marker = json.loads((out / "_shards" / "00001.json").read_text())
    assert marker["files"]["users/part-00001.parquet"] == {**want, "rows": 3}
    assert "stage.json" not in info["files"] and "_fingerprint.json" not in info["files"]
    assert not any(k.startswith(".lock") for k in info["files"])


@pytest.mark.parametrize("damage,what", [
    ("truncate", r"part .*part-00001.parquet is \d+ bytes where the stage wrote [\d,]+ \(truncated\)"),
    ("delete", r"part .*part-00001.parquet is missing"),
    ("extra", r"part .*part-00009.parquet was not written by the stage"),
    ("garbage", r"part .*part-00001.parquet is unreadable"),
])
def test_a_damaged_part_is_a_named_error_with_the_command_that_rebuilds_it(tmp_path, damage, what):
    from rlrf.errors import ArtifactError

    out = _finished_toy(tmp_path)
    part = out / "users" / "part-00001.parquet"
    data = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        part.unlink()
    elif damage == "extra":
        (out / "users" / "part-00009.parquet").write_bytes(data)
    else:  # same size, not parquet: only parquet notices, and says which file
        part.write_bytes(b"\0" * len(data))
    with pytest.raises(ArtifactError, match=what) as e:
        read_artifact(out, "users")
    assert "toy output" in str(e.value)
    assert "rerun `python pipelines/toy.py --recipe <recipe> --round 1 --force`" in str(e.value)


def test_a_flipped_byte_is_found_by_hash_when_asked(tmp_path, monkeypatch):
    from rlrf.artifacts import read_parts
    from rlrf.errors import ArtifactError

    out = _finished_toy(tmp_path)
    part = out / "users" / "part-00002.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: the cheap check passes
    part.write_bytes(bytes(data))
    try:
        read_parts(out, "users", verify=False)  # size only; parquet may or may not notice one flipped byte
    except ArtifactError as e:
        assert "part-00002" in str(e)
    with pytest.raises(ArtifactError, match="part-00002.parquet has changed since the stage wrote it"):
        read_parts(out, "users", verify=True)
    monkeypatch.setenv("RLRF_VERIFY", "1")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        read_artifact(out, "users")


def test_a_nested_stage_names_its_outer_stage_as_the_fix(tmp_path):
    from rlrf.artifacts import rebuild_hint

    outer = tmp_path / "runs" / "demo" / "round_2" / "check"
    with Stage(outer, "check", {}, quiet=True):
        inner = outer / "sample"
        with Stage(inner, "sample", {}, quiet=True) as st:
            st.finish(rows={})
        hint = rebuild_hint(inner)
    assert hint == f"remove {inner} and rerun `python pipelines/check.py --recipe <recipe> --round 2` " \
                   f"(it redoes only that part)"
    assert rebuild_hint(tmp_path / "runs" / "demo" / "prepare", {"stage": "prepare"}) == \
        "rerun `python pipelines/prepare.py --recipe <recipe> --force`"


def test_resume_redoes_a_done_shard_whose_part_went_missing_or_short(tmp_path):
    """Killed after shard markers were written, then a part lost (a failed disk, a careless rm): the rerun does that
    shard again instead of finishing over a hole, and ends with exactly the clean rows."""
    clean = _finished_toy(tmp_path, "clean")
    out = tmp_path / "killed"
    r = run_toy(tmp_path, out, n_shards=3, env={"RLRF_KILL_AFTER_SHARDS": "2"})
    assert r.returncode != 0
    (out / "users" / "part-00000.parquet").unlink()
    p1 = out / "users" / "part-00001.parquet"
    p1.write_bytes(p1.read_bytes()[:10])
    r = run_toy(tmp_path, out, n_shards=3)
    assert r.returncode == 0, r.stderr
    assert rows(out).equals(rows(clean))
    from rlrf.artifacts import read_parts
    assert sum(df.height for df in read_parts(out, "users", verify=True)) == 9


def test_verify_run_reports_each_stage_and_finds_a_flipped_byte(tmp_path):
    from rlrf.verify import verify_run

    run = tmp_path / "runs" / "demo"
    _finished_toy(tmp_path, "prepare")
    out = _finished_toy(tmp_path, "round_1/sample")
    (run / "round_1" / "dpo").mkdir(parents=True)
    (run / "round_1" / "dpo" / "_fingerprint.json").write_text('{"fingerprint": "x", "stage": "dpo"}')
    lines: list[str] = []
    assert verify_run(run, out=lines.append)
    assert [ln.split()[0] for ln in lines] == ["ok", "ok", "partial"]
    assert "round_1/dpo: started, not finished" in lines[2]
    marker = out / "_shards" / "00000.json"  # every file is covered, not only the parquet parts
    marker.write_text(marker.read_text().replace('"rows"', '"rowz"'))
    part = out / "users" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[-20] ^= 0xFF
    part.write_bytes(bytes(data))
    lines.clear()
    assert not verify_run(run, out=lines.append)
    text = "\n".join(lines)
    assert "FAIL      round_1/sample: 6 files, 2 bad" in text
    assert "_shards/00000.json has changed since the stage wrote it (sha256 differs)" in text
    assert "users/part-00000.parquet has changed since the stage wrote it" in text
    assert "fix: rerun `python pipelines/toy.py --recipe <recipe> --round 1 --force`" in text


def test_rlrf_verify_command_exit_codes(tmp_path, capsys):
    from rlrf.cli import verify_main

    out = _finished_toy(tmp_path)
    assert verify_main([str(tmp_path / "runs" / "demo")]) == 0
    assert "every checked file is as its stage wrote it" in capsys.readouterr().out
    (out / "users" / "part-00001.parquet").write_bytes(b"x")
    assert verify_main([str(tmp_path / "runs" / "demo")]) == 1
    assert verify_main([str(tmp_path / "nope")]) == 2
    assert "neither a run directory" in capsys.readouterr().err  # inspect.resolve_run's error, runs listed


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_stops_cleanly_and_the_rerun_resumes_to_the_clean_rows(tmp_path, sig):
    """A stop asked for (SIGTERM from a scheduler, Ctrl-C) ends the stage through its `finally`s: no temporary file
    left, the lock released at once, a line that says how to resume; the rerun ends with exactly the clean rows."""
    import signal
    import time

    clean = tmp_path / "clean"
    assert run_toy(tmp_path, clean, n_shards=4).returncode == 0
    out = tmp_path / "stopped"
    proc = run_toy(tmp_path, out, n_shards=4, sleep=1.0, wait=False)
    t0 = time.time()
    while not (out / "_shards" / "00000.json").exists():
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in ((143,) if sig == "SIGTERM" else (-2, 130)), err
    assert "stopped" in err and "rerun the same command to resume" in err, err
    assert not (out / "stage.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temporary file was left behind"
    r = run_toy(tmp_path, out, n_shards=4)  # the lock is free: no 'another process is running'
    assert r.returncode == 0, r.stderr
    assert rows(out).equals(rows(clean))


def test_disk_full_while_writing_a_part_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    """ENOSPC as polars reports it (an IO error inside its ComputeError) or as Python does (OSError 28), on the second
    part: a StageError naming that part, nothing at its path or beside it, no marker; once space is freed the rerun
    resumes from the part that failed."""
    import errno

    real = pl.DataFrame.write_parquet
    faults = [OSError(errno.ENOSPC, "No space left on device"),
              pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space left on "
                                         "device (os error 28)")]
    for k, fault in enumerate(faults):
        out = tmp_path / f"s{k}"
        calls = []

        def full(self, file, *a, _fault=fault, **kw):
            real(self, file, *a, **kw)  # some of it reached the disk before the device filled
            calls.append(file)
            if len(calls) == 2:
                raise _fault

        monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
        with pytest.raises(StageError, match=r"no space left on the device writing .*part-00001.parquet.*rerun"):
            with Stage(out, "toy", {}, quiet=True) as st:
                for i in st.todo(3):
                    st.write_shard(i, {"users": pl.DataFrame({"user_id": [i]})})
        monkeypatch.setattr(pl.DataFrame, "write_parquet", real)
        assert (out / "_shards" / "00000.json").exists()
        assert not (out / "users" / "part-00001.parquet").exists() and not (out / "_shards" / "00001.json").exists()
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
        with Stage(out, "toy", {}, quiet=True) as st:  # space freed: the rerun resumes and finishes
            assert st.todo(3) == [1, 2]
            for i in st.todo(3):
                st.write_shard(i, {"users": pl.DataFrame({"user_id": [i]})})
            st.finish()
        from rlrf.artifacts import read_parts
        assert sorted(pl.concat(read_parts(out, "users", verify=True))["user_id"].to_list()) == [0, 1, 2]


def test_a_write_killed_before_its_rename_leaves_only_a_temporary_that_the_rerun_sweeps(tmp_path):
    """RLRF_KILL_WRITING: kill -9 with a part written in full under its temporary name; no reader sees it (the
    part is missing, the shard not done), and the whole-stage rerun removes the dead writer's temporary."""
    out = tmp_path / "stage"
    r = run_toy(tmp_path, out, n_shards=3, env={"RLRF_KILL_WRITING": "part-00001"})
    assert r.returncode == -9, r.stderr
    assert not (out / "users" / "part-00001.parquet").exists() and list((out / "users").glob(".part-00001*.tmp-*"))
    r = run_toy(tmp_path, out, n_shards=3)
    assert r.returncode == 0, r.stderr
    assert rows(out)["user_id"].to_list() == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]


def test_sweep_temporaries_removes_only_what_dead_writers_left(tmp_path):
    from rlrf.files import sweep_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f".part-00000.parquet.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f".merged.tmp-{dead}").mkdir()
    (tmp_path / f".merged.tmp-{dead}" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".merged.old-{dead}").mkdir()
    mine = tmp_path / f".part-00001.parquet.tmp-{os.getpid()}"  # a live writer's (this process)
    mine.write_bytes(b"being written")
    keep = [tmp_path / ".lock", tmp_path / ".lock.slice-0-of-2", tmp_path / "a" / "part-00000.parquet"]
    for p in keep:
        p.write_bytes(b"")
    assert sweep_temporaries(tmp_path, min_age_s=3600) == 0  # too young
    assert sweep_temporaries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", mine.name, *(p.name for p in keep)])


def test_a_stage_reads_its_own_parts_before_finish_as_their_markers_recorded(tmp_path):
    out = tmp_path / "stage"
    with Stage(out, "toy", {"n": 2}, quiet=True) as st:
        assert st.written("users") is None
        for i in st.todo(2):
            st.write_shard(i, {"users": pl.DataFrame({"user_id": [i, i + 10]})})
        assert st.written("users")["user_id"].to_list() == [0, 10, 1, 11]
        st.part("users", 1).write_bytes(b"short")
        with pytest.raises(StageError, match=r"part-00001\.parquet .*rerun the same command"):
            st.written("users")
