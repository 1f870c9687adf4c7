"""python benchmarks/calibration_shape.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [--draws 30] [key.sub=value ...]

Which calibration shape reads the check's own distinct-2 difference. check.match_distinct chooses generator k's
temperature on check.match_users train users x check.match_n profiles each; the check then measures distinct-2 on
every valid user x check.n profiles. Corpus distinct-2 depends on that shape, and not on the profile count alone:
a generator that repeats itself within a user (the base at 0.7) loses more distinct bigrams to 16 profiles a user
than a hotter one does. Read from a finished check of 8 or more profiles a user (round_<k>/check/{old,new}/sample):

  for each shape (profiles a user x users) that costs what the calibration costs (check.match_users x
  check.match_n profiles), and for the check's own shape, the new - old corpus distinct-2 of the check's profiles
  restricted to that shape (each user's first k profiles, sample_idx < k: the texts a check of n=k draws, seeds
  being per row; `--draws` random draws of the users, the same users on both sides), its mean and spread over the
  draws, and the mean's offset from the check's own figure.

A shape whose offset is negative under-reads the check: calibrated there, generator k runs hotter than the check's
distinct-2 needs (perplexity pays); a positive offset over-reads it, and the check's distinct-2 can come out lower.
Last, distinct-2 across users (rlrf.quality.distinct_across: each profile slot's corpus of one profile a user,
averaged), which no shape moves: what check.match_figure=across calibrates on, the check's distinct_2_across.
On the demo's checks at 16 a user the corpus figure reads new - old from -0.01 (1 a user) to +0.04 (16 a user x 24
users) for one and the same pair of generators.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import polars as pl


def shapes_at(cost: int, have: int, users: int) -> list[tuple[int, int]]:
    """(profiles a user, users) for profile counts 2, 4, 8, 12, 16, ... up to `have`, each with the users that make
    `cost` profiles (at most `users`)."""
    ks = [k for k in (1, 2, 4, 8, 12, 16, 24, 32) if k <= have]
    return [(k, min(users, max(1, round(cost / k)))) for k in ks]


def shape_diffs(old: pl.DataFrame, new: pl.DataFrame, shapes: list[tuple[int, int]], draws: int = 30,
                seed: int = 0) -> list[dict]:
    """Per (k, users) shape: new - old corpus distinct-2 over `draws` random user sets (one set when `users` is all
    of them), each user's first k profiles; frames hold user_id, sample_idx and text, one row per profile."""
    from rlrf.quality import distinct_n

    ids = sorted(set(old["user_id"].to_list()) & set(new["user_id"].to_list()))
    rng = np.random.default_rng(seed)

    def d(df: pl.DataFrame, us, k: int) -> float:
        rows = df.filter(pl.col("user_id").is_in(us) & (pl.col("sample_idx") < k))
        return distinct_n(rows["text"].fill_null("").to_list(), 2)

    out = []
    for k, u in shapes:
        u = min(u, len(ids))
        sets = [ids] if u == len(ids) else [list(rng.choice(ids, u, replace=False)) for _ in range(draws)]
        vals = np.array([d(new, us, k) - d(old, us, k) for us in sets])
        out.append({"k": k, "users": u, "mean": float(vals.mean()), "std": float(vals.std()), "draws": len(sets)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--draws", type=int, default=30, help="random user sets per shape (default 30)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. runs_dir=runs_x)")
    args = ap.parse_args()
    from rlrf import runs
    from rlrf.config import load_recipe
    from rlrf.errors import StageError
    from rlrf.quality import distinct_across
    from rlrf.stats import fewest_per_user

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        check, old, new = runs.check_sides(recipe, args.round, "sample", "profiles")
    except StageError as e:
        sys.exit(f"calibration_shape: {e}")
    have = fewest_per_user(old, new)
    users = old["user_id"].n_unique()
    if have < 8:
        sys.exit(f"calibration_shape: the check at {check} holds {have} profiles a user; the shapes need 8 or more "
                 f"(run the check with check.n=16)")
    cfg = recipe.check
    cost = cfg.match_users * (cfg.match_n or cfg.n)
    rows = shape_diffs(old, new, shapes_at(cost, have, users) + [(have, users)], args.draws, recipe.seed)
    own = rows[-1]["mean"]
    print(f"round {args.round}, {check}: new - old corpus distinct-2 by shape (the calibration's cost: {cost} "
          f"profiles; the check's own: {users} valid users x {have})")
    for r in rows:
        mark = "  <- the check's own" if (r["k"], r["users"]) == (have, users) else ""
        spread = f" +- {r['std']:.4f} over {r['draws']} draws" if r["draws"] > 1 else ""
        print(f"  {r['k']:>2} a user x {r['users']:>3} users: {r['mean']:+.4f}{spread}, offset {r['mean'] - own:+.4f}"
              f"{mark}")
    across = [distinct_across(f["text"].fill_null("").to_list(), f["sample_idx"].to_list()) for f in (new, old)]
    print(f"  across users (one profile a user, the {have} slots averaged): {across[0] - across[1]:+.4f} "
          f"(new {across[0]:.4f}, old {across[1]:.4f})")


if __name__ == "__main__":
    main()
