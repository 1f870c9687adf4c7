"""python benchmarks/check_perplexity.py --recipe recipes/ml100k_smollm2.yaml [--round 1] [key.sub=value ...]

Is a round's perplexity rise a loss of fluency, or a change of length? Token-weighted perplexity under the base
model (the check's quality figure) falls with a profile's length: a profile's opening tokens cost the most, and the
long profiles that copy the prompt's history list are the most predictable text a generator writes. A generator
that writes shorter profiles therefore reads as less fluent at equal fluency. On a finished check stage
(round_<k>/check/{old,new}/sample), this prints for both generators' profiles on the valid users:

  perplexity                the check's figure (token-weighted, the text on its own after BOS)
  at old's lengths          quality.length_matched_perplexity: per-token NLL within each quartile of the old
                            profiles' token counts, weighted by the old profiles' tokens in it
  by length quartile        perplexity of each side's profiles in each quartile (how many profiles fall there)

Ratios new / old with a 95% bootstrap interval over users (a user's profiles resampled together, paired:
quality.paired_quality, the check's own intervals).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.quality import length_bins, paired_quality, pooled_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. run=grpo_demo)")
    args = ap.parse_args()
    from rlrf.llm import load_generator
    from rlrf.quality import token_nll

    recipe = load_recipe(args.recipe, args.overrides)
    where = runs.stage_dir(recipe, "check", args.round)
    model = load_generator(recipe.sample.model)
    sides = {}
    for side in ("old", "new"):
        d = where / side / "sample"
        if not (d / "stage.json").is_file():
            sys.exit(f"check_perplexity: {d} is not a finished sample stage: run "
                     f"`python pipelines/check.py --recipe {args.recipe} --round {args.round}` first")
        prof = read_artifact(d, "profiles", "sample").filter(pl.col("split") == "valid")
        nll, tokens = token_nll(prof["text"].fill_null("").to_list(), *model)
        sides[side] = pl.DataFrame({"user_id": prof["user_id"], "nll": nll, "tokens": tokens}).filter(pl.col("tokens") > 0)
    old, new = sides["old"], sides["new"]
    r = paired_quality(old, new, args.resamples, recipe.seed)
    print(f"{where}: {r['perplexity']['n']} valid users, {old.height} old and {new.height} new profiles "
          f"(mean tokens {old['tokens'].mean():.1f} -> {new['tokens'].mean():.1f})")
    for name, key in (("perplexity", "perplexity"), ("at old's lengths", "perplexity_at_old_lengths")):
        p, lo, hi = (r[key][x] for x in ("mean", "low", "high"))
        print(f"  {name:17s} new / old {p:.3f} [{lo:.3f}, {hi:.3f}]  ({100 * (p - 1):+.0f}%)")
    for line in quartile_table(old, new):
        print(line)


def quartile_table(old: pl.DataFrame, new: pl.DataFrame, bins: int = 4) -> list[str]:
    """Each side's perplexity in each of the length bins `ratios` matches on (quality.length_bins of old's tokens)."""
    edges = length_bins(old["tokens"].to_numpy(), bins)
    bounds = [0, *edges.tolist(), math.inf]
    lines = []
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        cells = []
        for df in (old, new):
            part = df.filter(pl.Series(np.searchsorted(edges, df["tokens"].to_numpy(), side="right") == b))
            cells.append(f"{pooled_perplexity(part['nll'].to_numpy(), part['tokens'].to_numpy()):6.2f} "
                         f"({part.height:3d} profiles)")
        lines.append(f"  tokens [{lo:g}, {hi:g}): old {cells[0]}, new {cells[1]}")
    return lines


if __name__ == "__main__":
    main()
