"""python benchmarks/dpo_vs_grpo.py --dpo runs/learn300_G:G --grpo runs/grpo300:GRPO [--out dpo_vs_grpo.png]

DPO rounds and GRPO rounds from the same base model, side by side at their cost: for each finished round 1 (its
check stage done), the wall time of the stages that made generator 1 (DPO: sample, encode, score, pairs, dpo, plus
train-reranker when the reward is the reranker judge; GRPO: grpo) and the check's new - old figure on the valid users under every judge,
with its 95% interval. Prints a table and draws the gain under each judge against the minutes spent.

A check directory may sit apart from its run (variants re-scored over one run's sample): `--dpo DIR:LABEL` reads
DIR/round_1/{check,dpo,pairs,score} and, for the stages DIR lacks, --stages-from (default: DIR itself).
Wall times are as recorded in each stage.json: compare runs measured on the same machine, alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlrf.stats import ci_text

MAKERS = {"dpo": ("sample", "encode", "train_reranker", "score", "pairs", "dpo"), "grpo": ("grpo",)}
STAGE_DIR = {"train_reranker": "../reranker"}


def wall(round_dir: Path, stage: str, fallback: Path | None) -> float | None:
    for base in (round_dir, fallback):
        if base is None:
            continue
        p = base / STAGE_DIR.get(stage, stage) / "stage.json"
        if p.is_file():
            return float(json.loads(p.read_text()).get("wall_s") or 0.0)
    return None


def row(spec: str, kind: str, stages_from: str | None) -> dict:
    path, _, label = spec.partition(":")
    r = Path(path) / "round_1"
    fallback = Path(stages_from) / "round_1" if stages_from else None
    check = json.loads((r / "check" / "stage.json").read_text())
    stages = list(MAKERS[kind])
    score = r / "score" / "stage.json"
    if kind == "dpo" and score.is_file() and json.loads(score.read_text())["config"]["score"]["reward"] != "reranker":
        stages.remove("train_reranker")  # a training-free reward needs no judge trained (the check's own is not counted)
    walls = {s: wall(r, s, fallback) for s in stages}
    used = {s: w for s, w in walls.items() if w is not None}
    return {"label": label or path, "kind": kind, "minutes": sum(used.values()) / 60, "stages": used,
            "judges": {name: check["judges"][name]["diff"] for name in check["judge_order"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dpo", nargs="*", default=[], help="DIR:LABEL of DPO runs (round 1 checked)")
    ap.add_argument("--grpo", nargs="*", default=[], help="DIR:LABEL of GRPO runs (round 1 checked)")
    ap.add_argument("--stages-from", default=None, help="run whose stages a --dpo DIR lacks (e.g. the shared sample)")
    ap.add_argument("--out", default="dpo_vs_grpo.png")
    args = ap.parse_args()
    rows = [row(s, "dpo", args.stages_from) for s in args.dpo] + [row(s, "grpo", None) for s in args.grpo]
    if not rows:
        ap.error("give at least one --dpo or --grpo run")
    judges = list(dict.fromkeys(j for r in rows for j in r["judges"]))
    for r in rows:
        print(f"\n{r['label']} ({r['kind']}): {r['minutes']:.1f} min to make generator 1 ("
              + ", ".join(f"{s} {w / 60:.1f}" for s, w in r["stages"].items()) + ")")
        for j in judges:
            if j in r["judges"]:
                d = r["judges"][j]
                print(f"  {j:70s} {ci_text(d)} ({d['n']} users)")
    from rlrf.plots import ci_errorbar, pyplot, save_png

    # one panel per judge (a run's own reward carries " - picked the pairs" / " - GRPO's reward": hollow marker)
    plain = list(dict.fromkeys(j.split(" - ")[0] for j in judges if "personal" not in j))
    fig, axes = pyplot().subplots(1, len(plain), figsize=(3.4 * len(plain), 3.2), squeeze=False)
    for ax, j in zip(axes[0], plain):
        for r in rows:
            key = next((k for k in r["judges"] if k.split(" - ")[0] == j), None)
            if key is None:
                continue
            d = r["judges"][key]
            ci_errorbar(ax, [r["minutes"]], [d], fmt="o" if r["kind"] == "dpo" else "s", label=r["label"],
                        mfc="none" if " - " in key else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=j.split(" (")[0], xlabel="minutes to make generator 1")
    axes[0][0].set_ylabel("valid users: new - old (95% CI)")
    axes[0][-1].legend(fontsize=7)
    save_png(fig, Path(args.out))
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
