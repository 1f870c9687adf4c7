"""Profile quality beyond the reward: is DPO keeping profiles readable, or drifting to text that games
the reranker? (LangPTune and LettinGo ask the same of language profiles.)

Per generator: mean length (tokens, words), distinct-2, the share of profiles that name at least one
genre or title from the user's own history, how many of the catalogue's genres a profile names, and
perplexity under the base model (also at another generator's length mix: length_matched_perplexity). Everything but the
perplexity is a small pure function over strings, tested against values worked out by hand.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import polars as pl

from rlrf.stats import ci_text, verdict

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
# MovieLens spells some genres the way nobody writes them in prose
_GENRE_ALIASES = {"sci-fi": ("sci-fi", "science fiction", "science-fiction"),
                  "children's": ("children's", "children", "kids", "family"),
                  "film-noir": ("film-noir", "film noir", "noir")}
_ARTICLE = re.compile(r"^(.*), (the|a|an|la|le|les|il|el|das|der|die)$", re.I)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (hyphens and apostrophes stay inside a word)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Corpus distinct-n (Li et al., 2016): distinct word n-grams / all word n-grams over all texts.

    0.0 when there is no n-gram at all (every text shorter than n words)."""
    total, seen = 0, set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def distinct_across(texts: list[str], slots, n: int = 2) -> float:
    """Distinct-n across users: the mean, over profile slots (`slots`: each text's sample_idx), of the corpus
    distinct-n of the slot's texts, one profile a user. The corpus figure of several profiles a user also counts the
    variety within a user, which a hotter temperature buys and which grows with the profiles a user; this one counts
    what tells users' profiles apart (a shared template lowers it) and reads the same at any profile count.
    0.0 without texts."""
    slots = np.asarray(slots)
    per = [distinct_n([t for t, s in zip(texts, slots) if s == j], n) for j in np.unique(slots)]
    return float(np.mean(per)) if per else 0.0


def bigrams(text: str) -> set[tuple[str, str]]:
    """The text's distinct word bigrams."""
    w = words(text)
    return set(zip(w, w[1:]))


def bigram_overlap(a: str, b: str) -> float:
    """Jaccard overlap of two texts' word-bigram sets: 1 for the same bigrams, 0 for none shared (or none at all)."""
    x, y = bigrams(a), bigrams(b)
    return len(x & y) / len(x | y) if x or y else 0.0


def typicality(texts: list[str], user_ids: list[int]) -> np.ndarray:
    """Per text: the mean, over its distinct word bigrams, of the share of the *other* users whose texts use that
    bigram (0 = nothing it says is said for anyone else, 1 = every bigram is in every other user's texts).

    The per-profile side of corpus distinct-2: a set of profiles whose typicality rises has a falling distinct-2.
    A user's own texts do not count for one another (N profiles of one user share their history's words). A text
    with no bigram scores 0; with a single user every text scores 0."""
    grams = [bigrams(t) for t in texts]
    per_user: dict = {}
    for u, g in zip(user_ids, grams):
        per_user.setdefault(u, set()).update(g)
    users_of: Counter = Counter()
    for g in per_user.values():
        users_of.update(g)
    others = len(per_user) - 1
    if others < 1:
        return np.zeros(len(texts))
    return np.array([float(np.mean([users_of[b] - 1 for b in g])) / others if g else 0.0 for g in grams])


def padded(text: str) -> str:
    """' word word ... ': the form whole-word phrase tests (`f" {phrase} " in padded(text)`) run against."""
    return " " + " ".join(words(text or "")) + " "


def names_genre(body: str, genre: str) -> bool:
    """Does `body` (a padded() text) name `genre` in any of its prose spellings, as whole words?"""
    return any(padded(alias) in body for alias in _GENRE_ALIASES.get(genre.lower(), (genre.lower(),)))


def normalize_title(title: str) -> str:
    """'Usual Suspects, The (1995)' -> 'the usual suspects'; the form a profile would write."""
    t = re.sub(r"\s*\([^)]*\)", "", title).strip()  # years and foreign-language alternates
    m = _ARTICLE.match(t)
    if m:
        t = f"{m.group(2)} {m.group(1)}"
    return " ".join(words(t))


def names_history(text: str, titles: list[str], genres: list[str]) -> bool:
    """Does the profile name at least one title or genre from the user's history (whole words)?"""
    body = padded(text)
    for title in titles:
        t = normalize_title(title)
        # titles of 1-2 letters ("M") match anything; ML-100K has an item titled "unknown"
        if len(t) >= 3 and t != "unknown" and f" {t} " in body:
            return True
    return any(names_genre(body, g) for g in genres)


def catalogue_genres(items: pl.DataFrame) -> list[str]:
    """The genres the prepare stage's items carry (sorted, 'unknown' left out): what genres_named counts."""
    return sorted({g for gs in items["genres"].to_list() for g in (gs or []) if g.lower() != "unknown"})


def genres_named(text: str, genres: list[str]) -> int:
    """How many of the catalogue's genres the profile names (whole words, prose spellings included): the part of a
    profile every user's reward can share, and what DPO learned first from the lexical reward's pairs."""
    body = padded(text)
    return sum(names_genre(body, g) for g in genres)


def without_genres(text: str, genres: list[str]) -> str:
    """`text` with every catalogue genre it names (genres_named's reading, all spellings) taken out: what is left of a
    profile besides its genre list, e.g. for the distinct-2 of the rest (benchmarks/gain_by_genres.py)."""
    for g in genres:
        text = _genre_pattern(g).sub(" ", text)
    return text


def _genre_pattern(genre: str) -> re.Pattern:
    aliases = sorted(_GENRE_ALIASES.get(genre.lower(), (genre.lower(),)), key=len, reverse=True)
    return re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(map(re.escape, aliases)) + r")(?![A-Za-z0-9])", re.I)


def swap_genres(text: str, genres: list[str], freq: np.ndarray, rng: np.random.Generator, nearest: int = 3) -> str | None:
    """`text` with every catalogue genre it names (genres_named's reading) replaced, in all its spellings, by another
    catalogue genre it does not name, of about the same popularity: drawn among the `nearest` such genres closest in
    log `freq` (how often profiles name each genre), so that a swap names neither more nor less popular genres than
    the text did. None when it names none, or too many to swap. The rest of the text is left as it is."""
    body = padded(text)
    named = [i for i, g in enumerate(genres) if names_genre(body, g)]
    free = [i for i in range(len(genres)) if i not in named]
    if not named or len(free) < len(named):
        return None
    logf = np.log(np.asarray(freq, dtype=np.float64) + 1.0)
    for i in sorted(named, key=lambda k: -logf[k]):
        close = sorted(free, key=lambda k: (abs(logf[k] - logf[i]), k))[:nearest]
        j = close[int(rng.integers(len(close)))]
        free.remove(j)
        text = _genre_pattern(genres[i]).sub(genres[j], text)
    return text


def history_mentions(profiles: pl.DataFrame, items: pl.DataFrame, interactions: pl.DataFrame) -> np.ndarray:
    """Per profile row: True where its text names a title or genre from its user's prompt history."""
    hist = (interactions.filter(pl.col("in_history")).select("user_id", "item_id")
            .join(items.select("item_id", "title", "genres"), on="item_id", how="inner"))
    by_user: dict[int, tuple[list, set]] = {}
    for u, _, title, genres in hist.iter_rows():
        titles, gs = by_user.setdefault(u, ([], set()))
        if title:
            titles.append(title)
        gs.update(genres or [])
    return np.array([names_history(text, *by_user.get(u, ([], [])))
                     for u, text in profiles.select("user_id", "text").iter_rows()], dtype=bool)


def token_nll(texts: list[str], model, tokenizer, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each text's summed negative log-likelihood (nats) and its token count under a causal LM, the text on its own
    (no prompt) after a BOS token; an empty text is (0, 0).

    Texts of like length are batched together (sorted by token count: little padding), and where the model exposes
    its decoder and LM head the head runs only at the positions that predict a text token (not at padding, not past
    the last token) and the NLL comes from cross_entropy on those rows: the model's 49k-wide logits are never held for
    a whole padded batch, nor copied into a log-softmax of the same size."""
    import torch

    nll, count = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    for rows, tok, row, keep in _nll_batches(_text_ids(texts, tokenizer), model, tokenizer, batch_size):
        nll[rows] = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row, tok).numpy()
        count[rows] = keep.sum(1).numpy()
    return nll, count


def token_nlls(texts: list[str], model, tokenizer, batch_size: int = 16) -> list[np.ndarray]:
    """Each text's per-token negative log-likelihoods (nats, float64), one for each of its tokens
    (`tokenizer(text, add_special_tokens=False)`, the first 512), measured as token_nll measures them (the same
    batches, the same BOS): their sum is token_nll's. An empty text gives an empty array. For readers that weigh
    parts of a text apart (benchmarks/perplexity_by_part.py)."""
    out = [np.zeros(0) for _ in texts]
    for rows, tok, row, _ in _nll_batches(_text_ids(texts, tokenizer), model, tokenizer, batch_size):
        tok, row = tok.numpy(), row.numpy()
        for j, i in enumerate(rows):
            out[i] = tok[row == j]
    return out


def _text_ids(texts: list[str], tokenizer) -> dict[int, list[int]]:
    """{text index: its token ids, the first 512} of the texts that are not blank."""
    return {i: tokenizer(t, add_special_tokens=False)["input_ids"][:512] for i, t in enumerate(texts) if t.strip()}


def _nll_batches(ids: dict[int, list[int]], model, tokenizer, batch_size: int):
    """Per batch of like-length texts: (their indices, the per-token NLL of their tokens in row-major order, the
    batch row of each of those tokens, the batch's token mask). Each text is read after a BOS token; see token_nll."""
    import torch
    import torch.nn.functional as F

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [pad]
    ids = {i: bos + t for i, t in ids.items()}
    order = sorted(ids, key=lambda i: (len(ids[i]), i))
    body, head = _decoder_and_head(model)
    model.eval()
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in rows])
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows])
        keep = mask[:, 1:].bool()
        with torch.no_grad():
            if head is None:
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
            else:
                logits = head(body(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1][keep])
            tok = F.cross_entropy(logits.float(), input_ids[:, 1:][keep], reduction="none").double()
        yield rows, tok, torch.arange(len(rows))[:, None].expand_as(keep)[keep], keep


# causal LMs whose logits are exactly lm_head(the decoder's last hidden state): no logit soft-capping or scaling
_PLAIN_HEAD = ("llama", "qwen2", "qwen3", "mistral", "smollm3")


def _decoder_and_head(model):
    """(decoder, LM head) of a causal LM of a _PLAIN_HEAD architecture, else (None, None): the whole model's logits."""
    if getattr(getattr(model, "config", None), "model_type", "") not in _PLAIN_HEAD:
        return None, None
    try:
        return model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def pooled_perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    """exp(total NLL / total tokens) of texts (per-text `nll`, `count` from token_nll): the check's perplexity. NaN
    without a token."""
    tokens = float(np.sum(count))
    return math.exp(float(np.sum(nll)) / tokens) if tokens else float("nan")


def perplexity(texts: list[str], model, tokenizer, batch_size: int = 16) -> float:
    """Token-weighted perplexity of the texts on their own (no prompt) under a causal LM.

    Measured without the prompt on purpose: it asks "is this fluent text?", the same question for every
    generator, rather than "is this what the base model would have answered?"."""
    return pooled_perplexity(*token_nll(texts, model, tokenizer, batch_size))


def length_bins(ref_count: np.ndarray, bins: int = 4) -> np.ndarray:
    """The edges of `bins` length bins: quantiles of the reference's (non-empty) token counts, duplicates merged. A
    text of c tokens is in bin np.searchsorted(edges, c, side="right"), [edges[b-1], edges[b])."""
    ref = np.asarray(ref_count)
    ref = ref[ref > 0]
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1])) if len(ref) else np.array([])


def length_matched_perplexity(nll: np.ndarray, count: np.ndarray, ref_count: np.ndarray, bins: int = 4) -> float:
    """Perplexity of texts (per-text `nll`, `count` from token_nll) at a reference's length mix: the per-token NLL
    within each length bin (`length_bins` of the reference's token counts), weighted by the reference's tokens in that
    bin. Token-weighted perplexity falls with length (a profile's opening tokens cost the most; long copied lists
    are predictable), so a generator that writes shorter profiles reads as less fluent at equal fluency; at the
    reference's own lengths this equals the reference's perplexity. NaN when a bin the reference reaches holds no
    text."""
    nll, count, ref = (np.asarray(x) for x in (nll, count, ref_count))
    keep, ref = count > 0, ref[ref > 0]
    nll, count = nll[keep], count[keep]
    if not len(ref) or not len(count):
        return float("nan")
    edges = length_bins(ref, bins)
    ref_bin, bin_ = np.searchsorted(edges, ref, side="right"), np.searchsorted(edges, count, side="right")
    total = 0.0
    for b in range(len(edges) + 1):
        weight = ref[ref_bin == b].sum() / ref.sum()
        if not weight:  # a bin the reference never reaches (all its texts as long as an edge) weighs nothing
            continue
        tokens = count[bin_ == b].sum()
        if not tokens:
            return float("nan")
        total += weight * nll[bin_ == b].sum() / tokens
    return math.exp(total)


def profile_quality(profiles: pl.DataFrame, items: pl.DataFrame, interactions: pl.DataFrame,
                    ppl_model=None, ppl_split: str | None = "test", keep_rows: bool = False) -> dict:
    """The quality row of one generator's profiles. `ppl_model` = (model, tokenizer) or None to skip;
    perplexity is measured on `ppl_split` users only (None = all), which bounds its cost; `keep_rows` adds
    "rows", the per-profile frame that paired_quality and length_matched_perplexity read (profile_frame: nll and
    tokens where perplexity was measured, NaN and 0 elsewhere), for a caller that pairs generators (not JSON: pop
    it)."""
    texts = profiles["text"].to_list()
    genres = catalogue_genres(items)
    mentions = history_mentions(profiles, items, interactions)
    out = {
        "profiles": len(texts),
        "mean_tokens": float(profiles["n_tokens"].mean()) if len(texts) else 0.0,
        "mean_words": float(np.mean([len(words(t)) for t in texts])) if texts else 0.0,
        "distinct_2": distinct_n(texts, 2),
        **({"distinct_2_across": distinct_across(texts, profiles["sample_idx"].to_list())}
           if "sample_idx" in profiles.columns else {}),
        "names_history": float(mentions.mean()) if texts else 0.0,
        "genres_named": float(np.mean([genres_named(t, genres) for t in texts])) if texts else 0.0,
        # cut mid-sentence at max_new_tokens; "sentence" = cut there too, then trimmed back to a sentence end
        "share_truncated": float((profiles["finish_reason"] == "length").mean()) if texts else 0.0,
        "share_at_limit": float(profiles["finish_reason"].is_in(["length", "sentence"]).mean()) if texts else 0.0,
    }
    full_nll = full_count = None
    if ppl_model is not None:
        at = np.ones(len(texts), dtype=bool) if ppl_split is None else (profiles["split"] == ppl_split).to_numpy()
        nll, count = token_nll([t for t, a in zip(texts, at) if a], *ppl_model)
        out["perplexity"] = pooled_perplexity(nll, count)
        out["perplexity_profiles"] = int(at.sum())
        full_nll, full_count = np.full(len(texts), np.nan), np.zeros(len(texts), dtype=np.int64)
        full_nll[at], full_count[at] = nll, count
    if keep_rows:
        out["rows"] = profile_frame(profiles, mentions, full_nll, full_count)
    return out


def _bigram_incidence(texts: list[str], users: np.ndarray, user_ids: list[int]):
    """Per user: a sparse 0/1 row over the word bigrams that two or more users' texts use, the count of the bigrams
    only this user's texts use, and the user's count of bigrams (with repeats)."""
    from scipy import sparse

    at = {u: i for i, u in enumerate(users.tolist())}
    per_user: list[set] = [set() for _ in users]
    total = np.zeros(len(users))
    for u, t in zip(user_ids, texts):
        w = words(t)
        total[at[u]] += max(len(w) - 1, 0)
        per_user[at[u]].update(zip(w, w[1:]))
    users_of: Counter = Counter(g for grams in per_user for g in grams)
    shared = {g: i for i, g in enumerate(g for g, c in users_of.items() if c > 1)}
    rows, cols, own = [], [], np.zeros(len(users))
    for i, grams in enumerate(per_user):
        mine = [shared[g] for g in grams if g in shared]
        rows += [i] * len(mine)
        cols += mine
        own[i] = len(grams) - len(mine)
    inc = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                            shape=(len(users), max(len(shared), 1)))
    return inc, own, total


def _covered(mult: np.ndarray, inc, chunk: int = 256) -> np.ndarray:
    """Per draw (a row of user multiplicities): how many of `inc`'s bigrams some drawn user uses. In chunks of
    draws, so memory stays at chunk x bigrams whatever the corpus (ML-1M's 6,040 users, ~10^5 bigrams)."""
    out = np.zeros(len(mult), dtype=np.int64)
    at = inc.T.tocsr()
    for s in range(0, len(mult), chunk):
        drawn = (mult[s:s + chunk] > 0).T.astype(np.float32)
        out[s:s + chunk] = (np.asarray(at @ drawn) > 0).sum(0)
    return out


def paired_quality(old: pl.DataFrame, new: pl.DataFrame, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95, bins: int = 4) -> dict:
    """new - old profile quality with percentile bootstrap intervals, users resampled with replacement and a drawn user
    bringing its profiles of both sides (Koehn's paired bootstrap, as for corpus BLEU: a corpus figure is recomputed on
    each draw). Frames hold one row per profile: user_id and what the figures need: `text` for distinct-2 (and with
    `sample_idx`, distinct-2 across users: distinct_across over the slots both sides have), `names_history` (bool)
    for its share, `nll` and `tokens` (token_nll's) for the perplexity ratios. Only users present in both frames
    count.

    Returns those of {"distinct_2": diff, "distinct_2_across": diff, "names_history": diff, "perplexity": ratio,
    "perplexity_at_old_lengths": ratio} the frames allow, each {"mean" (the full sample's figure: new - old, or
    new / old for the ratios), "low", "high", "n" (users), "level", "resamples"}. Distinct-2 counts a drawn user's
    own bigrams (those no other user's texts use) once per copy, as another user drawn in its place would bring
    bigrams of its own: counted once, every repeat would lower the draw's distinct-2, the more diverse side's the
    most, and the interval would sit off its figure."""
    users = np.intersect1d(old["user_id"].unique().to_numpy(), new["user_id"].unique().to_numpy())
    if not len(users):
        raise ValueError("paired_quality: no user has profiles from both generators")
    old, new = (df.filter(pl.col("user_id").is_in(users)) for df in (old, new))
    n = len(users)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    mult = np.zeros((resamples, n), dtype=np.float32)
    np.add.at(mult, (np.arange(resamples)[:, None], draws), 1.0)
    alpha = (1 - level) / 2

    def interval(point: float, values: np.ndarray) -> dict:
        low, high = np.nanquantile(values, [alpha, 1 - alpha])
        return {"mean": float(point), "low": float(low), "high": float(high), "n": n, "level": level,
                "resamples": resamples}

    def per_user(df: pl.DataFrame, col: str) -> np.ndarray:
        s = df.group_by("user_id").agg(pl.col(col).cast(pl.Float64).sum())
        return pl.DataFrame({"user_id": users}).join(s, on="user_id", how="left")[col].fill_null(0).to_numpy()

    out = {}
    if "text" in old.columns and "text" in new.columns:
        distinct = {}
        for name, df in (("old", old), ("new", new)):
            inc, own, total = _bigram_incidence(df["text"].fill_null("").to_list(), users, df["user_id"].to_list())
            distinct[name] = (_covered(mult, inc) + mult @ own) / np.maximum(mult @ total, 1)
        point = distinct_n(new["text"].fill_null("").to_list()) - distinct_n(old["text"].fill_null("").to_list())
        out["distinct_2"] = interval(point, distinct["new"] - distinct["old"])
        if "sample_idx" in old.columns and "sample_idx" in new.columns:
            # across users: each slot's corpus (one profile a user) drawn as above, the slots' figures averaged
            slots = np.intersect1d(old["sample_idx"].unique().to_numpy(), new["sample_idx"].unique().to_numpy())
            across = np.zeros(resamples)
            for j in slots:
                for sign, df in ((-1, old), (1, new)):
                    at = df.filter(pl.col("sample_idx") == j)
                    inc, own, total = _bigram_incidence(at["text"].fill_null("").to_list(), users,
                                                        at["user_id"].to_list())
                    across += sign * (_covered(mult, inc) + mult @ own) / np.maximum(mult @ total, 1) / len(slots)
            o, w = (df.filter(pl.col("sample_idx").is_in(slots)) for df in (old, new))
            point = (distinct_across(w["text"].fill_null("").to_list(), w["sample_idx"].to_list())
                     - distinct_across(o["text"].fill_null("").to_list(), o["sample_idx"].to_list()))
            out["distinct_2_across"] = interval(point, across)
    if "names_history" in old.columns and "names_history" in new.columns:
        share = {name: mult @ per_user(df, "names_history") / (mult @ per_user(df.with_columns(one=1), "one"))
                 for name, df in (("old", old), ("new", new))}
        out["names_history"] = interval(float(new["names_history"].mean()) - float(old["names_history"].mean()),
                                        share["new"] - share["old"])
    if {"nll", "tokens"} <= set(old.columns) and {"nll", "tokens"} <= set(new.columns):
        old, new = (df.filter(pl.col("tokens") > 0) for df in (old, new))
        plain = (np.exp(mult @ per_user(new, "nll") / (mult @ per_user(new, "tokens"))
                        - mult @ per_user(old, "nll") / (mult @ per_user(old, "tokens"))))
        out["perplexity"] = interval(pooled_perplexity(new["nll"].to_numpy(), new["tokens"].to_numpy())
                                     / pooled_perplexity(old["nll"].to_numpy(), old["tokens"].to_numpy()), plain)
        # at old's length mix: the bins move with each draw's old profiles, so each draw is recomputed in full
        ids = {name: df["user_id"].to_numpy() for name, df in (("old", old), ("new", new))}
        rows = {name: [np.flatnonzero(side == u) for u in users] for name, side in ids.items()}
        arrays = {name: (df["nll"].to_numpy(), df["tokens"].to_numpy()) for name, df in (("old", old), ("new", new))}

        def matched(pick: np.ndarray) -> float:
            o = np.concatenate([rows["old"][i] for i in pick])
            w = np.concatenate([rows["new"][i] for i in pick])
            ref = arrays["old"][1][o]
            return (length_matched_perplexity(arrays["new"][0][w], arrays["new"][1][w], ref, bins)
                    / pooled_perplexity(arrays["old"][0][o], ref))

        out["perplexity_at_old_lengths"] = interval(matched(np.arange(n)), np.array([matched(p) for p in draws]))
    return out


def profile_frame(profiles: pl.DataFrame, mentions: np.ndarray, nll=None, tokens=None) -> pl.DataFrame:
    """What paired_quality reads, one row per profile: user_id, split, sample_idx (where the profiles have it), text,
    names_history (history_mentions' array), and with token_nll's arrays (one value per profile row) nll and
    tokens."""
    keep = ["user_id", "split"] + (["sample_idx"] if "sample_idx" in profiles.columns else [])
    out = profiles.select(*keep, pl.col("text").fill_null("")).with_columns(
        names_history=pl.Series(np.asarray(mentions, dtype=bool), dtype=pl.Boolean))
    if nll is not None:
        out = out.with_columns(nll=pl.Series(np.asarray(nll, dtype=np.float64)),
                               tokens=pl.Series(np.asarray(tokens, dtype=np.int64)))
    return out


def criteria_lines(diff: dict | None) -> list[str]:
    """paired_quality's figures read against issue 11's quality criteria: distinct-2 and the names-history share
    not lower ("lower" only when the whole interval is below 0), perplexity within +25% of the old generator's."""
    if not diff:
        return []

    lines = [f"{name} new - old {ci_text(diff[key])} -> {verdict(diff[key], 'higher', 'lower')}"
             for key, name in (("distinct_2", "distinct-2"), ("distinct_2_across", "distinct-2 across users"),
                               ("names_history", "names-history share")) if key in diff]
    for key, name in (("perplexity", "perplexity"), ("perplexity_at_old_lengths", "perplexity at old's lengths")):
        ci = diff.get(key)
        if ci and math.isnan(ci["mean"]):  # length_matched_perplexity: a length bin of old's holds no new profile
            lines.append(f"{name} new / old: not measured (some length bin of the old profiles holds no new profile)")
        elif ci:
            bound = ("over +25%" if ci["low"] > 1.25 else "within +25%" if ci["high"] <= 1.25
                     else "+25% inside the interval")
            lines.append(f"{name} new / old {ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] -> {bound}")
    return lines
