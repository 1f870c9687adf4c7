"""Reading a finished stage's output: its stage.json, its parquet parts checked against the checksums it recorded,
and, when one is missing or damaged, the command that rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from rlrf.errors import ArtifactError, StageError
from rlrf.files import file_problem, first_line, verify_env

STAGE_JSON = "stage.json"
FINGERPRINT = "_fingerprint.json"


def stage_files(stage_dir: str | Path) -> list[str]:
    """Every file a stage left in its directory (relative, sorted): all but its own stage.json and fingerprint,
    and hidden names (locks, temporaries of a writer that was killed)."""
    root = Path(stage_dir)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) \
                and str(rel) not in (STAGE_JSON, FINGERPRINT):
            out.append(rel.as_posix())
    return sorted(out)


def rebuild_hint(stage_dir: str | Path, info: dict | None = None) -> str:
    """The command that rebuilds a stage's output: --force on the stage that made it, or, for a sub-stage nested in
    another (check's and evaluate's), removing it and rerunning the outer stage, which redoes only that part."""
    stage_dir = Path(stage_dir)
    outer = None
    for parent in stage_dir.parents:
        if (parent / FINGERPRINT).is_file():
            outer = parent
    rnd = next((p.split("_", 1)[1] for p in reversed(stage_dir.parts) if p.startswith("round_")), None)
    if outer is not None:
        name = (read_json(outer / FINGERPRINT) or {}).get("stage") or outer.name
        cmd = _stage_command(name, rnd)
        return f"remove {stage_dir} and rerun `{cmd}` (it redoes only that part)"
    name = (info or {}).get("stage") or (read_json(stage_dir / FINGERPRINT) or {}).get("stage") or stage_dir.name
    return f"rerun `{_stage_command(name, rnd, force=True)}`"


def _stage_command(name: str, rnd: str | None, force: bool = False) -> str:
    rounds = name not in ("prepare", "train-reranker", "evaluate")
    return (f"python pipelines/{name.replace('-', '_')}.py --recipe <recipe>"
            + (f" --round {rnd}" if rnd and rounds else "") + (" --force" if force else ""))


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stage_json(stage_dir: Path, produced_by: str | None = None) -> dict:
    """The finished stage's summary; an actionable error when the stage has not finished."""
    p = Path(stage_dir) / STAGE_JSON
    if not p.is_file():
        what = produced_by or Path(stage_dir).name
        partial = " (it started but did not finish; rerun it to resume)" if Path(stage_dir).exists() else ""
        raise StageError(
            f"{stage_dir} has no finished '{what}' output{partial}: "
            f"run `python pipelines/{what.replace('-', '_')}.py --recipe <recipe>` first (or `make round1`)."
        )
    return json.loads(p.read_text())


def part_path(stage_dir: str | Path, artifact: str, i: int) -> Path:
    """The one shard layout of every stage: shard i of `artifact` is <stage>/<artifact>/part-<i:05d>.parquet."""
    return Path(stage_dir) / artifact / f"part-{i:05d}.parquet"


def part_paths(stage_dir: str | Path, artifact: str) -> list[Path]:
    """The parts of `artifact` lying in the stage directory, in shard order."""
    return sorted((Path(stage_dir) / artifact).glob("part-*.parquet"))


def wrote(stage_dir: str | Path, artifact: str, produced_by: str | None = None) -> bool:
    """Whether the finished stage wrote any part of `artifact` (an optional output, such as the sample stage's
    item_knowledge), by its stage.json, not by what happens to lie in the directory."""
    info = read_stage_json(Path(stage_dir), produced_by)
    if info.get("files") is None:  # finished before rlrf recorded checksums
        return bool(part_paths(stage_dir, artifact))
    return any(k.startswith(f"{artifact}/part-") for k in info["files"])


def read_artifact(stage_dir: str | Path, artifact: str, produced_by: str | None = None) -> pl.DataFrame:
    """All shards of a finished stage's artifact, schema-checked (see rlrf.schema)."""
    from rlrf import schema

    stage_dir = Path(stage_dir)
    info = read_stage_json(stage_dir, produced_by)
    df = pl.concat(read_parts(stage_dir, artifact, info), how="vertical")
    schema.check(df, artifact, where=str(stage_dir / artifact), produced_by=produced_by)
    return df


def read_parts(stage_dir: str | Path, artifact: str, info: dict | None = None,
               verify: bool | None = None) -> list[pl.DataFrame]:
    """Each parquet part of a finished stage's artifact, checked against stage.json's checksums: a part missing, of
    another size (or, with verify / RLRF_VERIFY=1, another sha256), one the stage never wrote, or one parquet
    cannot read is an ArtifactError naming the part and the command that rebuilds it."""
    stage_dir = Path(stage_dir)
    info = read_stage_json(stage_dir) if info is None else info
    verify = verify_env() if verify is None else verify
    where = f"{info.get('stage', stage_dir.name)} output {stage_dir}"

    def damaged(what: str, fix: str = "") -> ArtifactError:  # the rebuild command is looked up only when needed
        return ArtifactError(f"{where}: {what}; {fix}{rebuild_hint(stage_dir, info)}")

    files = part_paths(stage_dir, artifact)
    manifest = info.get("files")  # None: finished before rlrf recorded checksums; nothing to compare
    if manifest is not None:
        listed = sorted(k for k in manifest if k.startswith(f"{artifact}/part-"))
        present = {f.relative_to(stage_dir).as_posix() for f in files}
        for rel in listed:
            if rel not in present:
                raise damaged(f"part {stage_dir / rel} is missing")
        for rel in sorted(present - set(listed)):
            raise damaged(f"part {stage_dir / rel} was not written by the stage that finished there (stage.json "
                          f"does not list it)", fix="remove it, or ")
    if not files:
        raise ArtifactError(f"{stage_dir / artifact} has no parquet parts although the stage finished; "
                            f"{rebuild_hint(stage_dir, info)}")
    out = []
    for f in files:
        rel = f.relative_to(stage_dir).as_posix()
        if manifest is not None:
            problem = file_problem(f, manifest[rel], verify)
            if problem:
                raise damaged(f"part {f} {problem}")
        try:
            out.append(pl.read_parquet(f))
        except Exception as e:  # polars' ComputeError, an OSError, ...: one clear line instead of a traceback
            raise damaged(f"part {f} is unreadable ({first_line(e)})") from None
    return out
