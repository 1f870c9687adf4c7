"""python benchmarks/pool_draws.py CHECK_DIR CHECK_DIR [...] [--judge NAME]

Does the recipe learn, over the draws, where one check of ~94 valid users cannot say? Each CHECK_DIR is a finished
check stage (runs/<run>/round_<k>/check) of an independent draw of the same recipe: another `seed=` (split, users,
profiles, reranker and pairs), or the other arithmetic (an AVX2-only machine samples in fp32 and draws other
profiles). Per draw the script prints the check's temperatures, its independent judge's new - old (by default the
check's own judge) and every quality figure, then the figures pooled over the draws (rlrf.stats.pool):

  fixed    the inverse-variance mean: the draws taken as one effect measured k times;
  random   DerSimonian-Laird's between-draw variance added, the interval from Hartung-Knapp's t on k - 1 degrees of
           freedom: what a new draw of the recipe has on average. With few draws it is wide, and it is the figure
           a claim about the recipe (not about one run of it) needs;

with Cochran's Q and I2 (the share of the spread between draws their own intervals do not explain), and the pooled
(random) figures read against the check's criteria (rlrf.quality.criteria_lines). Two checks of one draw (a
training-seed replicate on the same pairs) are not independent draws of the pairs: pool those apart, or not at all.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

QUALITY = (("distinct_2_across", "distinct-2 across users", False), ("distinct_2", "distinct-2 (corpus)", False),
           ("names_history", "names-history share", False), ("perplexity", "perplexity", True),
           ("perplexity_at_old_lengths", "perplexity at old's lengths", True))


def read_check(check_dir: Path, judge: str | None) -> dict:
    """One finished check's judge figure, quality diffs and temperatures; a clear error where it is not one."""
    from rlrf.artifacts import read_stage_json
    from rlrf.errors import StageError

    path = Path(check_dir) / "stage.json"
    try:
        info = read_stage_json(check_dir, "check")
    except StageError as e:
        raise SystemExit(f"pool_draws: a finished check stage is missing: {e}") from None
    if info.get("stage") not in (None, "check") or "judges" not in info:
        raise SystemExit(f"pool_draws: {path} is not a check stage's")
    name = judge or info["judge"]
    if name not in info["judges"]:
        raise SystemExit(f"pool_draws: {path} has no judge {name!r}; it has {sorted(info['judges'])}")
    temps = info.get("temperature") or {}
    return {"dir": str(check_dir), "round": info.get("round"), "judge": name, "diff": info["judges"][name]["diff"],
            "quality": (info.get("quality") or {}).get("diff", {}),
            "temperature": (temps.get("old"), temps.get("new"))}


def pooled(draws: list[dict]) -> dict:
    """Every figure all draws carry and measured, pooled: {"judge": pool(...), quality key: pool(...)} (a check
    whose perplexity at old's lengths was not measured, NaN, leaves that figure out)."""
    from rlrf.stats import pool

    out = {"judge": pool([d["diff"] for d in draws])}
    for key, _, log in QUALITY:
        if all(key in d["quality"] and math.isfinite(d["quality"][key]["mean"]) for d in draws):
            out[key] = pool([d["quality"][key] for d in draws], log=log)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checks", nargs="+", type=Path, help="finished check stage directories, one per draw")
    ap.add_argument("--judge", default=None, help="a judge the checks name (default: each check's own)")
    args = ap.parse_args(argv)
    if len(args.checks) < 2:
        raise SystemExit("pool_draws: pass 2 or more check stages (independent draws of one recipe)")
    draws = [read_check(c, args.judge) for c in args.checks]
    if len({d["round"] for d in draws}) > 1:
        raise SystemExit(f"pool_draws: the checks are of different rounds {sorted({d['round'] for d in draws})}")
    if len({d["judge"] for d in draws}) > 1:
        raise SystemExit(f"pool_draws: the checks' own judges differ {sorted({d['judge'] for d in draws})}; "
                         "pass --judge")

    from rlrf.quality import criteria_lines
    from rlrf.stats import ci_text, verdict

    def fig(ci: dict, log: bool) -> str:
        return f"x{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if log else ci_text(ci)

    judge = draws[0]["judge"]
    print(f"pool_draws: {len(draws)} draws, round {draws[0]['round']}, judge {judge}")
    for d in draws:
        told, tnew = d["temperature"]
        parts = [f"{judge} {ci_text(d['diff'])}"] + [f"{name} {fig(d['quality'][key], log)}"
                                                      for key, name, log in QUALITY if key in d["quality"]]
        print(f"  {d['dir']} (T {told} -> {tnew}): " + "; ".join(parts))
    pools = pooled(draws)
    for kind in ("fixed", "random"):
        parts = [f"{judge} {ci_text(pools['judge'][kind])}"] + [f"{name} {fig(pools[key][kind], log)}"
                                                              for key, name, log in QUALITY if key in pools]
        print(f"pooled ({kind}): " + "; ".join(parts))
    j = pools["judge"]
    print(f"between draws ({judge}): Q {j['q']:.2f} on {j['k'] - 1} df, I2 {j['i2']:.0%}, "
          f"tau {j['random']['tau2'] ** 0.5:.4f}")
    print(f"pooled (random) {judge}: {verdict(j['random'])}")
    for line in criteria_lines({key: p["random"] for key, p in pools.items() if key != "judge"}):
        print(f"pooled (random) {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
