"""Synthetic finished stage outputs (profiles, scores) that follow rlrf/schema.py, for the loop's tests."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from rlrf.schema import SCHEMAS
from rlrf.store import Stage


def profile_rows(users: dict[int, list[str]], split: str = "train", round: int = 1) -> list[dict]:
    rows = []
    for uid, texts in users.items():
        for i, t in enumerate(texts):
            rows.append({"run": "t", "round": round, "split": split, "user_id": uid, "sample_idx": i,
                         "prompt": f"Given a user {uid} who watched films. Analyze user's preferences.",
                         "text": t, "n_tokens": len(t.split()), "finish_reason": "eos", "n_history_trimmed": 0,
                         "generator": "g", "generator_hash": "h", "temperature": 1.0, "top_p": 0.95,
                         "max_new_tokens": 32, "seed": 1000 * uid + i})
    return rows


def score_rows(rewards: dict[int, list[float]], split: str = "train", round: int = 1,
               empty: dict[int, list[int]] | None = None) -> list[dict]:
    rows = []
    for uid, rs in rewards.items():
        for i, r in enumerate(rs):
            rows.append({"run": "t", "round": round, "split": split, "user_id": uid, "sample_idx": i,
                         "reward": float(r), "n_lists": 3, "empty_text": i in (empty or {}).get(uid, [])})
    return rows


def write_stage(d: Path, name: str, artifact: str, rows: list[dict]) -> Path:
    df = pl.DataFrame(rows, schema=SCHEMAS[artifact])
    with Stage(d, name, {"synthetic": artifact, "n": len(rows)}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {artifact: df})
        st.finish()
    return d
