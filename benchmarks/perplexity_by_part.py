"""python benchmarks/perplexity_by_part.py --recipe RECIPE BASE_SAMPLE_DIR OTHER_SAMPLE_DIR... [key.sub=value ...]

Where does a generator's perplexity rise sit: in the words that name what the user likes, or in the prose around
them? The check's perplexity (token-weighted, each profile's text alone after BOS under the base model,
quality.token_nll) split into two parts: the tokens that name a catalogue genre (any of its prose spellings) or one of
the user's prompt-history titles (quality.normalize_title's form), and the rest. A generator that names more titles
pays for their rarity without being any less fluent; one sampled from the tail pays in the rest.

Each argument is a finished sample stage of the same users (e.g. a check's calibrate/old and calibrate/new_t<T>, or
its old/sample and new/sample); the first is the baseline. Prints each stage's perplexity overall, of the named tokens
(with their share of the tokens) and of the rest, then each other stage / the first, per part, with a 95% bootstrap
interval over users (a user's profiles resampled together, paired by user).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.quality import _GENRE_ALIASES, catalogue_genres, normalize_title, token_nlls


def names(genres: list[str]) -> list[str]:
    """Every prose spelling of the catalogue's genres, lowercase (quality.names_genre's aliases)."""
    return [a for g in genres for a in _GENRE_ALIASES.get(g.lower(), (g.lower(),))]


def history_titles(items: pl.DataFrame, interactions: pl.DataFrame) -> dict[int, set[str]]:
    """{user: the normalised titles of their prompt history}, as names_history reads them (3+ letters, not
    'unknown')."""
    hist = interactions.filter(pl.col("in_history")).join(items.select("item_id", "title"), on="item_id")
    out: dict[int, set[str]] = {}
    for u, title in hist.select("user_id", "title").iter_rows():
        t = normalize_title(title or "")
        if len(t) >= 3 and t != "unknown":
            out.setdefault(u, set()).add(t)
    return out


def named_spans(text: str, phrases) -> list[tuple[int, int]]:
    """Character spans of `text` where any phrase occurs as whole words, case-insensitive."""
    low = text.lower()
    return [(m.start(), m.end()) for p in phrases
            for m in re.finditer(r"(?<![a-z0-9])" + re.escape(p) + r"(?![a-z0-9])", low)]


def named_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token (its character offsets): does it overlap a named span?"""
    return np.array([any(s < e2 and s2 < e for s2, e2 in spans) for s, e in offsets], dtype=bool)


def split_nll(profiles: pl.DataFrame, titles: dict[int, set[str]], genre_names: list[str], model, tokenizer,
              batch_size: int = 16) -> pl.DataFrame:
    """Per user: summed NLL and token counts of the named tokens and of the rest (the check's token NLLs,
    quality.token_nlls: the same batches and tokens as its perplexity)."""
    users, texts = profiles["user_id"].to_list(), profiles["text"].fill_null("").to_list()
    rows = []
    for u, text, nll in zip(users, texts, token_nlls(texts, model, tokenizer, batch_size)):
        if not len(nll):
            continue
        offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:len(nll)]
        named = named_mask(offs, named_spans(text, genre_names + sorted(titles.get(u, ()))))
        rows.append((u, float(nll[named].sum()), int(named.sum()), float(nll[~named].sum()), int((~named).sum())))
    return (pl.DataFrame(rows, schema=["user_id", "nll_named", "n_named", "nll_rest", "n_rest"], orient="row")
            .group_by("user_id").sum().sort("user_id"))


def ppl(nll: np.ndarray, n: np.ndarray) -> float:
    return float(np.exp(nll.sum() / n.sum())) if n.sum() else float("nan")


def ratio(base: pl.DataFrame, other: pl.DataFrame, part: str, resamples: int = 1000, seed: int = 0) -> dict:
    """other / base perplexity of one part (named | rest) over the users both have, with a paired user bootstrap."""
    j = base.join(other, on="user_id", suffix="_o")
    a_nll, a_n = j[f"nll_{part}"].to_numpy(), j[f"n_{part}"].to_numpy()
    b_nll, b_n = j[f"nll_{part}_o"].to_numpy(), j[f"n_{part}_o"].to_numpy()

    def at(idx):
        return ppl(b_nll[idx], b_n[idx]) / ppl(a_nll[idx], a_n[idx])

    rng = np.random.default_rng(seed)
    draws = np.array([at(rng.integers(0, j.height, j.height)) for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    return {"mean": at(np.arange(j.height)), "low": float(np.quantile(draws, 0.025)),
            "high": float(np.quantile(draws, 0.975)), "n": j.height}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    ap.add_argument("stages", nargs="+", help="finished sample stages (the first is the baseline) and key=value "
                                              "overrides")
    args = ap.parse_args()
    stages = [a for a in args.stages if "=" not in a]
    recipe = load_recipe(args.recipe, [a for a in args.stages if "=" in a])
    if len(stages) < 2:
        sys.exit("perplexity_by_part: give a baseline sample stage and at least one other")
    from rlrf.llm import load_generator

    prep = runs.prepare_dir(recipe)
    items, inter = read_artifact(prep, "items", "prepare"), read_artifact(prep, "interactions", "prepare")
    titles, genre_names = history_titles(items, inter), names(catalogue_genres(items))
    model, tok = load_generator(recipe.sample.model)
    parts = {}
    for d in stages:
        p = parts[d] = split_nll(read_artifact(Path(d), "profiles", "sample"), titles, genre_names, model, tok)
        named, rest = (p["nll_named"].to_numpy(), p["n_named"].to_numpy()), (p["nll_rest"].to_numpy(),
                                                                              p["n_rest"].to_numpy())
        print(f"{d}: perplexity {ppl(named[0] + rest[0], named[1] + rest[1]):.2f}; named {ppl(*named):.2f} "
              f"({named[1].sum() / (named[1].sum() + rest[1].sum()):.1%} of the tokens), rest {ppl(*rest):.2f}")
    base = stages[0]
    for d in stages[1:]:
        for part in ("rest", "named"):
            r = ratio(parts[base], parts[d], part)
            print(f"  {d} / {base}, {part}: x{r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}] over {r['n']} users")


if __name__ == "__main__":
    main()
