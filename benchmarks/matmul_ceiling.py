"""python benchmarks/matmul_ceiling.py

The box's matmul ceiling: GFLOP/s of a 2048x2048 @ 2048x2048 torch matmul on torch's threads, fp32 and bf16
(bf16 is emulated, and far slower, on a CPU without AVX512-bf16 / AMX). The other benchmarks divide a
stage's FLOPs (counted from `param_counts`) by the fp32 figure, measured in the same run, to print the
fraction of the ceiling they reach.
"""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, dtype=torch.float32, seconds: float = 2.0) -> float:
    """Best-of GFLOP/s of an n x n matmul over about `seconds` (after one warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def param_counts(model_dir) -> tuple[int, int]:
    """(transformer body parameters, LM head parameters) of a causal LM: a token costs 2x the body through the model
    and 2x the head where its next-token logits are needed (embeddings are a lookup)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return body, cfg.hidden_size * cfg.vocab_size


def main() -> None:
    from rlrf.llm import cpu_has_bf16
    from rlrf.machine import machine

    flags = machine()["cpu_flags"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {' '.join(flags) or 'none'}, "
          f"native bf16: {cpu_has_bf16()}")
    print(f"  fp32 2048^2   {matmul_gflops():8.1f} GFLOP/s")
    # emulated bf16 runs at ~0.1 GFLOP/s (a 2048^2 product takes minutes): measure it on a small one there
    n = 2048 if cpu_has_bf16() else 256
    print(f"  bf16 {n}^2{' ' * (8 - len(str(n)))} {matmul_gflops(n, torch.bfloat16):8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
