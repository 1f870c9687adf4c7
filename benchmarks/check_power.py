"""python benchmarks/check_power.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [--judge retrieval] [key.sub=value ...]

How sharp the learning check is, and what more profiles a valid user (`check.n`) would buy. Read from a finished
check stage (round_<k>/check/{old,new}/score), for one judge (by default the independent MiniLM one):

  measured     the check's own paired difference and its 95% bootstrap interval (rlrf.stats.paired_bootstrap, with
               the check's resamples and seed: the figure the check printed);
  noise        the variance of the per-user differences split into its sampling part (each side's within-user
               variance over its profile count: what more profiles remove) and the rest (users really differ);
  projected    the interval's half-width a check of 4, 8, 16 and 32 profiles a user would have over the same users
               (rlrf.stats.projected_half_width), and how often a run whose true gain is the measured one would
               read "improved" (the whole interval above 0; normal approximation);
  subsets      when the check holds 8 or more profiles a user: the bootstrap half-width measured on each user's
               first k profiles (sample_idx < k, the texts a check of n=k draws, seeds being per row), for every k
               of 4, 8, 16 below it: the projection checked against data, no model.

A check at n=4 on the demo's 94 valid users has a half-width of about 0.010 on a gain of about 0.010, so one run in
two to four misses a real gain of that size; the figures here say how many profiles make the verdict reliable.
"""

from __future__ import annotations

import argparse
import math
import sys

import polars as pl


def power(gain: float, half_width: float) -> float:
    """P(the whole 95% interval is above 0) for a run whose true gain is `gain` (normal approximation)."""
    if half_width <= 0:
        return float(gain > 0)
    z = gain / (half_width / 1.96) - 1.96
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--judge", default="retrieval", help="a score column of the check: retrieval (the independent "
                                                         "MiniLM judge), lexical, genres, judge_a, ...")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. runs_dir=runs_x)")
    args = ap.parse_args()
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.errors import StageError
    from rlrf.stats import ci_text, fewest_per_user, noise_split, paired, paired_bootstrap, projected_half_width

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        check, old, new = runs.check_sides(recipe, args.round, "score", "scores")
    except StageError as e:
        sys.exit(f"check_power: {e}")
    if args.judge not in old.columns:
        sys.exit(f"check_power: the check's scores have no '{args.judge}' column (there are: "
                 f"{', '.join(c for c in old.columns if c not in ('run', 'round', 'split', 'user_id', 'sample_idx'))})")
    boot = dict(resamples=recipe.rounds.bootstrap, seed=recipe.seed + args.round)  # the check's own bootstrap
    ci = paired_bootstrap(paired(old, new, args.judge)["diff"].to_numpy(), **boot)
    split = noise_split(old, new, args.judge)
    half = (ci["high"] - ci["low"]) / 2
    print(f"round {args.round}, {check}, judge {args.judge}: {split['users']} valid users, {split['n']:g} profiles a "
          f"user a side")
    print(f"  measured   new - old {ci_text(ci)}, half-width {half:.4f}")
    share = split["within"] / split["var_diff"] if split["var_diff"] > 0 else float("nan")
    print(f"  noise      var of per-user differences {split['var_diff']:.2e}: sampling {split['within']:.2e} "
          f"({share:.0%}), between users {split['between']:.2e}")
    for n in (4, 8, 16, 32):
        h = projected_half_width(split, n)
        print(f"  projected  check.n={n:<3} half-width {h:.4f}; P(improved) at a true gain of {ci['mean']:+.4f}: "
              f"{power(ci['mean'], h):.0%}")
    have = fewest_per_user(old, new)
    for k in (4, 8, 16):
        if k >= have:
            break
        sub = [f.filter(pl.col("sample_idx") < k) for f in (old, new)]
        c = paired_bootstrap(paired(*sub, args.judge)["diff"].to_numpy(), **boot)
        print(f"  subsets    first {k:<3} profiles a user: new - old {ci_text(c)}, half-width "
              f"{(c['high'] - c['low']) / 2:.4f} (projected from all {have}: "
              f"{projected_half_width(split, k):.4f})")


if __name__ == "__main__":
    main()
