"""KAR's knowledge-augmented rerankers (DLCM, PRM) and their checkpoints (fitting them: rlrf/rerank_train.py).

Each candidate item is the concatenation of its id embedding, its attribute (first genre) embedding
(32 each) and, with knowledge on, the hybrid-expert adaptor's output for two tasks: user preference
(driven by the user's profile embedding) and item fact (driven by the item text embedding), 32 dims
each. With knowledge off the same code is the base model. A backbone (rlrf/backbones.py: DLCM, PRM) reads
the whole list of candidate vectors and gives each a logit.

With `history` > 0 (reranker.history; evaluate.history for the evaluation rerankers) each candidate also
gets user-history features: its id and attribute embeddings times the mean embedding of the user's liked
and of the not-liked prompt-history items, and its mean item-item co-occurrence cosine to those two sets
(from train users' interactions and every user's history, never a valid/test user's lists). KAR's lists
are item-only, so the base model cannot tell which of 10 items a user rated beyond popularity (the README's
reranker table measures both). The lists as arrays and the item tables are built in rlrf/rerank_data.py.

The item tables (attribute per item, item text embedding per item, history, co-occurrence) are buffers of
the model, so a checkpoint carries the knowledge it was trained with and a reward forward needs only item
ids, user ids and profile embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlrf.backbones import BACKBONES, mlp
from rlrf.errors import StageError
from rlrf.files import atomic_path
from rlrf.rerank_data import RerankData


# ----------------------------------------------------------------------------- models


def precision(dtype: str) -> str:
    """reranker.dtype resolved on this machine: auto = bfloat16 where the CPU does bf16 matmuls natively (AVX512-bf16,
    AMX: a PRM trains about 1.5x faster, a DLCM 1.3x, test metrics within the seeds' spread, docs/performance.md), else
    float32 (AVX2 emulates bf16, slower than fp32)."""
    if dtype in ("bfloat16", "float32"):
        return dtype
    from rlrf.llm import cpu_has_bf16

    return "bfloat16" if cpu_has_bf16() else "float32"


@dataclass
class RerankerSpec:
    """What a checkpoint needs to be rebuilt, and what the data must match (saved as model.json)."""
    backbone: str
    knowledge: bool
    n_items: int          # item-id vocabulary: max item_id + 1 (0 = padding)
    n_attributes: int     # attribute-id vocabulary: max attribute_id + 1 (0 = none)
    list_size: int
    know_dim: int = 0     # text-embedding width (0 without knowledge)
    encoder: str = ""     # rlrf.encode.encoder_id of those embeddings
    emb_dim: int = 32
    expert_hidden: int = 128
    expert_out: int = 32
    n_shared: int = 2
    n_dedicated: int = 5
    gru_hidden: int = 64
    prm_heads: int = 2
    prm_mlp: tuple = (200, 80)
    dropout: float = 0.0  # on each candidate's input features, training only
    history: int = 0      # user-history width: the last `history` prompt-history items per user (0 = off)
    n_users: int = 0      # user-id vocabulary of the history table: max user_id + 1 (0 without history)
    precision: str = "float32"  # bfloat16: every forward under CPU autocast (matmuls in bf16, weights and the logits
    # fp32); the precision it trained in is the one it scores in (reranker.dtype, resolved by `precision`)

    # fields that describe the data: a checkpoint is refused when one of these differs
    DATA_FIELDS = ("n_items", "n_attributes", "list_size", "know_dim", "encoder", "n_users")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "RerankerSpec":
        d = dict(d)
        d["prm_mlp"] = tuple(d.get("prm_mlp", (200, 80)))
        return cls(**d)


class HybridExpertAdaptor(nn.Module):
    """KAR's hybrid-expert adaptor: per task, n_shared experts (shared by all tasks) plus n_dedicated
    experts of its own, mixed by a softmax gate computed from that task's vector."""

    def __init__(self, d_in: int, n_tasks: int = 2, n_shared: int = 2, n_dedicated: int = 5,
                 hidden: int = 128, out: int = 32):
        super().__init__()
        self.shared = nn.ModuleList(mlp([d_in, hidden, out]) for _ in range(n_shared))
        self.dedicated = nn.ModuleList(nn.ModuleList(mlp([d_in, hidden, out]) for _ in range(n_dedicated))
                                       for _ in range(n_tasks))
        self.gates = nn.ModuleList(nn.Linear(d_in, n_shared + n_dedicated) for _ in range(n_tasks))

    def task(self, t: int, x: torch.Tensor) -> torch.Tensor:
        experts = torch.stack([e(x) for e in (*self.shared, *self.dedicated[t])], dim=-2)  # (..., E, out)
        gate = torch.softmax(self.gates[t](x), dim=-1).unsqueeze(-1)                      # (..., E, 1)
        return (gate * experts).sum(-2)


class Reranker(nn.Module):
    def __init__(self, spec: RerankerSpec):
        super().__init__()
        self.spec = spec
        e = spec.emb_dim
        self.item_emb = nn.Embedding(spec.n_items, e, padding_idx=0)
        self.attr_emb = nn.Embedding(spec.n_attributes, e, padding_idx=0)
        self.register_buffer("item_attr", torch.zeros(spec.n_items, dtype=torch.long))
        d = 2 * e
        if spec.history:
            # the user's prompt-history items (never rerank samples) and whether the user liked each
            self.register_buffer("hist_items", torch.zeros(spec.n_users, spec.history, dtype=torch.long))
            self.register_buffer("hist_liked", torch.zeros(spec.n_users, spec.history))
            # item-item co-occurrence cosine from what is known at training time (train users' interactions,
            # every user's prompt history): the collaborative signal 32-dim ids learn poorly from 754 users
            self.register_buffer("item_sim", torch.zeros(spec.n_items, spec.n_items))
            d += 4 * e + 2
        if spec.knowledge:
            if spec.know_dim <= 0:
                raise ValueError("a knowledge reranker needs know_dim > 0 (the text-embedding width)")
            self.register_buffer("item_know", torch.zeros(spec.n_items, spec.know_dim))
            self.adaptor = HybridExpertAdaptor(spec.know_dim, 2, spec.n_shared, spec.n_dedicated,
                                               spec.expert_hidden, spec.expert_out)
            d += 2 * spec.expert_out
        self.dropout = nn.Dropout(spec.dropout)
        if spec.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {spec.backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.backbone = BACKBONES[spec.backbone](d, spec)

    def history_features(self, user_ids: torch.Tensor, item_ids: torch.Tensor, cand_item: torch.Tensor,
                         cand_attr: torch.Tensor) -> torch.Tensor:
        """(B, L, 4e + 2): each candidate's id and attribute embeddings times the mean embedding of the user's
        liked and of the user's not-liked history items (a factorised user-item match, as FISM/SVD++), and
        the candidate's mean co-occurrence similarity to those two sets."""
        items = self.hist_items[user_ids]                                   # (B, H)
        liked = self.hist_liked[user_ids].unsqueeze(-1)                     # (B, H, 1)
        real = (items > 0).float().unsqueeze(-1)
        sim = self.item_sim[item_ids.unsqueeze(-1), items.unsqueeze(1)]    # (B, L, H)
        out = []
        for w in (liked * real, (1 - liked) * real):
            n = w.sum(1).clamp(min=1.0)                                     # (B, 1)
            for cand, emb in ((cand_item, self.item_emb(items)), (cand_attr, self.attr_emb(self.item_attr[items]))):
                out.append(cand * ((w * emb).sum(1) / n).unsqueeze(1))
            out.append((sim @ w / n.unsqueeze(1)) * 10.0)                    # (B, L, 1), cosines are ~0.01-0.3
        return torch.cat(out, dim=-1)

    def forward(self, item_ids: torch.Tensor, user_vecs: torch.Tensor | None = None,
                user_index: torch.Tensor | None = None, user_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L) for lists of item ids (B, L).

        user_vecs (U, know_dim): profile embeddings; user_index (B,) picks each list's row (default: row
        b for list b). Many lists share a profile in a reward forward, so the user task runs once per
        profile and the item task once per distinct item. user_ids (B,): each list's user, for the
        history features (spec.history > 0).
        """
        parts = [self.item_emb(item_ids), self.attr_emb(self.item_attr[item_ids])]
        if self.spec.history:
            if user_ids is None:
                raise ValueError("this reranker reads the user's history: pass user_ids (one per list)")
            parts.append(self.history_features(user_ids, item_ids, *parts))
        if self.spec.knowledge:
            if user_vecs is None:
                raise ValueError("this reranker was trained with knowledge: pass the profile embeddings")
            uniq, inv = torch.unique(item_ids, return_inverse=True)
            parts.append(self.adaptor.task(1, self.item_know[uniq])[inv])
            user = self.adaptor.task(0, user_vecs)
            user = user if user_index is None else user[user_index]
            parts.append(user.unsqueeze(1).expand(-1, item_ids.shape[1], -1))
        return self.backbone(self.dropout(torch.cat(parts, dim=-1)))

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """forward, in spec.precision: under bf16 autocast the logits come back as fp32 for the loss and scores."""
        if self.spec.precision != "bfloat16":
            return super().__call__(*args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().__call__(*args, **kwargs).float()


# ----------------------------------------------------------------------------- training


def build_model(spec: RerankerSpec, data: RerankData) -> Reranker:
    model = Reranker(spec)
    model.item_attr.copy_(torch.from_numpy(data.item_attr))
    if spec.knowledge:
        model.item_know.copy_(torch.from_numpy(data.item_know))
    if spec.history:
        model.hist_items.copy_(torch.from_numpy(data.hist_items))
        model.hist_liked.copy_(torch.from_numpy(data.hist_liked))
        model.item_sim.copy_(torch.from_numpy(data.item_sim))
    return model


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: Reranker, out_dir: Path, seed: int | str) -> Path:
    """checkpoints/seed_<seed>.safetensors, or checkpoints/<name>.safetensors for a named judge member."""
    from safetensors.torch import save_file

    name = f"seed_{seed}" if isinstance(seed, int) else seed
    path = Path(out_dir) / "checkpoints" / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"name": name})
    return path


def check_spec(saved: RerankerSpec, expected: RerankerSpec, where: str) -> None:
    """Refuse a checkpoint whose data-dependent config differs from the data it would be used with."""
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r}, data {getattr(expected, k)!r}"
             for k in RerankerSpec.DATA_FIELDS if getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise StageError(f"{where} does not match the data it is used with ({'; '.join(diffs)}). Retrain it on "
                         f"this run's prepare/encode output (python pipelines/train_reranker.py --force) or "
                         f"point to the matching run.")


def load_reranker(reranker_dir: str | Path, seed: int | None = None,
                  expect: RerankerSpec | None = None) -> tuple[Reranker, RerankerSpec]:
    """A trained reranker (first seed unless `seed`), checked against `expect` when given."""
    from rlrf.artifacts import read_stage_json

    reranker_dir = Path(reranker_dir)
    info = read_stage_json(reranker_dir, "train-reranker")
    spec = RerankerSpec.from_dict(json.loads((reranker_dir / "model.json").read_text()))
    seed = info["seeds"][0] if seed is None else seed
    if not (reranker_dir / "checkpoints" / f"seed_{seed}.safetensors").is_file():
        raise StageError(f"{reranker_dir / 'checkpoints'}/seed_{seed}.safetensors not found (seeds trained: {info['seeds']})")
    return load_checkpoint(reranker_dir, f"seed_{seed}", expect), spec


def load_checkpoint(reranker_dir: str | Path, name: str, expect: RerankerSpec | None = None) -> Reranker:
    """checkpoints/<name>.safetensors of a reranker stage as a model of its model.json (checked against `expect`)."""
    from safetensors.torch import load_file

    reranker_dir = Path(reranker_dir)
    spec = RerankerSpec.from_dict(json.loads((reranker_dir / "model.json").read_text()))
    if expect is not None:
        check_spec(spec, expect, str(reranker_dir / "model.json"))
    path = reranker_dir / "checkpoints" / f"{name}.safetensors"
    if not path.is_file():
        raise StageError(f"{path} not found: rerun the train-reranker stage that writes {reranker_dir}")
    model = Reranker(spec)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise StageError(f"{path} does not fit {reranker_dir / 'model.json'}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model
