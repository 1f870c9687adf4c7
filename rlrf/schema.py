"""The data contract: every artifact's columns and dtypes, checked where a stage reads its input.

Column names are the field's own words. Ids are dense integers (`item_id` 1..n_items, 0 reserved for
padding; `user_id` 1..n_users); the dataset's own ids stay in `raw_user_id` / `raw_item_id`.
A stage that writes an artifact builds it with these dtypes; a stage that reads one calls `check`.
"""

from __future__ import annotations

import polars as pl

Str, I8, I32, I64, F32, F64, Bool = pl.Utf8, pl.Int8, pl.Int32, pl.Int64, pl.Float32, pl.Float64, pl.Boolean
Message = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})

SPLITS = ("train", "valid", "test")

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    # ---- prepare
    "users": {
        "user_id": I64, "raw_user_id": Str, "split": Str,
        "gender": Str, "age": Str, "occupation": Str,  # null where the dataset has none (Amazon)
        "n_interactions": I32, "n_history": I32, "n_lists": I32,
    },
    "items": {
        "item_id": I64, "raw_item_id": Str, "title": Str, "year": I32,
        "genres": pl.List(Str), "attribute_id": I64,  # attribute_id: first genre/category, dense, 0 = none
        "text": Str,  # factual item knowledge from metadata (or the LLM, sample.item_knowledge)
    },
    "interactions": {
        "user_id": I64, "item_id": I64, "rating": F64, "timestamp": I64,
        "label": I8, "position": I32, "in_history": Bool,  # position: 0-based time order per user
    },
    "lists": {
        "list_id": I64, "user_id": I64, "split": Str,
        "item_ids": pl.List(I64), "labels": pl.List(I8),
    },
    "prompts": {
        "user_id": I64, "split": Str, "domain": Str,  # domain: movies | books (picks the factors text)
        "prompt_head": Str, "history_lines": pl.List(Str), "prompt_tail": Str,
        "prompt": Str,  # head + lines + tail: the full KAR prompt
    },
    # ---- sample
    "profiles": {
        "run": Str, "round": I32, "split": Str, "user_id": I64, "sample_idx": I32,
        "prompt": Str, "text": Str, "n_tokens": I32, "finish_reason": Str,  # eos | length | sentence (cut at the length, trimmed to a sentence end)
        "n_history_trimmed": I32, "generator": Str, "generator_hash": Str,
        "temperature": F64, "top_p": F64, "max_new_tokens": I32, "seed": I64,
    },
    "item_knowledge": {  # sample.item_knowledge: the LLM's answer to KAR's item prompt, one per item
        "item_id": I64, "prompt": Str, "text": Str, "n_tokens": I32, "finish_reason": Str,
        "round": I32, "generator": Str, "generator_hash": Str, "seed": I64,
    },
    # ---- encode (embeddings live in the cache, rows here point into it)
    "user_texts": {
        "user_id": I64, "sample_idx": I32, "split": Str, "text_hash": Str,
    },
    "item_texts": {
        "item_id": I64, "text_hash": Str,  # the items artifact's `text`, encoded
    },
    # ---- score
    "scores": {
        "run": Str, "round": I32, "split": Str, "user_id": I64, "sample_idx": I32,
        "reward": F64, "n_lists": I32, "empty_text": Bool,
    },
    # ---- train-reranker
    "predictions": {
        "user_id": I64, "list_id": I64, "split": Str, "seed": I64,
        "scores": pl.List(F32), "labels": pl.List(I8),
    },
    # ---- pairs (TRL conversational preference format + bookkeeping)
    "pairs": {
        "prompt": pl.List(Message), "chosen": pl.List(Message), "rejected": pl.List(Message),
        "user_id": I64, "round": I32, "chosen_reward": F64, "rejected_reward": F64, "margin": F64,
        "chosen_idx": I32, "rejected_idx": I32,
    },
}
# the held-out users' pairs (pairs.heldout_splits): same format, never trained on
SCHEMAS["heldout_pairs"] = SCHEMAS["pairs"]

# the stage that writes each artifact (the store refuses a stage writing another's), for error messages too
PRODUCED_BY = {
    "users": "prepare", "items": "prepare", "interactions": "prepare", "lists": "prepare", "prompts": "prepare",
    "profiles": "sample", "item_knowledge": "sample", "user_texts": "encode", "item_texts": "encode", "scores": "score",
    "predictions": "train-reranker",
    "pairs": "pairs", "heldout_pairs": "pairs",
}


class SchemaError(ValueError):
    pass


def check(df: pl.DataFrame, artifact: str, where: str = "", produced_by: str | None = None) -> pl.DataFrame:
    """Raise a SchemaError naming the file and the stage that makes it when `df` breaks the contract.

    Extra columns are allowed (e.g. per-metric reward columns in scores); missing ones or wrong dtypes
    are not.
    """
    expected = SCHEMAS[artifact]
    stage = produced_by or PRODUCED_BY.get(artifact, "?")
    problems = []
    for col, dt in expected.items():
        if col not in df.columns:
            problems.append(f"missing column {col!r}")
        elif df.schema[col] != dt:
            problems.append(f"column {col!r} is {df.schema[col]}, expected {dt}")
    if problems:
        raise SchemaError(
            f"{where or artifact}: not a valid '{artifact}' artifact ({'; '.join(problems)}). "
            f"It is made by the '{stage}' stage: rerun `python pipelines/{stage.replace('-', '_')}.py "
            f"--recipe <recipe> --force`."
        )
    return df


def empty(artifact: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[artifact])
