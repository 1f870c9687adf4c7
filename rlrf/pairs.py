"""Preference pairs: per user, the best and the worst of the N scored profiles become (chosen, rejected).

The `pairs` artifact is TRL's conversational preference format (`prompt` = the sample stage's user
message as chat messages, `chosen` / `rejected` = one assistant message each) plus bookkeeping, so
`datasets.load_dataset("parquet", data_files=...)` hands DPOTrainer a dataset it takes as it is.
The LLaMA-Factory export is the same pairs in its sharegpt ranking format with a dataset_info.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.errors import StageError
from rlrf.files import write_json
from rlrf.quality import (bigram_overlap, catalogue_genres, distinct_n, genres_named, names_genre, padded, swap_genres,
                          typicality)
from rlrf.schema import SCHEMAS

LLAMAFACTORY_DIR = "llamafactory"


def dataset_name(round: int) -> str:
    """The LLaMA-Factory dataset name of round k's pairs (the key in dataset_info.json)."""
    return f"rlrf_pairs_round{round}"


def select_pairs(scores: pl.DataFrame, min_margin: float = 0.0, length_tolerance: int = -1,
                 ended_only: bool = False, typicality_tolerance: float = -1.0,
                 agree_with: tuple[str, ...] = (), min_overlap: float = 0.0,
                 typicality_band: float = -1.0, genres_tolerance: int = -1, diverse: str = "",
                 diverse_pool: float = 0.5) -> tuple[pl.DataFrame, Counter]:
    """Best and worst profile per user from a scores frame (user_id, sample_idx, reward, empty_text; plus
    n_tokens with `length_tolerance`, finish_reason with `ended_only`, typicality with `typicality_tolerance` or
    `typicality_band`, each column named in `agree_with`, text with `min_overlap`).

    Returns one row per kept user (user_id, chosen_idx, rejected_idx, chosen_reward, rejected_reward,
    margin) and the users dropped by reason. Empty profiles are left out before picking (an empty
    completion teaches DPO nothing about profiles), so are profiles the reward could not judge (NaN: a user with
    no held-out positives), and with `ended_only` so are profiles cut at the token
    limit (finish_reason "length"). With `length_tolerance` >= 0 the pair is the largest-margin one whose two
    profiles differ by at most that many tokens, so a reward that grows with length cannot teach DPO "longer".
    With `typicality_tolerance` >= 0 the chosen profile is at most that much more typical than the rejected one
    (`rlrf.quality.typicality`), so a reward that pays for what every user's profile says cannot teach DPO to
    write alike for everyone. With `agree_with` (other judges' columns) the pair is the largest-margin one that none
    of those judges ranks the other way (chosen below rejected; a judge that ties or cannot judge does not veto):
    what the reward prefers and another judge contradicts is left out of what DPO learns. Equal rewards resolve to
    the lowest sample_idx for both picks, so the choice is deterministic. With `min_overlap` > 0 the two profiles
    share at least that share of their word bigrams (`rlrf.quality.bigram_overlap`, Jaccard): minimal pairs, which
    differ in what they say of the user and not in template, so DPO cannot learn a template from them. With
    `typicality_band` >= 0 (pairs.typicality_band) the two profiles' typicality differs by at most that much either
    way. With `genres_tolerance` >= 0 (column genres_named) the two profiles name as many of the catalogue's genres
    give or take that many, so a reward that pays for naming more genres cannot teach DPO "name more genres".
    With `diverse` (a column, higher = more diverse) the pair is DivPO's (Lanchantin et al., 2025): the chosen profile
    among the user's floor(diverse_pool x n) best-rewarded ones (at least one), the rejected among as many
    worst-rewarded, the allowed pair with the largest diversity lead of chosen over rejected, then the largest margin.
    """
    dropped: Counter = Counter()
    n_empty = int(scores["empty_text"].sum())
    if n_empty:
        dropped["empty_profile"] += n_empty
    live = scores.filter(~pl.col("empty_text"))
    unjudged = live["reward"].is_nan() | live["reward"].is_null()  # e.g. a user with no held-out positives
    dropped["no_reward"] += int(unjudged.sum())
    live = live.filter(~unjudged)
    if ended_only:
        cut = live["finish_reason"] == "length"
        dropped["cut_at_limit"] += int(cut.sum())
        live = live.filter(~cut)
    counts = live.group_by("user_id").len()
    typical = typicality_tolerance >= 0 or typicality_band >= 0
    if length_tolerance >= 0 or typical or agree_with or min_overlap > 0 or genres_tolerance >= 0 or diverse:
        cols = (["n_tokens"] * (length_tolerance >= 0) + ["typicality"] * typical + list(agree_with)
                + ["text"] * (min_overlap > 0) + ["genres_named"] * (genres_tolerance >= 0))
        cols += [diverse] * bool(diverse and diverse not in cols)
        side = live.select("user_id", "sample_idx", "reward", *cols)
        allowed = pl.col("sample_idx") != pl.col("sample_idx_r")
        if diverse:  # each profile's reward rank within its user (0 = best) and the size of each pool
            side = side.with_columns(
                rank=pl.struct(pl.col("reward").neg(), "sample_idx").rank("ordinal").over("user_id") - 1,
                pool=(pl.len().over("user_id") * diverse_pool).floor().clip(lower_bound=1).cast(pl.Int64),
                n=pl.len().over("user_id"))
            allowed &= (pl.col("rank") < pl.col("pool")) & (pl.col("rank_r") >= pl.col("n_r") - pl.col("pool_r"))
        if length_tolerance >= 0:
            allowed &= (pl.col("n_tokens") - pl.col("n_tokens_r")).abs() <= length_tolerance
        if typicality_tolerance >= 0:
            allowed &= pl.col("typicality") - pl.col("typicality_r") <= typicality_tolerance
        if typicality_band >= 0:
            allowed &= (pl.col("typicality") - pl.col("typicality_r")).abs() <= typicality_band
        if genres_tolerance >= 0:
            allowed &= (pl.col("genres_named") - pl.col("genres_named_r")).abs() <= genres_tolerance
        for judge in agree_with:  # a veto needs both profiles judged (NaN compares above every number in polars)
            a, b = pl.col(judge), pl.col(f"{judge}_r")
            allowed &= ~((a < b) & a.is_not_nan() & b.is_not_nan()).fill_null(False)
        # never a pair whose chosen profile has the lower reward (typicality is one-sided: a user may have only those)
        allowed &= pl.col("reward") >= pl.col("reward_r")
        cand = side.join(side, on="user_id", suffix="_r").filter(allowed)
        if min_overlap > 0:
            overlap = [bigram_overlap(a, b) for a, b in zip(cand["text"].to_list(), cand["text_r"].to_list())]
            cand = cand.filter(pl.Series(overlap, dtype=pl.Float64) >= min_overlap)
        lead = (pl.col(diverse) - pl.col(f"{diverse}_r")) if diverse else pl.lit(0.0)
        cand = (cand.with_columns((pl.col("reward") - pl.col("reward_r")).alias("margin"), lead.alias("lead"))
                .sort(["user_id", "lead", "margin", "sample_idx", "sample_idx_r"],
                      descending=[False, True, True, False, False])
                .group_by("user_id", maintain_order=True).first()
                .select("user_id", pl.col("sample_idx").alias("chosen_idx"), pl.col("reward").alias("chosen_reward"),
                        pl.col("sample_idx_r").alias("rejected_idx"), pl.col("reward_r").alias("rejected_reward"),
                        "margin"))
        df = counts.join(cand, on="user_id", how="left").sort("user_id")
        far = (df["len"] >= 2) & df["margin"].is_null()
        why = ("no_pair_within_length" if length_tolerance >= 0 and not typical and not agree_with
               and min_overlap <= 0 and genres_tolerance < 0 and not diverse else "no_pair_within_tolerance")
        dropped[why] += int(far.sum())
        df = df.filter(~far)
    else:
        best = live.sort(["user_id", "reward", "sample_idx"], descending=[False, True, False]).group_by(
            "user_id", maintain_order=True).first()
        worst = live.sort(["user_id", "reward", "sample_idx"]).group_by("user_id", maintain_order=True).first()
        df = (best.select("user_id", pl.col("sample_idx").alias("chosen_idx"), pl.col("reward").alias("chosen_reward"))
              .join(worst.select("user_id", pl.col("sample_idx").alias("rejected_idx"),
                                 pl.col("reward").alias("rejected_reward")), on="user_id")
              .join(counts, on="user_id")
              .with_columns((pl.col("chosen_reward") - pl.col("rejected_reward")).alias("margin"))
              .sort("user_id"))
    single = df["len"] < 2
    tie = ~single & (df["margin"].fill_null(0) <= 0)
    small = ~single & ~tie & (df["margin"] <= min_margin)
    dropped["single_profile"] += int(single.sum())
    dropped["tie"] += int(tie.sum())
    dropped["margin_below_min"] += int(small.sum())
    keep = df.filter(~(single | tie | small)).select("user_id", "chosen_idx", "chosen_reward", "rejected_idx",
                                                     "rejected_reward", "margin")
    return keep, +dropped


def cross_user_pairs(picked: pl.DataFrame, chosen_profiles: pl.DataFrame, reward, n: int, draws: int = 16,
                     length_tolerance: int = -1, min_margin: float = 0.0, seed: int = 0) -> tuple[pl.DataFrame, int]:
    """Pairs whose rejected profile is another user's: for each user of `picked` (select_pairs' rows), up to `n`
    other picked users' chosen profiles that `reward(texts, user_ids)["reward"]` scores below this user's chosen
    reward by more than `min_margin` on this user, and (with `length_tolerance` >= 0) within that many tokens of
    its chosen profile. `chosen_profiles` holds user_id, sample_idx, text, n_tokens of the picked users' chosen
    profiles. Up to `draws` others are tried per user in an order seeded by (seed, user), the first that qualify
    taken. Returns rows shaped as select_pairs' plus `rejected_user`, and how many users got none.

    A profile judged on another user's positives scores lower on average (the reward's personal part), but the
    generic part of what profiles say is the same on both sides of such a pair, so DPO's log-ratio difference is
    carried by what is particular to the user: the pressure that pairs within one user's samples lack."""
    empty = pl.DataFrame(schema={"user_id": pl.Int64, "chosen_idx": pl.Int32, "chosen_reward": pl.Float64,
                                 "rejected_user": pl.Int64, "rejected_idx": pl.Int32, "rejected_reward": pl.Float64,
                                 "margin": pl.Float64})
    if n <= 0 or picked.height < 2:
        return empty, picked.height if n > 0 else 0
    pool = picked.select("user_id", "chosen_idx").join(
        chosen_profiles.select("user_id", pl.col("sample_idx").alias("chosen_idx"), "text", "n_tokens"),
        on=["user_id", "chosen_idx"], how="left").sort("user_id")
    if pool["text"].null_count():
        raise ValueError("cross_user_pairs: chosen_profiles lacks some picked users' chosen profiles")
    ids = pool["user_id"].to_numpy()
    texts, tokens, idx = pool["text"].to_list(), pool["n_tokens"].to_numpy(), pool["chosen_idx"].to_numpy()
    own = dict(zip(picked["user_id"].to_list(), picked["chosen_reward"].to_list()))
    tries_u, tries_v = [], []  # (row of the user, row of the other user) pairs to score
    for i, u in enumerate(ids.tolist()):
        others = np.delete(np.arange(len(ids)), i)
        if length_tolerance >= 0:
            others = others[np.abs(tokens[others] - tokens[i]) <= length_tolerance]
        order = np.random.default_rng([int(seed), int(u)]).permutation(others)[:draws]
        tries_u += [i] * len(order)
        tries_v += order.tolist()
    tries_u, tries_v = np.asarray(tries_u, np.int64), np.asarray(tries_v, np.int64)
    r = (np.asarray(reward([texts[v] for v in tries_v], ids[tries_u])["reward"], dtype=np.float64)
         if len(tries_u) else np.zeros(0))
    bounds = np.searchsorted(tries_u, np.arange(len(ids) + 1))  # tries_u is built user by user, in order
    rows = []
    for i, u in enumerate(ids.tolist()):
        at = np.arange(bounds[i], bounds[i + 1])
        ok = at[~np.isnan(r[at]) & (own[u] - r[at] > min_margin)][:n]
        rows += [(u, int(idx[i]), own[u], int(ids[tries_v[j]]), int(idx[tries_v[j]]), float(r[j]),
                  own[u] - float(r[j])) for j in ok]
    out = pl.DataFrame(rows, schema=empty.schema, orient="row") if rows else empty
    return out, int(len(ids) - out["user_id"].n_unique())


SWAPPED = -1  # rejected_idx of a pair whose rejected side is its chosen profile with the genres swapped


def genre_swap_pairs(picked: pl.DataFrame, chosen_profiles: pl.DataFrame, reward, genres: list[str],
                     weights: np.ndarray, min_margin: float = 0.0, seed: int = 0,
                     others: int = 5, pop_tolerance: float = 0.3) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Pairs whose two sides differ only in which genres they name: for each user of `picked` (select_pairs' rows),
    the chosen profile against itself with every genre it names swapped for the genre it does not name closest in
    popularity among the profiles (rlrf.quality.swap_genres over `weights`, how often the profiles name each genre;
    seeded by (seed, user)) where the two texts' mean log-popularity of named genres is within `pop_tolerance` (a
    profile naming the most popular genres can only swap down), kept where the chosen text's lead over the swap under
    `reward(texts, user_ids)["reward"]` on this user, less its mean lead on `others` other picked users (seeded), is
    above `min_margin`: that personal lead is the pair's margin. Everything the two sides share (template, length,
    titles) cancels out of DPO's log-ratio, and genres that serve every user (the popular ones) out of the margin;
    what is left is naming this user's genres rather than others.

    `chosen_profiles` holds user_id, sample_idx, text of the picked users' chosen profiles. Returns the pairs (shaped as
    select_pairs' rows, rejected_idx = SWAPPED), the swapped texts as profile rows (user_id, sample_idx = SWAPPED,
    text) for to_trl, and how many users got none (no genre named, or no swap the reward scores lower)."""
    pool = picked.join(chosen_profiles.rename({"sample_idx": "chosen_idx"}), on=["user_id", "chosen_idx"])
    users, texts = pool["user_id"].to_list(), pool["text"].to_list()
    swaps = [swap_genres(t, genres, weights, np.random.default_rng([int(seed), int(u), 0x5A9]), nearest=1)
             for u, t in zip(users, texts)]
    logf = np.log(np.asarray(weights, dtype=np.float64) + 1.0)

    def popularity(text: str) -> float:  # mean log-frequency of the genres a text names
        body = padded(text)
        return float(np.mean([logf[k] for k, g in enumerate(genres) if names_genre(body, g)]))

    # a swap that names far less popular genres (the chosen named the most popular ones) would teach "popular"
    have = [i for i, w in enumerate(swaps) if w is not None and abs(popularity(texts[i]) - popularity(w)) <= pop_tolerance]
    # the margin is personal: the chosen text's lead over its swap on this user, less its mean lead on `others` other
    # users, so that a swap that only names less popular genres (lower on every user) is not a pair
    judged = [[users[i]] + [int(v) for v in np.random.default_rng([int(seed), int(users[i]), 0x07]).permutation(
        [u for u in users if u != users[i]])[:others]] for i in have]
    flat_u = [u for js in judged for u in js]
    flat_c = [texts[i] for i, js in zip(have, judged) for _ in js]
    flat_s = [swaps[i] for i, js in zip(have, judged) for _ in js]
    r = (np.asarray(reward(flat_c + flat_s, np.asarray(flat_u * 2))["reward"], dtype=np.float64)
         if have else np.zeros(0))
    lead = r[:len(flat_u)] - r[len(flat_u):]
    rows, swapped, at = [], [], 0
    for i, js in zip(have, judged):
        own, low = r[at], r[len(flat_u) + at]
        personal = lead[at] - (np.nanmean(lead[at + 1: at + len(js)]) if len(js) > 1 else 0.0)
        at += len(js)
        if np.isfinite(personal) and personal > min_margin:
            rows.append((users[i], int(pool["chosen_idx"][i]), float(own), SWAPPED, float(low), float(personal)))
            swapped.append((users[i], SWAPPED, swaps[i]))
    schema = {"user_id": pl.Int64, "chosen_idx": pl.Int32, "chosen_reward": pl.Float64, "rejected_idx": pl.Int32,
              "rejected_reward": pl.Float64, "margin": pl.Float64}
    out = pl.DataFrame(rows, schema=schema, orient="row")
    texts_out = pl.DataFrame(swapped, schema={"user_id": pl.Int64, "sample_idx": pl.Int32, "text": pl.Utf8}, orient="row")
    return out, texts_out, picked.height - out.height


def coin_flip(pairs: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The pairs (TRL rows) with chosen and rejected swapped, rewards and indices with them, in a seeded half of the
    rows (floor(n/2), drawn by `seed`): the null control of pairs.coin_flip. A swapped row's margin is negative."""
    flip = np.zeros(pairs.height, dtype=bool)
    flip[np.random.default_rng([int(seed), 0xC014]).permutation(pairs.height)[: pairs.height // 2]] = True
    f = pl.Series("flip", flip)
    swap = {a: pl.when(f).then(pl.col(b)).otherwise(pl.col(a))
            for a, b in (("chosen", "rejected"), ("rejected", "chosen"), ("chosen_reward", "rejected_reward"),
                         ("rejected_reward", "chosen_reward"), ("chosen_idx", "rejected_idx"),
                         ("rejected_idx", "chosen_idx"))}
    return pairs.with_columns(**swap, margin=pl.when(f).then(-pl.col("margin")).otherwise(pl.col("margin")))


def with_typicality(profiles: pl.DataFrame) -> pl.DataFrame:
    """The profiles with a `typicality` column (`rlrf.quality.typicality`), measured among the profiles of the same
    split: what that split's corpus distinct-2 is made of."""
    typ = np.zeros(profiles.height)
    split = profiles["split"].to_numpy()
    for name in np.unique(split):
        at = split == name
        part = profiles.filter(pl.Series(at))
        typ[at] = typicality(part["text"].to_list(), part["user_id"].to_list())
    return profiles.with_columns(typicality=pl.Series(typ, dtype=pl.Float64))


def sides(pairs: pl.DataFrame, scores: pl.DataFrame) -> dict:
    """What the pairs teach besides the reward: chosen vs rejected mean tokens, corpus distinct-2 and mean typicality,
    each profile counted once per side (with pairs.cross_user a chosen profile is in two pairs). `scores` holds
    n_tokens and typicality per (user_id, sample_idx). DPO learns whatever tells the two sides apart."""
    if pairs.is_empty():
        return {}
    side = scores.select("user_id", "sample_idx", "n_tokens", "typicality",
                         *(["genres_named"] if "genres_named" in scores.columns else []))
    out = {}

    def mean(col: pl.Series) -> float:  # a genre-swapped rejected side has no scores row: NaN, not an error
        m = col.mean()
        return float("nan") if m is None else float(m)

    for name in ("chosen", "rejected"):
        who = "rejected_user" if name == "rejected" and "rejected_user" in pairs.columns else "user_id"
        d = pairs.select(pl.col(who).alias("user_id"), pl.col(f"{name}_idx").alias("sample_idx"),
                         pl.col(name).list.first().struct.field("content").alias("text")).join(
            side, on=["user_id", "sample_idx"], how="left").unique(["user_id", "sample_idx"], maintain_order=True)
        out[name] = {"mean_tokens": mean(d["n_tokens"]), "distinct_2": distinct_n(d["text"].to_list()),
                     "typicality": mean(d["typicality"]),
                     **({"genres_named": mean(d["genres_named"])} if "genres_named" in d.columns else {})}
    return out


def to_trl(chosen: pl.DataFrame, profiles: pl.DataFrame, round: int) -> pl.DataFrame:
    """Join picked indices with the profile texts and shape TRL's conversational preference rows."""
    texts = profiles.select("user_id", "sample_idx", "prompt", "text")
    if "rejected_user" not in chosen.columns:  # a pair of one user's own profiles
        chosen = chosen.with_columns(rejected_user=pl.col("user_id"))
    df = (chosen
          .join(texts.rename({"sample_idx": "chosen_idx", "text": "chosen_text"}), on=["user_id", "chosen_idx"])
          .join(texts.rename({"user_id": "rejected_user", "sample_idx": "rejected_idx",
                              "text": "rejected_text"}).drop("prompt"), on=["rejected_user", "rejected_idx"]))

    def msg(role: str, col: str) -> pl.Expr:
        return pl.concat_list(pl.struct(pl.lit(role).alias("role"), pl.col(col).alias("content")))

    out = df.select(
        msg("user", "prompt").alias("prompt"),
        msg("assistant", "chosen_text").alias("chosen"),
        msg("assistant", "rejected_text").alias("rejected"),
        "user_id", pl.lit(round).alias("round"), "chosen_reward", "rejected_reward", "margin",
        "chosen_idx", "rejected_idx", pl.col("rejected_user").cast(pl.Int64),
    )
    return out.cast(SCHEMAS["pairs"]).sort("user_id", "rejected_user")


def to_sharegpt(pairs: pl.DataFrame) -> list[dict]:
    """LLaMA-Factory's sharegpt preference rows: conversations + chosen/rejected gpt messages."""
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = []
    for r in pairs.iter_rows(named=True):
        rows.append({
            "conversations": [{"from": role[m["role"]], "value": m["content"]} for m in r["prompt"]],
            "chosen": {"from": "gpt", "value": r["chosen"][0]["content"]},
            "rejected": {"from": "gpt", "value": r["rejected"][0]["content"]},
        })
    return rows


def write_llamafactory(pairs: pl.DataFrame, out_dir: Path, round: int) -> Path:
    """Write <out_dir>/llamafactory/{<name>.json, dataset_info.json}; returns that directory (= dataset_dir)."""
    d = Path(out_dir) / LLAMAFACTORY_DIR
    name = dataset_name(round)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / f"{name}.json", to_sharegpt(pairs))
    write_json(d / "dataset_info.json", {name: {
        "file_name": f"{name}.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    }})
    return d


def scored_profiles(profiles: pl.DataFrame, scores_dir, text: bool = False,
                    extra: list[str] = ()) -> pl.DataFrame:
    """Every split's scores with what the pairing options look at: length, finish, typicality (`profiles` holds it:
    with_typicality), genres named where `profiles` holds them (with_genres_named), with `text` the text
    (pairs.min_overlap), and the `extra` columns of `profiles` (with_diversity's)."""
    extra = ["genres_named"] * ("genres_named" in profiles.columns) + list(extra)
    return read_artifact(scores_dir, "scores", "score").join(
        profiles.select("user_id", "sample_idx", "n_tokens", "finish_reason", "typicality", *extra, *(["text"] * text)),
        on=["user_id", "sample_idx"], how="left")


def with_diversity(profiles: pl.DataFrame, criterion: str, generator: str) -> pl.DataFrame:
    """The profiles with a `diversity` column, higher = rarer, for pairs.diverse: "typicality" = minus the profile's
    typicality (with_typicality's column); "surprisal" = its mean token NLL (nats) on its own, no prompt, under
    `generator` (the model that sampled it: rlrf.quality.token_nll, the check's perplexity measure), NaN for an empty
    profile."""
    if criterion == "typicality":
        return profiles.with_columns(diversity=-pl.col("typicality"))
    if criterion != "surprisal":
        raise ValueError(f"pairs.diverse: unknown criterion {criterion!r}")
    from rlrf.llm import load_generator
    from rlrf.quality import token_nll

    nll, count = token_nll(profiles["text"].fill_null("").to_list(), *load_generator(generator))
    mean = np.where(count > 0, nll / np.maximum(count, 1), np.nan)
    return profiles.with_columns(diversity=pl.Series(mean, dtype=pl.Float64))


def with_genres_named(profiles: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """The profiles with a `genres_named` column: how many of the catalogue's genres each names (rlrf.quality)."""
    genres = catalogue_genres(items)
    return profiles.with_columns(genres_named=pl.Series([genres_named(t, genres) for t in profiles["text"].to_list()],
                                                        dtype=pl.Int64))


def pairs_stage(recipe: Recipe, profiles_dir, scores_dir, out_dir, round: int, *, force: bool = False) -> Path:
    """Build round `round`'s preference pairs from a sample stage's profiles and a score stage's rewards."""
    cfg = recipe.pairs
    out_dir = Path(out_dir)
    genres_from = [runs.prepare_dir(recipe)] if cfg.genres_tolerance >= 0 or cfg.genre_swap else []  # the catalogue
    with runs.STAGES["pairs"].open(recipe, out_dir, inputs=[profiles_dir, scores_dir, *genres_from], extra={"round": round},
                                   force=force) as st:
        if st.done:
            return out_dir
        profiles = with_typicality(read_artifact(profiles_dir, "profiles", "sample"))
        items = read_artifact(genres_from[0], "items", "prepare") if genres_from else None
        if cfg.genres_tolerance >= 0:
            profiles = with_genres_named(profiles, items)
        if cfg.diverse:
            profiles = with_diversity(profiles, cfg.diverse, runs.generator_for_round(recipe, round))
            st.log(f"pairs: DivPO pairs (pairs.diverse={cfg.diverse}, pools of {cfg.diverse_pool:g} of each user's "
                   f"profiles)")
        every = scored_profiles(profiles, scores_dir, text=cfg.min_overlap > 0,
                                extra=["diversity"] * bool(cfg.diverse))

        missing = [j for j in cfg.agree_with if j not in every.columns]
        if missing:
            raise StageError(f"pairs.agree_with names {', '.join(missing)}, which {scores_dir} does not hold (a score "
                             f"stage older than that judge); rerun the score stage with --force, or drop the judge")

        def pick(splits: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, Counter]:
            scores = every.filter(pl.col("split").is_in(splits))
            picked, dropped = select_pairs(scores, cfg.min_margin, cfg.length_tolerance, cfg.ended_only,
                                           cfg.typicality_tolerance, tuple(cfg.agree_with), cfg.min_overlap,
                                           cfg.typicality_band, cfg.genres_tolerance,
                                           "diversity" if cfg.diverse else "", cfg.diverse_pool)
            return scores, picked, dropped

        scores, picked, dropped = pick(cfg.splits)
        if scores.is_empty():
            raise StageError(f"{scores_dir}: no scored profiles of split(s) {cfg.splits}; check pairs.splits "
                             f"against sample.splits in the recipe")
        mine = profiles.filter(pl.col("split").is_in(cfg.splits))
        if cfg.genre_swap:
            from rlrf.reward import load_reward

            genres = catalogue_genres(items)
            bodies = [padded(t) for t in mine["text"].to_list()]
            weights = np.asarray([sum(names_genre(b, g) for b in bodies) for g in genres], dtype=float)  # how often
            # the profiles name each genre
            picked, swaps, none = genre_swap_pairs(picked, mine.select("user_id", "sample_idx", "text"),
                                                   load_reward(recipe, round), genres, weights, cfg.min_margin,
                                                   recipe.seed)
            if none:
                dropped["no_genre_swap"] = none
            mine = pl.concat([mine, swaps.join(mine.filter(pl.col("sample_idx") == pl.col("sample_idx").min().over(
                "user_id")).select("user_id", "prompt"), on="user_id")], how="diagonal_relaxed")
            st.log(f"pairs: {picked.height} genre-swap pairs (pairs.genre_swap: each chosen profile against itself "
                   f"with the genres it names swapped; {none} users without one)")
        pairs = to_trl(picked, mine, round)
        if pairs.height < picked.height:
            raise StageError(f"{scores_dir} scores profiles that {profiles_dir} does not hold "
                             f"({picked.height - pairs.height} users); rerun the score stage with --force")
        n_cross = 0
        if cfg.cross_user > 0:
            from rlrf.reward import load_reward

            cross, none = cross_user_pairs(picked, mine.select("user_id", "sample_idx", "text", "n_tokens"),
                                           load_reward(recipe, round), cfg.cross_user, cfg.cross_user_draws,
                                           cfg.length_tolerance, cfg.min_margin, recipe.seed)
            if none:
                dropped["no_cross_user_pair"] = none
            n_cross = cross.height
            pairs = pl.concat([pairs, to_trl(cross, mine, round)]).sort("user_id", "rejected_user")
            st.log(f"pairs: {n_cross} more pairs whose rejected profile is another user's (pairs.cross_user="
                   f"{cfg.cross_user}; reward {recipe.score.reward} on the pair's own user)")
        if cfg.coin_flip:
            pairs = coin_flip(pairs, recipe.seed)
            st.log(f"pairs: NULL CONTROL (pairs.coin_flip): chosen and rejected swapped in {pairs.height // 2} of "
                   f"{pairs.height} pairs; what DPO learns from these is not the reward's")
        # the held-out users' pairs: never trained on; DPO reports its implicit-reward accuracy on them
        held = to_trl(pick(cfg.heldout_splits)[1], profiles.filter(pl.col("split").is_in(cfg.heldout_splits)), round)
        for todo in st.todo(1):
            if cfg.llamafactory_export:
                write_llamafactory(pairs, out_dir, round)
            st.write_shard(todo, {"pairs": pairs, "heldout_pairs": held}, counters=dict(dropped))
        users = scores["user_id"].n_unique()
        info = st.finish(extra={"users": users, "mean_margin": float(pairs["margin"].mean() or 0.0),
                                "cross_user_pairs": n_cross,
                                "sides": sides(pairs, every),
                                "heldout_pairs": held.height, "heldout_splits": cfg.heldout_splits,
                                "llamafactory_dataset": dataset_name(round) if cfg.llamafactory_export else None})
        if info is not None and pairs.is_empty():
            st.log(f"pairs: warning: every user was dropped ({json.dumps(dict(dropped))}); DPO has nothing to learn. "
                   f"Raise sample.n or sample.temperature for more reward spread, or lower pairs.min_margin.")
    return out_dir
