"""The sample stage: N preference profiles per user from the round's generator.

For every user of the chosen splits: the KAR prompt from prepare (history trimmed oldest-first until
the chat-templated prompt fits sample.max_prompt_tokens), then N samples with temperature / top_p / min_p /
max_new_tokens. Sample j of user u in round k is drawn with seed `user_seed(seed, u, k) + j`, from
nothing else: a rerun, a resumed run, a `--shard i/n` slice, or another generator sampled with the
same round argument (the is-it-learning check) all use the same seeds.

Users, in id order, are cut into at most sample.shards contiguous shards (the unit of resume) of whole
generate batches (batch_size // n users each), so no shard ends in a small batch that decodes at a third
of the speed; with sample.item_knowledge one more shard holds the LLM's KAR item texts (`item_knowledge`
artifact). Empty and length-limited profiles are kept and marked (finish_reason eos | length);
stage.json counts them, and the trimmed history lines.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from rlrf import prompts as kar, runs, schema
from rlrf.artifacts import read_artifact, read_json
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.files import write_json
from rlrf.generate import Sampling, open_backend
from rlrf.llm import resolve_model, weights_hash
from rlrf.memory import trim_freed_memory
from rlrf.store import Stage, parse_shard


def user_seed(seed: int, user_id: int, round: int, kind: str = "user") -> int:
    """Base seed of a user's samples (sample j uses base + j); 60 bits so base + j stays an int64."""
    h = hashlib.sha256(f"{kind}:{seed}:{user_id}:{round}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 4


def select_users(prompts: pl.DataFrame, splits: list[str], max_users: int, seed: int, skip: int = 0) -> pl.DataFrame:
    """Prompts of the chosen splits; with max_users > 0, that many per split from a seeded shuffle.

    The shuffle depends on the run seed only (not the round), so every round samples the same users. `skip` > 0
    leaves out the shuffle's first `skip` users of each split, those a draw of max_users=skip took: users
    disjoint from the round's own (check.match_distinct's calibration users).
    """
    out = []
    for split in splits:
        part = prompts.filter(pl.col("split") == split).sort("user_id")
        if skip > 0 or 0 < max_users < part.height:
            rng = np.random.default_rng([seed, 7, schema.SPLITS.index(split)])
            order = rng.permutation(part.height)[skip:]
            part = part[sorted((order[:max_users] if max_users > 0 else order).tolist())]
        out.append(part)
    return pl.concat(out).sort("user_id") if out else prompts.head(0)


def user_shards(user_ids: list[int], per_batch: int, max_shards: int) -> list[list[int]]:
    """`user_ids` cut into at most `max_shards` contiguous shards of whole batches of `per_batch` users.

    Every shard but the last holds a multiple of per_batch users: a shard is generated batch by batch, and a
    small batch decodes at a fraction of a full one's tokens/s, so cutting users `user_id % shards` left one slow
    tail batch per shard."""
    size = per_batch * max(1, math.ceil(len(user_ids) / (per_batch * max(1, max_shards))))
    return [user_ids[i:i + size] for i in range(0, len(user_ids), size)]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids)


_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]*]*)(?=\s|$)|\n")


def trim_to_sentence(text: str) -> str | None:
    """`text` cut back to the end of its last complete sentence (., !, ? or a line break); None when it holds
    no sentence end, or the cut would keep less than half of it (one long run-on sentence: kept as it is)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < len(text) // 2:
        return None
    return text[:ends[-1]].rstrip()


def fit_prompt(tokenizer, head: str, lines: list[str], tail: str, budget: int) -> tuple[str, list[int], int]:
    """(prompt, chat token ids, lines dropped): drop the oldest history lines until it fits `budget`.

    Binary search on the number dropped (the length only shrinks as lines go). If even an empty history
    does not fit, the prompt keeps no history and goes over budget (the caller counts it).
    """
    full = kar.join_prompt(head, lines, tail)
    ids = chat_ids(tokenizer, full)
    if len(ids) <= budget:
        return full, ids, 0
    lo, hi = 1, len(lines)  # answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if len(chat_ids(tokenizer, kar.join_prompt(head, lines[mid:], tail))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    text = kar.join_prompt(head, lines[lo:], tail)
    return text, chat_ids(tokenizer, text), lo


def bench_prompts(recipe: Recipe, tokenizer, splits: list[str], users: int, round: int = 1
                  ) -> tuple[list[list[int]], list[int]]:
    """The first `users` users of these splits (every user of them, in the recipe's seeded order): their prompts'
    token ids as the sample stage fits them and their round's seeds, for benchmarks that time the stage's sampling."""
    from rlrf.prepare import prepare_stage

    cfg = recipe.sample
    prepare_stage(recipe)
    part = select_users(read_artifact(runs.prepare_dir(recipe), "prompts", "prepare"), splits, -1, recipe.seed)
    part = part.head(users)
    ids = [fit_prompt(tokenizer, r["prompt_head"], r["history_lines"], r["prompt_tail"], cfg.max_prompt_tokens)[1]
           for r in part.iter_rows(named=True)]
    return ids, [user_seed(recipe.seed, u, round) for u in part["user_id"]]


def _sample_config(recipe: Recipe, splits=None, n=None, max_users=None, batch_size=None):
    """recipe.sample with the stage's per-call overrides (None keeps the recipe's value)."""
    return dataclasses.replace(recipe.sample, **{k: v for k, v in
                                                 {"splits": splits, "n": n, "max_users": max_users,
                                                  "batch_size": batch_size}.items() if v is not None})


def _stage_config(recipe: Recipe, cfg, generator: str, round: int, ghash: str, arith: dict | None = None) -> dict:
    """The sample stage's fingerprinted config: what decides which text each (user, sample_idx) gets, plus layout.

    Sampling in fp32 on a CPU adds `fp32_rows: padded`: since 2026-12-06 its decode steps run at a row count whose
    rounding does not depend on the neighbours (rlrf.generate.row_padding), which changed some of the texts an fp32
    sample drew before, so such a stage made before is redone; bf16 samples drew the same texts and keep theirs."""
    arith = arith or arithmetic(cfg)
    marks = {"fp32_rows": "padded"} if arith["backend"] == "hf" and "cpu" in arith and arith["dtype"] == "float32" else {}
    return runs.STAGES["sample"].config(recipe, {"sample": cfg}, run=recipe.run, round=round,
                                        generator=str(generator), generator_hash=ghash, **marks)


def sample_stage(recipe: Recipe, out_dir: str | Path, generator: str, round: int, *, splits=None, n=None,
                 max_users=None, batch_size=None, force: bool = False, shard=None,
                 source: str | Path | list[str | Path] | None = None, skip_users: int = 0) -> Path:
    """Write the `profiles` artifact (N per user) for `generator` into out_dir; returns out_dir.

    `source`, one finished sample stage or a list of them, is where texts are taken from instead of sampled
    (`from_sources`): every user that one of them holds with the same seeds, generator, decoding and arithmetic.
    The stage's config, hence its fingerprint, is the same either way, because the texts are. When the sources
    hold every user, the stage is one shard of taken texts; otherwise the taken users are shard 0 (their ids kept
    in `taken.json`, so a resume cuts the rest the same way whatever the sources hold by then) and the rest are
    sampled in shards after it. `skip_users` > 0 samples the users after the first `skip_users` of each split's
    seeded draw (select_users), recorded in the fingerprint."""
    cfg = _sample_config(recipe, splits, n, max_users, batch_size)
    out_dir = Path(out_dir)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    prep = runs.prepare_dir(recipe)
    model_dir = resolve_model(generator)  # an unknown model fails here, before any work
    ghash = weights_hash(model_dir)
    arith = arithmetic(cfg)
    config = _stage_config(recipe, cfg, generator, round, ghash, arith)
    if skip_users:
        config["skip_users"] = skip_users
    with Stage(out_dir, runs.STAGES["sample"].name, config, inputs=[prep], force=force, shard=shard,
               summary=_line, arithmetic=arith) as st:
        if st.done:
            return out_dir
        prompts = read_artifact(prep, "prompts", "prepare")
        users = select_users(prompts, cfg.splits, cfg.max_users, recipe.seed, skip=skip_users)
        if users.height == 0:
            raise StageError(f"sample: no users in splits {cfg.splits} of {prep} (sample.splits); "
                             f"check the prepare stage's output")
        sources = [] if source is None else [source] if isinstance(source, (str, Path)) else list(source)
        taken, reused = None, None
        if sources and shard is None:
            taken, reused = _taken(st, out_dir, recipe, sources, users, cfg, config)
        if taken is not None and len(reused["users"]) == users.height:  # the sources hold every user: no sampling
            for i in st.todo(1):
                st.write_shard(i, {"profiles": taken})
            st.finish(extra={**_summary(taken, cfg), "taken_from": ", ".join(reused["from"])})
            return out_dir
        first = 1 if reused else 0  # shard 0: the taken users
        rest = users.filter(~pl.col("user_id").is_in(reused["users"])) if reused else users
        chunks = user_shards(rest["user_id"].to_list(), max(1, cfg.batch_size // cfg.n), cfg.shards)
        n_shards = first + len(chunks) + (1 if cfg.item_knowledge else 0)
        todo = st.todo(n_shards)
        if first and 0 in todo:
            if taken is None:
                taken, _ = from_sources(recipe, sources, users.filter(pl.col("user_id").is_in(reused["users"])),
                                        cfg, config)
            if taken.select("user_id").n_unique() != len(reused["users"]):
                raise StageError(f"{out_dir / TAKEN} lists {len(reused['users'])} users to take from "
                                 f"{reused['from']}, which no longer hold them all; rerun with --force")
            st.write_shard(0, {"profiles": taken})
        todo = [i for i in todo if i >= first]
        if todo and cfg.backend == "hf":
            _check_memory(model_dir, cfg, st.log)
        backend = open_backend(cfg.backend, str(model_dir), cfg.dtype, cfg.batch_size, cfg.threads,
                               pad_to=cfg.max_prompt_tokens) if todo else None
        meta = dict(run=recipe.run, round=round, generator=str(generator), generator_hash=ghash)
        for i in todo:
            if i == first + len(chunks):
                st.write_shard(i, {"item_knowledge": _item_knowledge(backend, prep, prompts, cfg, recipe.seed, meta)})
            else:
                part = rest.filter(pl.col("user_id").is_in(chunks[i - first]))
                desc = f"sample shard {i + 1 - first}/{len(chunks)}"
                st.write_shard(i, {"profiles": _profiles(backend, part, cfg, recipe.seed, meta, desc)})
                trim_freed_memory()
        extra = None
        if _all_done(st, n_shards):
            extra = {**_summary(st.written("profiles"), cfg),
                     **({"reused": {"users": len(reused["users"]), "from": reused["from"]}} if reused else {})}
        st.finish(extra=extra)
    if backend is not None:
        # the model and its KV caches go back to the system, not to the heap's free lists: a process that runs
        # several sample stages (the check's calibration runs five) otherwise climbs ~0.4 GB a stage
        del backend
        gc.collect()
        trim_freed_memory()
    return out_dir


TAKEN = "taken.json"


def arithmetic(cfg) -> dict:
    """What decides a sampled text's floats beyond the stage's config: the device (the CPU model and its dtype flags,
    or the GPU) and the dtype `sample.dtype` resolves to there. A bf16 sample and an fp32 one of the same recipe
    share a fingerprint and differ in nearly every text; the store refuses to resume one with the other
    (rlrf.store.Stage `arithmetic`), and stage.json records it."""
    import torch

    from rlrf.llm import pick_dtype
    from rlrf.machine import machine

    if torch.cuda.is_available():
        device = {"gpu": torch.cuda.get_device_name(0)}
    else:
        here = machine()
        device = {"cpu": here["cpu"], "cpu_flags": here["cpu_flags"]}
    dtype = str(pick_dtype(cfg.dtype)).removeprefix("torch.") if cfg.backend == "hf" else cfg.dtype
    return {**device, "backend": cfg.backend, "dtype": dtype}


def _taken(st: Stage, out_dir: Path, recipe: Recipe, sources: list, users: pl.DataFrame, cfg,
           config: dict) -> tuple[pl.DataFrame | None, dict | None]:
    """(the profiles taken from the sources, {"users": their ids, "from": the sources used}); (None, None) when
    nothing is taken, and (None, what was taken) on a resume.

    Decided once, before the first shard, and kept in taken.json: a resume reads which users were taken instead of
    asking the sources again (a source finished in between would otherwise cut the rest into other shards)."""
    path = out_dir / TAKEN
    if st.done_shards():
        return None, (read_json(path) if path.is_file() else None)
    taken, used = from_sources(recipe, sources, users, cfg, config)
    if taken.is_empty():
        path.unlink(missing_ok=True)
        return None, None
    reused = {"users": taken["user_id"].unique().sort().to_list(), "from": used}
    write_json(path, reused)
    return taken, reused


def _line(info: dict) -> str:
    c = info["config"]
    where = (f"taken from {info['taken_from']} (same seeds)" if "taken_from" in info else
             f"finish eos={info['finish_reason'].get('eos', 0)} length={info['finish_reason'].get('length', 0)} "
             f"sentence={info['finish_reason'].get('sentence', 0)} empty={info['empty_text']} | history trimmed for "
             f"{info['users_history_trimmed']} users ({info['history_lines_trimmed']} lines)")
    if "reused" in info:
        where = (f"{info['reused']['users']} users' profiles taken from {', '.join(info['reused']['from'])} (same "
                 f"seeds), the rest sampled | {where}")
    t, m = (c.get("sample") or {}).get("temperature"), (c.get("sample") or {}).get("min_p")
    at = (f" at T={t:g}" if t is not None else "") + (f" min_p={m:g}" if m else "")
    return f"round {c['round']}: {info['users']} users from {c['generator']}{at} | {where}"


# what only changes how a sample stage is cut into work, never which text a (user, sample_idx) gets
_LAYOUT_KEYS = ("splits", "n", "max_users", "shards", "batch_size")


def from_source(recipe: Recipe, src: str | Path, users: pl.DataFrame, cfg, want: dict) -> pl.DataFrame | None:
    """The profiles a sample stage of config `want` would sample for `users`, taken from the finished sample stage
    `src` when it holds them all (`from_sources`); None when it cannot serve them all (the caller samples instead).

    The is-it-learning check uses it: its "old" side (generator k-1 on valid users, round k's seeds) is a subset of
    round k's own sample stage, which saves sampling it a second time."""
    taken, _ = from_sources(recipe, [src], users, cfg, want)
    return taken if taken.height == users.height * cfg.n else None


def from_sources(recipe: Recipe, sources: list, users: pl.DataFrame, cfg, want: dict) -> tuple[pl.DataFrame, list[str]]:
    """The profiles a sample stage of config `want` would sample for those of `users` that a finished sample stage
    among `sources` holds with at least cfg.n profiles (the first source that holds a user serves it), and the
    sources used. A source serves when it has the same seed, run, round, generator weights and decoding, and ran on
    the same arithmetic (`arithmetic`: the same CPU model and flags, or GPU, and dtype). A text's
    seed is (run seed, user, round, sample_idx), never the batch or the other users, and each prompt is prefilled
    alone (rlrf.generate), so what is taken is what sampling would write."""
    from rlrf.machine import machine

    strip = lambda d: {k: v for k, v in d.items() if k not in _LAYOUT_KEYS}  # noqa: E731
    here, mine = machine(), arithmetic(cfg)
    frames, used, left = [], [], users.select("user_id")
    for src in map(Path, sources):
        if left.is_empty() or not (src / "stage.json").is_file():
            continue
        info = json.loads((src / "stage.json").read_text())
        have, ran = info.get("config", {}), info.get("machine", {})
        same_arithmetic = (info["arithmetic"] == mine if "arithmetic" in info else  # before it was kept
                           all(ran.get(k) == here.get(k) for k in ("cpu", "cpu_flags")) and ran.get("gpu") == here.get("gpu"))
        same = (all(have.get(k) == want.get(k) for k in ("seed", "run", "round", "generator_hash", "fp32_rows"))
                and strip(have.get("sample", {})) == strip(want["sample"]) and not cfg.item_knowledge
                and int(have["sample"].get("n", 0)) >= cfg.n and same_arithmetic)
        if not same:
            continue
        got = (read_artifact(src, "profiles", "sample")
               .filter(pl.col("user_id").is_in(left["user_id"].implode()) & (pl.col("sample_idx") < cfg.n)))
        whole = got.group_by("user_id").len().filter(pl.col("len") == cfg.n)["user_id"]
        if whole.len():
            frames.append(got.filter(pl.col("user_id").is_in(whole.implode())))
            used.append(str(src))
            left = left.filter(~pl.col("user_id").is_in(whole.implode()))
    taken = pl.concat(frames).sort("user_id", "sample_idx") if frames else schema.empty("profiles")
    return taken, used


def _all_done(st: Stage, n_shards: int) -> bool:
    return all(st.shard_done(s) for s in range(n_shards))


def _profiles(backend, part: pl.DataFrame, cfg, seed: int, meta: dict, desc: str) -> pl.DataFrame:
    tok = backend.tokenizer
    fitted = [fit_prompt(tok, r["prompt_head"], r["history_lines"], r["prompt_tail"], cfg.max_prompt_tokens)
              for r in part.iter_rows(named=True)]
    uids = part["user_id"].to_list()
    seeds = [user_seed(seed, u, meta["round"]) for u in uids]
    sp = Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                  min_new_tokens=cfg.min_new_tokens, min_p=cfg.min_p)
    comps = _run(backend, [f[1] for f in fitted], seeds, sp, desc, unit="user")
    rows = []
    for r, (text, ids, trimmed), base, cs in zip(part.iter_rows(named=True), fitted, seeds, comps):
        over = len(ids) > cfg.max_prompt_tokens
        for j, c in enumerate(cs):
            out, finish = c.text, c.finish_reason
            if cfg.trim == "sentence" and finish == "length":
                cut = trim_to_sentence(out)
                if cut is not None:
                    out, finish = cut, "sentence"
            rows.append(dict(meta, split=r["split"], user_id=r["user_id"], sample_idx=j, prompt=text, text=out,
                             n_tokens=c.n_tokens, finish_reason=finish, n_history_trimmed=trimmed,
                             prompt_over_budget=over, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, seed=base + j))
    cols = {**schema.SCHEMAS["profiles"], "prompt_over_budget": pl.Boolean}
    return pl.DataFrame(rows, schema=cols).select(list(cols))


def _item_knowledge(backend, prep: Path, prompts: pl.DataFrame, cfg, seed: int, meta: dict) -> pl.DataFrame:
    """KAR's factual item knowledge: one LLM answer to the item prompt per item."""
    items = read_artifact(prep, "items", "prepare").sort("item_id")
    domain = prompts["domain"][0] if prompts.height else "movies"
    texts = [kar.item_prompt(t, domain, y) for t, y in zip(items["title"], items["year"])]
    ids = [chat_ids(backend.tokenizer, t) for t in texts]
    seeds = [user_seed(seed, i, meta["round"], kind="item") for i in items["item_id"]]
    sp = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                  min_p=cfg.min_p)
    comps = _run(backend, ids, seeds, sp, "item knowledge", unit="item")
    return pl.DataFrame({
        "item_id": items["item_id"], "prompt": texts, "text": [c[0].text for c in comps],
        "n_tokens": [c[0].n_tokens for c in comps], "finish_reason": [c[0].finish_reason for c in comps],
        "round": [meta["round"]] * len(texts), "generator": [meta["generator"]] * len(texts),
        "generator_hash": [meta["generator_hash"]] * len(texts), "seed": seeds,
    }, schema=schema.SCHEMAS["item_knowledge"])


def _run(backend, prompt_ids, seeds, sp, desc: str, unit: str):
    """backend.generate with a progress bar of prompts done and tokens/s."""
    t0, tokens = time.time(), [0]
    with tqdm(total=len(prompt_ids), desc=desc, unit=unit, leave=False) as bar:
        def progress(done: int, new_tokens: int) -> None:
            tokens[0] += new_tokens
            bar.update(done)
            bar.set_postfix(tok_s=f"{tokens[0] / max(time.time() - t0, 1e-9):.0f}")

        return backend.generate(prompt_ids, seeds, sp, progress=progress)


def _check_memory(model_dir: Path, cfg, log) -> None:
    """Refuse (or warn) before loading the model when a generate batch cannot fit (rlrf.memory)."""
    import torch

    from rlrf.llm import pick_dtype
    from rlrf.memory import Shape, preflight, sample_peak_mb

    if torch.cuda.is_available():  # GPU memory is another budget; CUDA says so itself
        return
    need = sample_peak_mb(Shape.from_dir(model_dir), batch_size=cfg.batch_size, n=cfg.n,
                          prompt_tokens=cfg.max_prompt_tokens, new_tokens=cfg.max_new_tokens,
                          bytes_per=pick_dtype(cfg.dtype).itemsize)
    preflight("sample", need, "sample.batch_size (rows per generate batch) or sample.max_prompt_tokens", log)


def _summary(df: pl.DataFrame | None, cfg) -> dict:
    """Counts over every shard's profiles (not just this process's), for stage.json and the summary line."""
    df = schema.empty("profiles") if df is None else df
    per_user = df.filter(pl.col("sample_idx") == 0)
    return {
        "users": per_user.height,
        "finish_reason": dict(zip(*df["finish_reason"].value_counts().sort("finish_reason")
                                  .to_dict(as_series=False).values())) if df.height else {},
        "empty_text": int((df["text"].str.strip_chars() == "").sum()),
        "users_history_trimmed": int((per_user["n_history_trimmed"] > 0).sum()),
        "history_lines_trimmed": int(per_user["n_history_trimmed"].sum()),
        "prompts_over_budget": int(per_user["prompt_over_budget"].sum()) if "prompt_over_budget" in df.columns else 0,
        "mean_n_tokens": round(float(df["n_tokens"].mean()), 1) if df.height else 0.0,
        "n": cfg.n, "max_new_tokens": cfg.max_new_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
    }
