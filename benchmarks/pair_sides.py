"""python benchmarks/pair_sides.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [key.sub=value ...]

What a pair-selection rule teaches DPO besides the reward, measured before any DPO step: on a finished round's
sample and score stages, each rule picks the largest-margin pair per train user among that user's like-length
ended profiles (pairs.length_tolerance, pairs.ended_only, as the pairs stage does), and the script prints the pairs
it keeps, their mean margin, and chosen - rejected for corpus distinct-2, for typicality (rlrf.quality.typicality)
and for the number of the catalogue's genres named (rlrf.quality.genres_named), each with a 95% bootstrap interval
over users. DPO learns whatever tells the two sides
apart: a rule whose chosen side is less diverse than its rejected side (distinct-2 below 0) teaches "write alike",
whatever its reward teaches.

Every rule is rlrf.pairs.select_pairs: the pairs stage's own (the baseline, in the same run); the same with a
two-sided typicality band (`pairs.typicality_band`: |chosen - rejected| <= b, no typicality direction on average);
with the genres named balanced (`pairs.genres_tolerance`: |chosen - rejected| <= g genres); and "minimal pairs" whose
two profiles share at least a share t of their word bigrams (Jaccard; `pairs.min_overlap`), so that the two sides
differ in content, not in template; and DivPO's pairs (`pairs.diverse`: the rarest of the best-rewarded half against
the commonest of the worst-rewarded half, by surprisal or by typicality), with each side's surprisal (mean token NLL
on its own under the generator that sampled it) printed for every rule when surprisal is among `--diverse`.
"""

from __future__ import annotations

import argparse

import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.pairs import scored_profiles, select_pairs, with_diversity, with_genres_named, with_typicality
from rlrf.quality import paired_quality
from rlrf.stats import ci_text, paired_bootstrap


def picked_sides(profiles: pl.DataFrame, picked: pl.DataFrame) -> pl.DataFrame:
    """select_pairs' pairs with each side's text, tokens and typicality (the rejected side's suffixed _r)."""
    side = profiles.select("user_id", "sample_idx", "text", "n_tokens", "typicality", "genres_named",
                           *(["div_surprisal"] * ("div_surprisal" in profiles.columns)))
    return (picked.join(side, left_on=["user_id", "chosen_idx"], right_on=["user_id", "sample_idx"])
            .join(side, left_on=["user_id", "rejected_idx"], right_on=["user_id", "sample_idx"], suffix="_r"))


def sides_with_intervals(picked: pl.DataFrame, resamples: int) -> dict:
    """chosen - rejected corpus distinct-2 (rlrf.quality.paired_quality: the check's own bootstrap, a drawn user
    bringing both its profiles) and mean typicality, each with a 95% bootstrap interval over users."""
    chosen = picked.select("user_id", "text")
    rejected = picked.select("user_id", pl.col("text_r").alias("text"))
    d2 = paired_quality(rejected, chosen, resamples=resamples)["distinct_2"]
    diff = lambda c: (picked[c] - picked[f"{c}_r"]).cast(pl.Float64).to_numpy()  # noqa: E731
    out = {"distinct_2": d2, "typicality": paired_bootstrap(diff("typicality"), resamples=resamples),
           "genres_named": paired_bootstrap(diff("genres_named"), resamples=resamples)}
    if "div_surprisal" in picked.columns:  # with_diversity's surprisal column, as main names it
        out["surprisal"] = paired_bootstrap(diff("div_surprisal"), resamples=resamples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--bands", default="0.05,0.02", help="typicality bands b to try (comma-separated)")
    ap.add_argument("--overlaps", default="0.2,0.4", help="bigram-Jaccard floors t to try (comma-separated)")
    ap.add_argument("--genres", default="0,1", help="genres-named tolerances g to try (comma-separated)")
    ap.add_argument("--diverse", default="typicality,surprisal",
                    help="DivPO criteria to try (pairs.diverse; comma-separated; surprisal loads the generator)")
    ap.add_argument("--pool", type=float, default=0.5, help="pairs.diverse_pool for the DivPO rules")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.pairs
    profiles = with_genres_named(with_typicality(read_artifact(runs.stage_dir(recipe, "sample", args.round), "profiles",
                                                               "sample")),
                                 read_artifact(runs.prepare_dir(recipe), "items", "prepare"))
    criteria = [c for c in args.diverse.split(",") if c]
    for c in criteria:
        profiles = with_diversity(profiles, c, runs.generator_for_round(recipe, args.round)).rename(
            {"diversity": f"div_{c}"})
    scores = scored_profiles(profiles, runs.stage_dir(recipe, "score", args.round), text=True,
                             extra=[f"div_{c}" for c in criteria]).filter(
        pl.col("split").is_in(cfg.splits))
    stage_rule = dict(min_margin=cfg.min_margin, length_tolerance=cfg.length_tolerance, ended_only=cfg.ended_only,
                      typicality_tolerance=cfg.typicality_tolerance, agree_with=tuple(cfg.agree_with),
                      min_overlap=cfg.min_overlap, typicality_band=cfg.typicality_band,
                      genres_tolerance=cfg.genres_tolerance)
    rules = {f"the pairs stage's (length_tolerance={cfg.length_tolerance}, ended_only={cfg.ended_only}): the "
             f"baseline": stage_rule}
    rules.update({f"+ typicality band {b}": {**stage_rule, "typicality_band": b}
                  for b in (map(float, args.bands.split(",")) if args.bands else ())})
    rules.update({f"+ genres named within {g}": {**stage_rule, "genres_tolerance": g}
                  for g in (map(int, args.genres.split(",")) if args.genres else ())})
    rules.update({f"+ minimal pairs, bigram Jaccard >= {t}": {**stage_rule, "min_overlap": t}
                  for t in (map(float, args.overlaps.split(",")) if args.overlaps else ())})
    rules.update({f"+ DivPO by {c}, pool {args.pool:g}": {**stage_rule, "diverse": f"div_{c}",
                                                          "diverse_pool": args.pool} for c in criteria})
    print(f"round {args.round} of run {recipe.run}: chosen - rejected with 95% bootstrap intervals over users "
          f"({args.resamples} draws)")
    for name, rule in rules.items():
        picked = picked_sides(profiles, select_pairs(scores, **rule)[0])
        if picked.height < 2:
            print(f"- {name}: {picked.height} pairs, too few to measure")
            continue
        s = sides_with_intervals(picked, args.resamples)
        print(f"- {name}: {picked.height} pairs, mean margin {picked['margin'].mean():.3f}, mean tokens "
              f"{picked['n_tokens'].mean():.0f} vs {picked['n_tokens_r'].mean():.0f}; "
              f"distinct-2 {ci_text(s['distinct_2'])}; "
              f"typicality {ci_text(s['typicality'])}; genres named {ci_text(s['genres_named'])}"
              + (f"; surprisal {ci_text(s['surprisal'])}" if "surprisal" in s else ""))


if __name__ == "__main__":
    main()
