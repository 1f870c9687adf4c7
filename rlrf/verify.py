"""`rlrf verify RUN`: every finished stage of a run checked file by file against the sizes and sha256 its stage
recorded (rlrf.store writes them: shard markers and stage.json's `files`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from rlrf.artifacts import FINGERPRINT, STAGE_JSON, read_stage_json, rebuild_hint
from rlrf.errors import StageError
from rlrf.files import file_problem, first_line


def verify_stage(stage_dir: str | Path) -> tuple[str, list[str], int]:
    """(status, problems, files checked) of one finished stage, every file hashed: status is "ok", "FAIL" or
    "unchecked" (finished before rlrf recorded checksums)."""
    stage_dir = Path(stage_dir)
    info = read_stage_json(stage_dir)
    manifest = info.get("files")
    if manifest is None:
        return "unchecked", [], 0
    problems = []
    for rel, want in sorted(manifest.items()):
        problem = file_problem(stage_dir / rel, want, verify=True)
        if problem:
            problems.append(f"{rel} {problem}")
        elif rel.endswith(".parquet"):
            try:
                pl.read_parquet_schema(stage_dir / rel)
            except Exception as e:
                problems.append(f"{rel} is unreadable ({first_line(e)})")
    return ("FAIL" if problems else "ok"), problems, len(manifest)


def verify_run(run_dir: str | Path, out=print) -> bool:
    """`rlrf verify RUN`: every finished stage under run_dir checked file by file, one line per stage, the problems
    and the command that rebuilds the stage under a failing one. True when nothing failed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageError(f"{run_dir} is not a run directory (runs/<run>, the recipe's `run`)")
    stages = sorted(p.parent for p in run_dir.rglob(STAGE_JSON))
    if not stages:
        raise StageError(f"{run_dir} holds no finished stage (no stage.json below it)")
    ok = True
    for d in stages:
        status, problems, n = verify_stage(d)
        rel = d.relative_to(run_dir).as_posix()
        if status == "unchecked":
            out(f"unchecked {rel}: finished before rlrf recorded checksums ({rebuild_hint(d)} to add them)")
        else:
            out(f"{status:9s} {rel}: {n} files" + (f", {len(problems)} bad" if problems else ""))
        for p in problems:
            out(f"          {p}")
        if problems:
            ok = False
            out(f"          fix: {rebuild_hint(d)}")
    for d in sorted(p.parent for p in run_dir.rglob(FINGERPRINT)):
        if not (d / STAGE_JSON).is_file():
            out(f"partial   {d.relative_to(run_dir).as_posix()}: started, not finished (rerun it to resume)")
    return ok
