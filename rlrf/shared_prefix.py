"""Attention that shares one prompt's KV cache across its N samples (used by rlrf.generate.HFBackend).

N samples of a ~500-token prompt differ only in their ~100 new tokens. Repeating the prompt's KV cache
N times (what `generate(num_return_sequences=N)` does, and what a DynamicCache grown by torch.cat
copies again at every step) makes each decode step read and write N copies of the prompt. Here the
prompt's keys/values are stored once per prompt, the new tokens' keys/values once per sample in a
preallocated buffer, and each decode step computes

    softmax([q K_prompt ; q K_new]) [V_prompt ; V_new]

in two parts merged with a shared max (the usual log-sum-exp split), the prompt part as one matmul
per prompt for all N samples and all query heads of a KV group.

It plugs into transformers through its attention interface (no model code copied): the model's
attention modules hand us query/key/value after RoPE, and we keep the cache ourselves, so the model is
called with use_cache=False and no attention mask.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "rlrf_shared_prefix"
_active: "PrefixKV | None" = None


class PrefixKV:
    """KV store for one batch of B prompts x n samples (row r = prompt r // n, sample r % n).

    Prompts are prefilled one at a time (`prefill` collects each prompt's keys/values; no padding, so
    causal SDPA runs its fast path and a prompt's cache never depends on its batch), then `pack` lays
    them out left-padded as [B, kv_heads, L, head_dim] for the decode steps.
    """

    def __init__(self, n: int, max_new_tokens: int):
        self.n = n
        self.max_new = max_new_tokens
        self.collect: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prompt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None  # [B, L]: False on left padding
        self.step = 0  # index of the token being fed in the current decode call

    @contextlib.contextmanager
    def active(self):
        global _active
        _active, prev = self, _active
        try:
            yield self
        finally:
            _active = prev

    def pack(self, lengths: list[int], pad_to: int = 0) -> None:
        # every batch padded to the same length (the prompt budget): the attention's reductions then
        # run over the same number of positions whatever the neighbours, so a row's floats, and with
        # them its sampled text, do not depend on which prompts share its batch
        L = max(max(lengths), pad_to)
        self.mask = torch.zeros(len(lengths), L, dtype=torch.bool)
        for r, n in enumerate(lengths):
            self.mask[r, L - n:] = True
        for layer in list(self.collect):
            kvs = self.collect.pop(layer)  # each layer's unpadded copies go as its padded one comes: one copy at a time
            k0 = kvs[0][0]
            shape = (len(kvs), k0.shape[1], L, k0.shape[3])
            K, V = k0.new_zeros(shape), k0.new_zeros(shape)
            for r, (k, v) in enumerate(kvs):
                K[r, :, L - k.shape[2]:] = k[0]
                V[r, :, L - v.shape[2]:] = v[0]
            self.prompt[layer] = (K, V)
        self.mask = self.mask.to(k0.device)

    def keep(self, prompts: torch.Tensor) -> None:
        """Decode on with only these of the current prompts (a bool mask over them) and their n rows each: the
        finished ones leave the batch. Each row's attention reads only its own prompt's and its own keys, so what
        the rows that stay compute does not change."""
        prompts = prompts.to(self.mask.device)
        rows = prompts.repeat_interleave(self.n)
        self.mask = self.mask[prompts]
        for cache, keep in ((self.prompt, prompts), (self.new, rows)):
            for layer, (K, V) in cache.items():  # layer by layer: the old copy goes before the next one is made
                cache[layer] = (K[keep], V[keep])


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: [b, H, q, d] in, ([b, q, H, d], None) out."""
    kv = _active
    if kv is None:
        raise RuntimeError(f"{NAME} attention is only usable inside rlrf.generate (no PrefixKV active)")
    layer = module.layer_idx
    if query.shape[2] > 1:
        out = _prefill(kv, layer, query, key, value, scaling)
    else:
        out = _decode(kv, layer, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _prefill(kv: PrefixKV, layer: int, q, k, v, scaling):
    if q.shape[0] != 1:
        raise RuntimeError(f"{NAME}: prefill one prompt at a time (got a batch of {q.shape[0]})")
    kv.collect.setdefault(layer, []).append((k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def _decode(kv: PrefixKV, layer: int, q, k, v, scaling):
    R, H, _, d = q.shape
    hkv, n, t = k.shape[1], kv.n, kv.step
    B, g = R // n, H // hkv
    if layer not in kv.new:
        shape = (R, hkv, kv.max_new, d)
        kv.new[layer] = (k.new_zeros(shape), v.new_zeros(shape))
    k_new, v_new = kv.new[layer]
    k_new[:, :, t] = k[:, :, 0]
    v_new[:, :, t] = v[:, :, 0]
    k_p, v_p = kv.prompt[layer]

    # prompt part: all n samples x g heads of a KV group against the prompt's keys in one matmul
    q_groups = q.view(B, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(B, hkv, n * g, d)
    s_p = (q_groups @ k_p.transpose(-1, -2)).float() * scaling  # [B, hkv, n*g, L]
    s_p.masked_fill_(~kv.mask[:, None, None, :], float("-inf"))
    # new-token part, per sample
    q_rows = q.view(R, hkv, g, d)
    s_n = (q_rows @ k_new[:, :, :t + 1].transpose(-1, -2)).float() * scaling  # [R, hkv, g, t+1]

    m = torch.maximum(_rows(s_p.amax(-1, keepdim=True), B, n, hkv, g), s_n.amax(-1, keepdim=True))
    p_p = torch.exp(s_p - _groups(m, B, n, hkv, g))
    p_n = torch.exp(s_n - m)
    denom = _rows(p_p.sum(-1, keepdim=True), B, n, hkv, g) + p_n.sum(-1, keepdim=True)
    o_p = _rows(p_p.to(v_p.dtype) @ v_p, B, n, hkv, g)  # [R, hkv, g, d]
    o_n = p_n.to(v_new.dtype) @ v_new[:, :, :t + 1]
    out = ((o_p.float() + o_n.float()) / denom).to(q.dtype)
    return out.reshape(R, H, 1, d)


def _rows(x, B, n, hkv, g):
    """[B, hkv, n*g, c] (grouped by prompt) -> [B*n, hkv, g, c] (one row per sample)."""
    return x.view(B, hkv, n, g, -1).permute(0, 2, 1, 3, 4).reshape(B * n, hkv, g, -1)


def _groups(x, B, n, hkv, g):
    """Inverse of _rows."""
    return x.view(B, n, hkv, g, -1).permute(0, 2, 1, 3, 4).reshape(B, hkv, n * g, -1)


def supports(model) -> bool:
    """Plain full-attention decoders (Llama, Qwen2/3, Mistral without sliding window, ...)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "is_encoder_decoder", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return any(hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") for m in model.modules())


def install(model) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    model.set_attn_implementation(NAME)


@contextlib.contextmanager
def generation(model):
    """Sample from a model that trains between calls (GRPO's policy): this attention and eval mode for the
    block, the model's own attention implementation and train/eval mode back after it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prev, was_training = base.config._attn_implementation, model.training
    install(base)
    model.eval()
    try:
        yield model
    finally:
        base.set_attn_implementation(prev)
        model.train(was_training)
