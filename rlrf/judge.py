"""The reranker judge: KAR rerankers cross-fitted over users, so that no profile is ever rewarded by a model
that trained on (or early-stopped on) that profile's user.

The users with a profile in the judge's knowledge round are cut into `reranker.folds` folds (seeded). Member
(j, f) of the judge trains on the users outside fold f, minus a seeded `reranker.stop_share` of them on whose
lists it early-stops, and judges the users of fold f. A reward averages the members that never saw the
user; asking for a user that every member saw is refused (it is a bug, not a setting). Train users the
sample stage did not draw join every member's training with a zero profile (`reranker.without_profile:
zero`), so the item side learns from all train lists while the profile side is judged out of sample.

Two independent judges are trained: "a" (the reward: `score.judges` seeds, each its own fold split,
averaged) and "b" (as many other seeds and fold splits): how often b agrees with a's chosen-over-rejected is
the judge's reliability (rlrf.reliability).

    runs/<run>/reranker/members.json                 every member: judge, seed, fold, the users it saw
    runs/<run>/reranker/checkpoints/<member>.safetensors
    runs/<run>/reranker/metrics.json                 each member's held-out NDCG/MAP on its fold's users,
                                                     next to item popularity on the same lists
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.files import write_json

JUDGES = ("a", "b")


def member_name(judge: str, seed: int, fold: int) -> str:
    return f"judge_{judge}_seed_{seed}_fold_{fold}"


def judge_seeds(recipe: Recipe) -> dict[str, list[int]]:
    """Seeds of judge a (the reward) and judge b (its independent twin): score.judges each, never shared."""
    n, base = recipe.score.judges, int(recipe.reranker.seeds[0])
    return {"a": [base + i for i in range(n)], "b": [base + n + i for i in range(n)]}


def fold_of(user_ids, folds: int, seed: int) -> dict[int, int]:
    """A seeded, balanced user -> fold assignment (fold sizes differ by at most one)."""
    users = np.sort(np.unique(np.asarray(user_ids, dtype=np.int64)))
    perm = np.random.default_rng([seed, 31]).permutation(len(users))
    return {int(users[p]): i % folds for i, p in enumerate(perm)}


def member_roles(fold: dict[int, int], f: int, stop_share: float, seed: int) -> tuple[set, set, set]:
    """(train, stop, judged) users of member f: judged = fold f; stop = a seeded share of the rest."""
    judged = {u for u, g in fold.items() if g == f}
    rest = np.array(sorted(u for u, g in fold.items() if g != f), dtype=np.int64)
    n_stop = max(1, int(round(stop_share * len(rest)))) if len(rest) > 1 else 0
    stop = set(np.random.default_rng([seed, f, 17]).permutation(rest)[:n_stop].tolist())
    return set(rest.tolist()) - stop, stop, judged


def _rows(pool: dict, users: set) -> dict:
    keep = np.isin(pool["user_id"], np.fromiter(users, dtype=np.int64, count=len(users)))
    return {k: v[keep] for k, v in pool.items()}


def popularity_ndcg(lists: dict, interactions: pl.DataFrame, seen: set, k: int = 5) -> float:
    """NDCG@k of ranking `lists` by each item's number of ratings from the `seen` users (the baseline a judge
    must beat on the lists it judges; counts come only from users the judge may know)."""
    from rlrf.metrics import ndcg_at_k

    if len(lists["item_ids"]) == 0:
        return float("nan")
    counts = (interactions.filter(pl.col("user_id").is_in(sorted(seen))).group_by("item_id").len())
    pop = np.zeros(int(lists["item_ids"].max()) + 1)
    ids = counts["item_id"].to_numpy()
    ok = ids < len(pop)
    pop[ids[ok]] = counts["len"].to_numpy()[ok]
    return float(ndcg_at_k(pop[lists["item_ids"]], lists["labels"], k).mean())


def train_reranker_stage(recipe: Recipe, out_dir: str | Path, knowledge_dir: str | Path, *, force: bool = False) -> Path:
    """Train judge a and judge b: score.judges seeds x reranker.folds folds each (see the module docstring)."""
    from rlrf.rerank import precision, save_checkpoint
    from rlrf.rerank_train import fit, predict, split_metrics
    from rlrf.rerank_data import load_data
    from rlrf.threads import torch_threads

    cfg = recipe.reranker
    if not cfg.knowledge:
        raise StageError("train-reranker: the reward judge needs reranker.knowledge=true (a base reranker ignores "
                         "the profile, so every profile would get the same reward)")
    out_dir = Path(out_dir)
    seeds = judge_seeds(recipe)
    plan = [(j, s, f) for j in JUDGES for s in seeds[j] for f in range(cfg.folds)]
    prep = runs.prepare_dir(recipe)
    with runs.STAGES["train-reranker"].open(recipe, out_dir, inputs=[prep, knowledge_dir], force=force,
                                            extra={"judges": recipe.score.judges}, summary=_line) as st, \
            torch_threads(cfg.threads):
        if st.done:
            return out_dir
        data = load_data(recipe, knowledge_dir, history=cfg.history, without_profile=cfg.without_profile)
        st.counters.update(data.dropped)
        profiled = sorted(data.user_know)
        if len(profiled) < cfg.folds:
            raise StageError(f"train-reranker: {len(profiled)} users have a profile in {knowledge_dir}, fewer than "
                             f"reranker.folds={cfg.folds}: a fold would be left without users. Sample more users "
                             f"(sample.max_users) or lower reranker.folds.")
        # every list of a user with a profile (any split) plus zero-profile train lists; an empty split's arrays
        # have no list width, so they stay out
        parts = [data.lists[s] for s in ("train", "valid", "test") if len(data.lists[s]["list_id"])]
        pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        unprofiled = set(np.unique(pool["user_id"]).tolist()) - set(profiled)  # zero-profile train users
        inter = read_artifact(prep, "interactions", "prepare")
        spec = data.spec(cfg.backbone, True, cfg.dropout, history=cfg.history > 0, precision=precision(cfg.dtype))
        write_json(out_dir / "model.json", spec.to_dict())
        for i in st.todo(len(plan)):
            j, seed, f = plan[i]
            fold = fold_of(profiled, cfg.folds, seed)
            train, stop, judged = member_roles(fold, f, cfg.stop_share, seed)
            part = dataclasses.replace(data, lists={"train": _rows(pool, train | unprofiled),
                                                    "valid": _rows(pool, stop), "test": _rows(pool, judged)})
            model, log = fit(spec, part, cfg, seed, progress=not st.quiet)
            name = member_name(j, seed, f)
            save_checkpoint(model, out_dir, name)
            held = split_metrics(predict(model, part, "test"), part.lists["test"]["labels"])
            seen = train | stop | unprofiled
            member = {"name": name, "judge": j, "seed": seed, "fold": f, "best_epoch": log["best_epoch"],
                      "seen_users": sorted(seen), "judged_users": sorted(judged), "heldout": held,
                      "heldout_popularity_ndcg@5": popularity_ndcg(part.lists["test"], inter, seen),
                      "n_lists": {"train": int(len(part.lists["train"]["list_id"])),
                                  "stop": int(len(part.lists["valid"]["list_id"])),
                                  "judged": int(len(part.lists["test"]["list_id"]))}}
            write_json(out_dir / "members" / f"{name}.json", member)
            st.write_shard(i, {})
            st.log(f"train-reranker: {name}: best epoch {log['best_epoch']}, held-out NDCG@5 "
                   f"{held.get('ndcg@5', float('nan')):.4f} (popularity {member['heldout_popularity_ndcg@5']:.4f}) "
                   f"on {len(judged)} users it never saw")
        members = [json.loads((out_dir / "members" / f"{member_name(*p)}.json").read_text()) for p in plan]
        write_json(out_dir / "members.json", members)
        summary = judge_summary(members)
        write_json(out_dir / "metrics.json", summary)
        st.finish({"judges": summary, "seeds": seeds, "folds": cfg.folds, "backbone": cfg.backbone,
                   "precision": spec.precision})
    return out_dir


def _line(info: dict) -> str:
    s, seeds = info["judges"], info["seeds"]
    members = sum(len(v) for v in seeds.values()) * info["folds"]
    return (f"{members} {info['backbone']} judge members ({len(next(iter(seeds.values())))} seed(s) x "
            f"{info['folds']} folds x judges {', '.join(seeds)}): held-out NDCG@5 {s['heldout_ndcg@5']['mean']:.4f} +- "
            f"{s['heldout_ndcg@5']['std']:.4f} vs item popularity {s['popularity_ndcg@5']['mean']:.4f} on the same lists")


def judge_summary(members: list[dict]) -> dict:
    """Held-out accuracy of the members (each on the fold it judges) next to popularity on the same lists."""
    def ms(x):
        x = np.asarray([v for v in x if v is not None and not np.isnan(v)], dtype=np.float64)
        return {"mean": float(x.mean()) if len(x) else float("nan"), "std": float(x.std()) if len(x) else float("nan")}

    return {"heldout_ndcg@5": ms([m["heldout"].get("ndcg@5", np.nan) for m in members]),
            "heldout_map@5": ms([m["heldout"].get("map@5", np.nan) for m in members]),
            "popularity_ndcg@5": ms([m["heldout_popularity_ndcg@5"] for m in members]),
            "members": len(members)}


class RerankerJudge:
    """One judge (a or b) of a train-reranker stage: `score_vectors(vecs, user_ids)` -> {name: (P,)}.

    Each profile is scored by the members that never saw its user (averaged); see the module docstring."""

    name = "reranker"

    def __init__(self, members: list[tuple[object, frozenset]], lists: pl.DataFrame, metric: str = "ndcg@5",
                 tie_break: float = 0.0, batch_profiles: int = 512, where: str = "the judge"):
        self.members, self.lists, self.metric = members, lists, metric
        self.tie_break, self.batch_profiles, self.where = tie_break, batch_profiles, where

    @property
    def trained_users(self) -> frozenset:
        """Users that every member saw: the judge cannot score them."""
        seen = [s for _, s in self.members]
        return frozenset.intersection(*seen) if seen else frozenset()

    @classmethod
    def load(cls, reranker_dir: str | Path, judge: str, lists: pl.DataFrame, metric: str, tie_break: float,
             batch_profiles: int = 512, expect=None) -> "RerankerJudge":
        from rlrf.rerank import load_checkpoint

        reranker_dir = Path(reranker_dir)
        path = reranker_dir / "members.json"
        if not path.is_file():
            raise StageError(f"{path} not found: {reranker_dir} is not a finished cross-fitted judge; run "
                             f"`python pipelines/train_reranker.py --recipe <recipe> --round <k>`")
        members = [(load_checkpoint(reranker_dir, m["name"], expect), frozenset(m["seen_users"]))
                   for m in json.loads(path.read_text()) if m["judge"] == judge]
        if not members:
            raise StageError(f"{path} has no member of judge {judge!r}")
        return cls(members, lists, metric, tie_break, batch_profiles, where=str(reranker_dir))

    def score_vectors(self, vecs: np.ndarray, user_ids) -> dict[str, np.ndarray]:
        """{"reward", metric..., "margin"} per profile: the mean over the members that never saw the user."""
        from rlrf.reward import METRICS, reward_profiles, with_tie_break

        user_ids = np.asarray(user_ids, dtype=np.int64)
        names = tuple(dict.fromkeys((self.metric, *METRICS, "margin")))
        total = {m: np.zeros(len(user_ids)) for m in names}
        count = np.zeros(len(user_ids))
        n_lists = np.zeros(len(user_ids), np.int64)
        for model, seen in self.members:
            ok = ~np.isin(user_ids, np.fromiter(seen, np.int64, len(seen)))
            if not ok.any():
                continue
            values, n = reward_profiles(model, vecs[ok], user_ids[ok], self.lists, self.metric, self.batch_profiles)
            for m in names:
                total[m][ok] += np.nan_to_num(values[m])
            count[ok] += 1
            n_lists[ok] = n
        if (count == 0).any():
            bad = np.unique(user_ids[count == 0])
            raise StageError(f"{self.where}: every member of this judge trained on user(s) {bad[:5].tolist()}"
                             f"{'...' if len(bad) > 5 else ''}; a judge never rewards a profile of a user it saw "
                             f"(in-sample rewards favour the profile it trained on). Score users of the folds the "
                             f"judge was cross-fitted over, or retrain it (train-reranker) with these users' profiles.")
        out = {m: np.where(n_lists > 0, total[m] / count, np.nan) for m in names}
        out["reward"] = with_tie_break(out[self.metric], out["margin"], self.tie_break)
        out["n_lists"] = n_lists
        return out
