"""Memory a stage will need, estimated from its config before it starts, against what the machine has.

The two stages that hold a language model (sample, dpo) call `preflight` before loading it: an estimate above the
memory the machine (or its cgroup) has in all is a StageError naming the knob to turn; one above what is free now
is a warning line. The estimates count the terms that grow with the config (model weights, the KV cache of a
sample batch, the activations a DPO step keeps for its backward pass, its logits) plus a fixed runtime; they
were set against the peaks stage.json records (`peak_rss_mb`) for SmolLM2-135M on the demo shapes and are meant
to be right within about 25%, not exact. `rlrf inspect summary` shows each stage's measured peak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RUNTIME_MB = 900.0  # python + torch + transformers/trl/datasets imported, before any model


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only model (from its config.json)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        c = config.get("text_config", config)  # multimodal configs nest the language model's
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size", 4 * hidden)
        heads = c.get("num_attention_heads", max(1, hidden // 64))
        kv = c.get("num_key_value_heads", heads)
        hd = c.get("head_dim") or hidden // heads
        per_layer = hidden * hd * (heads * 2 + kv * 2) + 3 * hidden * inter
        emb = vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
        return cls(hidden, layers, inter, heads, kv, hd, vocab, layers * per_layer + emb)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Shape":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def sample_peak_mb(shape: Shape, *, batch_size: int, n: int, prompt_tokens: int, new_tokens: int,
                   bytes_per: int = 4) -> float:
    """Weights + the KV cache of one generate batch (each prompt's prefix once, shared by its n samples; each
    sample's own tokens) + the last position's logits per row + runtime."""
    prompts = max(1, batch_size // max(1, n))
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per
    kv = kv_per_token * (prompts * prompt_tokens + batch_size * new_tokens)
    logits = batch_size * shape.vocab * 4 * 3  # fp32 logits, softmax, top-p sort
    return RUNTIME_MB + (shape.params * bytes_per + kv + logits) / 2**20


def dpo_peak_mb(shape: Shape, *, batch: int, max_length: int, completion_tokens: int, share_prompt: bool,
                bytes_per: int = 4, checkpointing: bool = False, adapted_layers: int = 0) -> float:
    """Weights + what one policy forward keeps for its backward (per token per layer: the hidden-size tensors of
    attention and norms and the MLP's intermediate ones; per row per layer: the attention probabilities; with
    gradient checkpointing each layer's input only, plus one layer's worth recomputed) + the completion tokens'
    logits (log-softmax and its gradient) + runtime. share_prompt: one row [prompt | chosen | rejected] per pair
    instead of two rows [prompt | answer]. adapted_layers (dpo.lora_layers): only the top this many layers carry
    LoRA, so the backward stops below them and the layers under them keep nothing (0 = every layer)."""
    completion_tokens = min(completion_tokens, max_length)
    if share_prompt:
        rows, seq = batch, max_length + completion_tokens
    else:
        rows, seq = 2 * batch, max_length
    tokens = rows * seq
    # layers whose activations are held at once
    layers = 1 if checkpointing else min(adapted_layers or shape.layers, shape.layers)
    # activations count at 4 bytes whatever the weights: LoRA's path and the norms run in fp32 around bf16 weights
    # (bf16 runs measured 5.5 GB at batch 4, 4.1 GB at batch 2, 2.9 GB at batch 4 checkpointed, on the demo's pairs)
    per_token = (layers * (12 * shape.hidden + 4 * shape.intermediate)
                 + (shape.layers * shape.hidden if checkpointing else 0)) * 4
    attn = rows * layers * shape.heads * seq * seq * 4
    logits = 2 * batch * completion_tokens * shape.vocab * 4 * 3
    return RUNTIME_MB + (shape.params * bytes_per + tokens * per_token + attn + logits) / 2**20


def trim_freed_memory() -> bool:
    """Hand the heap's freed pages back to the system (glibc `malloc_trim(0)`); False where there is no glibc.

    glibc serves torch's large tensors by mmap until the first such free, then raises its mmap threshold (up to
    32 MB) and serves them from the heap, whose freed holes it keeps, so a training loop's resident memory climbs
    step by step with its live tensors unchanged. Trimming after each optimizer step ends that climb for a few
    milliseconds a step. (A fixed mmap threshold, the other cure, is slower: every large tensor then comes as fresh
    zeroed pages.) docs/performance.md has the measurements."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def machine_mb() -> tuple[float | None, float | None]:
    """(free now, in all) in MB: /proc/meminfo's MemAvailable and MemTotal, capped by a cgroup v2 memory limit;
    (None, None) where neither can be read."""
    free = total = None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) / 1024
        free = int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            cap = int(limit) / 2**20
            used = int(Path("/sys/fs/cgroup/memory.current").read_text()) / 2**20
            total = cap if total is None else min(total, cap)
            free = cap - used if free is None else min(free, cap - used)
    except (OSError, ValueError):
        pass
    return free, total


def preflight(stage: str, need_mb: float, knobs: str, log=print, machine: tuple | None = None) -> None:
    """Refuse a stage whose estimate exceeds the machine's memory in all (StageError naming `knobs`); warn when it
    exceeds what is free now (other jobs may end first, or the kernel may kill this one)."""
    from rlrf.errors import StageError

    free, total = machine_mb() if machine is None else machine
    if total is not None and need_mb > total:
        raise StageError(f"{stage}: needs about {need_mb / 1024:.1f} GB of memory by its config, and this machine has "
                         f"{total / 1024:.1f} GB in all; lower {knobs}")
    if free is not None and need_mb > free:
        log(f"{stage}: warning: needs about {need_mb / 1024:.1f} GB by its config, {free / 1024:.1f} GB is free now "
            f"(other processes hold the rest); if it is killed, stop them or lower {knobs}")
