"""python benchmarks/pair_sides.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [key.sub=value ...]

What a pair-selection rule teaches DPO besides the reward, measured before any DPO step: on a finished round's
sample and score stages, each rule picks the largest-margin pair per train user among that user's like-length
ended profiles (pairs.length_tolerance, pairs.ended_only, as the pairs stage does), and the script prints the pairs
it keeps, their mean margin, and chosen - rejected for corpus distinct-2 and for typicality
(rlrf.quality.typicality), each with a 95% bootstrap interval over users. DPO learns whatever tells the two sides
apart: a rule whose chosen side is less diverse than its rejected side (distinct-2 below 0) teaches "write alike",
whatever its reward teaches.

The rules: the pairs stage's own (the baseline, in the same run); the same with a two-sided typicality band
(|chosen - rejected| <= b: no typicality direction on average); and "minimal pairs" whose two profiles share at
least a share t of their word bigrams (Jaccard; the pairs stage's `pairs.min_overlap`), so that the two sides differ
in content, not in template.
"""

from __future__ import annotations

import argparse

import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.pairs import with_typicality
from rlrf.quality import bigram_overlap, paired_quality
from rlrf.stats import ci_text, paired_bootstrap


def candidates(recipe, k: int) -> pl.DataFrame:
    """Every same-user (chosen, rejected) pair of train profiles the pairs stage could pick: both judged, ended when
    pairs.ended_only, within pairs.length_tolerance tokens, chosen's reward above rejected's."""
    cfg = recipe.pairs
    prof = with_typicality(read_artifact(runs.stage_dir(recipe, "sample", k), "profiles", "sample"))
    scores = read_artifact(runs.stage_dir(recipe, "score", k), "scores", "score").join(
        prof.select("user_id", "sample_idx", "n_tokens", "finish_reason", "typicality", "text"),
        on=["user_id", "sample_idx"], how="left")
    live = scores.filter(pl.col("split").is_in(cfg.splits) & ~pl.col("empty_text") & pl.col("reward").is_not_nan())
    if cfg.ended_only:
        live = live.filter(pl.col("finish_reason") != "length")
    side = live.select("user_id", "sample_idx", "reward", "n_tokens", "typicality", "text")
    ok = (pl.col("sample_idx") != pl.col("sample_idx_r")) & (pl.col("reward") > pl.col("reward_r"))
    if cfg.length_tolerance >= 0:
        ok &= (pl.col("n_tokens") - pl.col("n_tokens_r")).abs() <= cfg.length_tolerance
    pairs = side.join(side, on="user_id", suffix="_r").filter(ok)
    overlap = [bigram_overlap(a, b) for a, b in zip(pairs["text"].to_list(), pairs["text_r"].to_list())]
    return pairs.with_columns(margin=pl.col("reward") - pl.col("reward_r"), overlap=pl.Series(overlap, dtype=pl.Float64))


def pick(pairs: pl.DataFrame) -> pl.DataFrame:
    """The largest-margin pair per user (ties to the lowest sample indices, as the pairs stage)."""
    return (pairs.sort(["user_id", "margin", "sample_idx", "sample_idx_r"], descending=[False, True, False, False])
            .group_by("user_id", maintain_order=True).first())


def sides(picked: pl.DataFrame, resamples: int) -> dict:
    """chosen - rejected corpus distinct-2 (rlrf.quality.paired_quality: the check's own bootstrap, a drawn user
    bringing both its profiles) and mean typicality, each with a 95% bootstrap interval over users."""
    chosen = picked.select("user_id", "text")
    rejected = picked.select("user_id", pl.col("text_r").alias("text"))
    d2 = paired_quality(rejected, chosen, resamples=resamples)["distinct_2"]
    return {"distinct_2": d2, "typicality": paired_bootstrap((picked["typicality"] - picked["typicality_r"]).to_numpy(),
                                                            resamples=resamples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--bands", default="0.05,0.02", help="typicality bands b to try (comma-separated)")
    ap.add_argument("--overlaps", default="0.2,0.4", help="bigram-Jaccard floors t to try (comma-separated)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    recipe = load_recipe(args.recipe, args.overrides)
    pairs = candidates(recipe, args.round)
    rules = {f"the pairs stage's (length_tolerance={recipe.pairs.length_tolerance}, "
             f"ended_only={recipe.pairs.ended_only}): the baseline": pairs}
    rules.update({f"+ typicality band {b}": pairs.filter((pl.col("typicality") - pl.col("typicality_r")).abs() <= b)
                  for b in map(float, args.bands.split(",")) if args.bands})
    rules.update({f"+ minimal pairs, bigram Jaccard >= {t}": pairs.filter(pl.col("overlap") >= t)
                  for t in map(float, args.overlaps.split(",")) if args.overlaps})
    print(f"round {args.round} of run {recipe.run}: {pairs['user_id'].n_unique()} users with a candidate pair; "
          f"chosen - rejected with 95% bootstrap intervals over users ({args.resamples} draws)")
    for name, cand in rules.items():
        picked = pick(cand)
        if picked.height < 2:
            print(f"- {name}: {picked.height} pairs, too few to measure")
            continue
        s = sides(picked, args.resamples)
        print(f"- {name}: {picked.height} pairs, mean margin {picked['margin'].mean():.3f}, mean tokens "
              f"{picked['n_tokens'].mean():.0f} vs {picked['n_tokens_r'].mean():.0f}; distinct-2 {ci_text(s['distinct_2'])}; "
              f"typicality {ci_text(s['typicality'])}")


if __name__ == "__main__":
    main()
