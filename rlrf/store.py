"""Resumable stage jobs, the datatrove way.

A stage writes into its own directory. Work is split in shards; a shard's files are written to a
temporary name and renamed, then its completion marker (with its row counts and drop counters) is
written last. A rerun skips shards whose marker exists. `stage.json`, written when every shard is
done, records the resolved config and its fingerprint, package versions, row counts, merged drop
counters and wall time; readers refuse a stage directory that has none.

    with Stage(stage_dir, "sample", config, inputs=[prompts_dir], force=args.force, shard=args.shard) as st:
        if st.done:
            return
        for i in st.todo(num_shards):
            st.write_shard(i, {"profiles": df}, counters={"empty_text": 2})
        st.finish()

Locks are `flock`s, so a process killed with -9 releases them. A whole-stage run holds the stage lock
exclusively; a `--shard i/n` slice holds it shared plus an exclusive lock on its own slice, so slices
run side by side while a second whole run (or the same slice twice) is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import polars as pl

STAGE_JSON = "stage.json"
FINGERPRINT = "_fingerprint.json"
SHARDS = "_shards"
PACKAGES = ("rlrf", "torch", "transformers", "trl", "peft", "sentence-transformers", "polars", "numpy")


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


def fingerprint(config: Any, inputs: Iterable[Path] = ()) -> str:
    """Hash of a stage's config and the fingerprints of the stage outputs it reads."""
    upstream = []
    for d in inputs:
        info = read_stage_json(Path(d))
        upstream.append(info["fingerprint"])
    blob = json.dumps({"config": config, "inputs": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A directory that already stands at `path` (a stage stopped after writing it, then resumed) is swapped out:
    renamed aside, replaced, then removed, so `path` never holds a mix of the two."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
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


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, df: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


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


class Stage:
    def __init__(
        self,
        stage_dir: str | Path,
        name: str,
        config: Any,
        inputs: Iterable[str | Path] = (),
        force: bool = False,
        shard: tuple[int, int] | None = None,
        quiet: bool = False,
    ):
        self.dir = Path(stage_dir)
        self.name = name
        self.config = config
        self.inputs = [Path(p) for p in inputs]
        self.force = force
        self.shard = shard or (0, 1)
        self.quiet = quiet
        self.fingerprint = fingerprint(config, self.inputs)
        self.done = False
        self.counters: Counter = Counter()
        self._locks: list[Any] = []
        self._t0 = time.time()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Stage":
        self.dir.mkdir(parents=True, exist_ok=True)
        i, n = self.shard
        whole = n == 1
        self._lock(".lock", exclusive=whole,
                   busy=f"another process is running stage '{self.name}' in {self.dir}"
                        + ("" if whole else " as a whole (not a slice)"))
        if not whole:
            self._lock(f".lock.slice-{i}-of-{n}", exclusive=True,
                       busy=f"another process is running slice {i}/{n} of stage '{self.name}' in {self.dir}")

        old = self._read_fingerprint()
        if old is not None and old != self.fingerprint and not self._has_output():
            old = None  # a run that failed before writing anything leaves nothing to protect
        if old is not None and old != self.fingerprint:
            if not self.force:
                raise StageError(
                    f"{self.dir} holds '{self.name}' output made with a different config or inputs "
                    f"(fingerprint {old}, now {self.fingerprint}). Rerun with --force to redo it from scratch, "
                    f"or use another run name (run=...) to keep both."
                )
            if not whole:
                raise StageError(f"--force cannot be combined with --shard; redo {self.dir} as a whole first")
            self._wipe()
        elif old is not None and self.force and whole:
            self._wipe()

        stage_json = self.dir / STAGE_JSON
        if stage_json.is_file():
            self.done = True
            self.log(f"{self.name}: up to date ({self.dir}, fingerprint {self.fingerprint}); nothing to do. "
                     f"Use --force to redo it.")
        else:
            write_json(self.dir / FINGERPRINT, {"fingerprint": self.fingerprint, "config": self.config})
        return self

    def __exit__(self, *exc) -> None:
        for fh in reversed(self._locks):
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self._locks.clear()

    def _lock(self, name: str, exclusive: bool, busy: str) -> None:
        fh = open(self.dir / name, "a+")
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StageError(f"{busy}; wait for it to finish (or stop it) and rerun.") from None
        self._locks.append(fh)

    def _read_fingerprint(self) -> str | None:
        p = self.dir / FINGERPRINT
        return json.loads(p.read_text())["fingerprint"] if p.is_file() else None

    def _has_output(self) -> bool:
        return any(not c.name.startswith(".lock") and c.name != FINGERPRINT for c in self.dir.iterdir())

    def _wipe(self) -> None:
        for child in self.dir.iterdir():
            if child.name.startswith(".lock"):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # ------------------------------------------------------------------ shards

    def _marker(self, i: int) -> Path:
        return self.dir / SHARDS / f"{i:05d}.json"

    def shard_done(self, i: int) -> bool:
        return self._marker(i).is_file()

    def done_shards(self) -> list[int]:
        """Indices of every shard with a completion marker, whatever shard count wrote them."""
        d = self.dir / SHARDS
        return sorted(int(m.stem) for m in d.glob("*.json")) if d.is_dir() else []

    def part(self, artifact: str, i: int) -> Path:
        """Where shard i's part of `artifact` lives."""
        return self.dir / artifact / f"part-{i:05d}.parquet"

    def todo(self, num_shards: int) -> list[int]:
        """Shards of this slice that have no completion marker yet."""
        si, sn = self.shard
        mine = [s for s in range(num_shards) if s % sn == si]
        todo = [s for s in mine if not self.shard_done(s)]
        if len(todo) < len(mine):
            self.log(f"{self.name}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
        self._num_shards = num_shards
        return todo

    def write_shard(self, i: int, frames: dict[str, pl.DataFrame], counters: dict | None = None) -> None:
        """Write one shard's artifacts (tmp + rename each), then its marker last."""
        rows = {}
        for artifact, df in frames.items():
            write_parquet(self.part(artifact, i), df)
            rows[artifact] = df.height
        write_json(self._marker(i), {"rows": rows, "dropped": dict(counters or {})})
        _maybe_die()

    def finish(self, extra: dict | None = None, rows: dict | None = None) -> dict | None:
        """Write stage.json once every shard is done; returns it (None if other slices are pending).

        Stages without shards pass their own `rows`; sharded stages get them summed from the markers.
        """
        num = getattr(self, "_num_shards", None)
        dropped: Counter = Counter(self.counters)
        total_rows: Counter = Counter(rows or {})
        if num is not None:
            missing = [s for s in range(num) if not self.shard_done(s)]
            if missing:
                self.log(f"{self.name}: slice {self.shard[0]}/{self.shard[1]} done; "
                         f"{len(missing)} shards of other slices still pending")
                return None
            for s in range(num):
                m = json.loads(self._marker(s).read_text())
                total_rows.update(m["rows"])
                dropped.update(m["dropped"])
        info = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": [str(p) for p in self.inputs],
            "packages": package_versions(),
            "rows": dict(total_rows),
            "dropped": dict(dropped),
            "wall_s": round(time.time() - self._t0, 2),
            # the process's peak resident memory so far (a stage run by its own script: the stage's own peak)
            "peak_rss_mb": _peak_rss_mb(),
            "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
        }
        write_json(self.dir / STAGE_JSON, info)
        self.done = True
        drops = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()) if v) or "none"
        self.log(f"{self.name}: done in {info['wall_s']:.1f}s -> {self.dir} | rows "
                 + ", ".join(f"{k}={v}" for k, v in sorted(total_rows.items())) + f" | dropped: {drops}")
        return info


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first CPU's /proc/cpuinfo fields (model name, flags, ...); {} where there is no such file."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    return set(cpu_info().get("flags", "").split())


def machine() -> dict:
    """What a stage's time depends on: CPU model and the flags that pick the dtype (avx2 fp32, AVX512-bf16,
    AMX), cores, torch's threads, and the GPU when there is one (stage.json `machine`)."""
    import platform

    info = {"cpu": cpu_info().get("model name") or platform.processor(),
            "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "cores": os.cpu_count()}
    if "torch" in sys.modules:  # only where the stage already paid for torch
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _maybe_die() -> None:
    """Fault injection for resume tests: RLRF_KILL_AFTER_SHARDS=k sends SIGKILL to this process after
    it has written k shard markers, exactly what a kill -9 half way through a stage does."""
    global _shards_written
    limit = os.environ.get("RLRF_KILL_AFTER_SHARDS")
    _shards_written += 1
    if limit and _shards_written >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_shards_written = 0


def read_artifact(stage_dir: str | Path, artifact: str, produced_by: str | None = None) -> pl.DataFrame:
    """All shards of a finished stage's artifact, schema-checked (see rlrf.schema)."""
    from rlrf import schema

    stage_dir = Path(stage_dir)
    read_stage_json(stage_dir, produced_by)
    files = sorted((stage_dir / artifact).glob("part-*.parquet"))
    if not files:
        raise StageError(f"{stage_dir / artifact} has no parquet parts although the stage finished; "
                         f"rerun that stage with --force")
    df = pl.concat([pl.read_parquet(f) for f in files], how="vertical")
    schema.check(df, artifact, where=str(stage_dir / artifact), produced_by=produced_by)
    return df


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`i/n` -> (i, n), validated."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise StageError(f"--shard {text!r}: expected i/n, e.g. --shard 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise StageError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
