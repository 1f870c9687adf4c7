"""How much do a round's profiles tell a recommender beyond item popularity, and how much could they?

The retrieval rewards rank the whole catalogue by text similarity alone, far below what item popularity reaches on
the same held-out positives; a recommender would use a profile on top of popularity (KAR's principle: knowledge
augments a base model). This script measures that directly, on the run's prepare artifacts:

    score(item) = z(log(1 + popularity)) + alpha * cosine(profile, item)      popularity: prompt histories only

in two text spaces (the catalogue genres a text names, multi-hot; word TF-IDF over the item texts, the lexical
reward's space), NDCG@k of each user's held-out positives over the catalogue minus the history (the retrieval
rewards' protocol). alpha is fitted on the TRAIN users' round-k profiles (a grid); the figures are then

- the baseline, popularity alone (alpha = 0), on the same users in the same run;
- the profiles' gain over it on train users (where alpha was fitted: an upper bound) and valid users;
- the headroom: the same judge with the user's own prompt history (every history item's text) as the "profile";
- with --check DIR (a round's check stage): generator k-1 vs k on the valid users under this judge, paired by user.

Every figure is a per-user mean with a paired bootstrap 95% interval.

    python benchmarks/profile_headroom.py --run runs/learn300 --round 1 --check runs/learn300/round_1/check
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from rlrf.artifacts import read_artifact
from rlrf.retrieval import Genres, Lexical, RetrievalReward, catalogue_ndcg, unit
from rlrf.stats import ci_text, paired_bootstrap

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def genre_space(items: pl.DataFrame):
    g = Genres(items)  # the genres reward's space
    return g, unit(g.item_vecs)


def lexical_space(items: pl.DataFrame):
    lex = Lexical(items["text"].to_list())
    vecs = lex(items["text"].to_list())
    out = np.zeros((int(items["item_id"].max()) + 1, vecs.shape[1]), np.float32)
    out[items["item_id"].to_numpy()] = vecs
    return lex, unit(out)


class Judge:
    def __init__(self, prep: Path, k: int):
        self.items = read_artifact(prep, "items", "prepare").sort("item_id")
        inter = read_artifact(prep, "interactions", "prepare")
        self.rr = RetrievalReward.from_artifacts(np.zeros((int(self.items["item_id"].max()) + 1, 1), np.float32),
                                                 read_artifact(prep, "lists", "prepare"), inter, self.items,
                                                 "catalogue", k)
        n = int(self.items["item_id"].max()) + 1
        pop = np.zeros(n)
        c = inter.filter(pl.col("in_history")).group_by("item_id").len()
        pop[c["item_id"].to_numpy()] = c["len"].to_numpy()
        prior = np.log1p(pop)
        self.prior = ((prior - prior.mean()) / prior.std()).astype(np.float32)
        self.history_text = (inter.filter(pl.col("in_history")).join(self.items.select("item_id", "text"), on="item_id")
                             .group_by("user_id").agg(pl.col("text").str.join(" ")))

    def ndcg(self, cos: np.ndarray | None, alpha: float, users: np.ndarray) -> np.ndarray:
        sims = np.repeat(self.prior[None], len(users), 0) if cos is None else self.prior[None] + alpha * cos
        rel, exc, empty = [], [], np.zeros(0, np.int64)
        for u in users.tolist():
            info, hist = self.rr.lists.get(u), self.rr.history.get(u, empty)
            rel.append(empty if info is None else info["all_pos"])
            exc.append(np.concatenate([hist, self.rr.no_item]))
        return catalogue_ndcg(sims, rel, exc, self.rr.k)


def per_user(users: np.ndarray, values: np.ndarray) -> pl.DataFrame:
    return (pl.DataFrame({"user_id": users, "v": values}).filter(pl.col("v").is_not_nan())
            .group_by("user_id").agg(pl.col("v").mean()).sort("user_id"))


def gain(a: pl.DataFrame, b: pl.DataFrame, seed: int = 0) -> str:
    """b - a per user (paired), mean [95% interval]."""
    j = a.join(b, on="user_id", suffix="_b")
    ci = paired_bootstrap((j["v_b"] - j["v"]).to_numpy(), 2000, seed)
    return f"{ci_text(ci)} ({ci['n']} users)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="runs/<run>: its prepare/ and round_<k>/sample/")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--k", type=int, default=400, help="NDCG cut-off (the retrieval rewards' default)")
    ap.add_argument("--check", nargs="*", default=[], help="check stage directories: old vs new under this judge")
    args = ap.parse_args()
    run = Path(args.run)
    judge = Judge(run / "prepare", args.k)
    prof = read_artifact(run / f"round_{args.round}" / "sample", "profiles", "sample")
    for split in ("train", "valid"):
        users = prof.filter(pl.col("split") == split)["user_id"].unique().sort().to_numpy()
        print(f"{split} users ({len(users)}): popularity alone NDCG@{args.k} "
              f"{per_user(users, judge.ndcg(None, 0, users))['v'].mean():.4f}")
    for name, (embed, item_unit) in {"genres": genre_space(judge.items), "lexical": lexical_space(judge.items)}.items():
        train = prof.filter(pl.col("split") == "train")
        tu = train["user_id"].to_numpy()
        cos = unit(embed(train["text"].to_list())) @ item_unit.T
        fit = {a: float(np.nanmean(judge.ndcg(cos, a, tu))) for a in ALPHAS}
        alpha = max(fit, key=fit.get)
        print(f"\n[{name}] alpha fitted on train users' profiles: {alpha} (train NDCG by alpha: "
              + ", ".join(f"{a}: {v:.4f}" for a, v in fit.items()) + ")")
        def history(users):
            h = pl.DataFrame({"user_id": np.unique(users)}).join(judge.history_text, on="user_id")
            return h["user_id"].to_numpy(), unit(embed(h["text"].to_list())) @ item_unit.T

        hu, hcos = history(tu)  # the history's own alpha, fitted on the train users too
        alpha_h = max(ALPHAS, key=lambda a: float(np.nanmean(judge.ndcg(hcos, a, hu))))
        for split in ("train", "valid"):
            p = prof.filter(pl.col("split") == split)
            u = p["user_id"].to_numpy()
            base = per_user(u, judge.ndcg(None, 0, u))
            with_prof = per_user(u, judge.ndcg(unit(embed(p["text"].to_list())) @ item_unit.T, alpha, u))
            hu, hcos = history(u)
            with_hist = per_user(hu, judge.ndcg(hcos, alpha_h, hu))
            print(f"  {split}: profiles over popularity {gain(base, with_prof)}; the user's history over popularity "
                  f"(alpha {alpha_h}: the headroom) {gain(base, with_hist)}")
        for chk in args.check:
            sides = {}
            for side in ("old", "new"):
                p = read_artifact(Path(chk) / side / "sample", "profiles", "sample")
                u = p["user_id"].to_numpy()
                sides[side] = per_user(u, judge.ndcg(unit(embed(p["text"].to_list())) @ item_unit.T, alpha, u))
            print(f"  {chk}: new - old {gain(sides['old'], sides['new'])}")


if __name__ == "__main__":
    main()
