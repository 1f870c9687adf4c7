"""Resumable stage jobs, the datatrove way.

A stage writes into its own directory. Work is split in shards; a shard's files are written to a
temporary name and renamed, then its completion marker (with its row counts and drop counters) is
written last. A rerun skips shards whose marker exists. `stage.json`, written when every shard is
done, records the resolved config and its fingerprint, package versions, row counts, merged drop
counters and wall time; readers refuse a stage directory that has none.

    with runs.STAGES["sample"].open(recipe, stage_dir, inputs=[prompts_dir], extra={"round": k}, shard=shard) as st:
        if st.done:
            return
        for i in st.todo(num_shards):
            st.write_shard(i, {"profiles": df}, counters={"empty_text": 2})
        st.finish()

A stage's config is what its output depends on; rlrf.runs.STAGES declares it for each of rlrf's stages (the recipe
sections it reads, by one rule), and its fingerprint adds those of the stage outputs it reads. A stage whose
fingerprint changed is refused until --force; what it writes is named in rlrf.schema.PRODUCED_BY.

Every file a stage leaves is checksummed: a shard's marker records the size and sha256 of the parts it wrote,
and stage.json's `files` those of every file in the stage directory. `read_artifact` (rlrf/artifacts.py) compares sizes (hashes
with RLRF_VERIFY=1) and names the part and the command that rebuilds it when one is missing, truncated,
changed or unreadable; `rlrf verify RUN` hashes a whole run (rlrf/verify.py).

Locks are `flock`s, so a process killed with -9 releases them. A whole-stage run holds the stage lock
exclusively; a `--shard i/n` slice holds it shared plus an exclusive lock on its own slice, so slices
run side by side while a second whole run (or the same slice twice) is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import polars as pl

from rlrf.artifacts import FINGERPRINT, STAGE_JSON, part_path, read_json, read_stage_json, stage_files
from rlrf.errors import StageError
from rlrf.files import file_digest, file_problem, sweep_temporaries, write_json, write_parquet
from rlrf.machine import machine
from rlrf.schema import PRODUCED_BY

_MAKERS = frozenset(PRODUCED_BY.values())

SHARDS = "_shards"
PACKAGES = ("rlrf", "torch", "transformers", "trl", "peft", "sentence-transformers", "polars", "numpy")


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
        summary: Callable[[dict], str] | None = None,
        arithmetic: dict | None = None,
    ):
        """`summary` turns the stage's stage.json into the stage's own figures, which the store appends to the one
        line it prints when the stage finishes or is found up to date.

        `arithmetic` is what, beyond the fingerprinted config, decides the bytes a shard holds (the sample stage's: the
        CPU or GPU and the dtype `auto` resolved to, for a sampled text's floats differ between them). It is kept out
        of the fingerprint, so a finished stage copied to another machine stays up to date, but every shard's marker
        records it and a resume refuses to add shards to those written under another (the stage would hold a mix of
        two machines' draws that neither reproduces)."""
        self.dir = Path(stage_dir)
        self.summary = summary
        self.name = name
        self.config = config
        self.inputs = [Path(p) for p in inputs]
        self.force = force
        self.shard = shard or (0, 1)
        self.quiet = quiet
        self.arithmetic = arithmetic
        self.fingerprint = fingerprint(config, self.inputs)
        self.done = False
        self.counters: Counter = Counter()
        self._locks: list[Any] = []
        self._t0 = time.time()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Stage":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sigterm = _stop_on_sigterm()
        i, n = self.shard
        whole = n == 1
        self._lock(".lock", exclusive=whole,
                   busy=f"another process is running stage '{self.name}' in {self.dir}"
                        + ("" if whole else " as a whole (not a slice)"))
        if not whole:
            self._lock(f".lock.slice-{i}-of-{n}", exclusive=True,
                       busy=f"another process is running slice {i}/{n} of stage '{self.name}' in {self.dir}")

        if whole:  # no other writer can be inside this directory now: what a killed one left is garbage
            sweep_temporaries(self.dir)
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
                     f"Use --force to redo it." + self._summary(read_json(stage_json)))
        else:
            write_json(self.dir / FINGERPRINT, {"fingerprint": self.fingerprint, "stage": self.name,
                                                "config": self.config})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for fh in reversed(self._locks):
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self._locks.clear()
        if self._sigterm is not False:  # installed by __enter__: put back what was there
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._sigterm is None else self._sigterm)
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, Stopped)) and not self.done:
            done = len(self.done_shards())
            print(f"{self.name}: stopped ({'SIGTERM' if exc_type is Stopped else 'Ctrl-C'}) with {done} shard(s) "
                  f"done in {self.dir}; rerun the same command to resume", file=sys.stderr, flush=True)

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

    def written(self, artifact: str) -> pl.DataFrame | None:
        """This stage's own `artifact` as written so far, before finish (its summary): every done shard's part, in
        shard order, each at the size its marker recorded (a changed one is a StageError saying to rerun, which
        redoes that shard). None when no done shard wrote a part of it."""
        frames = []
        for i in self.done_shards():
            marker = read_json(self._marker(i)) or {}
            rel = self.part(artifact, i).relative_to(self.dir).as_posix()
            recorded = marker.get("files", {}).get(rel)
            if recorded is None:
                continue
            problem = file_problem(self.dir / rel, recorded, verify=False)
            if problem:
                raise StageError(f"{self.dir / rel} {problem} since its shard finished; rerun the same command: the "
                                 f"shard is done again")
            frames.append(pl.read_parquet(self.dir / rel))
        return pl.concat(frames) if frames else None

    def part(self, artifact: str, i: int) -> Path:
        """Where shard i's part of `artifact` lives."""
        return part_path(self.dir, artifact, i)

    def todo(self, num_shards: int) -> list[int]:
        """Shards of this slice that have no completion marker yet."""
        si, sn = self.shard
        mine = [s for s in range(num_shards) if s % sn == si]
        todo = [s for s in mine if not self.shard_done(s) or not self._shard_intact(s)]
        if len(todo) < len(mine):
            if todo:
                self._same_arithmetic([s for s in mine if s not in todo])
            self.log(f"{self.name}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
        self._num_shards = num_shards
        return todo

    def _same_arithmetic(self, done: list[int]) -> None:
        """Refuse to resume next to done shards written under another arithmetic (see __init__); markers from before
        it was recorded, and stages that record none, are trusted."""
        if self.arithmetic is None:
            return
        other = {}
        for i in done:
            theirs = (read_json(self._marker(i)) or {}).get("arithmetic")
            if theirs is not None and theirs != self.arithmetic:
                other.setdefault(json.dumps(theirs, sort_keys=True), []).append(i)
        if other:
            theirs, shards = next(iter(other.items()))
            raise StageError(
                f"{self.dir}: {sum(map(len, other.values()))} done shard(s) of '{self.name}' (first: {shards[:5]}) were "
                f"written on {theirs}, and this machine is {json.dumps(self.arithmetic, sort_keys=True)}: what it "
                f"writes would differ in its floats, and the stage would hold a mix of two draws that neither machine "
                f"reproduces. Resume it on the machine kind that started it, or rerun with --force to redo it here.")

    def _shard_intact(self, i: int) -> bool:
        """Whether shard i's parts are all there at the size its marker recorded; a shard whose part went missing
        or was cut short (a disk that failed, a hand that deleted it) is done again instead of trusted."""
        marker = read_json(self._marker(i))
        if marker is None:
            self.log(f"{self.name}: shard {i}'s marker is unreadable; redoing the shard")
            self._marker(i).unlink()
            return False
        for rel, d in marker.get("files", {}).items():
            problem = file_problem(self.dir / rel, d, verify=False)
            if problem:
                self.log(f"{self.name}: shard {i}'s {rel} {problem}; redoing the shard")
                self._marker(i).unlink()
                return False
        return True

    def write_shard(self, i: int, frames: dict[str, pl.DataFrame], counters: dict | None = None) -> None:
        """Write one shard's artifacts (tmp + rename each), then its marker last, with each part's size and sha256."""
        for artifact in frames:
            maker = PRODUCED_BY.get(artifact)
            if maker is not None and self.name in _MAKERS and maker != self.name:
                raise ValueError(f"stage '{self.name}' cannot write '{artifact}': the {maker} stage makes it "
                                 f"(rlrf.schema.PRODUCED_BY)")
        rows, files = {}, {}
        for artifact, df in frames.items():
            path = self.part(artifact, i)
            write_parquet(path, df)
            rows[artifact] = df.height
            files[path.relative_to(self.dir).as_posix()] = {**file_digest(path), "rows": df.height}
        write_json(self._marker(i), {"rows": rows, "dropped": dict(counters or {}), "files": files,
                                     **({"arithmetic": self.arithmetic} if self.arithmetic is not None else {})})
        _maybe_die()

    def finish(self, extra: dict | None = None, rows: dict | None = None) -> dict | None:
        """Write stage.json once every shard is done; returns it (None if other slices are pending).

        Stages without shards pass their own `rows`; sharded stages get them summed from the markers.
        """
        num = getattr(self, "_num_shards", None)
        dropped: Counter = Counter(self.counters)
        total_rows: Counter = Counter(rows or {})
        hashed: dict[str, dict] = {}  # what the shard markers hashed as each part was written: not read twice
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
                hashed.update(m.get("files", {}))
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
            "peak_rss_mb": peak_rss_mb(),
            "machine": machine(),
            **({"arithmetic": self.arithmetic} if self.arithmetic is not None else {}),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
        }
        # last, so it covers every file the stage wrote (rlrf verify, read_artifact)
        info["files"] = {rel: _digest_once(self.dir / rel, hashed.get(rel)) for rel in stage_files(self.dir)}
        write_json(self.dir / STAGE_JSON, info)
        self.done = True
        drops = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()) if v) or "none"
        self.log(f"{self.name}: done in {info['wall_s']:.1f}s -> {self.dir} | rows "
                 + ", ".join(f"{k}={v}" for k, v in sorted(total_rows.items())) + f" | dropped: {drops}"
                 + self._summary(info))
        return info

    def _summary(self, info: dict | None) -> str:
        if self.summary is None or not info:
            return ""
        try:
            return " | " + self.summary(info)
        except (KeyError, TypeError, ValueError):  # a stage.json written before a figure existed: the line goes
            return ""


def _digest_once(path: Path, marker: dict | None) -> dict:
    """A file's digest for stage.json: the one its shard marker recorded when the part was written (same size), or
    a fresh one."""
    if marker and "sha256" in marker and marker.get("bytes") == path.stat().st_size:
        return {"bytes": marker["bytes"], "sha256": marker["sha256"]}
    return file_digest(path)


class Stopped(SystemExit):
    """SIGTERM while a stage runs: raised in the main thread, so every `finally` runs (temporary files removed, locks
    released) and the process exits with 143 like a plain SIGTERM would."""


def _stop_on_sigterm():
    """Turn SIGTERM into Stopped while a stage runs (main thread only); returns the handler to restore (None: one not
    set from Python), or False where nothing was installed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False

    def stop(signum, frame):
        raise Stopped(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def peak_rss_mb(children: bool = False) -> float:
    """The largest resident memory this process reached, or (children=True) the largest any of its finished child
    processes reached."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: KiB


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
