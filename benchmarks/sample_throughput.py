"""python benchmarks/sample_throughput.py --recipe recipes/ml100k_smollm2.yaml [--prompts 64] [--threads 0]

Sampling throughput on the same KAR prompts from ML-100K (the first --prompts train users, history
trimmed to sample.max_prompt_tokens), N=4 samples of exactly 64 new tokens each (min_new_tokens
forces equal lengths), measured in one process:
  (a) baseline: plain transformers, fp32, generate(do_sample, num_return_sequences=4) on batches of 16
      prompts, left padding;
  (b) ours: rlrf.generate.HFBackend as the sample stage runs it (bf16 where the CPU has AVX512-bf16 /
      AMX, prompts sorted by length, one prefill per prompt shared by its 4 samples, per-row seeds).
Both use the same torch thread count (--threads; 0 = torch's default), so the ratio is the code's.
Prints tokens/s of each, the ratio (target >= 4 on the 2-core AVX2 machine) and the fraction of the box's fp32
matmul ceiling (benchmarks/matmul_ceiling.py, same run) that ours reaches, counting the prompt's prefill
FLOPs (once per prompt: ours prefills once for its N samples) and the new tokens'.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rlrf.config import load_recipe
from rlrf.generate import HFBackend, Sampling
from rlrf.llm import resolve_model
from rlrf.sample import bench_prompts

N, NEW_TOKENS, BASELINE_BATCH = 4, 64, 16


def baseline(model_dir, chats: list[str], sp: Sampling) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    t0, tokens = time.time(), 0
    for b in range(0, len(chats), BASELINE_BATCH):
        enc = tok(chats[b:b + BASELINE_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0,
                                 num_return_sequences=N, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=tok.pad_token_id)
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        print(f"  baseline batch {b // BASELINE_BATCH + 1}: {tokens / (time.time() - t0):.1f} tok/s", flush=True)
    return tokens / (time.time() - t0)


def ours(model_dir, prompt_ids: list[list[int]], sp: Sampling, batch_size: int, dtype: str) -> float:
    be = HFBackend(str(model_dir), dtype=dtype, batch_size=batch_size)
    be.generate(prompt_ids[:1], [0], Sampling(n=N, max_new_tokens=2))  # warm-up (first-call allocations)
    t0, tokens = time.time(), [0]

    def progress(done, new):
        tokens[0] += new
        print(f"  ours: {tokens[0] / (time.time() - t0):.1f} tok/s", flush=True)

    be.generate(prompt_ids, list(range(len(prompt_ids))), sp, progress=progress)
    return tokens[0] / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    p.add_argument("--batch-size", type=int, default=None, help="ours: sequences per batch (default: sample.batch_size)")
    p.add_argument("--dtype", default="auto", help="ours: auto | bfloat16 | float32")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    recipe = load_recipe(a.recipe, a.overrides)
    model_dir = resolve_model(recipe.sample.model)
    be_tok = HFBackend.tokenizer_for(model_dir)
    ids, _ = bench_prompts(recipe, be_tok, ["train"], a.prompts)
    chats = [be_tok.decode(i) for i in ids]
    sp = Sampling(n=N, temperature=recipe.sample.temperature, top_p=recipe.sample.top_p,
                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    load = os.getloadavg()[0]
    print(f"{len(ids)} prompts, mean {sum(map(len, ids)) / len(ids):.0f} prompt tokens, N={N}, {NEW_TOKENS} new tokens, "
          f"threads={torch.get_num_threads()}, load average {load:.1f}", flush=True)
    ours_tps = ours(model_dir, ids, sp, a.batch_size or recipe.sample.batch_size, a.dtype)
    base_tps = baseline(model_dir, chats, sp)
    print(f"baseline (transformers fp32 generate, num_return_sequences={N}, batch {BASELINE_BATCH} prompts): "
          f"{base_tps:.1f} tok/s")
    print(f"ours (rlrf.generate.HFBackend, dtype={a.dtype}, batch {a.batch_size or recipe.sample.batch_size} seqs): "
          f"{ours_tps:.1f} tok/s")
    print(f"ratio: {ours_tps / base_tps:.2f}x  (load average {load:.1f} -> {os.getloadavg()[0]:.1f})")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from matmul_ceiling import matmul_gflops, param_counts

    body, head = param_counts(model_dir)
    new = len(ids) * N * NEW_TOKENS
    flops = 2 * body * (sum(map(len, ids)) + new) + 2 * head * (len(ids) + new)
    ceiling, rate = matmul_gflops(), flops / 1e9 / (new / ours_tps)  # after both runs: a quiet box's figure
    print(f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s; ours ran {rate:.0f} GFLOP/s = {rate / ceiling:.0%} of it "
          f"({flops / new / 1e9:.2f} GFLOP per new token with its share of the prefill: the ceiling allows "
          f"{ceiling / (flops / new / 1e9):.0f} tok/s)")


if __name__ == "__main__":
    main()
