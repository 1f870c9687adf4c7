"""Files a stage writes and checks: atomic writes (nothing half-written at a path a reader globs), a full disk named,
digests (size and sha256), the temporaries a killed writer left, and what is wrong with a file against its digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from rlrf.errors import StageError


def file_digest(path: str | Path, with_hash: bool = True) -> dict:
    """{"bytes": size, "sha256": hex} of one file (the hash read in 1 MiB chunks; left out with with_hash=False)."""
    path = Path(path)
    out: dict = {"bytes": path.stat().st_size}
    if with_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A directory that already stands at `path` (a stage stopped after writing it, then resumed) is swapped out:
    renamed aside, replaced, then removed, so `path` never holds a mix of the two. A full disk (or quota) while
    writing is a StageError naming the file, with nothing left at `path` or beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            yield tmp
            _maybe_die_writing(path)
        except Exception as e:
            if _disk_full(e):
                raise StageError(f"no space left on the device writing {path}; nothing was kept of it: free disk "
                                 f"space (or point runs_dir / RLRF_CACHE elsewhere) and rerun the same command to "
                                 f"resume") from None
            raise
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as Python raises them (OSError) or as polars wraps them (its IO error, "os error 28")."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return f"os error {errno.ENOSPC}" in text or f"os error {errno.EDQUOT}" in text


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, df: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def _maybe_die_writing(path: Path) -> None:
    """Fault injection: RLRF_KILL_WRITING=<text> sends SIGKILL to this process when a write through atomic_path whose
    destination contains <text> has been written in full under its temporary name but not yet renamed into place,
    i.e. a kill -9 in the middle of writing that file (the merged model, an embedding-cache part, a shard's part)."""
    want = os.environ.get("RLRF_KILL_WRITING")
    if want and want in str(path):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def sweep_temporaries(root: str | Path, min_age_s: float = 0.0) -> int:
    """Remove what a killed writer left under `root`: atomic_path's `.<name>.tmp-<pid>` (a file or a folder written
    in part or in full, never renamed into place) and `.<name>.old-<pid>` (a folder being replaced). Only the
    temporaries of processes that are gone and at least `min_age_s` old are touched; returns how many went."""
    gone = 0
    for p in sorted(Path(root).rglob(".*"), key=lambda q: len(q.parts)):
        m = _TEMPORARY.match(p.name)
        if not m or not os.path.lexists(p) or _alive(int(m.group(2))):
            continue
        try:
            if time.time() - p.lstat().st_mtime < min_age_s:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone += 1
        except FileNotFoundError:
            pass
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_env() -> bool:
    """RLRF_VERIFY=1: readers hash every part they read against its recorded sha256 (sizes are always compared)."""
    return os.environ.get("RLRF_VERIFY", "") not in ("", "0")


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (polars' run to many), or its type where it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def file_problem(path: Path, want: dict, verify: bool) -> str | None:
    """What is wrong with one file against its recorded digest, or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != want["bytes"]:
        return (f"is {size:,} bytes where the stage wrote {want['bytes']:,} "
                f"({'truncated' if size < want['bytes'] else 'changed'})")
    if verify and "sha256" in want and file_digest(path)["sha256"] != want["sha256"]:
        return "has changed since the stage wrote it (sha256 differs)"
    return None
