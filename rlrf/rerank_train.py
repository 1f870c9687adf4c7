"""Fitting a KAR reranker (rlrf/rerank.py's model) and the per-seed train-reranker stage.

`fit` trains one seed on the train users' lists (BCE per item or listwise softmax) and early-stops on valid
MAP@5; `predict` scores a split's lists; `train_stage` trains one model per seed and writes checkpoints,
per-seed metrics and predictions: the evaluation's rerankers (`make evaluate`) and the benchmarks' in-sample
judges. The round's reward judge, cross-fitted over users, is rlrf/judge.py, which calls `fit` per member.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm import tqdm

from rlrf import runs
from rlrf.config import Recipe, RerankerConfig
from rlrf.errors import StageError
from rlrf.files import write_json
from rlrf.rerank import Reranker, RerankerSpec, build_model, precision, save_checkpoint
from rlrf.rerank_data import RerankData, load_data
from rlrf.threads import torch_threads

KS = (1, 3, 5, 7)


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


# ----------------------------------------------------------------------------- the stage


def _mean_std(per_seed: list[dict]) -> dict:
    keys = per_seed[0].keys() if per_seed else []
    return {k: {"mean": float(np.mean([m[k] for m in per_seed])), "std": float(np.std([m[k] for m in per_seed]))}
            for k in keys}


def train_stage(recipe: Recipe, out_dir: str | Path, knowledge_dir: str | Path | None, *, backbone: str | None = None,
                knowledge: bool | None = None, seeds: list[int] | None = None, history: int | None = None,
                force: bool = False, progress: bool = True) -> Path:
    """Train the reranker (one model per seed) on train users' lists; early stop on valid MAP@5. `progress=False`
    leaves out the per-epoch bars (a worker among others: make evaluate), not the log lines."""
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
        spec = data.spec(cfg.backbone, cfg.knowledge, cfg.dropout, history=cfg.history > 0,
                         precision=precision(cfg.dtype))
        write_json(out_dir / "model.json", spec.to_dict())
        for i in st.todo(len(cfg.seeds)):
            seed = int(cfg.seeds[i])
            model, log = fit(spec, data, cfg, seed, progress=progress and not st.quiet)
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
                   "test": metrics["test"], "valid": metrics["valid"], "epoch_s": metrics["epoch_s"],
                   "precision": spec.precision})
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
