"""python benchmarks/grpo_curve.py --recipe recipes/ml100k_smollm2.yaml run=grpo_demo rounds.trainer=grpo
       [--dpo runs/ml100k_smollm2:DPO] [--out grpo_curve.png] [key.sub=value ...]

GRPO's held-out reward against the time it trained, step by step: every checkpoint a finished GRPO round 1 saved
(`grpo.save_steps`) becomes a generator (its adapter merged into the base in fp32, as the stage merges its last),
samples the check's valid users with the check's seeds, and is judged by the judges the check used, paired by
user against generator 0's check profiles (round_1/check/old). Minutes are the training steps' own time summed to
that checkpoint (train_log.csv's step_time: model loading and the final merge are left out). The last step is the
check's own new side. `--dpo DIR:LABEL` adds a finished DPO round 1 as one point at its cost (as
benchmarks/dpo_vs_grpo.py counts it). Everything it writes sits in runs/<run>/round_1/grpo_curve/ and is reused
when the script runs again (each checkpoint's sample, encode and score are ordinary stages).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.stats import ci_text


def minutes_at(train_log: Path) -> dict[int, float]:
    """{step: minutes of training up to and including it} from a GRPO train_log.csv's step_time column."""
    out, total = {}, 0.0
    with open(train_log) as f:
        for r in csv.DictReader(f):
            total += float(r["step_time"] or 0.0)
            out[int(r["step"])] = total / 60
    return out


def checkpoints(grpo_dir: Path) -> dict[int, Path]:
    found = {}
    for d in (grpo_dir / "checkpoints").glob("checkpoint-*"):
        if (d / "adapter_config.json").is_file():
            found[int(d.name.split("-")[1])] = d
    return dict(sorted(found.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("--dpo", default=None, help="DIR:LABEL of a DPO run whose round 1 is checked")
    ap.add_argument("--out", default="grpo_curve.png")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from rlrf.check import _side, judge_diffs, judged, judges, with_judge_ab
    from rlrf.dpo import merge
    from rlrf.llm import resolve_model

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.rounds.trainer != "grpo":
        sys.exit("grpo_curve: give rounds.trainer=grpo and the GRPO run (run=...)")
    recipe = judged(recipe)
    grpo_dir, check_dir = runs.stage_dir(recipe, "grpo", 1), runs.stage_dir(recipe, "check", 1)
    if not (check_dir / "stage.json").is_file():
        sys.exit(f"grpo_curve: {check_dir} is not finished: run `make grpo1` (or pipelines/check.py) first")
    old = with_judge_ab(read_artifact(check_dir / "old" / "score", "scores", "score"))
    cols = judges(recipe, old.columns)
    mins = minutes_at(grpo_dir / "train_log.csv")
    last = max(mins)
    base = Path(resolve_model(runs.generator(recipe, 0)))
    rows = []
    for step, ckpt in checkpoints(grpo_dir).items():
        if step == last:
            side = check_dir / "new" / "score"  # the finished generator: the check's own new side
        else:
            root = grpo_dir.parent / "grpo_curve" / f"step_{step}"
            if not (root / "merged" / "config.json").is_file():
                merge(base, ckpt, root / "merged")
            side = _side(recipe, root, str(root / "merged"), 1, None)
        new = with_judge_ab(read_artifact(side, "scores", "score"))
        diffs = judge_diffs(recipe, old, new, 1)
        rows.append({"step": step, "minutes": mins[step], "judges": {j: ci for j, (_, _, ci) in diffs.items()}})
    dpo = None
    if args.dpo:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dpo_vs_grpo import row

        dpo = row(args.dpo, "dpo", None)
    print(f"{grpo_dir}: new - old on the valid users, 95% paired bootstrap, per saved step")
    for what, figs in [(f"step {r['step']:3d} ({r['minutes']:5.1f} min)", r["judges"]) for r in rows] + (
            [(f"{dpo['label']} ({dpo['minutes']:.1f} min)", dpo["judges"])] if dpo else []):
        print(f"{what}: " + "; ".join(f"{j.split(' (')[0]} {ci_text(d)}" for j, d in figs.items()))
    from rlrf.plots import ci_errorbar, pyplot, save_png

    names = list(cols)
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
    for ax, j in zip(axes[0], names):
        pts = [(r["minutes"], r["judges"][j]) for r in rows if j in r["judges"]]
        if pts:
            ci_errorbar(ax, [p[0] for p in pts], [p[1] for p in pts], fmt="s-", label="GRPO, per saved step")
        key = next((k for k in (dpo or {}).get("judges", {}) if k.split(" - ")[0] == j.split(" - ")[0]), None)
        if key:
            ci_errorbar(ax, [dpo["minutes"]], [dpo["judges"][key]], fmt="o", label=dpo["label"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=j.split(" (")[0] + (" (own)" if " - " in j else ""), xlabel="minutes of training")
    axes[0][0].set_ylabel("valid users: new - old (95% CI)")
    axes[0][-1].legend(fontsize=7)
    save_png(fig, Path(args.out))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
