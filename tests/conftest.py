"""Shared test set-up: never touch the hub; keep torch to the cores we have."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real MovieLens-100K (fetched by `make data`); tests that need it skip with the fix when absent."""
    d = REPO / "data" / "raw" / "ml-100k"
    if not (d / "ml-100k.inter").is_file():
        pytest.skip("MovieLens-100K not fetched: run `make data`")
    return d


def run_stage(name: str, runs_dir: Path, *extra: str, env: dict | None = None, round_: int = 1):
    """Run pipelines/<name>.py on the tiny recipe as `make round1` would (a subprocess, real models)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "pipelines" / f"{name}.py"), "--recipe", str(REPO / "recipes" / "tiny.yaml")]
    if name != "prepare":
        cmd += ["--round", str(round_)]
    cmd += [f"runs_dir={runs_dir}", f"data.path={REPO / 'data' / 'raw' / 'ml-100k'}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})


def stage_ok(r):
    assert r.returncode == 0, f"{r.args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


ROUND_STAGES = ["sample", "encode", "train_reranker", "score", "pairs", "dpo", "check"]


@pytest.fixture(scope="session")
def tiny_round1(ml100k_dir, tmp_path_factory) -> Path:
    """runs/tiny after a whole round 1 on the tiny recipe, built once per test session. The sample stage
    is killed with -9 after its first shard and resumed, as an interrupted `make round1` would be."""
    runs_dir = tmp_path_factory.mktemp("runs")
    stage_ok(run_stage("prepare", runs_dir))
    r = run_stage("sample", runs_dir, env={"RLRF_KILL_AFTER_SHARDS": "1"})
    assert r.returncode == -9, r.stderr[-2000:]
    for name in ROUND_STAGES:
        stage_ok(run_stage(name, runs_dir))
    return runs_dir / "tiny"
