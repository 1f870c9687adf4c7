"""The reranker's data: a run's lists as arrays, the item tables a Reranker's buffers hold (attribute, item text
embedding), the user-history features (liked / not-liked prompt-history items, item-item co-occurrence), and the
profile embeddings the knowledge-augmented model reads (rlrf/rerank.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.errors import StageError

if TYPE_CHECKING:
    from rlrf.rerank import RerankerSpec


@dataclass
class RerankData:
    """Lists of one run as arrays, plus the item tables a Reranker's buffers hold."""
    item_attr: np.ndarray                 # (n_items,) attribute id per item id
    item_know: np.ndarray | None          # (n_items, d) item text embedding per item id
    user_know: dict[int, np.ndarray]      # user_id -> profile embedding (sample_idx 0)
    lists: dict[str, dict[str, np.ndarray]]   # split -> list_id, user_id, item_ids (R, L), labels (R, L)
    encoder: str = ""
    dropped: dict = dataclasses.field(default_factory=dict)
    hist_items: np.ndarray | None = None  # (n_users, H) last H prompt-history item ids per user id (0 = none)
    hist_liked: np.ndarray | None = None  # (n_users, H) 1.0 where that history item is a positive
    item_sim: np.ndarray | None = None    # (n_items, n_items) co-occurrence cosine (cooccurrence_similarity)

    def spec(self, backbone: str, knowledge: bool, dropout: float = 0.0, history: bool = True,
             precision: str = "float32") -> RerankerSpec:
        from rlrf.rerank import RerankerSpec  # the model's module imports this one

        sizes = {len(v["item_ids"][0]) for v in self.lists.values() if len(v["item_ids"])}
        hist = history and self.hist_items is not None
        return RerankerSpec(backbone=backbone, knowledge=knowledge, n_items=len(self.item_attr),
                            n_attributes=int(self.item_attr.max()) + 1, list_size=max(sizes) if sizes else 0,
                            know_dim=self.item_know.shape[1] if knowledge else 0,
                            encoder=self.encoder if knowledge else "", dropout=dropout,
                            history=self.hist_items.shape[1] if hist else 0,
                            n_users=self.hist_items.shape[0] if hist else 0, precision=precision)


def lists_arrays(lists: pl.DataFrame, where: str = "lists") -> dict[str, np.ndarray]:
    sizes = lists["item_ids"].list.len().unique().to_list()
    if len(sizes) > 1:
        raise StageError(f"{where}: lists have different lengths {sorted(sizes)}; the prepare stage pads every "
                         f"list to prepare.list_size, so rerun it with --force")
    L = sizes[0] if sizes else 0
    if lists.height == 0:  # e.g. a shard whose users have no lists
        return {"list_id": np.zeros(0, np.int64), "user_id": np.zeros(0, np.int64),
                "item_ids": np.zeros((0, L), np.int64), "labels": np.zeros((0, L), np.int8)}
    return {
        "list_id": lists["list_id"].to_numpy().copy(),   # writable: torch refuses read-only arrays
        "user_id": lists["user_id"].to_numpy().copy(),
        "item_ids": np.asarray(lists["item_ids"].to_list(), dtype=np.int64).reshape(-1, L),
        "labels": np.asarray(lists["labels"].to_list(), dtype=np.int8).reshape(-1, L),
    }


def item_tables(items: pl.DataFrame) -> np.ndarray:
    attr = np.zeros(int(items["item_id"].max()) + 1, dtype=np.int64)
    attr[items["item_id"].to_numpy()] = items["attribute_id"].to_numpy()
    return attr


def history_tables(interactions: pl.DataFrame, n_users: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, width) item ids and liked flags of each user's last `width` prompt-history items
    (interactions with in_history; those never appear in a rerank list), left-aligned, 0-padded."""
    h = (interactions.filter(pl.col("in_history")).sort("user_id", "position")
         .group_by("user_id", maintain_order=True).tail(width)
         .with_columns(pl.int_range(pl.len()).over("user_id").alias("slot")))
    items = np.zeros((n_users, width), dtype=np.int64)
    liked = np.zeros((n_users, width), dtype=np.float32)
    u, slot = h["user_id"].to_numpy(), h["slot"].to_numpy()
    items[u, slot] = h["item_id"].to_numpy()
    liked[u, slot] = (h["label"].to_numpy() > 0)
    return items, liked


# the co-occurrence table is a dense (n_items, n_items) float32 buffer of the model
MAX_HISTORY_ITEMS = 20_000  # 1.6 GB


def cooccurrence_similarity(interactions: pl.DataFrame, users: pl.DataFrame, n_items: int) -> np.ndarray:
    """(n_items, n_items) cosine of item co-occurrence over what a reranker may know when it trains: train
    users' interactions and every user's prompt history (never a valid/test user's list items)."""
    from scipy import sparse

    if n_items > MAX_HISTORY_ITEMS:
        raise StageError(f"reranker history features: {n_items} items would need a {n_items ** 2 * 4 / 1e9:.1f} GB "
                         f"co-occurrence table (limit {MAX_HISTORY_ITEMS} items); set reranker.history=0 and "
                         f"evaluate.history=0 for this catalogue")
    train = users.filter(pl.col("split") == "train")["user_id"]
    known = (interactions.filter(pl.col("in_history") | pl.col("user_id").is_in(train.implode()))
             .unique(["user_id", "item_id"]))
    rows, cols = known["user_id"].to_numpy(), known["item_id"].to_numpy()
    x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                          shape=(int(rows.max()) + 1 if len(rows) else 1, n_items))
    c = (x.T @ x).toarray()
    np.fill_diagonal(c, 0.0)
    norm = np.sqrt(np.asarray(x.sum(0)).ravel() + 1.0)
    return (c / norm[:, None] / norm[None, :]).astype(np.float32)


def load_data(recipe: Recipe, knowledge_dir: str | Path | None, history: int | None = None,
              without_profile: str | None = None) -> RerankData:
    """The run's lists as arrays, with knowledge from `knowledge_dir` (an encode stage) and the user-history
    tables when `history` (default reranker.history) > 0. Lists of users without a profile are dropped, or
    with without_profile="zero" (default reranker.without_profile) kept on the TRAIN side with a zero profile
    vector; valid and test lists always need a profile, so early stopping and metrics judge real knowledge."""
    history = recipe.reranker.history if history is None else history
    without_profile = recipe.reranker.without_profile if without_profile is None else without_profile
    prep = runs.prepare_dir(recipe)
    items = read_artifact(prep, "items", "prepare")
    lists = read_artifact(prep, "lists", "prepare").sort("list_id")
    attr = item_tables(items)
    hist_items = hist_liked = item_sim = None
    if history > 0:
        users = read_artifact(prep, "users", "prepare")
        inter = read_artifact(prep, "interactions", "prepare")
        hist_items, hist_liked = history_tables(inter, int(users["user_id"].max() or 0) + 1, history)
        item_sim = cooccurrence_similarity(inter, users, len(attr))
    item_know, user_know, encoder, dropped = None, {}, "", {}
    if knowledge_dir is not None:
        from rlrf.encode import encoder_id, load_knowledge

        ut, it, cache = load_knowledge(recipe, knowledge_dir, sample_idx=0)
        encoder = encoder_id(recipe.encode)
        vecs = cache.get(it["text_hash"].to_list())
        item_know = np.zeros((len(attr), vecs.shape[1]), dtype=np.float32)
        item_know[it["item_id"].to_numpy()] = vecs
        uv = cache.get(ut["text_hash"].to_list())
        user_know = dict(zip(ut["user_id"].to_list(), uv))
        # KAR needs every user's knowledge; lists of users without a profile cannot be scored (counted), except
        # train lists under without_profile=zero
        has = lists["user_id"].is_in(list(user_know))
        if without_profile == "zero":  # train lists stay; a zero vector stands in for the missing profile
            keep = has | (lists["split"] == "train")
            dropped = {"lists_without_profile": int((~keep).sum()),
                       "train_lists_with_zero_profile": int((keep & ~has).sum())}
        else:
            keep = has
            dropped = {"lists_without_profile": int((~has).sum())}
        lists = lists.filter(keep)
    by_split = {s: lists_arrays(lists.filter(pl.col("split") == s), f"{prep}/lists") for s in ("train", "valid", "test")}
    if user_know:
        d = item_know.shape[1]
        zero = np.zeros(d, np.float32)  # without_profile=zero: the train lists of users with no profile
        for arr in by_split.values():  # one profile row per list, gathered once instead of every batch
            arr["user_vecs"] = (np.stack([user_know.get(int(u), zero) for u in arr["user_id"]]).astype(np.float32)
                                if len(arr["user_id"]) else np.zeros((0, d), np.float32))
    return RerankData(attr, item_know, user_know, by_split, encoder, dropped, hist_items, hist_liked, item_sim)
