"""Profile quality metrics on hand-made texts, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from rlrf.quality import (
    distinct_across,
    distinct_n,
    genres_named,
    history_mentions,
    names_history,
    normalize_title,
    paired_quality,
    perplexity,
    profile_quality,
    token_nll,
    length_matched_perplexity,
    typicality,
    without_genres,
    words,
)
from tests.fixtures_llm import smollm2_dir, tiny_model  # noqa: F401  (pytest fixtures)


def test_distinct_2_by_hand():
    # bigrams: "a b a b" -> ab, ba, ab ; "a b c" -> ab, bc   => 5 bigrams, distinct {ab, ba, bc} = 3
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    # unigrams: a b a b a b c -> 7 words, 3 distinct
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    # case and punctuation do not make a bigram new: "The film. the film!" -> the-film, film-the, the-film
    assert distinct_n(["The film. the film!"], 2) == pytest.approx(2 / 3)
    # bigrams never cross texts; a one-word text has none; no bigram at all is 0, not a division error
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n([], 2) == 0.0
    # a generator repeating one profile for everyone has distinct-2 falling with the number of users
    assert distinct_n(["likes action movies"] * 4, 2) == pytest.approx(2 / 8)


def test_typicality_by_hand():
    # bigrams: user 1 {ab, bc} and {ab}; user 2 {ab, bd}; user 3 {xy}. Users using each: ab 2, bc 1, bd 1, xy 1.
    # Per text: the mean over its bigrams of (users using it - the text's own user) / (3 - 1 other users).
    t = typicality(["a b c", "a b", "a b d", "x y"], [1, 1, 2, 3])
    assert t.tolist() == pytest.approx([(1 + 0) / 2 / 2, 1 / 2, (1 + 0) / 2 / 2, 0.0])
    # a user's own profiles never make each other typical; one user alone, or no bigram, is 0
    assert typicality(["likes action movies"] * 3, [1, 1, 1]).tolist() == [0.0, 0.0, 0.0]
    assert typicality(["drama", "likes drama"], [1, 2]).tolist() == [0.0, 0.0]
    # the same profile for every user is as typical as can be
    assert typicality(["likes action movies"] * 3, [1, 2, 3]).tolist() == [1.0, 1.0, 1.0]


def test_words_keep_hyphens_and_apostrophes():
    assert words("Sci-Fi fans' children's FILMS, 1990s!") == ["sci-fi", "fans", "children's", "films", "1990s"]


def test_normalize_title():
    assert normalize_title("Usual Suspects, The (1995)") == "the usual suspects"
    assert normalize_title("Horseman on the Roof, The (Hussard sur le toit, Le)") == "the horseman on the roof"
    assert normalize_title("Toy Story") == "toy story"
    assert normalize_title("Se7en (1995)") == "se7en"


def test_names_history_titles_genres_and_word_boundaries():
    assert names_history("They adored The Usual Suspects and twist endings.", ["Usual Suspects, The (1995)"], [])
    assert names_history("A fan of science fiction.", [], ["Sci-Fi"])
    assert names_history("They like CHILDREN'S films", [], ["Children's"])
    assert not names_history("They like warm, cosy films.", [], ["War"])  # 'war' is not in 'warm'
    assert not names_history("Mostly M-rated content", ["M (1931)"], [])  # one-letter titles never count
    assert not names_history("", ["Toy Story"], ["Comedy"])
    assert not names_history("Taste unknown.", ["unknown"], [])  # ML-100K item 267 is titled "unknown"


def _items():
    return pl.DataFrame({"item_id": [1, 2, 3], "title": ["Toy Story (1995)", "GoldenEye (1995)", "Heat (1995)"],
                         "genres": [["Animation", "Comedy"], ["Action", "Thriller"], ["Crime"]]},
                        schema={"item_id": pl.Int64, "title": pl.Utf8, "genres": pl.List(pl.Utf8)})


def _interactions():
    # user 1's history: Toy Story; user 2's: GoldenEye. Heat is user 2's *rerank* item, not history.
    return pl.DataFrame({"user_id": [1, 2, 2], "item_id": [1, 2, 3], "in_history": [True, True, False]},
                        schema={"user_id": pl.Int64, "item_id": pl.Int64, "in_history": pl.Boolean})


def _profiles(rows):
    return pl.DataFrame([{"user_id": u, "text": t, "n_tokens": n, "finish_reason": f, "split": s}
                         for u, t, n, f, s in rows],
                        schema={"user_id": pl.Int64, "text": pl.Utf8, "n_tokens": pl.Int32,
                                "finish_reason": pl.Utf8, "split": pl.Utf8})


def test_history_mentions_use_each_users_own_history():
    profiles = _profiles([
        (1, "Loves Toy Story.", 4, "eos", "test"),           # own history title -> yes
        (1, "Enjoys thrillers.", 3, "eos", "test"),          # thriller is user 2's genre, not user 1's -> no
        (2, "Big on action and spies.", 6, "length", "train"),  # own genre -> yes
        (2, "A fan of Heat and crime.", 7, "eos", "train"),   # Heat/Crime are not in user 2's *history* -> no
    ])
    assert history_mentions(profiles, _items(), _interactions()).tolist() == [True, False, True, False]
    q = profile_quality(profiles, _items(), _interactions())
    assert q["profiles"] == 4
    assert q["names_history"] == pytest.approx(0.5)
    assert q["mean_tokens"] == pytest.approx((4 + 3 + 6 + 7) / 4)
    assert q["mean_words"] == pytest.approx((3 + 2 + 5 + 6) / 4)
    assert q["share_truncated"] == pytest.approx(0.25)
    # catalogue genres: Animation, Comedy, Action, Thriller, Crime; "thrillers" is not the whole word
    assert q["genres_named"] == pytest.approx((0 + 0 + 1 + 1) / 4)
    assert "perplexity" not in q


def test_genres_named_counts_each_catalogue_genre_once_in_its_prose_spellings():
    genres = ["Sci-Fi", "Film-Noir", "Drama", "Children's", "War"]
    assert genres_named("Science fiction, more science fiction, and film noir.", genres) == 2
    assert genres_named("Dramas for kids; a warm drama.", genres) == 2  # "kids" -> Children's, "drama"; not "warm"
    assert genres_named("", genres) == 0


def test_without_genres_takes_out_every_spelling_genres_named_counts():
    genres = ["Sci-Fi", "Film-Noir", "Drama", "Children's", "War"]
    text = "Loves science fiction and Sci-Fi, dramas for kids, and a warm drama; not software."
    rest = without_genres(text, genres)
    assert genres_named(rest, genres) == 0 and genres_named(text, genres) == 3
    assert words(rest) == ["loves", "and", "dramas", "for", "and", "a", "warm", "not", "software"]  # as counted: whole words


class _Tok:
    """Whitespace tokenizer over a fixed vocabulary; ids 0 = pad/eos, 1 = bos."""

    pad_token_id, eos_token_id, bos_token_id = 0, 0, 1

    def __init__(self, vocab):
        self.ids = {w: i + 2 for i, w in enumerate(vocab)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids[w] for w in text.split()]}


class _Uniform(torch.nn.Module):
    """Every next token equally likely among V: perplexity exactly V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.v = vocab_size

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.v)})()


class _Oracle(_Uniform):
    """Puts all mass on the true next token: perplexity 1 (it peeks, which a test may do)."""

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, self.v), -1e4)
        nxt = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, nxt[..., None], 0.0)
        return type("Out", (), {"logits": logits})()


def test_perplexity_uniform_and_oracle_padding_ignored():
    tok = _Tok(["a", "b", "c", "d"])
    texts = ["a b c d a", "b", "c d"]  # different lengths: padding must not count
    assert perplexity(texts, _Uniform(6), tok, batch_size=2) == pytest.approx(6.0)
    assert perplexity(texts, _Oracle(6), tok, batch_size=3) == pytest.approx(1.0, abs=1e-3)
    assert math.isnan(perplexity(["", "  "], _Uniform(6), tok))
    q = profile_quality(_profiles([(1, "a b", 2, "eos", "test"), (2, "c", 1, "eos", "train")]),
                        _items(), _interactions(), ppl_model=(_Uniform(6), tok))
    assert q["perplexity"] == pytest.approx(6.0) and q["perplexity_profiles"] == 1  # test split only
    # the per-profile rows a paired comparison reads: NLL where perplexity was measured, NaN and 0 tokens elsewhere
    rows = profile_quality(_profiles([(1, "Loves Toy Story.", 3, "eos", "test"), (2, "c", 1, "eos", "train")]),
                           _items(), _interactions(), ppl_model=(_Uniform(6), _Tok(["Loves", "Toy", "Story.", "c"])),
                           keep_rows=True)["rows"]
    assert rows["user_id"].to_list() == [1, 2] and rows["names_history"].to_list() == [True, False]
    assert rows["tokens"].to_list()[1] == 0 and math.isnan(rows["nll"].to_list()[1])
    assert rows["nll"].to_list()[0] == pytest.approx(rows["tokens"].to_list()[0] * math.log(6))


def test_token_nll_per_text_sums_to_the_corpus_perplexity():
    tok = _Tok(["a", "b", "c", "d"])
    texts = ["a b c d a", "", "b", "c d"]
    nll, count = token_nll(texts, _Uniform(6), tok, batch_size=2)
    assert count.tolist() == [5, 0, 1, 2]  # every token after BOS is predicted; an empty text counts nothing
    assert nll == pytest.approx(np.array([5, 0, 1, 2]) * math.log(6))
    assert math.exp(nll.sum() / count.sum()) == pytest.approx(perplexity(texts, _Uniform(6), tok))


def test_length_matched_perplexity_reweights_to_the_reference_lengths():
    # per-token NLL 3.0 in short texts, 1.0 in long ones, for both generators: equally fluent at each length
    ref_count = np.array([10, 10, 90, 90])
    ref_nll = np.array([30.0, 30.0, 90.0, 90.0])
    new_count = np.array([10, 10, 10, 90])  # shorter on the whole
    new_nll = np.array([30.0, 30.0, 30.0, 90.0])
    plain = math.exp(new_nll.sum() / new_count.sum())
    matched = length_matched_perplexity(new_nll, new_count, ref_count, bins=2)
    ref_ppl = math.exp(ref_nll.sum() / ref_count.sum())
    assert plain > ref_ppl * 1.3  # token-weighted: the shorter mix alone reads as 'less fluent'
    assert matched == pytest.approx(ref_ppl)  # at the reference's length mix: the same fluency
    assert length_matched_perplexity(ref_nll, ref_count, ref_count, bins=2) == pytest.approx(ref_ppl)
    # empty texts carry nothing; a length bin the texts never reach gives no figure
    assert length_matched_perplexity(np.r_[new_nll, 0.0], np.r_[new_count, 0], ref_count, bins=2) == pytest.approx(ref_ppl)
    assert math.isnan(length_matched_perplexity(np.array([30.0]), np.array([10]), ref_count, bins=2))
    assert math.isnan(length_matched_perplexity(new_nll, new_count, np.array([], dtype=int)))
    # a reference of one length: its single edge leaves the bin below it empty, which weighs nothing (was NaN), and
    # every text falls in the one bin left: the plain perplexity
    assert length_matched_perplexity(ref_nll, ref_count, np.array([10, 10]), bins=2) == pytest.approx(ref_ppl)


def test_paired_quality_figures_by_hand():
    """Old: every user writes the same words; new: each user's own. distinct-2 and the names-history share by hand,
    the perplexity ratio from the NLLs; a user found on one side only does not count."""
    users = [1, 1, 2, 2, 3, 3]
    old = pl.DataFrame({"user_id": users + [9], "text": ["likes action movies"] * 7,
                        "names_history": [False] * 6 + [True], "nll": [4.0] * 7, "tokens": [2] * 7})
    new = pl.DataFrame({"user_id": users, "text": [f"p{i} likes film{i}" for i in range(6)],
                        "names_history": [True, False] * 3, "nll": [8.0] * 6, "tokens": [2] * 6})
    r = paired_quality(old, new, resamples=200, seed=0)
    # old over users 1-3: 2 distinct bigrams of 12; new: 12 distinct of 12
    assert r["distinct_2"]["mean"] == pytest.approx(1 - 2 / 12) and r["distinct_2"]["n"] == 3
    assert r["distinct_2"]["low"] > 0.5  # every draw's new side is all distinct, the old side at most 2 of 12
    assert r["names_history"]["mean"] == pytest.approx(0.5)
    assert r["names_history"]["low"] == pytest.approx(0.5) == r["names_history"]["high"]  # 1 of 2 for every user
    assert r["perplexity"]["mean"] == pytest.approx(math.exp(4 - 2))
    assert r["perplexity"]["low"] == pytest.approx(math.exp(2)) == r["perplexity"]["high"]
    same = paired_quality(old, old, resamples=50, seed=1)
    assert all(same[k]["low"] == same[k]["mean"] == same[k]["high"] == (1.0 if "perplexity" in k else 0.0)
               for k in same)
    with pytest.raises(ValueError, match="no user"):
        paired_quality(old.filter(pl.col("user_id") == 9), new)


def test_distinct_across_users_by_hand_and_against_the_corpus_figure():
    """distinct-2 across users: each profile slot's corpus (one profile a user) by distinct_n, the slots averaged. A
    generator that writes every user the same frame but varies within a user reads more diverse than a personal one
    on the corpus of two profiles a user, and less diverse across users; paired_quality gives both with intervals."""
    texts = ["a b c", "a b c", "x y", "x z"]
    assert distinct_across(texts, [0, 0, 1, 1]) == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert distinct_across(texts, [0, 1, 0, 1]) == pytest.approx((3 / 3 + 3 / 3) / 2)
    assert distinct_across([], []) == 0.0
    users = np.repeat(np.arange(1, 21), 2)
    slots = np.tile([0, 1], 20)
    old = pl.DataFrame({"user_id": users, "sample_idx": slots,  # personal, repeated within the user
                        "text": [f"this user likes u{u}a u{u}b u{u}c" for u in users]})
    new = pl.DataFrame({"user_id": users, "sample_idx": slots,  # one frame for all, a word drawn per profile
                        "text": [f"the user likes films w{i} w{i + 1}" for i in range(40)]})
    r = paired_quality(old, new, resamples=300, seed=0)
    assert r["distinct_2"]["mean"] > 0 and r["distinct_2_across"]["high"] < 0  # the corpus figure says the reverse
    rows = {name: df for name, df in (("old", old), ("new", new))}
    want = {k: distinct_across(df["text"].to_list(), df["sample_idx"].to_list()) for k, df in rows.items()}
    assert r["distinct_2_across"]["mean"] == pytest.approx(want["new"] - want["old"])
    a = r["distinct_2_across"]
    assert a["low"] - 1e-9 <= a["mean"] <= a["high"] + 1e-9  # every user alike here: the draws hardly move it
    # a slot one side lacks does not count; without sample_idx the figure is not given
    assert paired_quality(old, new.filter(pl.col("sample_idx") == 0), resamples=50)["distinct_2_across"]["mean"] == (
        pytest.approx(distinct_across(new.filter(pl.col("sample_idx") == 0)["text"].to_list(), [0] * 20)
                      - distinct_across(old.filter(pl.col("sample_idx") == 0)["text"].to_list(), [0] * 20)))
    assert "distinct_2_across" not in paired_quality(old.drop("sample_idx"), new, resamples=50)


def test_paired_quality_distinct_2_interval_sits_on_its_figure():
    """A corpus figure recomputed on a draw that repeats a user: counting that user's own bigrams once would pull
    every draw's distinct-2 down, the diverse side's the most, and the interval off the sample's figure (on the demo's
    check it left the figure outside its own interval). Counted once per copy, the draws centre on the figure."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    zipf = 1 / np.arange(1, 401)

    def corpus(spread: float) -> pl.DataFrame:
        p = zipf ** spread / (zipf ** spread).sum()
        texts = [" ".join(rng.choice(vocab, size=25, p=p)) for _ in range(240)]
        return pl.DataFrame({"user_id": np.repeat(np.arange(60), 4), "text": texts})

    old, new = corpus(1.6), corpus(0.8)  # the new side draws its words from a flatter distribution: more diverse
    r = paired_quality(old, new, resamples=400, seed=0)["distinct_2"]
    assert r["mean"] > 0.1 and r["low"] <= r["mean"] <= r["high"]
    mid = (r["low"] + r["high"]) / 2  # counted once, these draws read 0.36 to 0.46 around a figure of 0.63
    assert abs(mid - r["mean"]) < 0.3 * (r["high"] - r["low"])


@pytest.mark.integration
def test_perplexity_under_smollm2_prefers_fluent_text():
    from rlrf.llm import load_generator

    model, tok = load_generator("smollm2-135m-instruct")
    fluent = ["This user enjoys classic science fiction films and thoughtful dramas with strong characters."]
    shuffled = [" ".join(sorted(fluent[0].split(), key=lambda w: w[::-1]))]
    p_fluent, p_shuffled = perplexity(fluent, model, tok), perplexity(shuffled, model, tok)
    assert 1 < p_fluent < p_shuffled


def test_token_nll_through_the_head_alone_equals_the_whole_model_text_by_text(tiny_model):
    """A Llama's NLL with the LM head run only where a text token is predicted, texts batched by length, equals the
    whole model's log-softmax on each text alone (fp32: to rounding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrf.quality import _decoder_and_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert _decoder_and_head(model)[1] is not None  # the fast path is the one under test
    texts = ["Likes drama and war films.", "", "Comedy.", "A fan of sci-fi, horror and thrillers from the 1980s."]
    nll, count = token_nll(texts, model, tok, batch_size=3)
    for t, n, c in zip(texts, nll, count):
        if not t:
            assert (n, c) == (0, 0)
            continue
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        assert c == ids.shape[1] - 1
        assert n == pytest.approx(-logp.gather(-1, ids[0, 1:, None]).sum().item(), rel=1e-5)


def test_token_nlls_are_token_nlls_terms_token_by_token(tiny_model):
    """quality.token_nlls gives each text's per-token NLLs from the same batches: one per token, in order, summing to
    token_nll's; an empty or blank text gives none. Each token's value is the whole model's on that text alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrf.quality import token_nlls

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["Likes drama and war films.", "", "  ", "Comedy.", "A fan of sci-fi, horror and thrillers."]
    per = token_nlls(texts, model, tok, batch_size=2)
    nll, count = token_nll(texts, model, tok, batch_size=3)
    assert [len(p) for p in per] == count.tolist() and [len(p) for p in per][1:3] == [0, 0]
    assert [p.sum() for p in per] == pytest.approx(nll.tolist(), rel=1e-5)
    ids = torch.tensor([[tok.bos_token_id] + tok(texts[3], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    assert per[3] == pytest.approx((-logp.gather(-1, ids[0, 1:, None])[:, 0]).numpy(), rel=1e-5)
