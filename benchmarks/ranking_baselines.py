"""python benchmarks/ranking_baselines.py --recipe recipes/ml100k_smollm2.yaml

Reference rankings on the prepared test lists (runs the prepare stage first if needed):
  random       items in random order (mean and std over --draws seeded shuffles)
  stored       the lists' stored order (the prepare stage's shuffle): what a constant scorer gets
  popularity   items by their number of ratings from train users
  perfect      items by their label (the ceiling a reranker can reach on these lists)
printed as MAP/NDCG@{1,3,5,7}; docs/protocol.md's references for ML-100K (seed-1234 split, 1704 lists):
random NDCG@5 0.339, popularity 0.632, perfect 0.864.

It also times rlrf.metrics (vectorised numpy) against the named baseline, a per-list Python loop in
the style of KAR's evaluation code, on the same lists in the same process, and prints the ratio.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import polars as pl

from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.metrics import ranking_metrics
from rlrf.prepare import prepare_stage

KS = (1, 3, 5, 7)


def loop_metrics(scores: np.ndarray, labels: np.ndarray, ks=KS) -> dict[str, float]:
    """The baseline: one list at a time, one rank at a time (how KAR's evaluation loops)."""
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("map", "ndcg")}
    for s, y in zip(scores.tolist(), labels.tolist()):
        ranked = [lab for _, lab in sorted(zip(s, y), key=lambda t: -t[0])]
        ideal = sorted(y, reverse=True)
        for k in ks:
            dcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ranked[:k]))
            idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
            hits, prec = 0, 0.0
            for i, r in enumerate(ranked[:k]):
                if r > 0:
                    hits += 1
                    prec += hits / (i + 1)
            out[f"ndcg@{k}"] += dcg / idcg if idcg > 0 else 0.0
            out[f"map@{k}"] += prec / hits if hits else 0.0
    return {k: v / len(scores) for k, v in out.items()}


def fmt(name: str, m: dict, std: dict | None = None) -> str:
    cells = []
    for k in KS:
        for metric in ("map", "ndcg"):
            key = f"{metric}@{k}"
            cells.append(f"{key} {m[key]:.4f}" + (f"±{std[key]:.4f}" if std else ""))
    return f"{name:11s} " + "  ".join(cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--draws", type=int, default=100, help="random orders averaged")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe, a.overrides)
    d = prepare_stage(recipe)
    lists = read_artifact(d, "lists", "prepare").filter(pl.col("split") == a.split).sort("list_id")
    users = read_artifact(d, "users", "prepare")
    inter = read_artifact(d, "interactions", "prepare")
    item_ids = np.array(lists["item_ids"].to_list(), dtype=np.int64)
    labels = np.array(lists["labels"].to_list(), dtype=np.float64)
    print(f"{len(lists)} {a.split} lists of {item_ids.shape[1]} items "
          f"({int(labels.sum())} positives) from {lists['user_id'].n_unique()} users, {d}")

    rng = np.random.default_rng(recipe.seed)
    draws = [ranking_metrics(rng.random(labels.shape), labels, KS) for _ in range(a.draws)]
    mean = {k: float(np.mean([x[k] for x in draws])) for k in draws[0]}
    std = {k: float(np.std([x[k] for x in draws])) for k in draws[0]}
    print(fmt("random", mean, std))
    # a constant scorer keeps the stored order (stable ties): the prepare stage's own shuffle, one draw
    print(fmt("stored", ranking_metrics(np.zeros(labels.shape), labels, KS)))

    train = users.filter(pl.col("split") == "train")["user_id"].implode()
    counts = inter.filter(pl.col("user_id").is_in(train)).group_by("item_id").len()
    pop = np.zeros(int(item_ids.max()) + 1)
    pop[counts["item_id"].to_numpy()] = counts["len"].to_numpy()
    # ties (items no train user rated) broken at random, not by list position
    pop_scores = pop[item_ids] + rng.random(labels.shape) * 1e-3
    print(fmt("popularity", ranking_metrics(pop_scores, labels, KS)))
    print(fmt("perfect", ranking_metrics(labels, labels, KS)))

    # throughput: our vectorised metrics vs the per-list loop, same lists, same process
    reps = max(1, 20000 // len(labels))
    big_s = np.tile(pop_scores, (reps, 1))
    big_y = np.tile(labels, (reps, 1))
    t = time.perf_counter()
    base = loop_metrics(big_s, big_y)
    t_loop = time.perf_counter() - t
    t = time.perf_counter()
    ours = ranking_metrics(big_s, big_y, KS)
    t_vec = time.perf_counter() - t
    assert all(abs(base[k] - ours[k]) < 1e-9 for k in ours), "vectorised metrics disagree with the loop"
    n = len(big_y)
    print(f"metrics throughput on {n} lists: per-list python loop (baseline) {n / t_loop:,.0f} lists/s, "
          f"rlrf.metrics {n / t_vec:,.0f} lists/s, ratio {t_loop / t_vec:.1f}x")


if __name__ == "__main__":
    main()
