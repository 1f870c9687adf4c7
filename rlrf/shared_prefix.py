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
        self.bias: torch.Tensor | None = None  # [B, 1, 1, L] fp32: -inf on left padding, else 0 (added to the scores)
        self.step = 0  # index of the token being fed in the current decode call
        self.prompts: torch.Tensor | None = None  # the batch's prompts (their index in it) still in the layout
        self.rows: torch.Tensor | None = None  # slot of each row the model is fed (None: every slot, in order)
        self.pad = 0  # rows appended after them that only make up the matmuls' row count (rlrf.generate.row_padding)

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
        self.bias = torch.full((len(lengths), 1, 1, L), float("-inf"))
        for r, n in enumerate(lengths):
            self.bias[r, ..., L - n:] = 0.0
        for layer in list(self.collect):
            kvs = self.collect.pop(layer)  # each layer's unpadded copies go as its padded one comes: one copy at a time
            k0 = kvs[0][0]
            shape = (len(kvs), k0.shape[1], L, k0.shape[3])
            K, V = k0.new_zeros(shape), k0.new_zeros(shape)
            for r, (k, v) in enumerate(kvs):
                K[r, :, L - k.shape[2]:] = k[0]
                V[r, :, L - v.shape[2]:] = v[0]
            self.prompt[layer] = (K, V)
        self.bias = self.bias.to(k0.device)
        self.prompts = torch.arange(len(lengths))

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The slots (index in the layout's prompts x n) of these rows of the batch (row r = prompt r // n, sample
        r % n); None when they are every slot in order. Their prompts must still be in the layout."""
        slots = torch.searchsorted(self.prompts, rows // self.n) * self.n + rows % self.n
        if len(slots) == len(self.prompts) * self.n:
            return None  # every slot (the rows come in order)
        return slots.to(self.bias.device)

    def keep(self, prompts: torch.Tensor) -> None:
        """Decode on with only these of the current prompts (a bool mask over them) and their n rows each: the
        finished ones leave the batch. Each row's attention reads only its own prompt's and its own keys, so what
        the rows that stay compute does not change."""
        self.prompts = self.prompts[prompts.cpu()]
        prompts = prompts.to(self.bias.device)
        rows = prompts.repeat_interleave(self.n)
        self.bias = self.bias[prompts]
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
    elif kv.pad:  # the padding rows take no slot: the attention runs on the real rows, the padding gets zeros
        live = query.shape[0] - kv.pad
        out = _decode(kv, layer, query[:live], key[:live], value[:live], scaling)
        out = torch.cat([out, out.new_zeros((kv.pad, *out.shape[1:]))])
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
    if layer not in kv.new:  # each slot's new keys (transposed: [slots, hkv, d, step]) and values, for every step
        n_slots, hkv, d = len(kv.prompts) * kv.n, k.shape[1], k.shape[3]
        kv.new[layer] = (k.new_zeros((n_slots, hkv, d, kv.max_new)), v.new_zeros((n_slots, hkv, kv.max_new, d)))
    k_new, v_new = kv.new[layer]
    slots = slice(None) if kv.rows is None else kv.rows
    k_new[slots, :, :, kv.step] = k[:, :, 0]
    v_new[slots, :, kv.step] = v[:, :, 0]
    if kv.rows is None:
        return _decode_slots(kv, layer, q, scaling)
    # the model was fed only the live rows: place them on their slots, run the layout, read them back. A free slot's
    # query is zero and its output dropped; every row's attention reads only its own prompt's and its own keys, so a
    # live row computes what it computes with every slot live
    q_all = q.new_zeros((len(kv.prompts) * kv.n, *q.shape[1:]))
    q_all[slots] = q
    return _decode_slots(kv, layer, q_all, scaling)[slots]


def _decode_slots(kv: PrefixKV, layer: int, q, scaling):
    """Every slot's query [B*n, H, 1, d], the step's new keys/values already in kv.new."""
    R, H, _, d = q.shape
    n, t = kv.n, kv.step
    k_p, v_p = kv.prompt[layer]
    hkv = k_p.shape[1]
    B, g = R // n, H // hkv
    k_new, v_new = kv.new[layer]

    # prompt part: all n samples x g heads of a KV group against the prompt's keys in one matmul
    q_groups = q.view(B, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(B, hkv, n * g, d)
    # scaled scores plus the padding's -inf, in one op: x * scaling + 0 rounds as x * scaling did (the same floats as a
    # masked_fill after the product), a tenth of its time
    s_p = torch.add(kv.bias, (q_groups @ k_p.transpose(-1, -2)).float(), alpha=scaling)  # [B, hkv, n*g, L]
    # new-token part, per sample
    q_rows = q.view(R, hkv, g, d)
    # the keys stored transposed: the step slice is each matrix's leading columns, read in place (a slice of
    # [R, hkv, step, d] transposed is copied by the batched matmul first: twice the time; the same floats)
    s_n = (q_rows @ k_new[..., :t + 1]).float() * scaling  # [R, hkv, g, t+1]

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
