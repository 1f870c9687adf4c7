"""python benchmarks/check_personal.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [--sample] [key.sub=value ...]

Did a round's generator learn about each user, or a style every user's reward pays for? On a finished check
stage (round_<k>/check/{old,new}/sample), every training-free judge (retrieval in the encoder's space, lexical,
genres) scores both generators' profiles twice on the valid users:

  own        each profile judged on its own user's held-out positives (the check's figure)
  swapped    each profile judged on ANOTHER valid user's positives (the same fixed derangement of users for both
             generators, averaged over --derangements of them): what a profile earns from anyone's future items

With --sample, one generator instead: round k's own sample stage (generator k-1's profiles) on its valid users,
own vs swapped: does this generator (this prompt) write profiles that hold anything personal, before any DPO?

new - old under `own` is the check's gain; under `swapped` it is the part of that gain any user would credit
(naming popular genres, generic wording); own - swapped is the personal part, the gain that depends on the
profile being about this user. Every figure: mean over users with its paired bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.stats import ci_text as stats_ci_text, paired_bootstrap

JUDGES = ("retrieval", "lexical", "genres")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(n) with no fixed point (rejection sampling: ~e tries)."""
    if n < 2:
        raise ValueError("swapping users needs at least 2 users")
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def per_user(user_ids: np.ndarray, values: np.ndarray) -> dict[int, float]:
    df = (pl.DataFrame({"u": user_ids, "v": values}).filter(pl.col("v").is_not_nan())
          .group_by("u").agg(pl.col("v").mean()))
    return dict(zip(df["u"].to_list(), df["v"].to_list()))


def own_and_swapped(reward, texts: list[str], uid: np.ndarray, users: np.ndarray, perms: list[np.ndarray]):
    """Per user: mean reward of its profiles judged on its own positives, and judged on user p(u)'s positives
    averaged over the derangements `perms` (of `users`, sorted)."""
    own = per_user(uid, reward(texts, uid)["reward"])
    idx = np.searchsorted(users, uid)
    runs_ = [per_user(uid, reward(texts, users[p[idx]])["reward"]) for p in perms]
    swapped = {u: float(np.mean([r[u] for r in runs_ if u in r])) for u in own if any(u in r for r in runs_)}
    return own, swapped


def ci_text(x: np.ndarray, seed: int) -> str:
    return stats_ci_text(paired_bootstrap(x, 2000, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--derangements", type=int, default=5)
    ap.add_argument("--sample", action="store_true", help="one generator: round k's own sample stage, valid users")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. run=learn300)")
    args = ap.parse_args()
    from rlrf.reward import load_reward

    recipe = load_recipe(args.recipe, args.overrides)
    # each judge's plain reward: the personal part is what this script computes (score.contrast would subtract twice)
    recipe = dataclasses.replace(recipe, score=dataclasses.replace(recipe.score, contrast=0))
    if args.sample:  # one generator: the round's own sample stage, its valid users
        where = runs.stage_dir(recipe, "sample", args.round)
        dirs, script = {"old": where}, "sample"
    else:
        where = runs.stage_dir(recipe, "check", args.round)
        dirs, script = {side: where / side / "sample" for side in ("old", "new")}, "check"
    sides = {}
    for side, d in dirs.items():
        if not (d / "stage.json").is_file():
            sys.exit(f"check_personal: {d} is not a finished sample stage: run "
                     f"`python pipelines/{script}.py --recipe {args.recipe} --round {args.round}` first")
        prof = read_artifact(d, "profiles", "sample").filter(pl.col("split") == "valid")
        if prof.height == 0:
            sys.exit(f"check_personal: {d} holds no valid users' profiles (sample.splits must include valid)")
        sides[side] = prof.sort("user_id", "sample_idx")
    users = functools.reduce(np.intersect1d, (prof["user_id"].unique().to_numpy() for prof in sides.values()))
    rng = np.random.default_rng(recipe.seed)
    perms = [derangement(len(users), rng) for _ in range(args.derangements)]
    what = "one generator, mean reward" if args.sample else "new - old, mean over users [95% paired bootstrap]"
    print(f"{where}: {len(users)} valid users, {args.derangements} derangements; {what}")
    print(f"{'judge':10s} | {'own (the check)' if not args.sample else 'own':28s} | {'swapped (anyone credits)':28s} | "
          f"personal (own - swapped)")
    for kind in JUDGES:
        reward = load_reward(recipe, args.round, kind)
        own, swapped = {}, {}
        for side, prof in sides.items():
            prof = prof.filter(pl.col("user_id").is_in(users))
            own[side], swapped[side] = own_and_swapped(reward, prof["text"].fill_null("").to_list(),
                                                       prof["user_id"].to_numpy(), users, perms)
        if args.sample:
            keep = [u for u in users.tolist() if u in own["old"] and u in swapped["old"]]
            o = np.array([own["old"][u] for u in keep])
            sw = np.array([swapped["old"][u] for u in keep])
            print(f"{kind:10s} | {o.mean():.4f}{'':22s} | {sw.mean():.4f}{'':22s} | {ci_text(o - sw, recipe.seed)}  "
                  f"({len(keep)} users)")
            continue
        keep = [u for u in users.tolist() if all(u in d for d in (own["old"], own["new"], swapped["old"], swapped["new"]))]
        d_own = np.array([own["new"][u] - own["old"][u] for u in keep])
        d_sw = np.array([swapped["new"][u] - swapped["old"][u] for u in keep])
        print(f"{kind:10s} | {ci_text(d_own, recipe.seed):28s} | {ci_text(d_sw, recipe.seed):28s} | "
              f"{ci_text(d_own - d_sw, recipe.seed)}  ({len(keep)} users)")


if __name__ == "__main__":
    main()
