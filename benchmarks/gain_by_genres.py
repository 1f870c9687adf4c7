"""python benchmarks/gain_by_genres.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [--judge retrieval] [key.sub=value ...]

How much of a round's gain under a judge (by default the check's independent one) is the number of catalogue genres
its profiles name, the part of a profile every user's reward can share (README, "Is it learning?"). Read from the
round's finished check stage (round_<k>/check/{old,new}/{sample,score}, the valid users):

  slope      the judge's reward per genre named, within a user: fitted on generator k-1's profiles with a fixed
             effect per user (each profile's reward and genre count less its user's means), so it is what naming one
             more genre is worth among one user's own profiles, before any training;
  explained  slope x the users' mean change in genres named, new - old;
  rest       the gain less that: what the round changed besides the genre count (a phrasing the judge pays for, or
             one it does not);
  distinct-2 of both sides as the check counts it, and again with every genre name taken out of the texts
             (rlrf.quality.without_genres), new - old with the check's paired bootstrap (rlrf.quality.paired_quality):
             how much of the fall is the genre names themselves.

Each with its 95% bootstrap interval over users (the slope refitted in every draw). The slope is measured on the old
profiles and carried to the new ones: where the new profiles leave the old ones' range (lists twice as long), the
split is an extrapolation; read it beside the profiles, not instead of them. Prints one line per part.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import polars as pl


def decompose(old: pl.DataFrame, new: pl.DataFrame, resamples: int = 2000, seed: int = 0) -> dict:
    """{"gain", "explained", "rest", "slope", "genres"}, each {"mean", "lo", "hi"}, and "n" (users), from two frames
    of one row per profile (user_id, reward, genres), over the users both hold with a finite reward."""
    old, new = (f.filter(pl.col("reward").is_finite()).select("user_id", "reward", "genres") for f in (old, new))
    users = np.intersect1d(old["user_id"].unique().to_numpy(), new["user_id"].unique().to_numpy())
    if users.size == 0:
        raise ValueError("gain_by_genres: no user has a finite reward on both sides")
    idx = {u: i for i, u in enumerate(users.tolist())}
    old = old.filter(pl.col("user_id").is_in(users.tolist()))
    ou = np.array([idx[u] for u in old["user_id"].to_list()])
    y, g = old["reward"].to_numpy().astype(float), old["genres"].to_numpy().astype(float)
    counts = np.bincount(ou, minlength=users.size)
    yc = y - (np.bincount(ou, y, users.size) / counts)[ou]  # within-user deviations
    gc = g - (np.bincount(ou, g, users.size) / counts)[ou]
    sxy, sxx = np.bincount(ou, yc * gc, users.size), np.bincount(ou, gc * gc, users.size)  # per user
    means = lambda f: (f.group_by("user_id").agg(pl.col("reward").mean(), pl.col("genres").mean())  # noqa: E731
                       .with_columns(i=pl.col("user_id").replace_strict(idx, default=None)).drop_nulls("i").sort("i"))
    mo, mn = means(old), means(new)
    dy = mn["reward"].to_numpy() - mo["reward"].to_numpy()
    dg = mn["genres"].to_numpy() - mo["genres"].to_numpy()

    def parts(w: np.ndarray) -> np.ndarray:  # w: each user's weight (its multiplicity in a bootstrap draw)
        slope = (w @ sxy) / (w @ sxx) if w @ sxx > 0 else 0.0
        gain, genres = (w @ dy) / w.sum(), (w @ dg) / w.sum()
        return np.array([gain, slope * genres, gain - slope * genres, slope, genres])

    full = parts(np.ones(users.size))
    rng = np.random.default_rng(seed)
    boot = np.array([parts(np.bincount(rng.integers(0, users.size, users.size), minlength=users.size).astype(float))
                     for _ in range(resamples)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    names = ("gain", "explained", "rest", "slope", "genres")
    return {"n": int(users.size), **{k: {"mean": float(full[i]), "lo": float(lo[i]), "hi": float(hi[i])}
                                     for i, k in enumerate(names)}}


def side(check, name: str, judge: str, genres: list[str]) -> pl.DataFrame:
    """One side of a finished check: a row per profile with the judge's reward and the genres its text names."""
    from rlrf.artifacts import read_artifact
    from rlrf.quality import genres_named

    prof = read_artifact(check / name / "sample", "profiles", "sample").select("user_id", "sample_idx", "text")
    scores = read_artifact(check / name / "score", "scores", "score")
    if judge not in scores.columns:
        sys.exit(f"gain_by_genres: the check's scores have no '{judge}' column (there are: "
                 f"{', '.join(c for c in scores.columns if c not in ('run', 'round', 'split', 'user_id'))})")
    return (prof.join(scores.select("user_id", "sample_idx", pl.col(judge).alias("reward")),
                      on=["user_id", "sample_idx"], how="inner")
            .with_columns(genres=pl.col("text").map_elements(lambda t: genres_named(t, genres), return_dtype=pl.Int64)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--judge", default="retrieval", help="a score column of the check: retrieval (the independent "
                                                         "MiniLM judge), lexical, genres, ...")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. run=h3)")
    args = ap.parse_args()
    from rlrf import runs
    from rlrf.artifacts import read_artifact
    from rlrf.config import load_recipe
    from rlrf.errors import StageError
    from rlrf.quality import catalogue_genres, distinct_n, paired_quality, without_genres

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        check = runs.finished_check(recipe, args.round)
    except StageError as e:
        sys.exit(f"gain_by_genres: {e}")
    genres = catalogue_genres(read_artifact(runs.prepare_dir(recipe), "items", "prepare"))
    old, new = side(check, "old", args.judge, genres), side(check, "new", args.judge, genres)
    d = decompose(old, new)
    ci = lambda k, f="+.4f": f"{d[k]['mean']:{f}} [{d[k]['lo']:{f}}, {d[k]['hi']:{f}}]"  # noqa: E731
    print(f"round {args.round}, run {recipe.run}, judge {args.judge}: {d['n']} valid users, 95% bootstrap over users")
    print(f"  gain new - old                 {ci('gain')}")
    print(f"  genres named new - old         {ci('genres', '+.2f')}")
    print(f"  reward per genre (within user) {ci('slope', '+.5f')}")
    print(f"  explained by the genre count   {ci('explained')}")
    print(f"  rest                           {ci('rest')}")
    rest = lambda f: f.with_columns(text=pl.col("text").map_elements(lambda t: without_genres(t, genres),  # noqa: E731
                                                                     return_dtype=pl.String))
    for label, (o, n) in (("distinct-2", (old, new)), ("distinct-2, genre names taken out", (rest(old), rest(new)))):
        q = paired_quality(o.select("user_id", "text"), n.select("user_id", "text"))["distinct_2"]  # as the check
        print(f"  {label:<34} {distinct_n(o['text'].to_list()):.3f} -> {distinct_n(n['text'].to_list()):.3f}, "
              f"new - old {q['mean']:+.3f} [{q['low']:+.3f}, {q['high']:+.3f}]")


if __name__ == "__main__":
    main()
