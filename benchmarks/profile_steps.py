"""python benchmarks/profile_steps.py [--what sample,dpo] [--rows 20]

Where the time goes, by torch.profiler, at the demo recipe's shapes on SmolLM2-135M: (sample) the sample
stage's HFBackend on 8 KAR prompts of ~320 tokens x 4 samples x 32 new tokens (prefill + decode), (dpo) one
DPO optimizer step of the dpo stage (batch 4, prompt once per pair) after a warm-up step. Prints the top ops
by self CPU time and the time grouped into matmuls (linear/mm/bmm), attention (SDPA and softmax), the
sampler's own ops, and everything else (elementwise, copies, Python-side dispatch). docs/performance.md
keeps the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "sampler": ("aten::topk", "aten::sort", "aten::cumsum", "aten::searchsorted", "aten::uniform_", "aten::rand"),
}


def report(prof, rows: int, wall: float, title: str) -> None:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n== {title}: {wall:.2f} s wall, {total / 1e6:.2f} s of op self time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    share = {g: 0.0 for g in (*GROUPS, "other")}
    for e in events:
        g = next((g for g, names in GROUPS.items() if any(e.key.startswith(n) for n in names)), "other")
        share[g] += e.self_cpu_time_total
    print("grouped: " + ", ".join(f"{g} {v / total:.0%}" for g, v in share.items())
          + f"; op time / wall {total / 1e6 / wall:.0%} (the rest is Python between ops)")


def profile_sample(rows: int) -> None:
    from rlrf.config import load_recipe
    from rlrf.generate import HFBackend, Sampling
    from rlrf.llm import resolve_model
    from rlrf.sample import bench_prompts

    recipe = load_recipe("recipes/ml100k_smollm2.yaml", [])
    model_dir = resolve_model(recipe.sample.model)
    ids, _ = bench_prompts(recipe, HFBackend.tokenizer_for(model_dir), ["train"], 8)
    be = HFBackend(str(model_dir), batch_size=recipe.sample.batch_size, pad_to=recipe.sample.max_prompt_tokens)
    sp = Sampling(n=4, temperature=1.0, top_p=0.95, max_new_tokens=32, min_new_tokens=32)
    be.generate(ids[:1], [0], Sampling(n=4, max_new_tokens=2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        be.generate(ids, list(range(len(ids))), sp)
        wall = time.perf_counter() - t
    report(prof, rows, wall, f"sample: 8 prompts (mean {sum(map(len, ids)) / 8:.0f} tokens) x 4 x 32 new tokens, "
                             f"{8 * 4 * 32 / wall:.0f} tok/s")


def profile_dpo(rows: int) -> None:
    import tempfile

    from dpo_step import build_variant, make_pairs, optimizer_step

    from rlrf.llm import resolve_model

    ds = make_pairs(8)
    stage = dict(no_ckpt=True, stage_dtype=True, group=True, share=True, precompute=False)
    with tempfile.TemporaryDirectory() as tmp:
        v = build_variant("stage", ds, resolve_model("smollm2-135m-instruct"), stage, Path(tmp), 4, 416)
        optimizer_step(v, 0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = optimizer_step(v, 1)
    report(prof, rows, wall, "dpo: one optimizer step, batch 4, prompt once per pair")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="sample,dpo")
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in a.what.split(","):
        {"sample": profile_sample, "dpo": profile_dpo}[w](a.rows)


if __name__ == "__main__":
    main()
