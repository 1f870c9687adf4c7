"""KAR's knowledge-augmented rerankers (DLCM, PRM) and the train-reranker stage.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm import tqdm

from rlrf import runs
from rlrf.backbones import BACKBONES, mlp
from rlrf.config import Recipe, RerankerConfig
from rlrf.errors import StageError
from rlrf.files import atomic_path, write_json
from rlrf.rerank_data import RerankData, load_data
from rlrf.threads import torch_threads

KS = (1, 3, 5, 7)


# ----------------------------------------------------------------------------- models


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


def _user_matrix(arr: dict, idx) -> torch.Tensor | None:
    return torch.from_numpy(arr["user_vecs"][idx]) if "user_vecs" in arr else None


def _forward(model: Reranker, arr: dict, idx) -> torch.Tensor:
    """The model on the lists `idx` of one split's arrays."""
    return model(torch.from_numpy(arr["item_ids"][idx]), _user_matrix(arr, idx),
                 user_ids=torch.from_numpy(arr["user_id"][idx]))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    # listwise: softmax cross-entropy against the normalised labels; lists without a positive carry no signal
    pos = labels.sum(1)
    keep = pos > 0
    if not keep.any():
        return logits.sum() * 0.0
    target = labels[keep] / pos[keep].unsqueeze(1)
    return -(target * torch.log_softmax(logits[keep], dim=1)).sum(1).mean()


@torch.no_grad()
def predict(model: Reranker, data: RerankData, split: str, batch: int = 2048) -> np.ndarray:
    model.eval()
    arr = data.lists[split]
    out = []
    for s in range(0, len(arr["item_ids"]), batch):
        out.append(_forward(model, arr, slice(s, s + batch)).float().numpy())
    L = arr["item_ids"].shape[1] if arr["item_ids"].ndim == 2 else 0
    return np.concatenate(out) if out else np.zeros((0, L), dtype=np.float32)


def split_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from rlrf.metrics import ranking_metrics

    if len(scores) == 0:
        return {}
    return {k: float(v) for k, v in ranking_metrics(scores, labels, ks=KS).items()}


def fit(spec: RerankerSpec, data: RerankData, cfg: RerankerConfig, seed: int, progress: bool = True) -> tuple[Reranker, dict]:
    """Train one seed; early stopping on valid MAP@5. Returns the best model and its training log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(spec, data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = data.lists["train"]
    n = len(train["item_ids"])
    if n == 0:
        raise StageError("train-reranker: no train lists (see the prepare stage's lists and, with knowledge, "
                         "whether train users have profiles)")
    has_valid = len(data.lists["valid"]["item_ids"]) > 0
    log = {"seed": seed, "epochs": [], "best_epoch": 0, "best_valid_map@5": -1.0}
    best_state, bad = None, 0
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.time()
        order = rng.permutation(n)
        losses = []
        for b, s in enumerate(tqdm(range(0, n, cfg.batch_size), desc=f"seed {seed} epoch {epoch}",
                                   leave=False, disable=not progress)):
            idx = order[s:s + cfg.batch_size]
            labels = torch.from_numpy(train["labels"][idx]).float()
            loss = loss_fn(_forward(model, train, idx), labels, cfg.loss)
            step += 1
            if not torch.isfinite(loss):
                raise StageError(
                    f"train-reranker: loss is {loss.item()} at step {step} (epoch {epoch}, batch {b}: lists "
                    f"{train['list_id'][idx][:5].tolist()}...) with seed {seed}. Lower reranker.lr (now {cfg.lr}) "
                    f"or check the profile/item embeddings of the encode stage for NaN.")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_s = time.time() - t0
        vm = split_metrics(predict(model, data, "valid"), data.lists["valid"]["labels"]) if has_valid else {}
        v = vm.get("map@5", -float(np.mean(losses)))  # no valid users: fall back to the train loss
        log["epochs"].append({"epoch": epoch, "train_loss": float(np.mean(losses)), "epoch_s": round(epoch_s, 3),
                              "valid_map@5": vm.get("map@5"), "valid_ndcg@5": vm.get("ndcg@5")})
        if v > log["best_valid_map@5"]:
            log["best_valid_map@5"], log["best_epoch"], bad = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, log


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


# ----------------------------------------------------------------------------- the stage


def _mean_std(per_seed: list[dict]) -> dict:
    keys = per_seed[0].keys() if per_seed else []
    return {k: {"mean": float(np.mean([m[k] for m in per_seed])), "std": float(np.std([m[k] for m in per_seed]))}
            for k in keys}


def train_stage(recipe: Recipe, out_dir: str | Path, knowledge_dir: str | Path | None, *, backbone: str | None = None,
                knowledge: bool | None = None, seeds: list[int] | None = None, history: int | None = None,
                force: bool = False) -> Path:
    """Train the reranker (one model per seed) on train users' lists; early stop on valid MAP@5."""
    cfg = dataclasses.replace(recipe.reranker, **{k: v for k, v in
                              {"backbone": backbone, "knowledge": knowledge, "seeds": seeds,
                               "history": history}.items() if v is not None})
    if cfg.knowledge and knowledge_dir is None:
        raise StageError("train-reranker: reranker.knowledge=true needs an encode stage dir (profiles as knowledge); "
                         "run pipelines/encode.py first or set reranker.knowledge=false for the base model")
    knowledge_dir = knowledge_dir if cfg.knowledge else None
    out_dir = Path(out_dir)
    inputs = [runs.prepare_dir(recipe)] + ([knowledge_dir] if knowledge_dir else [])
    with runs.STAGES["train-reranker"].open(recipe, out_dir, inputs=inputs, used={"reranker": cfg}, force=force,
                                            extra={} if cfg.knowledge else {"encode": None}, summary=_line) as st, \
            torch_threads(cfg.threads):
        if st.done:
            return out_dir
        data = load_data(recipe, knowledge_dir, history=cfg.history, without_profile=cfg.without_profile)
        st.counters.update(data.dropped)
        spec = data.spec(cfg.backbone, cfg.knowledge, cfg.dropout, history=cfg.history > 0)
        write_json(out_dir / "model.json", spec.to_dict())
        for i in st.todo(len(cfg.seeds)):
            seed = int(cfg.seeds[i])
            model, log = fit(spec, data, cfg, seed, progress=not st.quiet)
            save_checkpoint(model, out_dir, seed)
            frames, result = [], {"best_epoch": log["best_epoch"], "epochs_run": len(log["epochs"]),
                                  "epoch_s": float(np.mean([e["epoch_s"] for e in log["epochs"]])), "log": log}
            for split in ("train", "valid", "test"):
                arr = data.lists[split]
                scores = predict(model, data, split)
                result[split] = split_metrics(scores, arr["labels"])
                frames.append(pl.DataFrame({
                    "user_id": arr["user_id"], "list_id": arr["list_id"], "split": [split] * len(scores),
                    "seed": np.full(len(scores), seed, dtype=np.int64),
                    "scores": scores.tolist(), "labels": arr["labels"].tolist(),
                }, schema={"user_id": pl.Int64, "list_id": pl.Int64, "split": pl.Utf8, "seed": pl.Int64,
                           "scores": pl.List(pl.Float32), "labels": pl.List(pl.Int8)}))
            write_json(out_dir / "metrics" / f"seed_{seed}.json", result)
            st.write_shard(i, {"predictions": pl.concat(frames)})
            st.log(f"train-reranker: seed {seed}: best epoch {log['best_epoch']}, "
                   f"valid MAP@5 {result['valid'].get('map@5', float('nan')):.4f}, "
                   f"valid NDCG@5 {result['valid'].get('ndcg@5', float('nan')):.4f}, "
                   f"test NDCG@5 {result['test'].get('ndcg@5', float('nan')):.4f}")
        per_seed = {int(s): json.loads((out_dir / "metrics" / f"seed_{int(s)}.json").read_text()) for s in cfg.seeds}
        metrics = {
            "backbone": cfg.backbone, "knowledge": cfg.knowledge, "loss": cfg.loss, "seeds": [int(s) for s in cfg.seeds],
            "per_seed": {str(s): {k: m[k] for k in ("valid", "test", "best_epoch", "epochs_run", "epoch_s")}
                         for s, m in per_seed.items()},
            "valid": _mean_std([m["valid"] for m in per_seed.values()]),
            "test": _mean_std([m["test"] for m in per_seed.values()]),
            "epoch_s": float(np.mean([m["epoch_s"] for m in per_seed.values()])),
            "n_lists": {s: int(len(a["list_id"])) for s, a in data.lists.items()},
        }
        write_json(out_dir / "metrics.json", metrics)
        st.finish({"seeds": metrics["seeds"], "backbone": cfg.backbone, "knowledge": cfg.knowledge,
                   "test": metrics["test"], "valid": metrics["valid"], "epoch_s": metrics["epoch_s"]})
    return out_dir


def _line(info: dict) -> str:
    # a KAR reranker has test lists only where the sample stage drew test users (the demo round leaves them
    # to `make evaluate`): then valid is the held-out figure to show
    split = "test" if info["test"] else "valid"
    t = info[split].get("ndcg@5", {})
    return (f"{info['backbone']}{' + knowledge' if info['knowledge'] else ''} over seeds {info['seeds']}: "
            f"{split} NDCG@5 {t.get('mean', float('nan')):.4f} +- {t.get('std', float('nan')):.4f}"
            f"{'' if split == 'test' else ' (no test lists with a profile: sample.splits leaves test users out)'}, "
            f"{info['epoch_s']:.2f} s/epoch")
