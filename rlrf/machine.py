"""What a run's speed depends on: the CPU (model, the flags that pick the dtype), cores, torch's threads, the GPU.
The one reader of /proc/cpuinfo (stage.json's `machine`, llm.cpu_has_bf16, evaluate, the benchmarks)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


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


ISA_LIMIT = "RLRF_CPU_ISA"  # "avx2": read the CPU as an AVX2-only one (benchmarks/as_avx2.sh sets it, with torch's own)


def isa_limit() -> str:
    """$RLRF_CPU_ISA: "" (the CPU as it is) or "avx2" (its AVX-512 and AMX flags hidden, so the machine-aware
    defaults pick what an AVX2-only CPU gets: fp32)."""
    limit = os.environ.get(ISA_LIMIT, "").strip().lower()
    if limit not in ("", "avx2"):
        raise ValueError(f"${ISA_LIMIT}={limit!r}: expected avx2 or nothing (unset it to read the CPU as it is)")
    return limit


def cpu_flags() -> set[str]:
    """The CPU's flags, less those above $RLRF_CPU_ISA where it is set."""
    flags = set(cpu_info().get("flags", "").split())
    if isa_limit() == "avx2":
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    return flags


def machine() -> dict:
    """What a stage's time depends on: CPU model and the flags that pick the dtype (avx2 fp32, AVX512-bf16,
    AMX), cores, torch's threads, and the GPU when there is one (stage.json `machine`)."""
    import platform

    info = {"cpu": cpu_info().get("model name") or platform.processor(),
            "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "cores": os.cpu_count()}
    if isa_limit():  # a figure measured as on another CPU says so
        info["cpu_isa_limit"] = isa_limit()
    if "torch" in sys.modules:  # only where the stage already paid for torch
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def has_cuda() -> bool:
    """A CUDA device torch can use (imports torch)."""
    import torch

    return torch.cuda.is_available()
