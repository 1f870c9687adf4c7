"""Faults on a real round (the tiny recipe's, built once per session): every file each stage left is as its
checksums say, and a damaged input part stops the stage that reads it with one line naming the part and the
command that rebuilds it, never a parquet traceback, and leaves nothing the next stage would read."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_stage, stage_ok
from rlrf.verify import verify_run

pytestmark = [pytest.mark.integration, pytest.mark.faults]

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


# --------------------------------------------------------------------------- kill -9, then rerun
# prepare, sample, encode, score, dpo and evaluate have their kill tests beside their stages (test_prepare,
# conftest's tiny_round1, test_encode, test_reward, test_dpo, test_evaluate); these cover the rest of a round.

def _frames(stage_dir: Path, artifacts: list[str]) -> dict:
    from rlrf.artifacts import read_artifact

    return {a: read_artifact(stage_dir, a) for a in artifacts}


def _killed_then_resumed(reader: str, runs_dir: Path, env: dict) -> None:
    r = run_stage(reader, runs_dir, env=env)
    assert r.returncode == -9, f"{reader} was not killed: {r.stderr[-2000:]}"
    stage_ok(run_stage(reader, runs_dir))


# (stage, its output under the run, kill after this many shard markers, artifacts compared with the clean run's)
KILLS = [
    ("train_reranker", "reranker", 1, []),  # 4 members (2 judges x 2 folds), one shard each: killed after the first
    ("pairs", "round_1/pairs", 1, ["pairs", "heldout_pairs"]),
    ("check", "round_1/check", 2, []),  # killed inside its nested sub-stages (old side reused, new side sampled)
]


@pytest.mark.parametrize("stage,out,after,artifacts", KILLS, ids=[k[0] for k in KILLS])
def test_kill_9_half_way_then_rerun_gives_the_clean_rows(tiny_round1, tmp_path, stage, out, after, artifacts):
    import numpy as np
    import polars as pl
    from polars.testing import assert_frame_equal

    runs_dir = tmp_path / "runs"
    run = _linked_copy(tiny_round1, runs_dir / "tiny")
    shutil.rmtree(run / out)
    _killed_then_resumed(stage, runs_dir, {"RLRF_KILL_AFTER_SHARDS": str(after)})
    clean, resumed = _frames(tiny_round1 / out, artifacts), _frames(run / out, artifacts)
    for a in artifacts:
        assert_frame_equal(resumed[a], clean[a], check_exact=False, rtol=1e-5, atol=1e-6)
    if stage == "train_reranker":  # every member's weights and held-out figures as a clean run trained them
        from safetensors.numpy import load_file

        names = sorted(p.name for p in (tiny_round1 / out / "checkpoints").glob("*.safetensors"))
        assert names == sorted(p.name for p in (run / out / "checkpoints").glob("*.safetensors")) and len(names) == 4
        for name in names:
            a, b = (load_file(r / out / "checkpoints" / name) for r in (tiny_round1, run))
            assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), name
        m0, m1 = (json.loads((r / out / "metrics.json").read_text()) for r in (tiny_round1, run))
        assert m0.keys() == m1.keys()
        for k in m0:
            assert m1[k] == (pytest.approx(m0[k]) if isinstance(m0[k], (dict, float)) else m0[k]), k
    if stage == "check":
        assert_frame_equal(pl.read_parquet(run / out / "per_user.parquet"),
                           pl.read_parquet(tiny_round1 / out / "per_user.parquet"), check_exact=False, rtol=1e-5)
    lines: list[str] = []
    assert verify_run(run, out=lines.append), "\n".join(lines)


def test_a_merge_killed_half_way_leaves_no_generator_and_the_rerun_makes_the_clean_one(tiny_round1, tmp_path):
    """kill -9 with the merged model written in full under its temporary name, not yet renamed: the next round's
    generator (dpo/merged) does not exist, so nothing reads a partial model; the rerun resumes from the last
    checkpoint, merges again (the same weights as a clean run) and sweeps the dead writer's temporary."""
    from rlrf.llm import weights_hash

    runs_dir = tmp_path / "runs"
    run = _linked_copy(tiny_round1, runs_dir / "tiny")
    dpo = run / "round_1" / "dpo"
    for name in ("merged", "adapter", "stage.json", "train_log.csv", "loss.png"):
        p = dpo / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    r = run_stage("dpo", runs_dir, env={"RLRF_KILL_WRITING": "dpo/merged"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (dpo / "merged").exists() and not (dpo / "stage.json").exists()
    assert list(dpo.glob(".merged.tmp-*")), "the kill was not inside the merge's write"
    r = run_stage("check", runs_dir, "--force")  # a later stage reading generator 1 is refused, by name
    assert r.returncode == 2 and "round_1/dpo/merged" in r.stderr and "does not exist yet" in r.stderr, r.stderr[-2000:]
    r = run_stage("dpo", runs_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr
    assert weights_hash(dpo / "merged") == weights_hash(tiny_round1 / "round_1" / "dpo" / "merged")
    assert not list(dpo.glob(".merged.*")), "the killed writer's temporary was left behind"


def test_an_embedding_cache_write_killed_half_way_is_never_read(tiny_round1, tmp_path):
    """kill -9 while the shared embedding cache's part is being written: no reader sees the part (it has only its
    temporary name), and the rerun encodes again to the clean run's rows and vectors."""
    import numpy as np
    from polars.testing import assert_frame_equal

    from rlrf.encode import EmbeddingCache

    runs_dir = tmp_path / "runs"
    run = _linked_copy(tiny_round1, runs_dir / "tiny")
    (clean_cache,) = (tiny_round1 / "embeddings").iterdir()  # one folder per encoder
    shutil.rmtree(run / "embeddings")
    shutil.rmtree(run / "round_1" / "encode")
    r = run_stage("encode", runs_dir, env={"RLRF_KILL_WRITING": f"embeddings/{clean_cache.name}/part-"})
    assert r.returncode == -9, r.stderr[-2000:]
    cache_dir = run / "embeddings" / clean_cache.name
    assert not list(cache_dir.glob("part-*.parquet")) and list(cache_dir.glob(".part-*.tmp-*"))
    assert not (run / "round_1" / "encode" / "stage.json").exists()
    r = run_stage("encode", runs_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    clean, resumed = _frames(tiny_round1 / "round_1" / "encode", ["user_texts", "item_texts"]), \
        _frames(run / "round_1" / "encode", ["user_texts", "item_texts"])
    for a in clean:
        assert_frame_equal(resumed[a], clean[a])
    keys = clean["user_texts"]["text_hash"].to_list()
    enc_id = json.loads((cache_dir / "encoder.json").read_text())["encoder_id"]
    new = EmbeddingCache(run / "embeddings", enc_id).get(keys)
    old = EmbeddingCache(tiny_round1 / "embeddings", enc_id).get(keys)
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)
