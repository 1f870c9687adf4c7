"""python benchmarks/score_throughput.py --recipe recipes/ml100k_smollm2.yaml [--profiles DIR] [--reranker DIR]

Profiles scored per second end to end (encode into a fresh embedding cache + the batched reward
forward over each profile's user's lists + the metrics) against the encoder alone
(SentenceTransformer.encode on the same texts), measured in the same process, alternating
baseline / ours `--repeats` times; prints both and the ratio (target >= 0.9: the reward must cost
almost nothing beside encoding).

Texts: a finished sample stage's profiles (--profiles) or, without one, deterministic profile-like
texts of ~90 tokens. Reranker: a trained KAR reranker (--reranker) or a freshly initialised one of the
same shape (the forward's cost does not depend on the weights). Needs the recipe's prepare output
(run pipelines/prepare.py first).

--truncation also measures what the user text should be: the profiles' encoder token counts, and the
mean cosine between a user's profiles embedded as the answer alone vs as prompt + answer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.encode import EmbeddingCache, encode_texts, encoder_id, load_encoder
from rlrf.rerank import build_model, load_reranker
from rlrf.threads import torch_threads
from rlrf.rerank_data import RerankData, item_tables
from rlrf.reward import reward_profiles

GENRES = ["dramas", "comedies", "thrillers", "westerns", "science fiction", "musicals", "war films", "romances"]


def synthetic_texts(n: int, users: np.ndarray, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        g = rng.choice(GENRES, 3, replace=False)
        texts.append(f"Profile {i}: this user mostly watches {g[0]} and {g[1]} from the {rng.integers(1940, 1999)}s, "
                     f"rates {g[2]} lower, prefers strong characters, a {rng.choice(['dark', 'light', 'warm'])} tone, "
                     f"acclaimed directors and memorable soundtracks; they revisit classics, enjoy plot twists, "
                     f"and avoid slow pacing, long running times and sequels that repeat the original's story.")
    return texts, rng.choice(users, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml")
    p.add_argument("--profiles", default=None, help="a finished sample stage dir (default: synthetic texts)")
    p.add_argument("--reranker", default=None, help="a trained KAR reranker dir (default: freshly initialised)")
    p.add_argument("-n", type=int, default=512, help="profiles (synthetic texts only)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--truncation", action="store_true", help="also measure answer-only vs prompt + answer texts")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    recipe = load_recipe(a.recipe, a.overrides)
    prep = runs.prepare_dir(recipe)
    lists = read_artifact(prep, "lists", "prepare")
    items = read_artifact(prep, "items", "prepare")
    if a.profiles:
        prof = read_artifact(a.profiles, "profiles", "sample")
        texts, users = prof["text"].fill_null("").to_list(), prof["user_id"].to_numpy()
    else:
        texts, users = synthetic_texts(a.n, lists["user_id"].unique().to_numpy())
    model = load_encoder(recipe.encode)
    enc = encoder_id(recipe.encode)
    bs = recipe.encode.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        item_cache = EmbeddingCache(tmp, enc)  # item texts: encoded once per run, so outside the timing
        keys, _ = encode_texts(model, item_cache, items["text"].to_list(), bs, progress=False)
        if a.reranker:
            rer, spec = load_reranker(a.reranker)
        else:
            attr = item_tables(items)
            know = np.zeros((len(attr), item_cache.vectors.shape[1]), np.float32)
            know[items["item_id"].to_numpy()] = item_cache.get(keys)
            data = RerankData(attr, know, {}, {"train": {"item_ids": np.zeros((1, 10), np.int64)}}, enc)
            torch.manual_seed(0)
            rer = build_model(data.spec(recipe.reranker.backbone, True), data).eval()
        n_lists = lists.join(pl.DataFrame({"user_id": users}), on="user_id").height
        print(f"{len(texts)} profiles, {n_lists} (profile, list) rows, encoder {recipe.encode.encoder}, "
              f"reranker {rer.spec.backbone}{' (trained)' if a.reranker else ' (initialised)'}, "
              f"torch threads: encoder {torch.get_num_threads()}, reward {recipe.reranker.threads}")

        base_t, ours_t, fwd_t = [], [], []
        for r in range(a.repeats):
            t = time.perf_counter()
            model.encode(texts, batch_size=bs, convert_to_numpy=True)
            base_t.append(time.perf_counter() - t)

            cache = EmbeddingCache(Path(tmp) / f"fresh-{r}", enc)  # empty: every text is encoded again
            t = time.perf_counter()
            k, _ = encode_texts(model, cache, texts, bs, progress=False)
            t_enc = time.perf_counter()
            with torch_threads(recipe.reranker.threads):  # as the score stage runs it; the encoder keeps its own
                values, _ = reward_profiles(rer, cache.get(k), users, lists, recipe.score.metric, recipe.score.batch_size)
            ours_t.append(time.perf_counter() - t)
            fwd_t.append(time.perf_counter() - t_enc)
            print(f"  repeat {r}: encoder alone {base_t[-1]:.2f}s, encode + reward {ours_t[-1]:.2f}s "
                  f"(reward part {fwd_t[-1]:.2f}s)")

        base = len(texts) / min(base_t)
        ours = len(texts) / min(ours_t)
        print(f"baseline (SentenceTransformer.encode alone): {base:.1f} profiles/s")
        print(f"ours (encode + cache + batched reward):     {ours:.1f} profiles/s "
              f"(reward alone {len(texts) / min(fwd_t):.0f} profiles/s, mean reward {np.nanmean(values[recipe.score.metric]):.4f})")
        print(f"ratio ours / baseline: {ours / base:.3f} (target >= 0.9)")

    if a.truncation and a.profiles:
        truncation_report(model, read_artifact(a.profiles, "profiles", "sample"), recipe.encode.max_seq_length, bs)


def truncation_report(model, prof: pl.DataFrame, max_len: int, bs: int) -> None:
    """What the user text should be. Swap each profile's answer for the next user's and see how far the
    embedding moves: answer-only texts move fully; prompt + answer texts barely (the prompt fills the
    encoder's max_len tokens, so the answer is cut off), i.e. every profile of a user would look alike."""
    from rlrf.encode import token_counts

    prof = prof.head(256)
    ans = prof["text"].fill_null("").to_list()
    other = ans[1:] + ans[:1]
    prompts = prof["prompt"].to_list()
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # noqa: E731
    for name, a_txt, b_txt in (("answer only", ans, other),
                               ("prompt + answer", [p + "\n" + x for p, x in zip(prompts, ans)],
                                [p + "\n" + x for p, x in zip(prompts, other)])):
        ntok = token_counts(model, a_txt)
        cos = (unit(model.encode(a_txt, batch_size=bs)) * unit(model.encode(b_txt, batch_size=bs))).sum(1)
        print(f"{name:16s}: tokens mean {ntok.mean():.0f} max {ntok.max()}, truncated at {max_len}: "
              f"{np.mean(ntok > max_len):.1%}; cosine(own answer, another user's answer) mean {cos.mean():.3f}")


if __name__ == "__main__":
    main()
