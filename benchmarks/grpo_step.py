"""python benchmarks/grpo_step.py [--rounds 4] [--groups 2] [--generations 4] [--prompt 320]

The training compute of a GRPO step on SmolLM2-135M-Instruct (LoRA r16 on q/k/v/o, frozen base in the machine's
dtype as the grpo stage loads it): the policy forward + backward and the KL term's reference forward (adapter
disabled) over one micro-batch of `groups` prompts x `generations` completions, at the demo's shapes (a prompt of
`--prompt` tokens, completions of 20-96 tokens right-padded to the longest), through TRL's fused LM head as
GRPOTrainer calls it: TRL's own rows (the baseline) against grpo.share_prompt's packed rows (rlrf/grpo_packed.py),
measured in one process on the same batch, the two taking turns each round so a neighbour's load falls on both;
round 0 is warm-up. Sampling, the other half of a step, is the sample stage's (benchmarks/sample_throughput.py).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def batch(groups: int, generations: int, prompt: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    comps = [int(rng.integers(20, 97)) for _ in range(groups * generations)]
    width = max(comps)
    ids = torch.full((len(comps), prompt + width), pad)
    mask = torch.zeros_like(ids)
    for gi in range(groups):
        p = torch.randint(100, 40000, (prompt - int(rng.integers(0, 16)),), generator=g)
        for j in range(generations):
            r, c = gi * generations + j, comps[gi * generations + j]
            ids[r, prompt - len(p):prompt] = p
            ids[r, prompt:prompt + c] = torch.randint(100, 40000, (c,), generator=g)
            mask[r, prompt - len(p):prompt + c] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="prompts per micro-batch (the demo: 8 rows / 4 generations)")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompt", type=int, default=320)
    a = p.parse_args()

    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from rlrf import grpo_packed
    from rlrf.config import load_recipe
    from rlrf.dpo import load_policy, use_bf16
    from rlrf.llm import resolve_model
    from rlrf.machine import machine

    recipe = load_recipe("recipes/ml100k_smollm2.yaml")
    bf16 = use_bf16(recipe.grpo.dtype)
    torch.manual_seed(0)
    variants = {}
    for name in ("TRL rows", "share_prompt"):
        model, tok = load_policy(resolve_model(recipe.sample.model), bf16)
        add_fused_lm_head(model, temperature=recipe.sample.temperature, outputs=("log_probs", "entropy"))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"], task_type="CAUSAL_LM"))
        model.train()
        stats = grpo_packed.install(model.get_base_model(), recipe.sample.temperature) if name == "share_prompt" else None
        variants[name] = (model, stats)
    kw = batch(a.groups, a.generations, a.prompt, tok.pad_token_id)
    adv = torch.linspace(-1, 1, kw["input_ids"].shape[0])

    def step(model):
        model.zero_grad()
        out = model(**kw)
        (-(out.log_probs.sum(1) * adv).sum()).backward()
        with torch.no_grad(), model.disable_adapter():
            model(**kw)

    times = {n: [] for n in variants}
    for r in range(a.rounds + 1):
        for name, (model, _) in variants.items():
            t0 = time.perf_counter()
            step(model)
            if r:
                times[name].append(time.perf_counter() - t0)
    rows, width = kw["input_ids"].shape
    stats = variants["share_prompt"][1]
    m = machine()
    print(f"GRPO training compute per micro-batch ({a.groups} prompts x {a.generations} completions, prompt {a.prompt} "
          f"tokens, {rows} rows of {width}; bf16 {bf16}; {m.get('cpu', '?')}, flags {','.join(m.get('cpu_flags', []))}):")
    base = float(np.median(times["TRL rows"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:13s} {med:6.2f} s (median of {len(ts)}, range {min(ts):.2f}-{max(ts):.2f})  x{base / med:.2f} "
              f"against TRL's rows")
    print(f"  tokens per forward: TRL's rows {stats['row_tokens'] // max(stats['packed_forwards'], 1)}, packed "
          f"{stats['packed_tokens'] // max(stats['packed_forwards'], 1)}")


if __name__ == "__main__":
    main()
