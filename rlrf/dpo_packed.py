"""DPO forward with the prompt encoded once per pair (`dpo.share_prompt`).

TRL's DPOTrainer feeds a batch of B pairs as 2B rows, [prompt + chosen] then [prompt + rejected], so the
prompt (most of a pair's tokens on the demo) goes through the model twice, in the policy forward, its backward and the
reference forward. The two completions of a pair need the same prompt keys/values, so one row per pair

    [prompt | chosen | rejected]      positions 0..P-1 | P..P+C-1 | P..P+R-1

with a 4D attention mask (prompt causal; chosen sees prompt + earlier chosen; rejected sees prompt + earlier
rejected, never chosen) computes exactly the same log-probabilities from P + C + R tokens instead of
2 (P + max(C, R)). The first rejected token is predicted from the prompt's last hidden state, not from
chosen's last one; the gather below picks the right hidden state for every scored token.

It plugs in under TRL rather than beside it: TRL's `_compute_loss` calls
`model(input_ids, attention_mask, labels, fused_lm_head=True)` and reads per-token `log_probs` (and entropy,
mean logits, top-1 for its metrics) laid out as its (2B, L-1) rows. `install` wraps the base model's forward
(the one TRL's `add_fused_lm_head` patched) so that call is answered from the packed rows, scattered back
into TRL's layout; the loss, the reference pass (adapter disabled: the same forward), precomputed reference
log-probs, metrics and logging are TRL's own. Any other call (generation, a batch whose two halves do not
share prompts) goes to the original forward.
"""

from __future__ import annotations

import contextlib
import types

import torch



def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """TRL's [chosen rows; rejected rows] batch -> one row per pair, or None when the halves' prompts differ.

    Returns (ids, position_ids, mask4d, src): src[r, t] is, for TRL's row r and shifted position t (the hidden
    state that predicts token t+1), the flat index into the packed hidden states (B * Lp).
    """
    rows, length = input_ids.shape
    if rows % 2:
        return None
    b = rows // 2
    lab = labels != -100
    lens = attention_mask.sum(1)
    has = lab.any(1)
    first = torch.where(has, lab.int().argmax(1), lens)  # prompt length P (completions start there)
    comp = lab.sum(1)
    p_c, p_r = first[:b], first[b:]
    if not torch.equal(p_c, p_r):
        return None
    c_len, r_len = comp[:b], comp[b:]
    # the completions must sit right after the prompt, contiguous (TRL's collator, right padding)
    if not torch.equal(lens, first + comp):
        return None
    ar = torch.arange(length, device=input_ids.device)
    prompt_cols = ar[None, :] < p_c[:, None]
    if not torch.equal(input_ids[:b][prompt_cols], input_ids[b:][prompt_cols]):
        return None

    total = p_c + c_len + r_len
    lp = int(total.max())
    dev = input_ids.device
    ids = torch.zeros(b, lp, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(b, lp, dtype=torch.long, device=dev)
    seg = torch.full((b, lp), 3, dtype=torch.long, device=dev)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    for i in range(b):
        p, c, r = int(p_c[i]), int(c_len[i]), int(r_len[i])
        ids[i, :p + c] = input_ids[i, :p + c]
        ids[i, p + c:p + c + r] = input_ids[b + i, p:p + r]
        pos[i, :p + c] = torch.arange(p + c, device=dev)
        pos[i, p + c:p + c + r] = torch.arange(p, p + r, device=dev)
        seg[i, :p] = 0
        seg[i, p:p + c] = 1
        seg[i, p + c:p + c + r] = 2
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(lp, lp, dtype=torch.bool, device=dev).tril()
    mask = causal[None] & ((k == 0) | (q == k)) & (q != 3) & (k != 3)
    mask |= torch.eye(lp, dtype=torch.bool, device=dev)[None] & (q == 3)  # padding rows see themselves (no NaN)

    # where TRL's row r, shifted position t lives in the packed rows
    t = ar[: length - 1][None, :].expand(rows, -1)
    pair = torch.arange(rows, device=dev) % b
    rejected = (torch.arange(rows, device=dev) >= b)[:, None]
    shift = torch.where(rejected & (t >= first[:, None]), c_len[pair][:, None], torch.zeros_like(t))
    src = pair[:, None] * lp + (t + shift).clamp(max=lp - 1)
    return ids, pos, mask[:, None], src


def token_outputs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 1024, reference: torch.Tensor | None = None):
    """Per scored token: log p(target), entropy, mean logit, target is top-1 (rows of `hidden`), in chunks; the
    logits divided by `temperature` first, as TRL's fused head does. With `reference` (the reference model's hidden
    states at the same rows, no gradient) also KL(reference || policy) of the next-token distributions per token
    (its gradient through the policy's log-probs) and the reference's own four outputs."""
    outs = ([], [], [], [], [])
    ref_outs = ([], [], [], [])

    def head(h):
        logits = torch.nn.functional.linear(h, weight, bias).float() / temperature
        return logits, logits.log_softmax(-1)

    def four(logits, logp, tgt, into):
        """log p(target) (with the gradient logp carries), then entropy, mean logit, top-1 (none); the probs."""
        into[0].append(logp.gather(1, tgt[:, None])[:, 0])
        with torch.no_grad():
            p = logp.exp()
            into[1].append(-(p * logp).sum(-1))
            into[2].append(logits.mean(-1))
            into[3].append(logits.argmax(-1) == tgt)
        return p

    for s in range(0, hidden.shape[0], chunk):
        tgt = targets[s:s + chunk]
        logits, logp = head(hidden[s:s + chunk])
        four(logits, logp, tgt, outs)
        if reference is not None:
            with torch.no_grad():
                ref_logits, ref_logp = head(reference[s:s + chunk])
                ref_p = four(ref_logits, ref_logp, tgt, ref_outs)
            outs[4].append((ref_p * (ref_logp - logp)).sum(-1))
    main = [torch.cat(o) for o in outs[:4]]
    if reference is None:
        return main
    return main + [torch.cat(outs[4])], [torch.cat(o) for o in ref_outs]


def install(model, reference_scale: float = 1.0, token_kl: bool = False) -> dict:
    """Answer TRL's fused-head DPO call on `model` (the base model TRL patched) from prompt-shared rows; where LoRA
    adapts only the top layers (dpo.lora_layers), the reference pass reuses the policy pass's frozen layers. With
    `reference_scale` != 1 the reference pass's (adapter disabled) token log-probs are multiplied by it: H-DPO's
    tempered reference (dpo.entropy_alpha = 1 / reference_scale). With `token_kl` every training policy pass also
    runs the reference on its rows and leaves the batch's token KL (see install_packed) in the returned dict's
    "token_kl" for the trainer to add to its loss (dpo.token_kl)."""
    stats = install_packed(model, pack_pairs, frozen=FrozenBottom.of(model), token_kl=token_kl)
    if reference_scale != 1.0:
        scale_reference(model, reference_scale)
        stats["reference_scale"] = reference_scale
    return stats


def _lora_layers(model) -> list:
    """`model`'s LoRA layers: each one's `disable_adapters` says whether this forward is the reference's."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]


def _tuner(model):
    """A LoRA layer of `model`: its `disable_adapters` says whether this forward is the reference's."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("dpo.entropy_alpha: the model has no LoRA layer, so its reference pass cannot be told apart")
    return layers[0]


def scale_reference(model, scale: float) -> None:
    """Multiply the token log-probs of every fused-head forward run with the adapter disabled (TRL's reference pass,
    packed or not, precomputed or per step) by `scale`. DPO at beta' = alpha x beta against log pi_ref / alpha is
    H-DPO's loss, -log sigmoid(beta [(alpha log pi - log pi_ref)(chosen) - (...)(rejected)]) (Omura et al., 2024):
    its optimum is (pi_ref exp(r / beta)) ^ (1 / alpha), the reference tempered by alpha at the sequence level."""
    tuner = _tuner(model)
    inner = model.forward

    def forward(self, *args, **kwargs):
        out = inner(*args, **kwargs)
        if kwargs.get("fused_lm_head") and tuner.disable_adapters:
            out.log_probs = out.log_probs * scale
        return out

    model.forward = types.MethodType(forward, model)


class FrozenBottom:
    """The layers below the lowest adapted one, run once for the policy and its reference.

    With LoRA on the top layers only (dpo.lora_layers), every layer under the lowest adapted one computes the same
    thing in the policy forward and in the reference forward (the adapter disabled): same weights, same inputs, no
    dropout there. TRL runs the policy first and then the reference on the same batch; so the policy pass keeps the
    hidden states entering the lowest adapted layer, and the reference pass on the same packed rows skips the layers
    below it (each returns its input) and starts from them: the same floats, half the reference forward saved at
    SmolLM2's top 15 of 30 (a sixth of a step). Any other call (the adapter on, another batch, precomputed reference
    log-probs) runs every layer.
    """

    def __init__(self, layers, first: int, tuner):
        self.first, self.tuner = first, tuner
        self.mode: str | None = None
        self.key: tuple | None = None
        self.cache: torch.Tensor | None = None
        self.stats = {"reference_passes_reusing": 0}
        for layer in layers[:first]:
            layer.forward = self._skippable(layer.forward)
        layers[first].register_forward_pre_hook(self._enter, with_kwargs=True)

    @classmethod
    def of(cls, model) -> "FrozenBottom | None":
        """For a model whose LoRA starts above its first decoder layer; None otherwise (nothing to share)."""
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if layers is None:
            return None
        adapted = [i for i, layer in enumerate(layers) if any(hasattr(m, "lora_A") for m in layer.modules())]
        if not adapted or adapted[0] == 0:
            return None
        tuner = next(m for m in layers[adapted[0]].modules() if hasattr(m, "lora_A"))
        return cls(layers, adapted[0], tuner)

    def _skippable(self, forward):
        def run(hidden_states, *args, **kwargs):
            if self.mode == "reuse":
                return hidden_states  # its output is replaced at the lowest adapted layer anyway
            return forward(hidden_states, *args, **kwargs)
        return run

    def _enter(self, module, args, kwargs):
        if self.mode == "keep":
            self.cache = (args[0] if args else kwargs["hidden_states"]).detach()
        elif self.mode == "reuse":
            if args:
                return (self.cache,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.cache}
        return None

    @contextlib.contextmanager
    def around(self, *inputs: torch.Tensor):
        """Run the decoder on these packed inputs (ids, positions, mask): keep the frozen layers' output when the
        adapter is on, reuse it when it is off and the inputs are the kept ones."""
        if not self.tuner.disable_adapters:
            self.mode, self.key, self.cache = "keep", inputs, None
        elif self.key is not None and self.cache is not None and len(self.key) == len(inputs) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.key, inputs)):
            self.mode = "reuse"
            self.stats["reference_passes_reusing"] += 1
        else:
            self.mode = None
        try:
            yield
        finally:
            if self.mode == "reuse":
                self.key = self.cache = None
            self.mode = None


def install_packed(model, pack, temperature: float = 1.0, frozen: FrozenBottom | None = None,
                   token_kl: bool = False) -> dict:
    """Wrap `model.forward` (TRL's fused-head forward) so that a fused-head call whose rows `pack(input_ids,
    attention_mask, labels)` can pack -> (ids, position_ids, mask4d, src) is answered from the packed rows, with the
    logits divided by `temperature` as TRL's head does; any other call (and a batch `pack` returns None for) goes to
    the original forward. Returns the counters it keeps: forwards packed and not, and the tokens the packed ones ran
    against the tokens TRL's rows hold.

    With `token_kl`, a packed call with the adapters on and gradients enabled (a training policy pass) also runs the
    reference (every LoRA layer disabled, no gradient; the frozen layers' output reused) on the same rows, and puts
    in the returned dict's "token_kl" the sum over the batch's scored tokens of KL(reference || policy) of the
    next-token distributions divided by its rows (the mean over its chosen and rejected sequences of their summed
    token KL), with the policy's gradient. The reference pass TRL runs next on the same batch is answered from the
    one this ran (counted in "reference_passes_cached"), so the KL costs two LM-head passes, not a forward."""
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward
    stats = {"packed_forwards": 0, "plain_forwards": 0, "packed_tokens": 0, "row_tokens": 0}
    adapters = _lora_layers(model)
    if token_kl:
        if not adapters:
            raise ValueError("dpo.token_kl: the model has no LoRA layer, so its reference cannot be run beside it")
        stats["reference_passes_cached"] = 0
    cached: list = []  # [(input_ids, labels, the reference's output)] of the last policy pass that ran one

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        plain = (not fused_lm_head or args or labels is None or input_ids is None or attention_mask is None
                 or attention_mask.ndim != 2 or kwargs.get("shift_labels") is not None
                 or kwargs.get("output_router_logits"))
        if not plain and cached and adapters[0].disable_adapters:
            ids_, labels_, out = cached.pop()
            if ids_.shape == input_ids.shape and torch.equal(ids_, input_ids) and torch.equal(labels_, labels):
                stats["reference_passes_cached"] += 1
                return out
        packed = None if plain else pack(input_ids, attention_mask, labels)
        if packed is None:
            stats["plain_forwards"] += int(bool(fused_lm_head))
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        ids, pos, mask, src = packed
        stats["packed_forwards"] += 1
        stats["packed_tokens"] += ids.numel()
        stats["row_tokens"] += input_ids.numel()
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "position_ids",
                                                           "use_cache", "num_items_in_batch")}

        def decoder():
            with frozen.around(ids, pos, mask) if frozen is not None else contextlib.nullcontext():
                return self.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                       **rest).last_hidden_state

        hidden = decoder()
        targets = labels[:, 1:]
        scored = targets != -100
        lm_head = self.get_output_embeddings()
        sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src[scored])

        def place(x):
            return x.new_zeros(scored.shape).masked_scatter(scored, x)

        def output(logp, ent, mean, top1):
            log_probs = place(logp)
            return FusedCausalLMOutput(loss=-log_probs.sum() / scored.sum().clamp(min=1), log_probs=log_probs,
                                       entropy=place(ent), mean_logits=place(mean), is_top1=place(top1),
                                       label_mask=scored)

        if token_kl and torch.is_grad_enabled() and not adapters[0].disable_adapters:
            with torch.no_grad(), _adapters_off(adapters):
                ref = decoder()
            ref_sel = ref.reshape(-1, ref.shape[-1]).index_select(0, src[scored])
            (logp, ent, mean, top1, kl), ref_outs = token_outputs(sel, lm_head.weight, lm_head.bias,
                                                                  targets[scored], temperature, reference=ref_sel)
            stats["token_kl"] = kl.sum() / labels.shape[0]
            cached[:] = [(input_ids, labels, output(*ref_outs))]
            return output(logp, ent, mean, top1)
        return output(*token_outputs(sel, lm_head.weight, lm_head.bias, targets[scored], temperature))

    model.forward = types.MethodType(forward, model)
    if frozen is not None:
        stats["frozen_layers_shared"] = frozen.first
        stats["reference_passes_reusing"] = 0
        frozen.stats = stats  # one dict of counters for the caller
    return stats


@contextlib.contextmanager
def _adapters_off(layers):
    """Every LoRA layer disabled (the reference model) inside, enabled again after, as PEFT's disable_adapter does."""
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
