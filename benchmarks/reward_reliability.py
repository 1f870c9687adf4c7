"""python benchmarks/reward_reliability.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [--ensemble 3]

How far each reward can be trusted to pick a user's best and worst profile, on a finished round's sample
and encode stages (run `make round1`, or the sample and encode stages, first). For every judge it prints:

  agreement   how often an independent twin judge also scores the chosen profile above the rejected one
              (chance 50%; below ~70% DPO learns mostly noise), with its bootstrap 95% interval over users
  best=s0     the share of users whose best profile is sample 0, the one a reranker trains on (chance 1/N)
  range       the mean within-user reward range (max - min among a user's N profiles), next to the std of
              user means across users (how much of the reward is the profile vs the user)

Judges (the baseline is the judge the project used before cross-fitting, measured in the same run):
  reranker in-sample    KAR reranker trained on train users' sample-0 profiles, judging those same users
                        (twin: another seed); train users only (where the bias lives)
  reranker cross-fit    rlrf.judge with score.judges=1 (twin: judge b, other seeds and folds)
  reranker ensemble E   rlrf.judge with score.judges=E, each judge averaging E cross-fitted seeds
  retrieval <cands>@k   rlrf.retrieval (twin: the other half of the user's held-out positives; reliability of
                        a half-data reward, so the full reward is more reliable than shown)

Figures come with their interval; the machine's CPU flags are printed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.config import load_recipe
from rlrf.reliability import agreement, best_share, within_user_range


def cpu_flags() -> str:
    from rlrf.machine import cpu_flags as flags

    return " ".join(sorted(flags() & {"avx2", "avx512_bf16", "amx_bf16"})) or "none of avx2/avx512_bf16/amx_bf16"


def row(name: str, scores: pl.DataFrame, a: str, b: str, seed: int, seconds: float, best_col: str | None = None) -> dict:
    ag = agreement(scores, a, b, 2000, seed)
    bs = best_share(scores, best_col or a, 0)
    wr = within_user_range(scores, best_col or a)
    print(f"{name:28s} agreement {ag['mean']:.3f} [{ag['low']:.3f}, {ag['high']:.3f}] n={ag['n']:3d} | "
          f"best=s0 {bs['share']:.3f} (chance {bs['chance']:.3f}) | range {wr['within_range']:.4f} vs across-user "
          f"std {wr['across_std']:.4f} | {seconds:.0f} s")
    return {"judge": name, **{f"agreement_{k}": ag[k] for k in ("mean", "low", "high", "n")},
            "best_s0": bs["share"], "within_range": wr["within_range"], "across_std": wr["across_std"], "s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--ensemble", type=int, default=3, help="seeds per judge in the ensembled variant")
    p.add_argument("--ks", default="5,10,20,50", help="retrieval NDCG cut-offs to try (catalogue)")
    p.add_argument("--skip-reranker", action="store_true", help="retrieval variants only (no training)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    recipe = load_recipe(a.recipe, a.overrides)
    k = a.round
    from rlrf.artifacts import read_artifact
    from rlrf.encode import load_knowledge
    from rlrf.reward import judge_scorer, retrieval_scorer
    from rlrf.threads import torch_threads

    enc = runs.stage_dir(recipe, "encode", k)
    ut, it, cache = load_knowledge(recipe, enc, sample_idx=None)
    prep = runs.prepare_dir(recipe)
    items = read_artifact(prep, "items", "prepare")
    item_vecs = np.zeros((int(items["item_id"].max()) + 1, cache.vectors.shape[1]), np.float32)
    item_vecs[it["item_id"].to_numpy()] = cache.get(it["text_hash"].to_list())
    ut = ut.sort("user_id", "sample_idx")
    vecs = cache.get(ut["text_hash"].to_list())
    users = ut["user_id"].to_numpy()
    base = ut.select("user_id", "sample_idx", "split")
    print(f"reward reliability on {recipe.run} round {k}: {ut['user_id'].n_unique()} users x "
          f"{ut['sample_idx'].n_unique()} profiles; CPU flags: {cpu_flags()}")
    rows = []

    for cands, ks in (("catalogue", [int(x) for x in a.ks.split(",")]), ("lists", [5])):
        for kk in ks:
            t0 = time.time()
            r = dataclasses.replace(recipe, score=dataclasses.replace(recipe.score, retrieval_candidates=cands,
                                                                      retrieval_k=kk))
            ret = retrieval_scorer(r, item_vecs)
            df = base.with_columns(pl.Series("a", ret.ndcg(vecs, users, "a")), pl.Series("b", ret.ndcg(vecs, users, "b")),
                                   pl.Series("full", ret.ndcg(vecs, users)))
            rows.append(row(f"retrieval {cands}@{kk}", df, "a", "b", recipe.seed, time.time() - t0, best_col="full"))

    if not a.skip_reranker:
        from rlrf.judge import train_reranker_stage
        from rlrf.rerank_train import train_stage
        from rlrf.reward import reward_profiles

        bench = recipe.run_dir / "bench_reliability"
        lists = read_artifact(prep, "lists", "prepare")
        train = base.filter(pl.col("split") == "train")
        tr = ut.filter(pl.col("split") == "train")
        tv = cache.get(tr["text_hash"].to_list())
        t0 = time.time()
        cols = {}
        for s in (0, 1):  # the old judge: trained on train users' sample-0 profiles, judging those users
            d = train_stage(recipe, bench / f"insample_{s}", enc, seeds=[recipe.seed + s])
            from rlrf.rerank import load_reranker

            with torch_threads(recipe.reranker.threads):
                model, _ = load_reranker(d)
                vals, _ = reward_profiles(model, tv, tr["user_id"].to_numpy(), lists, recipe.score.metric)
            cols[s] = vals[recipe.score.metric] + recipe.score.tie_break * np.tanh(np.nan_to_num(vals["margin"]))
        df = train.with_columns(pl.Series("a", cols[0]), pl.Series("b", cols[1]))
        rows.append(row("reranker in-sample (train)", df, "a", "b", recipe.seed, time.time() - t0))

        for n in (1, a.ensemble):
            t0 = time.time()
            r = dataclasses.replace(recipe, score=dataclasses.replace(recipe.score, judges=n))
            d = train_reranker_stage(r, bench / f"crossfit_{n}", enc)
            with torch_threads(recipe.reranker.threads):
                ja = judge_scorer(r, d, "a", item_vecs.shape[1]).score_vectors(vecs, users)["reward"]
                jb = judge_scorer(r, d, "b", item_vecs.shape[1]).score_vectors(vecs, users)["reward"]
            df = base.with_columns(pl.Series("a", ja), pl.Series("b", jb))
            name = "reranker cross-fit" if n == 1 else f"reranker ensemble {n}"
            rows.append(row(name, df, "a", "b", recipe.seed, time.time() - t0))
            rows.append(row(name + " (train)", df.filter(pl.col("split") == "train"), "a", "b", recipe.seed, 0.0))

    out = recipe.run_dir / "bench_reliability"
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_csv(out / "reliability.csv")
    print(f"-> {out / 'reliability.csv'}")


if __name__ == "__main__":
    main()
