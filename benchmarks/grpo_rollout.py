"""python benchmarks/grpo_rollout.py [--run grpo_demo] [--rounds 3] [--users 8] [key.sub=value ...]

The sampling half of a GRPO step on SmolLM2-135M-Instruct at the demo's shapes: `users` train users' prompts from
a run's prepare stage (`make grpo1` makes run grpo_demo), grpo.num_generations profiles each, through the grpo
stage's own Rollout (rlrf's sampler, one prefill per group), from the policy GRPO trains: the frozen base in the
machine's dtype with a LoRA r16 update on q/k/v/o (random, of a trained adapter's size). The baseline is the
policy as TRL holds it, the LoRA path beside each projection (grpo.merged_rollout=false), against the update merged
into the weights for the call (grpo.merged_rollout=true, the default), measured in one process on the same
prompts and seeds, the two taking turns each round so a neighbour's load falls on both; round 0 is warm-up.
The training half is benchmarks/grpo_step.py's.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="grpo_demo", help="a run whose prepare stage holds the demo's prompts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--users", type=int, default=8, help="prompts per step (the demo: 32 profiles / 4 generations)")
    p.add_argument("overrides", nargs="*", help="recipe overrides (runs_dir=... to read another checkout's run)")
    a = p.parse_args()

    from peft import LoraConfig, get_peft_model

    from rlrf.config import load_recipe
    from rlrf.dpo import load_policy, use_bf16
    from rlrf.grpo import Rollout, train_prompts
    from rlrf.llm import resolve_model
    from rlrf.machine import machine

    recipe = load_recipe("recipes/ml100k_smollm2.yaml", [f"run={a.run}", *a.overrides])
    g = recipe.grpo
    bf16 = use_bf16(g.dtype)
    torch.manual_seed(0)
    model, tok = load_policy(resolve_model(recipe.sample.model), bf16)
    tok.padding_side = "left"
    model = get_peft_model(model, LoraConfig(r=g.lora_r, lora_alpha=g.lora_alpha, lora_dropout=0.0, bias="none",
                                             target_modules=list(g.lora_target_modules), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn_like(w) * 0.01)
    model.train()
    prompts = train_prompts(recipe, tok)["prompt"].to_list()[:a.users]
    batch = [[{"role": "user", "content": t}] for t in prompts for _ in range(g.num_generations)]
    rollout = Rollout(recipe)

    times: dict[str, list[float]] = {"LoRA beside (TRL's)": [], "merged": []}
    tokens: dict[str, list[int]] = {n: [] for n in times}
    for r in range(a.rounds + 1):
        for name in times:
            rollout.merged = name == "merged"
            trainer = SimpleNamespace(model=model, processing_class=tok, state=SimpleNamespace(global_step=r),
                                      accelerator=SimpleNamespace(unwrap_model=lambda m: m))
            t0 = time.perf_counter()
            out = rollout(batch, trainer)
            if r:
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(len(c) for c in out["completion_ids"]))
    m = machine()
    print(f"GRPO rollout of {len(batch)} profiles ({a.users} prompts x {g.num_generations}, up to "
          f"{recipe.sample.max_new_tokens} tokens; bf16 {bf16}; {m.get('cpu', '?')}, flags "
          f"{','.join(m.get('cpu_flags', []))}):")
    base = float(np.median(times["LoRA beside (TRL's)"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:20s} {med:6.2f} s (median of {len(ts)}, range {min(ts):.2f}-{max(ts):.2f}), "
              f"{np.mean(tokens[name]):.0f} tokens a call  x{base / med:.2f} against the LoRA beside")


if __name__ == "__main__":
    main()
