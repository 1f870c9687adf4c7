"""`rlrf inspect`: read a run's parquet artifacts and stage.json files as terminal tables.

    rlrf inspect pairs RUN [--round k] [--user U] [--worst-margin] [--limit N]
    rlrf inspect profiles RUN [--round k] [--user U] [--limit N]
    rlrf inspect summary RUN

RUN is a run directory (runs/<run>) or a run name under runs/. The parquet files stay the source of
truth (columns: docs/artifacts.md); this only prints them so a person can read what the LLM wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

import polars as pl

from rlrf.artifacts import FINGERPRINT, STAGE_JSON, read_artifact
from rlrf.errors import StageError
from rlrf.stats import ci_text
from rlrf.store import SHARDS


def resolve_run(run: str, runs_dir: str = "runs") -> Path:
    """A run directory, or a run name under runs_dir; an error listing the runs there otherwise."""
    for p in (Path(run), Path(runs_dir) / run):
        if p.is_dir() and ((p / "prepare").is_dir() or any(p.glob("round_*"))):
            return p
    known = sorted(d.name for d in Path(runs_dir).iterdir() if d.is_dir()) if Path(runs_dir).is_dir() else []
    raise StageError(f"no run {run!r}: neither a run directory (with prepare/ or round_<k>/) nor a run under "
                     f"{runs_dir}/ (runs there: {', '.join(known) or 'none'}). Pass e.g. runs/<run> or the run name.")


def latest_round(run_dir: Path, stage: str) -> int:
    """The highest round whose `stage` finished."""
    done = sorted(int(p.parent.parent.name.split("_")[1]) for p in run_dir.glob(f"round_*/{stage}/{STAGE_JSON}"))
    if not done:
        raise StageError(f"{run_dir} has no finished '{stage}' stage in any round: run "
                         f"`python pipelines/{stage}.py --recipe <recipe> --round 1` (or `make round1`) first.")
    return done[-1]


# ----------------------------------------------------------------------------- layout


def width() -> int:
    return max(60, shutil.get_terminal_size((120, 24)).columns)


def wrap(text: str, w: int) -> list[str]:
    """Wrap to width w, keeping the text's own line breaks (profiles are often lists)."""
    out = []
    for para in (text or "").splitlines() or [""]:
        out += textwrap.wrap(para, w, replace_whitespace=False, drop_whitespace=True) or [""]
    return out


def grid(rows: list[list[str]], titles: list[str], widths: list[int]) -> str:
    """A table: titles once, then each row's cells wrapped to their column width, side by side (' | ')."""
    lines = [" | ".join(t[:w].ljust(w) for t, w in zip(titles, widths)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    for cells in rows:
        wrapped = [wrap(c, w) for c, w in zip(cells, widths)]
        for i in range(max(map(len, wrapped))):
            lines.append(" | ".join((col[i] if i < len(col) else "").ljust(w)
                                    for col, w in zip(wrapped, widths)).rstrip())
    return "\n".join(lines)


def columns(cells: list[str], titles: list[str], total: int) -> str:
    """Cells side by side in equal columns filling `total` characters."""
    w = (total - 3 * (len(cells) - 1)) // len(cells)
    return grid([cells], titles, [w] * len(cells))


def _assistant(messages) -> str:
    """The completion text of a TRL conversational message list."""
    msgs = list(messages or [])
    return next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), msgs[-1]["content"] if msgs else "")


# ----------------------------------------------------------------------------- commands


def show_pairs(run_dir: Path, round: int | None, user: int | None, worst_margin: bool, limit: int) -> str:
    k = round if round is not None else latest_round(run_dir, "pairs")
    pairs = read_artifact(run_dir / f"round_{k}" / "pairs", "pairs", "pairs")
    all_margin = float(pairs["margin"].mean() or 0.0)
    if user is not None:
        pairs = pairs.filter(pl.col("user_id") == user)
        if pairs.height == 0:
            return f"round {k}: no pair for user {user} (the pairs stage drops ties and margins <= pairs.min_margin)"
    # --worst-margin: the pairs DPO is least sure of (smallest reward gap) first
    pairs = pairs.sort(["margin", "user_id"], descending=[not worst_margin, False])
    total = pairs.height
    if limit > 0:
        pairs = pairs.head(limit)
    w = width()
    out = [textwrap.fill(f"{run_dir} round {k}: {total} pairs, margin mean {all_margin:.4f}; showing {pairs.height} "
                         f"({'smallest' if worst_margin else 'largest'} margin first)", w)]
    for r in pairs.iter_rows(named=True):
        out += ["", "=" * w,
                f"user {r['user_id']}  margin {r['margin']:+.4f}",
                columns([_assistant(r["chosen"]), _assistant(r["rejected"])],
                        [f"CHOSEN #{r['chosen_idx']}  reward {r['chosen_reward']:.4f}",
                         f"REJECTED {_whose(r)}#{r['rejected_idx']}{' (the chosen, genres swapped)' if r['rejected_idx'] < 0 else ''}"
                         f"  reward {r['rejected_reward']:.4f}"], w)]
    return "\n".join(out)


def _whose(pair: dict) -> str:
    """'' for a user's own rejected profile, 'user <v> ' for another user's (pairs.cross_user)."""
    v = pair.get("rejected_user")
    return "" if v is None or v == pair["user_id"] else f"user {v} "


def show_profiles(run_dir: Path, round: int | None, user: int | None, limit: int) -> str:
    k = round if round is not None else latest_round(run_dir, "sample")
    profiles = read_artifact(run_dir / f"round_{k}" / "sample", "profiles", "sample")
    score_dir = run_dir / f"round_{k}" / "score"
    scored = (score_dir / STAGE_JSON).is_file()
    if scored:
        rewards = read_artifact(score_dir, "scores", "score").select("user_id", "sample_idx", "reward")
        profiles = profiles.join(rewards, on=["user_id", "sample_idx"], how="left")
    else:
        profiles = profiles.with_columns(pl.lit(None, dtype=pl.Float64).alias("reward"))
    if user is not None:
        profiles = profiles.filter(pl.col("user_id") == user)
        if profiles.height == 0:
            return f"round {k}: user {user} has no profiles (sample.splits / sample.max_users may leave them out)"
    users = profiles["user_id"].unique().sort()
    n_users = users.len()
    if limit > 0:
        users = users.head(limit)
    w = width()
    note = "" if scored else " (not scored yet: run the score stage for rewards)"
    out = [textwrap.fill(f"{run_dir} round {k}: {profiles.height} profiles of {n_users} users; "
                         f"showing {users.len()} users{note}", w)]
    for u in users.to_list():
        rows = profiles.filter(pl.col("user_id") == u).sort("sample_idx")
        first = rows.row(0, named=True)
        out += ["", "=" * w, f"user {u} ({first['split']})  generator {first['generator']}"]
        cells = []
        for r in rows.iter_rows(named=True):
            reward = "—" if r["reward"] is None else f"{r['reward']:.4f}"
            cells.append([f"#{r['sample_idx']}  reward {reward}\n{r['n_tokens']} tok, {r['finish_reason']}", r["text"]])
        out.append(grid(cells, ["profile", "text"], [20, w - 23]))
    return "\n".join(out)


def show_rollouts(run_dir: Path, round: int | None, user: int | None, limit: int) -> str:
    """The reward-hacking audit of a GRPO round: its highest-rewarded profiles first, with step and user."""
    k = round if round is not None else latest_round(run_dir, "grpo")
    path = run_dir / f"round_{k}" / "grpo" / "rollouts.parquet"
    if not path.is_file():
        raise StageError(f"{path} does not exist: round {k} was not trained with GRPO (rounds.trainer=grpo), or its "
                         f"grpo stage has not finished")
    rows = pl.read_parquet(path)
    if user is not None:
        rows = rows.filter(pl.col("user_id") == user)
    total, mean = rows.height, rows["reward"].mean()
    rows = rows.sort("reward", descending=True, nulls_last=True)
    if limit > 0:
        rows = rows.head(limit)
    w = width()
    out = [textwrap.fill(f"{run_dir} round {k}: {total} profiles sampled during GRPO, reward mean "
                         f"{float('nan') if mean is None else mean:.4f}; the {rows.height} highest-rewarded first "
                         f"(what the policy is pushed towards: look for hacks)", w)]
    cells = [[f"reward {r['reward']:.4f}\nstep {r['step']}, user {r['user_id']}", r["text"]] for r in rows.iter_rows(named=True)]
    if cells:
        out += ["", grid(cells, ["profile", "text"], [22, w - 25])]
    return "\n".join(out)


def _findings(info: dict) -> list[str]:
    """The figures a person checks first: a score stage's judge reliability, a judge's held-out accuracy,
    DPO's held-out pair accuracy, the check's verdict."""
    out = []
    if info.get("reliability_line"):
        out.append(f"reliability: {info['reliability_line']}")
    j = info.get("judges")
    if isinstance(j, dict) and "heldout_ndcg@5" in j:
        out.append(f"judge: held-out NDCG@5 {j['heldout_ndcg@5']['mean']:.4f} +- {j['heldout_ndcg@5']['std']:.4f} vs "
                   f"item popularity {j['popularity_ndcg@5']['mean']:.4f} on the same lists ({j['members']} members)")
    h = info.get("heldout")
    if isinstance(h, dict) and "accuracy" in h:
        out.append(f"held-out pairs: implicit-reward accuracy {h['accuracy']:.3f} [{h['low']:.3f}, {h['high']:.3f}] "
                   f"over {h['pairs']} pairs (chance 0.5)")
    if info.get("stage") == "check" and "reward_diff" in info:
        ci = info["reward_diff"]
        out.append(f"is it learning ({info.get('judge', info.get('metric'))}): {ci_text(ci)} over {ci['n']} valid users: {info.get('verdict')}")
    return out


def show_summary(run_dir: Path) -> str:
    """Every stage under the run: rows, drop counters, wall time; unfinished ones with their shard count."""
    lines = [f"{run_dir}:"]
    dirs = sorted({p.parent for p in run_dir.rglob(FINGERPRINT)} | {p.parent for p in run_dir.rglob(STAGE_JSON)})
    if not dirs:
        return f"{run_dir}: no stage has run yet (start with `make round1` or pipelines/prepare.py)"
    w = width()
    for d in dirs:
        rel = str(d.relative_to(run_dir))
        if (d / STAGE_JSON).is_file():
            info = json.loads((d / STAGE_JSON).read_text())
            rows = ", ".join(f"{k}={v}" for k, v in sorted(info.get("rows", {}).items())) or "-"
            drops = ", ".join(f"{k}={v}" for k, v in sorted(info.get("dropped", {}).items()) if v) or "none"
            rss = f"  peak {info['peak_rss_mb'] / 1024:.1f} GB" if info.get("peak_rss_mb") else ""
            head = (f"  {rel:<34} {info.get('stage', '?'):<15} {info.get('wall_s', 0):>9.1f}s  "
                    f"{info.get('finished_at', '')}{rss}")
            lines.append(head)
            lines += textwrap.wrap(f"rows: {rows}", w - 6, initial_indent="      ", subsequent_indent="        ")
            lines += textwrap.wrap(f"dropped: {drops}", w - 6, initial_indent="      ", subsequent_indent="        ")
            for note in _findings(info):
                lines += textwrap.wrap(note, w - 6, initial_indent="      ", subsequent_indent="        ")
        else:
            shards = len(list((d / SHARDS).glob("*.json")))
            lines.append(f"  {rel:<34} {'UNFINISHED':<15} {shards} shard(s) done; rerun its stage to resume")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rlrf inspect", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name, helptext in (("pairs", "chosen vs rejected profile, side by side, with rewards"),
                           ("profiles", "a round's sampled profiles with their rewards (if scored)"),
                           ("rollouts", "a GRPO round's highest-rewarded training profiles (the reward-hacking audit)"),
                           ("summary", "every stage's row counts, drop counters and timings")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("run", help="run directory (runs/<run>) or run name under --runs-dir")
        s.add_argument("--runs-dir", default="runs")
        if name != "summary":
            s.add_argument("--round", type=int, default=None, help="round k (default: the latest finished)")
            s.add_argument("--user", type=int, default=None, help="only this user_id")
            s.add_argument("--limit", type=int, default=10, help="at most this many pairs / users (0 = all)")
        if name == "pairs":
            s.add_argument("--worst-margin", action="store_true", help="smallest reward gap first")
    args = p.parse_args(argv)
    try:
        run_dir = resolve_run(args.run, args.runs_dir)
        if args.what == "pairs":
            text = show_pairs(run_dir, args.round, args.user, args.worst_margin, args.limit)
        elif args.what == "profiles":
            text = show_profiles(run_dir, args.round, args.user, args.limit)
        elif args.what == "rollouts":
            text = show_rollouts(run_dir, args.round, args.user, args.limit)
        else:
            text = show_summary(run_dir)
    except (StageError, ValueError) as e:  # SchemaError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
