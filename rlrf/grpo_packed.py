"""GRPO's forward with each group's prompt encoded once (`grpo.share_prompt`).

TRL's GRPOTrainer scores a batch of completions as rows [left-padded prompt | right-padded completion], and the
`num_generations` rows of one prompt's group repeat the same prompt: on the demo a 320-token prompt and a ~50-token
profile, so most of every policy forward, its backward and the reference (KL) forward is the same prompt again.
Here the rows that share a prompt become one packed row

    [prompt | completion 1 | completion 2 | ... ]      positions 0..P-1 | P..P+c1-1 | P..P+c2-1 | ...

with a 4D attention mask (the prompt causal; completion j sees the prompt and its own earlier tokens, never another
completion), which gives every completion token the log-probability (and entropy) it gets in its own row, from
P + sum(c_j) tokens instead of G x (P + max c). A row's positions start at 0 where TRL's left-padded row starts
after its padding; rotary attention depends on position differences only, so the scores are the same.

It plugs in as rlrf/dpo_packed.py does for DPO: TRL calls `model(input_ids, attention_mask, labels,
fused_lm_head=True)` on the base model its `add_fused_lm_head` patched and reads per-token `log_probs` and
`entropy` laid out as its (rows, L-1); `install` answers that call from the packed rows and scatters the results
back, so the loss, the KL term, advantages and metrics are TRL's own. A batch in which no two rows share a prompt,
and any other call (generation), goes to the original forward.
"""

from __future__ import annotations

import torch

from rlrf.dpo_packed import install_packed


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """TRL's GRPO rows -> one packed row per prompt (its rows wherever they sit in the batch: TRL shuffles a
    generation batch's rows before cutting it into micro-batches), or None when no two rows share one (nothing to
    save) or the rows are not [left-padded prompt | right-padded completion].

    Returns (ids, position_ids, mask4d, src): src[r, t] is, for TRL's row r and shifted position t (the hidden state
    that predicts token t+1), the flat index into the packed hidden states (groups * Lp).
    """
    rows, length = input_ids.shape
    lab = labels != -100
    if not lab.any():
        return None
    has = lab.any(1)
    first = torch.where(has, lab.int().argmax(1), torch.full_like(has, length, dtype=torch.long))
    b = int(first.min())  # the first completion column: completions start here in every row
    if b < 1:
        return None
    am = attention_mask.bool()
    ar = torch.arange(length, device=input_ids.device)
    comp_len = am[:, b:].sum(1)
    # completions right-padded (real tokens contiguous from column b), prompts left-padded (contiguous up to b)
    if not torch.equal(am[:, b:], ar[None, b:] < (b + comp_len)[:, None]):
        return None
    prompt_len = am[:, :b].sum(1)
    if not torch.equal(am[:, :b], ar[None, :b] >= (b - prompt_len)[:, None]):
        return None
    if bool((lab[:, :b]).any()):
        return None

    by_prompt: dict[tuple, list[int]] = {}  # in order of first appearance; each group's rows in row order
    for r in range(rows):
        by_prompt.setdefault(tuple(input_ids[r, :b][am[r, :b]].tolist()), []).append(r)
    groups = list(by_prompt.values())
    if len(groups) == rows:
        return None

    dev = input_ids.device
    sizes = [int(prompt_len[g[0]]) + int(comp_len[g].sum()) for g in groups]
    lp = max(sizes)
    ids = torch.zeros(len(groups), lp, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(len(groups), lp, dtype=torch.long, device=dev)
    seg = torch.full((len(groups), lp), -1, dtype=torch.long, device=dev)  # 0 prompt, j+1 member j, -1 padding
    src = torch.zeros(rows, length - 1, dtype=torch.long, device=dev)
    for gi, g in enumerate(groups):
        p = int(prompt_len[g[0]])
        ids[gi, :p] = input_ids[g[0], b - p:b]
        pos[gi, :p] = torch.arange(p, device=dev)
        seg[gi, :p] = 0
        at = p
        for j, r in enumerate(g):
            c = int(comp_len[r])
            ids[gi, at:at + c] = input_ids[r, b:b + c]
            pos[gi, at:at + c] = torch.arange(p, p + c, device=dev)
            seg[gi, at:at + c] = j + 1
            # TRL's shifted position t predicts token t+1; completion token i (column b + i) is predicted by the
            # hidden state of completion token i-1, or of the prompt's last token for i = 0
            t = torch.arange(b - 1, b + c - 1, device=dev)
            src[r, t] = gi * lp + torch.cat([torch.tensor([p - 1], device=dev), torch.arange(at, at + c - 1, device=dev)])
            at += c
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(lp, lp, dtype=torch.bool, device=dev).tril()
    mask = causal[None] & ((k == 0) | (q == k)) & (q != -1) & (k != -1)
    mask |= torch.eye(lp, dtype=torch.bool, device=dev)[None] & (q == -1)  # padding rows see themselves (no NaN)
    return ids, pos, mask[:, None], src


def install(model, temperature: float) -> dict:
    """Answer TRL's fused-head GRPO call on `model` (the base model TRL patched) from prompt-shared rows; `temperature`
    is the one TRL's fused head divides the logits by (GRPOConfig.temperature). Returns dpo_packed.install_packed's
    counters (forwards packed and not, packed tokens against TRL's rows' tokens)."""
    return install_packed(model, pack_groups, temperature)


def supported(model) -> str | None:
    """Why the packed forward cannot stand in for TRL's fused head on this model (None: it can)."""
    cfg = model.config.get_text_config()
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key})"
    if getattr(cfg, "output_router_logits", False):
        return "a mixture-of-experts model (router aux loss)"
    return None
