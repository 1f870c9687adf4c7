"""Is it learning? Generator k-1 and generator k write profiles for the same VALID users with the same
seeds; every judge of round k scores both; the figure is the paired difference of mean reward per user
(new - old) with a bootstrap 95% interval, first under the judges INDEPENDENT of the one that picked the
pairs (of retrieval, genres, lexical and the cross-fitted reranker judges a and b averaged, those score.reward
did not name), then under the pair-picking reward itself. Profile quality of both generators
(length, distinct-2, names-history share, perplexity under the base model) sits beside it, so a gain bought
with gibberish shows.

    runs/<run>/round_<k>/check/{old,new}/{sample,encode,score}/   both generators' profiles and rewards
    runs/<run>/round_<k>/check/stage.json, summary.md, check.png  the figure

Valid users are neither DPO's training users nor the test users the evaluation reports, and the same
seeds mean the two generators differ only in their weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact, read_stage_json
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.files import atomic_path, write_parquet
from rlrf.plots import pyplot, save_png
from rlrf.quality import criteria_lines
from rlrf.stats import ci_text, paired, paired_bootstrap, verdict
from rlrf.store import Stage
from rlrf.trainers import learned_reward


def judges(recipe: Recipe, columns) -> dict[str, str]:
    """name -> scores column of every judge present: first those independent of the reward the round learned
    from (the pair-picking reward; GRPO's reward)."""
    from rlrf.reward import REWARDS

    names = {j.check_column or j.column: j.label for j in REWARDS.values()}
    # score.contrast: each judge's personal part (own user minus other users)
    names.update({f"{j.column}_personal": j.label.split(" (")[0] + " personal (own user minus other users)"
                  for j in REWARDS.values() if j.personal})
    judge = REWARDS[recipe.score.reward]
    picked = (judge.check_column or judge.column) + ("_personal" if recipe.score.contrast else "")
    direct = learned_reward(recipe) is not None  # the trainer learned from a reward, not from the round's pairs
    mark = f" - {recipe.rounds.trainer.upper()}'s reward" if direct else " - picked the pairs"
    # pairs.agree_with: judges that vetoed pairs took part in picking them, so they are not independent either
    vetoes = [] if direct else [REWARDS[n].column for n in recipe.pairs.agree_with if REWARDS[n].column != picked]
    order = [c for c in names if c != picked and c not in vetoes] + vetoes + [picked]
    found = {names[c] + (mark if c == picked else " - vetoed the pairs" if c in vetoes else ""): c
             for c in order if c in columns}
    return found or {"the round's reward": "reward"}


def with_judge_ab(scores: pl.DataFrame) -> pl.DataFrame:
    if {"judge_a", "judge_b"} <= set(scores.columns):
        return scores.with_columns(((pl.col("judge_a") + pl.col("judge_b")) / 2).alias("judge_ab"))
    return scores


def _side(recipe: Recipe, root: Path, generator: str, k: int, reranker: Path) -> Path:
    """Sample (same seeds: same round argument for both generators), encode and score one generator.

    The old generator's profiles are usually already in round k's sample stage (it samples generator k-1
    with round k's seeds, valid users included): they are taken from there instead of sampled again."""
    from rlrf.encode import encode_stage
    from rlrf.sample import sample_stage
    from rlrf.score import score_stage

    prof = sample_stage(recipe, root / "sample", generator, k, splits=["valid"], n=recipe.check.n,
                        max_users=recipe.check.users, source=runs.stage_dir(recipe, "sample", k))
    enc = encode_stage(recipe, prof, root / "encode")
    return score_stage(recipe, prof, enc, reranker, root / "score")


def write_summary(path: Path, k: int, figures: dict, old_gen: str, new_gen: str, dpo: dict | None,
                  quality: dict, temperatures: dict | None = None, decodings: dict | None = None) -> None:
    lines = [f"# Round {k}: is it learning?", "",
             f"Valid users (never trained on by DPO), same seeds for both generators; each judge's reward averaged "
             f"over a user's profiles, paired by user. Old = generator {k - 1} (`{old_gen}`), new = generator {k} "
             f"(`{new_gen}`). The first judge is independent of the reward that picked the pairs.", ""]
    cal = (temperatures or {}).get("calibration")
    if cal:
        tried = ", ".join(f"{x['distinct_2']:.4f} at {x['temperature']:g}" for x in cal["tried"])
        lines += [f"Sampling temperature: old {temperatures['old']}, new {temperatures['new']}, calibrated "
                  f"(check.match_distinct) on {cal['users']} train users outside the round's sample to generator "
                  f"{k - 1}'s distinct-2{' across users' if cal.get('figure') == 'across' else ''} "
                  f"({cal['target_distinct_2']:.4f}; generator {k}: {tried})"
                  + ("" if cal["reached"] else "; no temperature tried reached it") + ".", ""]
    elif temperatures and temperatures["old"] != temperatures["new"]:
        lines += [f"Sampling temperature: old {temperatures['old']}, new {temperatures['new']} (check.temperature: "
                  f"generator {k} measured at a recalibrated temperature).", ""]
    cut = decoding_line(decodings, k)
    if cut:
        lines += [cut + ".", ""]
    lines += ["| judge | old | new | new - old (95% bootstrap interval) | users | improved | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, f in figures.items():
        ci = f["diff"]
        lines.append(f"| {name} | {f['old_mean']:.4f} | {f['new_mean']:.4f} | {ci['mean']:+.4f} [{ci['low']:+.4f}, "
                     f"{ci['high']:+.4f}] | {ci['n']} | {f['improved_share']:.0%} | {verdict(ci)} |")
    if quality:
        keys = [q for q in ("mean_tokens", "distinct_2", "distinct_2_across", "names_history", "genres_named",
                            "share_truncated", "share_at_limit", "perplexity", "perplexity_at_old_lengths")
                if q in quality.get("old", {})]
        lines += ["", "| profiles | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for side in ("old", "new"):
            lines.append(f"| {side} | " + " | ".join(f"{quality[side][q]:.4f}" for q in keys) + " |")
        more = criteria_lines(quality.get("diff"))
        if more:
            lines += ["", "Quality, paired by user (95% bootstrap interval):", ""] + [f"- {x}" for x in more]
    if dpo and dpo.get("backend") == "trl-grpo":
        lines += ["", f"GRPO (round {k}, reward {dpo.get('reward')}): {dpo.get('steps')} steps, {dpo.get('profiles_sampled')} "
                  f"profiles sampled for {dpo.get('train_users')} train users; mean reward of the step's profiles "
                  f"{dpo.get('reward_first_step')} at the first step, {dpo.get('reward_last_step')} at the last."]
    elif dpo:
        fin = dpo.get("final") or {}
        lines += ["", f"DPO (round {k}): {dpo.get('steps')} steps on {dpo.get('pairs_used')} pairs; last logged "
                  f"loss {fin.get('loss')}, reward margin {fin.get('rewards/margins')}, "
                  f"accuracy {fin.get('rewards/accuracies')}."]
        held = dpo.get("heldout")
        if held:
            lines.append(f"Implicit-reward accuracy on {held['pairs']} held-out (valid users') pairs: "
                         f"{held['accuracy']:.3f} [{held['low']:.3f}, {held['high']:.3f}] (chance 0.5).")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def decoding_line(decodings: dict | None, k: int) -> str:
    """'Nucleus and min-p: ...' where the two generators' top_p or min_p differ in the check (check.top_p,
    check.min_p), else ''."""
    if not decodings:
        return ""
    old, new = decodings["old"], decodings["new"]
    if all(old.get(key) == new.get(key) for key in ("top_p", "min_p")):
        return ""

    def side(d: dict) -> str:
        return f"top_p {d.get('top_p', 1.0):g}, min_p {d.get('min_p', 0.0):g}"
    return (f"Nucleus and min-p: generator {k} sampled at {side(new)} (check.top_p, check.min_p), generator {k - 1} "
            f"at {side(old)}")


def plot(path: Path, pairs: pl.DataFrame, ci: dict, k: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    d = pairs["diff"].to_numpy()
    # identical differences (e.g. an unchanged generator: all 0) need an explicit range to draw one bar
    lim = None if np.ptp(d) > 1e-12 else (d[0] - 1e-3, d[0] + 1e-3)
    ax.hist(d, bins=30 if lim is None else 1, range=lim, color="#4c72b0", alpha=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(ci["mean"], color="#c44e52", lw=1.5, label=f"mean {ci['mean']:+.4f}")
    ax.axvspan(ci["low"], ci["high"], color="#c44e52", alpha=0.2, label="95% bootstrap interval")
    ax.set(xlabel=f"reward(generator {k}) - reward(generator {k - 1}) per valid user", ylabel="users",
           title=f"round {k}: is it learning?")
    ax.legend(fontsize=8)
    save_png(fig, path)


def judged(recipe: Recipe) -> Recipe:
    """The recipe the check judges with: a round whose trainer learned from a reward directly (GRPO) names that
    reward as the round's own."""
    reward = learned_reward(recipe)
    if reward is None:
        return recipe
    return dataclasses.replace(recipe, score=dataclasses.replace(recipe.score, reward=reward))


def new_decoding(recipe: Recipe) -> Recipe:
    """The recipe with generator k's nucleus and min-p in the check: check.top_p and check.min_p, where set, in place
    of the sample section's (generator k-1 keeps the round's)."""
    c = recipe.check
    return runs.with_decoding(recipe, **{key: v for key, v in (("top_p", c.top_p), ("min_p", c.min_p))
                                         if v is not None})


def new_side(recipe: Recipe) -> Recipe:
    """The recipe generator k samples with in the check: check.temperature, check.top_p and check.min_p, where set,
    in place of the sample section's (generator k-1 keeps the round's)."""
    t = recipe.check.temperature
    return new_decoding(recipe if t is None else runs.at_temperature(recipe, t))


def match_distinct(recipe: Recipe, root: Path, old_gen: str, new_gen: str, k: int, log=print) -> dict:
    """check.match_distinct: the lowest of check.match_temperatures at which generator k's profiles (at check.top_p
    and check.min_p where set) of check.match_users train users reach the distinct-2 (check.match_figure: corpus, or
    across users) of generator k-1's at sample.temperature (same users, same seeds). The users are train users outside the round's sample (the
    seeded draw's next ones after the sample.max_users it took): DPO never trained on their prompts, and the valid
    users the check then measures play no part in the choice. A bisection over the ascending list, distinct-2 taken
    as rising with the temperature; where none reaches it, the highest, with `reached` false. Each side and
    temperature is a sample stage under `root`."""
    from rlrf.quality import distinct_across, distinct_n
    from rlrf.sample import sample_stage, select_users

    cfg, taken = recipe.check, recipe.sample.max_users
    calib_n = cfg.match_n or cfg.n  # profiles a calibration user
    across = cfg.match_figure == "across"
    if taken <= 0 and "train" in recipe.sample.splits:
        raise StageError("check.match_distinct calibrates on train users outside the round's sample, and "
                         "sample.max_users=-1 sampled them all: set sample.max_users below the train split's size, "
                         "or measure at a set check.temperature instead")
    skip = taken if "train" in recipe.sample.splits else 0

    prompts = read_artifact(runs.prepare_dir(recipe), "prompts", "prepare")
    if select_users(prompts, ["train"], cfg.match_users, recipe.seed, skip=skip).height == 0:
        raise StageError(f"check.match_distinct: no train users are left outside the round's sample of {skip}; "
                         f"lower sample.max_users, or measure at a set check.temperature instead")

    def distinct(rec: Recipe, gen: str, name: str) -> float:
        d = sample_stage(rec, root / name, gen, k, splits=["train"], n=calib_n, max_users=cfg.match_users,
                         skip_users=skip)
        p = read_artifact(d, "profiles", "sample")
        texts = p["text"].fill_null("").to_list()
        return distinct_across(texts, p["sample_idx"].to_list()) if across else distinct_n(texts, 2)

    target = distinct(recipe, old_gen, "old")
    new = new_decoding(recipe)
    temps, tried = list(cfg.match_temperatures), {}
    lo, hi, best = 0, len(temps) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        t = temps[mid]
        tried[t] = distinct(runs.at_temperature(new, t), new_gen, f"new_t{t:g}")
        log(f"check: calibrating generator {k}'s temperature on {cfg.match_users} train users: distinct-2"
            f"{' across users' if across else ''} "
            f"{tried[t]:.4f} at {t:g} (generator {k - 1}'s at {recipe.sample.temperature:g}: {target:.4f})")
        if tried[t] >= target:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    chosen = temps[-1] if best is None else temps[best]
    if best is None:
        log(f"check: no temperature in check.match_temperatures reaches generator {k - 1}'s distinct-2; measuring "
            f"at the highest, {chosen:g}")
    return {"temperature": chosen, "reached": best is not None, "target_distinct_2": target,
            "tried": [{"temperature": t, "distinct_2": d} for t, d in sorted(tried.items())],
            "users": cfg.match_users, "n": calib_n, "figure": cfg.match_figure, "split": "train", "skipped": skip}


def judge_diffs(recipe: Recipe, old: pl.DataFrame, new: pl.DataFrame, k: int) -> dict[str, tuple[str, pl.DataFrame, dict]]:
    """{judge: (its scores column, the per-user old/new/diff frame, new - old with its paired bootstrap interval)}
    for every judge of the check (in its order) that scored some user under both generators."""
    out = {}
    for name, col in judges(recipe, old.columns).items():
        pairs = paired(old, new, col)
        if pairs.height:
            out[name] = (col, pairs, paired_bootstrap(pairs["diff"].to_numpy(), recipe.rounds.bootstrap,
                                                      seed=recipe.seed + k))
    return out


def check_stage(recipe: Recipe, round: int, *, force: bool = False) -> Path:
    """Generator round-1 vs generator round on valid users; writes the figure into round_<k>/check/."""
    from rlrf.llm import weights_hash

    k = round
    recipe = runs.for_generator(judged(recipe), k - 1)  # generator k-1 at the temperature round k sampled it at
    out = runs.stage_dir(recipe, "check", k)
    old_gen, new_gen = runs.generator(recipe, k - 1), runs.generator(recipe, k)
    if not (Path(new_gen) / "config.json").is_file():
        raise StageError(f"generator {k} ({new_gen}) does not exist yet: run "
                         f"`python pipelines/{runs.trainer_stage(recipe)}.py --recipe <recipe> --round {k}` first")
    reranker = runs.reranker_dir(recipe, k)
    if not (reranker / "model.json").is_file() and recipe.score.reward != "reranker":
        reranker = None  # a round without a reranker judge (GRPO's): the training-free judges only
    config = runs.STAGES["check"].config(recipe, round=k, old=weights_hash(old_gen), new=weights_hash(new_gen))
    # the reranker's fingerprint is an input; the sides' sub-stages live inside this stage's directory, so a
    # --force here wipes them too before they are redone
    with Stage(out, runs.STAGES["check"].name, config, inputs=[reranker] if reranker else [], force=force) as st:
        if st.done:
            info = read_stage_json(out)
        else:
            calibration = (match_distinct(recipe, out / "calibrate", old_gen, new_gen, k)
                           if recipe.check.match_distinct else None)
            new_recipe = (runs.at_temperature(new_decoding(recipe), calibration["temperature"]) if calibration
                          else new_side(recipe))
            sides = {side: _side(rec, out / side, gen, k, reranker)
                     for side, gen, rec in (("old", old_gen, recipe), ("new", new_gen, new_recipe))}
            old = with_judge_ab(read_artifact(sides["old"], "scores", "score"))
            new = with_judge_ab(read_artifact(sides["new"], "scores", "score"))
            figures = {}
            for name, (col, pairs, ci) in judge_diffs(recipe, old, new, k).items():
                figures[name] = {"column": col, "diff": ci, "old_mean": float(pairs["old"].mean()),
                                 "new_mean": float(pairs["new"].mean()),
                                 "improved_share": float((pairs["diff"] > 0).mean())}
                if len(figures) == 1:  # the independent judge's per-user figures and plot
                    write_parquet(out / "per_user.parquet", pairs)
                    plot(out / "check.png", pairs, ci, k)
            if not figures:
                raise StageError(f"check: no valid user was scored under both generators ({out}); see the sides' "
                                 f"score stages (a user needs held-out positives or lists)")
            quality = _quality(recipe, sides, k)
            dpo_dir = runs.stage_dir(recipe, runs.trainer_stage(recipe), k)
            dpo = read_stage_json(dpo_dir) if (dpo_dir / "stage.json").is_file() else None
            temperatures = {"old": recipe.sample.temperature, "new": new_recipe.sample.temperature,
                            **({"calibration": calibration} if calibration else {})}
            decodings = {"old": runs.decoding(recipe), "new": runs.decoding(new_recipe)}
            write_summary(out / "summary.md", k, figures, old_gen, new_gen, dpo, quality, temperatures, decodings)
            first = next(iter(figures))
            ci = figures[first]["diff"]
            info = st.finish(
                extra={"round": k, "metric": first, "judge": first, "reward_diff": ci, "verdict": verdict(ci),
                       "old_mean": figures[first]["old_mean"], "new_mean": figures[first]["new_mean"],
                       "improved_share": figures[first]["improved_share"], "judges": figures,
                       "judge_order": list(figures), "quality": quality,
                       "dpo_heldout": (dpo or {}).get("heldout"), "temperature": temperatures,
                       "decoding": decodings,
                       "old_generator": old_gen, "new_generator": new_gen},
                rows={"users": ci["n"]})
    figs = info.get("judges", {info["metric"]: {"diff": info["reward_diff"]}})
    for name in info.get("judge_order", list(figs)):  # stage.json sorts its keys: the order is kept apart
        ci = figs[name]["diff"]
        print(f"check: round {k} {name}: new - old = {ci_text(ci)} over "
              f"{ci['n']} valid users -> {verdict(ci)}")
    temps = info.get("temperature") or {}
    if temps.get("old") != temps.get("new"):
        how = (f"calibrated to generator {k - 1}'s distinct-2 on train users outside the round's sample"
               if temps.get("calibration") else "check.temperature")
        print(f"check: round {k} generator {k} sampled at temperature {temps['new']:g} ({how}), generator {k - 1} at "
              f"{temps['old']:g}")
    cut = decoding_line(info.get("decoding"), k)
    if cut:
        print(f"check: round {k} {cut}")
    for line in criteria_lines((info.get("quality") or {}).get("diff")):
        print(f"check: round {k} {line}")
    print(f"check: {out / 'summary.md'}")
    return out


def _quality(recipe: Recipe, sides: dict, k: int) -> dict:
    """Profile quality of both generators' check profiles (perplexity under the base model), and under "diff" each
    figure's new - old (perplexity: new / old) with its paired bootstrap interval over the valid users."""
    from rlrf.llm import load_generator
    from rlrf.quality import length_matched_perplexity, paired_quality, profile_quality

    if not all((Path(d).parent / "sample" / "stage.json").is_file() for d in sides.values()):
        return {}
    prep = runs.prepare_dir(recipe)
    items, inter = read_artifact(prep, "items", "prepare"), read_artifact(prep, "interactions", "prepare")
    model = load_generator(recipe.sample.model)
    profiles = {side: read_artifact(Path(d).parent / "sample", "profiles", "sample") for side, d in sides.items()}
    out = {side: profile_quality(p, items, inter, ppl_model=model, ppl_split=None, keep_rows=True)
           for side, p in profiles.items()}
    frames = {side: out[side].pop("rows") for side in profiles}
    # perplexity falls with length, so a generator writing shorter profiles reads as less fluent at equal
    # fluency: both sides also at the old side's length mix (for the old side, its own perplexity)
    ref = frames["old"]["tokens"].to_numpy()
    for side, rows in frames.items():
        out[side]["perplexity_at_old_lengths"] = length_matched_perplexity(rows["nll"].to_numpy(),
                                                                            rows["tokens"].to_numpy(), ref)
    out["diff"] = paired_quality(frames["old"], frames["new"], recipe.rounds.bootstrap, seed=recipe.seed + k)
    return out


def summary_line(check_dir: Path) -> str:
    """One markdown line for README / evaluate tables."""
    info = json.loads((Path(check_dir) / "stage.json").read_text())
    ci = info["reward_diff"]
    return (f"round {info['round']}: {info['metric']} new - old {ci['mean']:+.4f} "
            f"(95% CI {ci['low']:+.4f} to {ci['high']:+.4f}, {ci['n']} valid users)")
