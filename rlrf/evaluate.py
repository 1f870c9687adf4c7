"""The evaluate stage: the paper's Table I, Table II and Figure 4 on our data, reward distributions and
profile quality, as runs/<run>/evaluate/results.md + results.json + PNGs.

Every generator (0 = the base model, k = round k's DPO output) writes N=evaluate.n profiles for every
user with the same seeds and decoding (the first evaluated round's: the profiles that round's sample and
check already hold are taken from them); a reranker per backbone x seed is trained on train users with
that generator's knowledge, early-stopped on valid, and reported on test, evaluate.workers of them at
once in processes of their own. Each piece is its own resumable sub-stage under evaluate/, so a rerun
only does what is not done:

    evaluate/gen_<k>/sample/  encode/  quality.json      generator k's profiles, their embeddings, quality
    evaluate/gen_<k>/quality_profiles.parquet            per profile: names-history, NLL (test users), for the
                                                         paired quality intervals of round k against generator 0
    evaluate/rerank/<backbone>/base/seed_<s>/            reranker without knowledge
    evaluate/rerank/<backbone>/gen_<k>/seed_<s>/         reranker with generator k's knowledge
    evaluate/reward/gen_<k>/                             test rewards under the run's reward reranker
    evaluate/results.md results.json rounds.png rewards.png stage.json
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs, stats
from rlrf.artifacts import STAGE_JSON, read_artifact, read_stage_json
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.files import write_json, write_parquet
from rlrf.quality import criteria_lines



def seed_round(recipe: Recipe) -> int:
    """The round argument every generator is sampled with: the first evaluated round's. The seeds (recipe.seed,
    user, round, idx) then match across generators, so a difference between them is the generator's, not the
    dice's; and they match that round's own sample (generator k-1 on the round's users) and its check (generator k
    on the valid users), whose texts are taken instead of sampled again (`sources`)."""
    return min(recipe.evaluate.rounds)


def sources(recipe: Recipe) -> list[Path]:
    """The run's sample stages that may hold evaluation profiles: each evaluated round's sample and its check's
    two sides (sample_stage takes from those that match a generator's weights and seeds, and skips the rest)."""
    out = []
    for k in sorted(set(recipe.evaluate.rounds)):
        check = runs.stage_dir(recipe, "check", k)
        out += [runs.stage_dir(recipe, "sample", k), check / "old" / "sample", check / "new" / "sample"]
    return out
METRICS = ("map@3", "ndcg@3", "map@5", "ndcg@5", "map@7", "ndcg@7")
TABLE_METRICS = ("map@5", "ndcg@5")


# ----------------------------------------------------------------------------- rounds


def missing_rounds(recipe: Recipe) -> list[int]:
    """Rounds in evaluate.rounds whose generator (round k's finished dpo stage) does not exist."""
    return [k for k in sorted(set(recipe.evaluate.rounds))
            if not (runs.stage_dir(recipe, runs.trainer_stage(recipe), k) / STAGE_JSON).is_file()]


def check_rounds(recipe: Recipe, recipe_path: str = "<recipe>") -> list[int]:
    """The generators to evaluate, [0, *rounds]; an error saying which stage to run when one is missing."""
    missing = missing_rounds(recipe)
    if missing:
        have = [k for k in sorted(set(recipe.evaluate.rounds)) if k not in missing]
        todo = "; ".join(f"generator {k} needs `make round{k}` (its last stage: `python pipelines/dpo.py "
                         f"--recipe {recipe_path} --round {k}` -> {runs.generator_dir(recipe, k)})" for k in missing)
        alt = f"evaluate.rounds={have}" if have else "evaluate.rounds=[] is not allowed; run round 1 first"
        raise StageError(f"evaluate.rounds lists round(s) {missing} that {recipe.run_dir} does not have: {todo}. "
                         f"Run those first, or evaluate only what exists ({alt}).")
    return [0, *sorted(set(recipe.evaluate.rounds))]


# ----------------------------------------------------------------------------- rerankers


@dataclass(frozen=True)
class RerankJob:
    """One evaluation reranker: its sub-stage directory, the encode stage it reads (None: the base model), its
    backbone and seed."""
    out: Path
    knowledge: Path | None
    backbone: str
    seed: int


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def reranker_workers(recipe: Recipe, jobs: int) -> int:
    """How many evaluation rerankers train at once: evaluate.workers, or (0) as many as this process has CPU cores
    for at reranker.threads each; never more than there are rerankers."""
    n = recipe.evaluate.workers or usable_cores() // max(1, recipe.reranker.threads)
    return max(1, min(n, jobs))


def _train(recipe: Recipe, job: RerankJob, progress: bool = True) -> dict[str, float]:
    from rlrf.rerank_train import train_stage

    train_stage(recipe, job.out, job.knowledge, backbone=job.backbone, knowledge=job.knowledge is not None,
                seeds=[job.seed], history=recipe.evaluate.history, progress=progress)
    return read_test_metrics(job.out, job.seed)


def _die_with_parent() -> None:
    """A worker's first act: be stopped (SIGTERM) when the process that spawned it dies (Linux's PR_SET_PDEATHSIG),
    so that a kill -9 of make evaluate leaves no reranker training on, holding its sub-stage's lock against the
    rerun. Elsewhere a no-op: such a worker ends with its current reranker."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


def train_rerankers(recipe: Recipe, jobs: list[RerankJob], workers: int = 1) -> list[dict[str, float]]:
    """Each job's reranker trained (or found done) and its test metrics, in job order.

    The rerankers are tiny (one torch thread each barely waits on memory), so on a 2-core machine two of them in
    two processes train in about half the time of one after the other. With `workers` > 1 they train in that many
    spawned processes; each is its own resumable sub-stage with its own seed, so what one writes is what it would
    write alone (tests/test_evaluate.py compares), and a stop (even a kill -9 of this process) keeps the finished ones
    and stops the rest, which the next run redoes. A worker that dies (out of memory) stops the stage with the
    rerankers it was training."""
    from tqdm import tqdm

    if workers <= 1:
        return [_train(recipe, job) for job in tqdm(jobs, desc="evaluate: rerankers", unit="model")]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    results: dict[int, dict] = {}
    bar = tqdm(total=len(jobs), desc=f"evaluate: rerankers ({workers} at a time)", unit="model")
    # spawn, not fork: the parent has run torch (the sampler), and a forked copy of its thread pools can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent)
    try:
        running = {pool.submit(_train, recipe, job, False): i for i, job in enumerate(jobs)}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                i = running.pop(f)
                try:
                    results[i] = f.result()
                except BrokenProcessPool:
                    raise StageError(f"evaluate: a reranker worker process died (killed, or out of memory?) with "
                                     f"{jobs[i].out} unfinished. The finished rerankers are kept: rerun to go on, "
                                     f"with evaluate.workers=1 to train one at a time in this process.") from None
                bar.update()
    except BaseException:
        _stop(pool)  # a stop stops the workers too; their sub-stages resume on the next run
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        bar.close()
    return [results[i] for i in range(len(jobs))]


def _stop(pool, grace_s: float = 5.0) -> None:
    """Stop a process pool's workers now and give the pool up without waiting on its queues.

    `shutdown(wait=True)` after terminating workers can wait forever: an idle worker blocks in the call queue's get
    holding the queue's reader lock, and a worker killed there leaves the lock taken, so a surviving worker never reads
    its stop sentinel (seen: the fast tests hung in test_rerankers_in_worker_processes_... with one worker asleep on
    that lock). So: terminate every worker, drop the pool without waiting, then join each with a grace period and
    kill what is still alive."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:  # (shutdown has dropped the pool's own table of them)
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=grace_s)


# ----------------------------------------------------------------------------- tables (pure)


def read_test_metrics(train_dir: Path, seed: int) -> dict[str, float]:
    """One seed's test metrics (and its test list count) from a train-reranker stage's metrics.json."""
    path = Path(train_dir) / "metrics.json"
    m = json.loads(path.read_text())
    test = m.get("per_seed", {}).get(str(seed), {}).get("test")
    if not isinstance(test, dict) or "map@5" not in test:
        raise StageError(f"{path} has no test metrics for seed {seed} (seeds there: {sorted(m.get('per_seed', {}))}); "
                         f"rerun that train-reranker sub-stage with --force")
    out = {k: float(v) for k, v in test.items() if isinstance(v, (int, float))}
    if "test" in m.get("n_lists", {}):
        out["test_lists"] = float(m["n_lists"]["test"])
    return out


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """{metric: {mean, std (ddof=1; 0 for one seed), n, values}} over seeds."""
    out = {}
    for metric in (*METRICS, "test_lists"):
        vals = [float(s[metric]) for s in per_seed if metric in s]
        if vals:
            out[metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                           "n": len(vals), "values": vals}
    return out


def cell(s: dict | None) -> str:
    return "—" if not s else f"{s['mean']:.4f} ± {s['std']:.4f}"


def assemble_tables(conditions: dict, last: int) -> dict:
    """Table I, Table II and the per-round series from {backbone: {"base" | k: summarize(...)}}.

    `last` is the round whose generator is "RLRF"; generator 0's knowledge is KAR's (an untuned LLM)."""
    table1, table2, per_round, base = [], [], {}, {}
    for backbone, cond in conditions.items():
        name = backbone.upper()
        rows = [("base", "none", cond.get("base")), ("KAR", "original LLM (round 0)", cond.get(0)),
                ("RLRF", f"round {last} generator", cond.get(last))]
        table1 += [{"backbone": name, "method": m, "knowledge": kn, **(s or {})} for m, kn, s in rows]
        ablation = [("RLRF", f"full: round {last} generator's knowledge", cond.get(last)),
                    ("RLRF w/o knowledge", "= the base reranker, no profile", cond.get("base")),
                    ("RLRF w/o DPO", "= KAR: knowledge from the untuned LLM (round 0)", cond.get(0))]
        table2 += [{"backbone": name, "variant": v, "maps_to": how, **(s or {})} for v, how, s in ablation]
        per_round[backbone] = {k: s for k, s in cond.items() if k != "base"}
        if cond.get("base"):
            base[backbone] = cond["base"]
    return {"table1": table1, "table2": table2, "per_round": per_round, "base": base}


def markdown_table(rows: list[dict], keys: list[str], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) if k in METRICS else str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reward comparison (pure)


def paired_rewards(scores0: pl.DataFrame, scoresk: pl.DataFrame, split: str = "test") -> pl.DataFrame:
    """Per user of `split`: mean reward over their profiles under each generator (users both scored)."""
    on = pl.col("split") == split
    return (stats.paired(scores0.filter(on), scoresk.filter(on))
            .select("user_id", pl.col("old").alias("reward_0"), pl.col("new").alias("reward_k")))


def reward_summary(paired: pl.DataFrame, k: int, resamples: int, seed: int) -> dict:
    """Generator k against generator 0 on the paired users: the check's statistics (rlrf.stats) on test users."""
    r0, rk = paired["reward_0"].to_numpy(), paired["reward_k"].to_numpy()
    d = rk - r0
    if not len(d):
        nan = float("nan")
        return {"round": k, "users": 0, "mean_0": nan, "mean_k": nan, "mean_diff": nan, "ci95": [nan, nan],
                "verdict": "no test user scored under both generators", "share_improved": nan, "bootstrap": resamples}
    ci = stats.paired_bootstrap(d, resamples=resamples, seed=seed)
    return {"round": k, "users": len(d), "mean_0": float(r0.mean()), "mean_k": float(rk.mean()),
            "mean_diff": ci["mean"], "ci95": [ci["low"], ci["high"]], "verdict": stats.verdict(ci),
            "share_improved": float((d > 0).mean()), "bootstrap": resamples}


# ----------------------------------------------------------------------------- hardware


def hardware() -> dict:
    """The stage's machine record (rlrf.machine.machine) with the cores this process may use and the platform."""
    import torch  # noqa: F401  (machine() reports torch's threads and the GPU once torch is loaded)

    from rlrf.machine import machine

    cores = usable_cores()
    return {**machine(), "cores": cores, "platform": platform.platform()}


# ----------------------------------------------------------------------------- the stage


def _quality(recipe: Recipe, gen_dir: Path, profiles_dir: Path, items, interactions, load_model) -> tuple[dict, Path]:
    """Generator k's quality row and its per-profile figures (quality.profile_frame: what the paired intervals
    against generator 0 resample), cached in gen_<k>/quality.json and quality_profiles.parquet next to the profiles
    they describe."""
    from rlrf.quality import profile_quality

    path, frame_path = gen_dir / "quality.json", gen_dir / "quality_profiles.parquet"
    fp = read_stage_json(profiles_dir)["fingerprint"]
    if path.is_file() and frame_path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("profiles_fingerprint") == fp:
            return cached["quality"], frame_path
    profiles = read_artifact(profiles_dir, "profiles", "sample")
    q = profile_quality(profiles, items, interactions, ppl_model=load_model(), keep_rows=True)
    write_parquet(frame_path, q.pop("rows"))  # nll and tokens of the perplexity split's (test) users, NaN elsewhere
    write_json(path, {"profiles_fingerprint": fp, "quality": q})  # last: it marks both files done
    return q, frame_path


def quality_diff(old: pl.DataFrame, new: pl.DataFrame, resamples: int, seed: int) -> dict:
    """Generator k against generator 0, paired by user with bootstrap intervals (quality.paired_quality): distinct-2
    and the names-history share over every user's profiles, as the quality table counts them; the perplexity ratios
    over the test users', where the table measures perplexity."""
    from rlrf.quality import paired_quality

    cols = ["user_id", "text", "names_history"]
    out = paired_quality(old.select(cols), new.select(cols), resamples, seed)
    test = [df.filter((pl.col("split") == "test") & pl.col("nll").is_not_nan()).select("user_id", "nll", "tokens")
            for df in (old, new)]
    if test[0].height and test[1].height:
        out.update(paired_quality(*test, resamples, seed))
    return out


def evaluate_stage(recipe: Recipe, *, force: bool = False, recipe_path: str = "<recipe>") -> Path:
    """Run (or resume) every sub-stage, then write results.md / results.json / rounds.png / rewards.png."""
    gens = check_rounds(recipe, recipe_path)  # before anything heavy: a missing round is the common mistake
    decs = {k: runs.generator_decoding(recipe, k) for k in gens}  # sample.temperature_from_check: each its own
    temps = {k: d["temperature"] for k, d in decs.items()}

    from rlrf.encode import encode_stage
    from rlrf.llm import weights_hash
    from rlrf.plots import plot_rewards, plot_rounds
    from rlrf.sample import sample_stage
    from rlrf.score import score_stage

    last = gens[-1]
    ev = recipe.evaluate
    out = recipe.run_dir / "evaluate"
    prep = runs.prepare_dir(recipe)
    reward_reranker = runs.reranker_dir(recipe, last)  # what generator `last` was tuned against
    # a round redone with the same config writes new weights under the same fingerprint: hash them too,
    # so finished results are never reported for a generator that has since changed
    hashes = {str(k): weights_hash(runs.generator_dir(recipe, k)) for k in gens[1:]}
    inputs = [prep, *(runs.stage_dir(recipe, runs.trainer_stage(recipe), k) for k in gens[1:]), reward_reranker]
    extra = {"generator_hashes": hashes}
    if any(t != recipe.sample.temperature for t in temps.values()):
        extra["generator_temperatures"] = {str(k): t for k, t in temps.items()}
    if any(d["top_p"] != recipe.sample.top_p or d["min_p"] != recipe.sample.min_p for d in decs.values()):
        extra["generator_decoding"] = {str(k): d for k, d in decs.items()}
    with runs.STAGES["evaluate"].open(recipe, out, inputs=inputs, extra=extra, force=force) as st:
        if st.done:
            return out
        items, interactions = read_artifact(prep, "items", "prepare"), read_artifact(prep, "interactions", "prepare")

        profiles, encoded = {}, {}
        for k in gens:
            g = out / f"gen_{k}"
            profiles[k] = Path(sample_stage(runs.with_decoding(recipe, **decs[k]), g / "sample",
                                            runs.generator(recipe, k), seed_round(recipe),
                                            splits=["train", "valid", "test"], n=ev.n, max_users=ev.max_users,
                                            batch_size=ev.batch_size, source=sources(recipe)))
            encoded[k] = Path(encode_stage(recipe, profiles[k], g / "encode"))

        jobs = [(b, c, s) for b in ev.backbones for c in ["base", *gens] for s in ev.seeds]
        work = [RerankJob(out / "rerank" / b / ("base" if c == "base" else f"gen_{c}") / f"seed_{s}",
                          None if c == "base" else encoded[c], b, s) for b, c, s in jobs]
        workers = reranker_workers(recipe, len(work))
        st.log(f"evaluate: {len(work)} rerankers, {workers} at a time (evaluate.workers), "
               f"{recipe.reranker.threads} torch thread(s) each")
        per_seed: dict = {}
        for (b, c, s), metrics in zip(jobs, train_rerankers(recipe, work, workers)):
            per_seed.setdefault(b, {}).setdefault(c, []).append(metrics)
        conditions = {b: {c: summarize(v) for c, v in conds.items()} for b, conds in per_seed.items()}
        tables = assemble_tables(conditions, last)
        plot_rounds(tables["per_round"], tables["base"], out / "rounds.png")

        scores = {}
        for k in sorted({0, last}):
            sdir = score_stage(recipe, profiles[k], encoded[k], reward_reranker, out / "reward" / f"gen_{k}",
                               splits=["test"])
            scores[k] = read_artifact(sdir, "scores", "score")
        paired = paired_rewards(scores[0], scores[last])
        reward = {"reranker": str(reward_reranker), "metric": recipe.score.metric,
                  **reward_summary(paired, last, recipe.rounds.bootstrap, recipe.seed)}
        if paired.height:
            ci = tuple(reward["ci95"])
            plot_rewards(paired["reward_0"].to_numpy(), paired["reward_k"].to_numpy(), last, ci,
                         recipe.score.metric, out / "rewards.png")

        model = []  # the base model, loaded once and only if some quality row is not cached

        def load_model():
            if not model:
                from rlrf.llm import load_generator
                model.append(load_generator(recipe.sample.model))
            return model[0]

        quality, frames = {}, {}
        for k in gens:
            quality[k], frames[k] = _quality(recipe, out / f"gen_{k}", profiles[k], items, interactions, load_model)
        frames = {k: pl.read_parquet(p) for k, p in frames.items()}
        diffs = {k: quality_diff(frames[0], frames[k], recipe.rounds.bootstrap, recipe.seed + k) for k in gens[1:]}

        hw = hardware()
        results = {"run": recipe.run, "recipe": recipe_path, "hardware": hw, "generators": {k: runs.generator(recipe, k) for k in gens},
                   "temperatures": temps,
                   "rlrf_round": last, "conditions": conditions, **tables, "reward": reward, "quality": quality,
                   "quality_diff": diffs}
        results = _str_keys(results)  # json wants string keys; generator k becomes "k"
        write_json(out / "results.json", results)
        (out / "results.md").write_text(results_markdown(results, recipe))
        st.finish(extra={"hardware": hw, "recipe": recipe_path, "results": str(out / "results.md")},
                  rows={"rerankers": len(jobs), "generators": len(gens), "reward_users": paired.height})
    return out


def list_counts_note(conditions: dict) -> str:
    """Rows are comparable only if every reranker was scored on the same test lists; say so either way.

    (A knowledge reranker drops the lists of users without a profile, e.g. under evaluate.max_users.)"""
    counts = {(b, str(c)): int(s["test_lists"]["mean"]) for b, conds in conditions.items()
              for c, s in conds.items() if "test_lists" in s}
    if not counts:
        return "Test list counts were not reported by the train-reranker stage."
    if len(set(counts.values())) == 1:
        return f"Every reranker above was scored on the same {next(iter(counts.values()))} test lists."
    detail = ", ".join(f"{b.upper()} {c}: {n}" for (b, c), n in sorted(counts.items()))
    return (f"**Warning: the rerankers were scored on different numbers of test lists ({detail}), so rows are not "
            f"strictly comparable.** Knowledge rerankers drop lists of users without a profile; set "
            f"evaluate.max_users=-1 so every user has one.")


def _str_keys(obj):
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def results_markdown(res: dict, recipe: Recipe) -> str:
    """results.md: both tables (with how each ablation row maps), the figures, reward and quality."""
    hw, last, ev = res["hardware"], res["rlrf_round"], recipe.evaluate
    m_cols = list(TABLE_METRICS)
    heads = [m.upper() for m in m_cols]
    gpu = f", GPU {hw['gpu']}" if hw.get("gpu") else ", no GPU"
    lines = [
        f"# Results: run `{res['run']}`",
        "",
        f"Recipe `{res['recipe']}`; {hw['cpu']} ({hw['cores']} cores, {hw['torch_threads']} torch threads){gpu}.",
        f"Test users; every reranker early-stopped on valid users. Mean ± std (ddof=1) over seeds {ev.seeds}; "
        f"{ev.n} profile(s) per user per generator, same seeds and decoding for every generator"
        + (". " if len(set((res.get("temperatures") or {}).values())) <= 1 else
           " but the temperature, each generator's own (sample.temperature_from_check): "
           + ", ".join(f"generator {k} {t:g}" for k, t in res["temperatures"].items()) + ". ")
        + f"RLRF = generator of round {last}. "
        + (f"Every reranker (base and knowledge alike) also reads the user's last {ev.history} prompt-history "
           f"items (evaluate.history)." if ev.history else "The rerankers see no user history (evaluate.history=0)."),
        "",
        "## Table I: reranking with and without LLM knowledge",
        "",
        markdown_table(res["table1"], ["backbone", "method", "knowledge", *m_cols], ["backbone", "method", "knowledge", *heads]),
        "",
        "## Table II: ablation",
        "",
        markdown_table(res["table2"], ["backbone", "variant", "maps_to", *m_cols], ["backbone", "variant", "how it is measured", *heads]),
        "",
        "## Per round (Figure 4 analogue)",
        "",
        "![per round](rounds.png)",
        "",
    ]
    rows = [{"backbone": b.upper(), "generator": "original" if int(k) == 0 else f"round {k}", **s}
            for b, per in res["per_round"].items() for k, s in sorted(per.items(), key=lambda x: int(x[0]))]
    lines += [markdown_table(rows, ["backbone", "generator", *m_cols], ["backbone", "generator", *heads]), ""]
    lines += [list_counts_note(res["conditions"]), ""]
    r = res["reward"]
    lines += [
        f"## Reward of original vs round-{last} profiles on test users",
        "",
        f"Scored by the reward reranker `{r['reranker']}` ({r['metric']}), {r['users']} test users, "
        f"per-user mean over their profiles.",
        "",
        f"- original: {r['mean_0']:.4f}; round {last}: {r['mean_k']:.4f}",
        f"- paired difference: {r['mean_diff']:+.4f}, bootstrap 95% interval [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] "
        f"({r['bootstrap']} resamples); users improved: {r['share_improved']:.1%}",
        f"- verdict: {r['verdict']}",
        "",
        "![rewards](rewards.png)",
        "",
        "## Profile quality",
        "",
        "distinct-2: distinct word bigrams / all bigrams over the generator's profiles. names history: share of "
        "profiles naming at least one title or genre from the user's prompt history. perplexity: of the profile "
        "text alone under the base model, on test users.",
        "",
        "| generator | profiles | mean tokens | mean words | distinct-2 | names history | truncated | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, q in sorted(res["quality"].items(), key=lambda x: int(x[0])):
        name = "original" if int(k) == 0 else f"round {k}"
        ppl = f"{q['perplexity']:.2f}" if "perplexity" in q else "—"
        lines.append(f"| {name} | {q['profiles']} | {q['mean_tokens']:.1f} | {q['mean_words']:.1f} | "
                     f"{q['distinct_2']:.3f} | {q['names_history']:.1%} | {q['share_truncated']:.1%} | {ppl} |")
    for k, diff in sorted(res.get("quality_diff", {}).items(), key=lambda x: int(x[0])):
        lines += ["", f"Round {k} (new) against the original (old), paired by user (95% bootstrap interval):", ""]
        lines += [f"- {x}" for x in criteria_lines(diff)]
    return "\n".join(lines) + "\n"
