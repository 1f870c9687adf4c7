"""The list backbones a reranker can read its candidates with, one registry keyed by reranker.backbone.

Each takes the list's candidate vectors (B, L, d) and gives one logit per candidate (B, L); the sigmoid lives in
the loss (ranking by logits is ranking by sigmoids).

- DLCM: a GRU (hidden 64) over the list; item i scores V . (o_i * tanh(W s + b)), o_i the GRU output at i and s
  its final state (DLCM's local perception function Phi, as KAR uses it).
- PRM: sinusoidal position encoding, one 2-head self-attention block, an MLP 200-80, one logit.

A new backbone is a module here and one line in BACKBONES (its name joins config.Backbone's Literal).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def mlp(sizes: list[int], last_act: bool = True) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLCM(nn.Module):
    def __init__(self, d_in: int, hidden: int = 64):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.phi_w = nn.Linear(hidden, hidden)
        self.phi_v = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, s = self.gru(x)                                   # o (B, L, H), s (1, B, H)
        ctx = torch.tanh(self.phi_w(s[-1])).unsqueeze(1)     # (B, 1, H)
        return self.phi_v(o * ctx).squeeze(-1)


def sinusoidal(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class PRM(nn.Module):
    def __init__(self, d_in: int, list_size: int, heads: int = 2, head_sizes: tuple = (200, 80)):
        super().__init__()
        self.register_buffer("pe", sinusoidal(list_size, d_in), persistent=False)
        self.attn = nn.MultiheadAttention(d_in, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_in)
        self.ffn = nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_in))
        self.norm2 = nn.LayerNorm(d_in)
        self.head = nn.Sequential(mlp([d_in, *head_sizes]), nn.Linear(head_sizes[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pe[: x.shape[1]]
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        x = self.norm2(x + self.ffn(x))
        return self.head(x).squeeze(-1)


# reranker.backbone -> builder(d_in, spec): spec is the reranker's RerankerSpec (list_size and the sizes below)
BACKBONES: dict[str, Callable[[int, object], nn.Module]] = {
    "dlcm": lambda d, spec: DLCM(d, spec.gru_hidden),
    "prm": lambda d, spec: PRM(d, spec.list_size, spec.prm_heads, spec.prm_mlp),
}
