"""Ranking metrics, KAR's definitions, vectorised over many lists of equal length.

    scores, labels: arrays [n_lists, list_size]; a higher score ranks an item earlier.

NDCG@k: DCG with gain 2^rel - 1 and discount 1 / log2(rank + 1) over the top k of the list ranked
by score, divided by the ideal DCG of the same list's labels; a list with no positive scores 0.
MAP@k: average of precision@i over the ranks i <= k that hold a positive, divided by the number of
positives in the top k (KAR's definition, not by all positives); 0 when the top k holds none.
Both are per list; `ranking_metrics` averages them, counting lists without positives as 0.

Ties: items with equal scores keep their order in the list (a stable sort of -score), so a
constant scorer ranks the list as given. Callers that want ties broken at random shuffle first.
Check (docs/protocol.md): lists [1,0,1] and [0,0,0] scored in that order give MAP@3 0.4167, NDCG@3 0.4599.
"""

from __future__ import annotations

import numpy as np


def _as_2d(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    try:
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"scores and labels must be rectangular [n_lists, list_size] arrays ({e})") from None
    if s.ndim == 1:
        s, y = s[None, :], y[None, :]
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be [n_lists, list_size]")
    return s, y


def _ranked_labels(s: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(y, order, axis=1)[:, :k]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def ndcg_at_k(scores, labels, k: int) -> np.ndarray:
    """NDCG@k of each list, shape [n_lists]."""
    _check_k(k)
    s, y = _as_2d(scores, labels)
    ranked = _ranked_labels(s, y, k)
    disc = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    dcg = ((2.0 ** ranked - 1.0) * disc).sum(axis=1)
    ideal = -np.sort(-y, axis=1)[:, :k]
    idcg = ((2.0 ** ideal - 1.0) * disc).sum(axis=1)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def map_at_k(scores, labels, k: int) -> np.ndarray:
    """MAP@k of each list (KAR: divided by the positives in the top k), shape [n_lists]."""
    _check_k(k)
    s, y = _as_2d(scores, labels)
    hit = (_ranked_labels(s, y, k) > 0).astype(np.float64)
    hits = np.cumsum(hit, axis=1)
    precision = hits / np.arange(1, hit.shape[1] + 1)
    total = (precision * hit).sum(axis=1)
    return np.divide(total, hits[:, -1], out=np.zeros_like(total), where=hits[:, -1] > 0)


def ranking_metrics(scores, labels, ks=(1, 3, 5, 7)) -> dict[str, float]:
    """Mean MAP@k and NDCG@k over the lists: {"map@1": ..., "ndcg@1": ..., "map@3": ...}."""
    s, y = _as_2d(scores, labels)
    out = {}
    for k in ks:
        out[f"map@{k}"] = float(map_at_k(s, y, k).mean()) if len(s) else float("nan")
        out[f"ndcg@{k}"] = float(ndcg_at_k(s, y, k).mean()) if len(s) else float("nan")
    return out
