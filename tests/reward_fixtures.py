"""A tiny synthetic run for the encode / rerank / reward tests, following rlrf/schema.py.

Each user has a taste (one of `n_genres` genres); an item is positive for a user when its genre is the
user's taste, so a reranker that reads the profile (whose fake embedding encodes the taste) can rank
far better than one that cannot. `write_fake_encode` stands in for the encoder with such vectors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from rlrf import runs
from rlrf.config import load_recipe
from rlrf.encode import EmbeddingCache, encoder_id, text_key
from rlrf.schema import SCHEMAS
from rlrf.store import Stage

GENRES = ["Drama", "Comedy", "Horror", "Western"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread spins against the other
    processes and made these tests ~30x slower (71 s vs 1.8 s for one fit), so use one here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_recipe(tmp_path: Path, *overrides: str):
    return load_recipe(None, [f"runs_dir={tmp_path}", "run=t", "reranker.epochs=8", "reranker.patience=3",
                              "reranker.batch_size=16", "reranker.lr=0.005", "score.shards=3", "encode.shards=2",
                              *overrides])


def taste(user_id: int) -> int:
    return user_id % len(GENRES)


def split_of(user_id: int, n_users: int) -> str:
    return "train" if user_id <= int(0.7 * n_users) else ("valid" if user_id <= int(0.85 * n_users) else "test")


def write_prepare(recipe, n_users: int = 40, n_items: int = 48, lists_per_user: int = 4, list_size: int = 10,
                  seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n_items + 1)
    genre = (ids - 1) % len(GENRES)
    items = pl.DataFrame({
        "item_id": ids, "raw_item_id": [str(i) for i in ids], "title": [f"Movie {i}" for i in ids],
        "year": [1990 + i % 10 for i in ids], "genres": [[GENRES[g]] for g in genre],
        "attribute_id": genre + 1, "text": [f"Movie {i} ({1990 + i % 10}) is a {GENRES[g]} film." for i, g in zip(ids, genre)],
    }, schema=SCHEMAS["items"])
    rows, users, inter = [], [], []
    for u in range(1, n_users + 1):
        # the prompt history: 6 liked items of the user's taste, 4 not-liked others, oldest first
        mine, other = ids[genre == taste(u)], ids[genre != taste(u)]
        hist = [(int(i), 5.0, 1) for i in rng.choice(mine, min(6, len(mine)), replace=False)] + \
               [(int(i), 2.0, 0) for i in rng.choice(other, min(4, len(other)), replace=False)]
        for pos, k in enumerate(rng.permutation(len(hist))):
            it, rating, label = hist[k]
            inter.append({"user_id": u, "item_id": it, "rating": rating, "timestamp": 1000 * u + pos, "label": label,
                          "position": pos, "in_history": True})
        users.append({"user_id": u, "raw_user_id": str(u), "split": split_of(u, n_users), "gender": "M", "age": "30",
                      "occupation": "writer", "n_interactions": 20, "n_history": 10, "n_lists": lists_per_user})
        for j in range(lists_per_user):
            its = rng.choice(ids, size=list_size, replace=False)
            rows.append({"list_id": (u - 1) * lists_per_user + j, "user_id": u, "split": split_of(u, n_users),
                         "item_ids": its.tolist(), "labels": (genre[its - 1] == taste(u)).astype(int).tolist()})
    d = runs.prepare_dir(recipe)
    with Stage(d, "prepare", {"synthetic": True, "seed": seed}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"items": items, "lists": pl.DataFrame(rows, schema=SCHEMAS["lists"]),
                               "users": pl.DataFrame(users, schema=SCHEMAS["users"]),
                               "interactions": pl.DataFrame(inter, schema=SCHEMAS["interactions"])})
        st.finish()
    return d


def write_profiles(recipe, d: Path, texts: dict[int, list[str]], n_users: int = 40, round: int = 1) -> Path:
    rows = []
    for uid, ts in texts.items():
        for i, t in enumerate(ts):
            rows.append({"run": "t", "round": round, "split": split_of(uid, n_users), "user_id": uid, "sample_idx": i,
                         "prompt": f"Given a user {uid} ...", "text": t, "n_tokens": len(t.split()),
                         "finish_reason": "eos", "n_history_trimmed": 0, "generator": "g", "generator_hash": "h",
                         "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 32, "seed": 1000 * uid + i})
    with Stage(d, "sample", {"synthetic": len(rows), "round": round}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"profiles": pl.DataFrame(rows, schema=SCHEMAS["profiles"])})
        st.finish()
    return d


def profile_texts(n_users: int = 40, n: int = 2) -> dict[int, list[str]]:
    """Sample 0 names the user's taste; sample 1 names another genre (a worse profile); empty text allowed."""
    return {u: [f"likes {GENRES[taste(u)]}", f"likes {GENRES[(taste(u) + 1) % len(GENRES)]}"][:n]
            for u in range(1, n_users + 1)}


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    """One-hot of the genre a text names (+ small text-seeded noise): what a good encoder would give."""
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)  # not hash(): that differs per process
    v = np.random.default_rng(seed).normal(0, 0.05, dim).astype(np.float32)
    for g, name in enumerate(GENRES):
        if name in text:
            v[g] += 1.0
    return v


def write_fake_encode(recipe, profiles_dir: Path, out_dir: Path, dim: int = 8) -> Path:
    """An encode stage output whose vectors come from `fake_vector` instead of a text encoder."""
    from rlrf.artifacts import read_artifact

    enc = encoder_id(recipe.encode)
    cache = EmbeddingCache(runs.embeddings_cache(recipe), enc)
    prof = read_artifact(profiles_dir, "profiles")
    items = read_artifact(runs.prepare_dir(recipe), "items")
    texts = prof["text"].to_list() + items["text"].to_list()
    keys = [text_key(enc, t) for t in texts]
    new = {k: t for k, t in zip(keys, texts) if k not in cache}
    cache.add(list(new), np.stack([fake_vector(t, dim) for t in new.values()]) if new else np.zeros((0, dim)))
    ut = prof.select("user_id", "sample_idx", "split").with_columns(
        pl.Series("text_hash", keys[: prof.height], dtype=pl.Utf8))
    it = pl.DataFrame({"item_id": items["item_id"], "text_hash": keys[prof.height:]}, schema=SCHEMAS["item_texts"])
    with Stage(out_dir, "encode", {"fake": True}, inputs=[profiles_dir], quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"user_texts": ut, "item_texts": it})
        st.finish({"encoder_id": enc})
    return out_dir
