"""Faults on a real round (the tiny recipe's, built once per session): every file each stage left is as its
checksums say, and a damaged input part stops the stage that reads it with one line naming the part and the
command that rebuilds it, never a parquet traceback, and leaves nothing the next stage would read."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import run_stage
from rlrf.verify import verify_run

pytestmark = pytest.mark.integration

# (stage that reads it, the producing stage's directory under the run, the artifact it reads)
READS = [
    ("sample", "prepare", "prompts"),
    ("encode", "round_1/sample", "profiles"),
    ("train_reranker", "prepare", "lists"),
    ("score", "round_1/encode", "user_texts"),
    ("pairs", "round_1/score", "scores"),
    ("dpo", "round_1/pairs", "pairs"),
]


def test_every_file_of_a_finished_round_is_as_its_stage_recorded(tiny_round1):
    """Nothing is written into a stage directory after its stage.json (a later write would read as damage), and
    every stage of the round, the check's and the reranker's nested ones included, has its checksums."""
    lines: list[str] = []
    assert verify_run(tiny_round1, out=lines.append), "\n".join(lines)
    assert lines and all(ln.startswith("ok") for ln in lines), "\n".join(lines)
    names = {ln.split()[1].rstrip(":") for ln in lines}
    assert {"prepare", "round_1/sample", "round_1/dpo", "round_1/check", "round_1/check/new/sample"} <= names


def _linked_copy(run: Path, dest: Path) -> Path:
    """A copy of the run whose files are hard links (the merged model is not copied byte by byte). Safe because every
    stage writes through a temporary name and a rename: a rerun makes new files, it never rewrites a linked one."""
    shutil.copytree(run, dest, copy_function=os.link)
    return dest


def test_a_damaged_input_part_is_named_by_every_stage_that_reads_it(tiny_round1, tmp_path):
    runs_dir = tmp_path / "runs"
    run = _linked_copy(tiny_round1, runs_dir / "tiny")
    damages = ["truncate", "delete", "garbage"]  # each kind for two readers (a stage start costs ~10 s)
    for i, (reader, producer, artifact) in enumerate(READS):
        damage = damages[i % 3]
        part = sorted((run / producer / artifact).glob("part-*.parquet"))[0]
        data = part.read_bytes()
        part.unlink()  # break the hard link: the session's round stays intact
        if damage == "truncate":
            part.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            part.write_bytes(b"\0" * len(data))
        out = run / _out(reader)
        kept = out.with_name(out.name + ".kept")
        out.rename(kept)  # the reader's first run (a finished reader is up to date and reads nothing)
        r = run_stage(reader, runs_dir)
        assert r.returncode == 2, f"{reader}: {r.stderr[-2000:]}"
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("error: ") and str(part) in err, f"{reader}: {err}"
        want = {"truncate": "(truncated)", "delete": "is missing", "garbage": "is unreadable"}[damage]
        assert want in err and "--force`" in err and "Traceback" not in r.stderr, f"{reader}: {err}"
        producer_script = "prepare" if producer == "prepare" else producer.split("/")[-1]
        assert f"pipelines/{producer_script}.py" in err, f"{reader}: {err}"
        # nothing the next stage would take for output: no stage.json, no parts
        assert not (out / "stage.json").exists() and not list(out.rglob("*.parquet")), reader
        part.write_bytes(data)  # repaired, and the reader's output put back, for the next reader
        shutil.rmtree(out, ignore_errors=True)
        kept.rename(out)


def _out(stage: str) -> str:
    return "reranker" if stage == "train_reranker" else f"round_1/{stage}"
