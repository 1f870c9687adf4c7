"""python benchmarks/check_against.py --recipe recipes/ml100k_smollm2.yaml --against RUN [--round 1] [key.sub=value ...]

A round's generator against another run's generator of the same round, instead of against generator k-1: the
baseline measured beside it. The other run is a control that shares everything but one thing, above all the null
control `pairs.coin_flip=true` (DPO on the same pairs with chosen and rejected swapped in a seeded half: the same
steps, learning rate and texts, but labels the reward did not give). What the check credits to a round and the
control reproduces is DPO's own doing (sharpening, drift), not the reward's.

Both runs' finished check stages are read (round_<k>/check/new/{sample,score}); their old sides must be the same
generator on the same users (the check's old sides hold generator k-1's profiles of the valid users). Prints, as the
check does, every judge's run - control with its 95% paired bootstrap interval over the valid users, then each
quality criterion (distinct-2 and names-history run - control, perplexity under the base model run / control).

    make round1 ARGS="run=coinflip pairs.coin_flip=true"      # the control (same samples: the seeds are the recipe's)
    python benchmarks/check_against.py --recipe recipes/ml100k_smollm2.yaml --against coinflip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlrf import runs
from rlrf.artifacts import read_artifact, read_stage_json
from rlrf.config import load_recipe
from rlrf.stats import ci_text, verdict


def new_side(recipe, k: int) -> tuple[Path, dict]:
    """(round k's check/new/score directory, the check's stage.json) of a run; exits naming what to run when absent."""
    check = runs.stage_dir(recipe, "check", k)
    if not (check / "stage.json").is_file() or not (check / "new" / "score" / "stage.json").is_file():
        sys.exit(f"check_against: {check} is not a finished check stage: run "
                 f"`python pipelines/check.py --recipe <recipe> --round {k} run={recipe.run}` first")
    return check / "new" / "score", read_stage_json(check)


def against(recipe, control, k: int, quality: bool = True) -> tuple[dict, dict]:
    """({judge: run - control with its interval}, quality diffs run - control) on the users both checks scored."""
    from rlrf.check import _quality, judge_diffs, with_judge_ab

    mine, mine_info = new_side(recipe, k)
    theirs, their_info = new_side(control, k)
    if mine_info["config"].get("old") != their_info["config"].get("old"):
        sys.exit(f"check_against: the two checks start from different generators k-1 ({recipe.run}: "
                 f"{mine_info['config'].get('old')}, {control.run}: {their_info['config'].get('old')}); a control "
                 f"must share the round's old generator")
    old = with_judge_ab(read_artifact(theirs, "scores", "score"))
    new = with_judge_ab(read_artifact(mine, "scores", "score"))
    judges = {name: ci for name, (_, _, ci) in judge_diffs(recipe, old, new, k).items()}
    q = _quality(recipe, {"old": theirs, "new": mine}, k).get("diff") if quality else None
    return judges, q or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--against", required=True, help="the control run's name (its runs/<name>)")
    ap.add_argument("--no-quality", action="store_true", help="judges only (no perplexity: no base model loaded)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as the run was made (e.g. run=h3)")
    args = ap.parse_args()
    from rlrf.check import judged
    from rlrf.quality import criteria_lines

    recipe = judged(load_recipe(args.recipe, args.overrides))
    control = judged(load_recipe(args.recipe, [*args.overrides, f"run={args.against}"]))
    judges, q = against(recipe, control, args.round, quality=not args.no_quality)
    print(f"round {args.round}: run {recipe.run} - control {control.run}, valid users, 95% paired bootstrap")
    for name, ci in judges.items():
        print(f"  {name}: {ci_text(ci)} over {ci['n']} users -> {verdict(ci, 'above the control', 'below the control')}")
    for line in criteria_lines(q):
        print("  " + line.replace("new - old", "run - control").replace("new / old", "run / control"))


if __name__ == "__main__":
    main()
