"""pairs stage: best/worst per user, ties and small margins dropped and counted, TRL + LLaMA-Factory output."""

import json

import polars as pl
import pytest

from rlrf import runs
from rlrf.artifacts import read_artifact, read_stage_json
from rlrf.config import load_recipe
from rlrf.errors import StageError
from rlrf.pairs import dataset_name, pairs_stage, select_pairs
from rlrf.quality import bigram_overlap
from tests.fixtures_llm import smollm2_dir, tiny_model  # noqa: F401  (pytest fixtures)
from tests.loop_fixtures import profile_rows, score_rows, write_stage


def _scores(rewards, empty=None):
    return pl.DataFrame(score_rows(rewards, empty=empty))


def test_best_and_worst_with_margins_worked_by_hand():
    picked, dropped = select_pairs(_scores({1: [0.2, 0.9, 0.5, 0.1], 2: [0.4, 0.3]}))
    assert picked["user_id"].to_list() == [1, 2]
    assert picked["chosen_idx"].to_list() == [1, 0]
    assert picked["rejected_idx"].to_list() == [3, 1]
    assert picked["margin"].to_list() == pytest.approx([0.8, 0.1])
    assert dict(dropped) == {}


def test_ties_single_profiles_and_small_margins_dropped_by_reason():
    rewards = {1: [0.5, 0.5, 0.5], 2: [0.3, 0.35], 3: [0.1, 0.9], 4: [0.7], 5: [0.2, 0.2, 0.6]}
    picked, dropped = select_pairs(_scores(rewards), min_margin=0.05)
    assert picked["user_id"].to_list() == [3, 5]
    assert dict(dropped) == {"tie": 1, "single_profile": 1, "margin_below_min": 1}
    # user 5: two profiles tie at the bottom; the lower sample_idx is the rejected one
    assert picked.filter(pl.col("user_id") == 5)["rejected_idx"].item() == 0


def test_unjudged_profiles_never_become_a_pair():
    """A NaN reward (a user with no held-out positives) is no evidence: before this, polars sorted NaN first and a
    user whose rewards were all NaN became a pair with margin NaN."""
    nan = float("nan")
    picked, dropped = select_pairs(_scores({1: [nan, nan, nan], 2: [0.3, nan, 0.1]}))
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(2, 0, 2)]
    assert dict(dropped) == {"no_reward": 4}


def test_margin_equal_to_min_margin_is_dropped():
    picked, dropped = select_pairs(_scores({1: [0.25, 0.5]}), min_margin=0.25)
    assert picked.is_empty() and dropped["margin_below_min"] == 1


def test_empty_profiles_never_become_a_pair():
    # user 1's worst reward belongs to an empty text: the pair uses the worst non-empty profile instead
    picked, dropped = select_pairs(_scores({1: [0.9, 0.0, 0.4]}, empty={1: [1]}))
    assert picked["rejected_idx"].to_list() == [2]
    assert dropped["empty_profile"] == 1


def _stage_inputs(tmp_path, rewards, texts=None, split="train"):
    texts = texts or {u: [f"user {u} profile {i}: likes drama" for i in range(len(r))] for u, r in rewards.items()}
    prof = write_stage(tmp_path / "sample", "sample", "profiles", profile_rows(texts, split))
    sc = write_stage(tmp_path / "score", "score", "scores", score_rows(rewards, split))
    return prof, sc


def test_length_tolerance_picks_the_best_pair_of_like_lengths():
    """User 1: the best (0.9) is long, so within 5 tokens the pair is 0.6 (20 tokens) over 0.1 (22); user 2 has no
    two profiles within 5 tokens; user 3's like-length pair ties. Worked by hand."""
    sc = _scores({1: [0.6, 0.9, 0.1, 0.3], 2: [0.2, 0.8], 3: [0.5, 0.5, 0.9]}).with_columns(
        n_tokens=pl.Series([20, 90, 22, 60, 10, 50, 30, 31, 80]))
    picked, dropped = select_pairs(sc, length_tolerance=5)
    assert picked["user_id"].to_list() == [1]
    assert picked.row(0, named=True) == pytest.approx(
        {"user_id": 1, "chosen_idx": 0, "chosen_reward": 0.6, "rejected_idx": 2, "rejected_reward": 0.1, "margin": 0.5})
    assert dict(dropped) == {"no_pair_within_length": 1, "tie": 1}
    # a tolerance wide enough for every pair is best vs worst again
    wide, _ = select_pairs(sc, length_tolerance=1000)
    plain, _ = select_pairs(sc)
    assert wide.sort("user_id").equals(plain.select(wide.columns).sort("user_id"))


def test_ended_only_leaves_cut_profiles_out():
    sc = _scores({1: [0.9, 0.5, 0.1], 2: [0.8, 0.2]}).with_columns(
        finish_reason=pl.Series(["length", "eos", "sentence", "length", "eos"]))
    picked, dropped = select_pairs(sc, ended_only=True)
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 1, 2)]
    assert dict(dropped) == {"cut_at_limit": 2, "single_profile": 1}


def test_typicality_tolerance_never_pairs_a_more_typical_chosen():
    """User 1: the best (0.9) is the most typical, so with tolerance 0 the pair is 0.5 (typicality 0.1) over 0.1
    (0.2); with tolerance 0.35 the best may be up to 0.35 more typical: 0.9 over 0.1 (0.5 - 0.2 = 0.3). User 2's
    only ordered pair has the more typical profile on top: no pair. Worked by hand."""
    sc = _scores({1: [0.9, 0.5, 0.1], 2: [0.8, 0.2]}).with_columns(
        typicality=pl.Series([0.5, 0.1, 0.2, 0.9, 0.1]))
    picked, dropped = select_pairs(sc, typicality_tolerance=0.0)
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 1, 2)]
    assert picked["margin"].to_list() == pytest.approx([0.4])
    assert dict(dropped) == {"no_pair_within_tolerance": 1}
    loose, _ = select_pairs(sc, typicality_tolerance=0.35)
    assert loose.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 2)]
    # with length too, both must hold: user 1's 0.1 is 38 tokens longer than the rest and 0.9 is 0.4 more typical
    # than 0.5: no pair is left
    both, dropped = select_pairs(sc.with_columns(n_tokens=pl.Series([10, 12, 50, 10, 10])), length_tolerance=5,
                                 typicality_tolerance=0.35)
    assert both.is_empty() and dropped["no_pair_within_tolerance"] == 2
    with pytest.raises(ValueError, match="pairs.typicality_tolerance"):
        load_recipe(None, ["pairs.typicality_tolerance=1.5"])


def test_typicality_band_bounds_the_difference_both_ways():
    """The typicality data above: with a band of 0.15 user 1's only pair is 0.5 (0.1) over 0.1 (0.2), |-0.1|; with
    0.35 the best, 0.9 (0.5) over 0.1 (0.2), +0.3. User 2's pair differs by 0.8 either way: never a pair. Worked by
    hand."""
    sc = _scores({1: [0.9, 0.5, 0.1], 2: [0.8, 0.2]}).with_columns(
        typicality=pl.Series([0.5, 0.1, 0.2, 0.9, 0.1]))
    picked, dropped = select_pairs(sc, typicality_band=0.15)
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 1, 2)]
    assert dict(dropped) == {"no_pair_within_tolerance": 1}
    wide, _ = select_pairs(sc, typicality_band=0.35)
    assert wide.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 2)]
    # a chosen profile far less typical than its rejected one is out too (typicality_tolerance would allow it):
    # 0.9 (0.0) over 0.1 (0.6) differs by 0.6, so the band's pair is 0.9 over 0.5 (0.1)
    less = sc.with_columns(typicality=pl.Series([0.0, 0.1, 0.6, 0.9, 0.1]))
    assert select_pairs(less, typicality_band=0.35)[0].select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 1)]
    assert select_pairs(less, typicality_tolerance=0.35)[0].select("user_id", "chosen_idx", "rejected_idx").rows() == [
        (1, 0, 2)]


def test_genres_tolerance_pairs_profiles_that_name_as_many_genres(tmp_path):
    """User 1's profiles (0.9, 0.5, 0.2, 0.1) name 3, 1, 1 and 0 genres: with a tolerance of 0 the pair is 0.5 over
    0.2 (1 and 1), with 1 it is 0.5 over 0.1 (1 and 0: the best within 1), with 3 best over worst; user 2's name 2 and
    0, a pair only at 3. Worked by hand; then through the recipe key, the genres counted in the texts against the
    prepare stage's catalogue."""
    sc = _scores({1: [0.9, 0.5, 0.2, 0.1], 2: [0.8, 0.3]}).with_columns(genres_named=pl.Series([3, 1, 1, 0, 2, 0]))
    for tol, want in ((0, [(1, 1, 2)]), (1, [(1, 1, 3)]), (3, [(1, 0, 3), (2, 0, 1)])):
        picked, dropped = select_pairs(sc, genres_tolerance=tol)
        assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == want, tol
    assert dict(select_pairs(sc, genres_tolerance=1)[1]) == {"no_pair_within_tolerance": 1}

    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=g", "pairs.genres_tolerance=0"])
    write_stage(runs.prepare_dir(recipe), "prepare", "items", [
        {"item_id": i, "raw_item_id": str(i), "title": t, "year": 1995, "genres": g, "attribute_id": 1, "text": t}
        for i, (t, g) in enumerate([("Heat", ["Action", "Crime"]), ("Fargo", ["Comedy", "Drama"])], 1)])
    texts = {1: ["likes action and drama", "likes comedy films", "nothing in particular"]}
    prof, scores = _stage_inputs(tmp_path, {1: [0.9, 0.4, 0.1]}, texts=texts)
    out = pairs_stage(recipe, prof, scores, tmp_path / "pairs", round=1)
    assert read_artifact(out, "pairs").select("chosen_idx", "rejected_idx").rows() == []  # 2, 1, 0 genres: no pair
    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "run=g", "pairs.genres_tolerance=1"])
    out = pairs_stage(recipe, prof, scores, tmp_path / "pairs1", round=1)
    assert read_artifact(out, "pairs").select("chosen_idx", "rejected_idx").rows() == [(0, 1)]
    assert read_stage_json(out)["sides"]["chosen"]["genres_named"] == 2
    with pytest.raises(ValueError, match="pairs.genres_tolerance"):
        load_recipe(None, ["pairs.genres_tolerance=-2"])


def test_bigram_overlap_worked_by_hand():
    # "likes dark comedies" vs "likes dark dramas": bigrams {likes dark, dark comedies} and {likes dark, dark dramas}
    assert bigram_overlap("Likes dark comedies", "likes dark dramas") == pytest.approx(1 / 3)
    assert bigram_overlap("likes dark comedies.", "Likes dark comedies") == 1.0
    assert bigram_overlap("drama", "comedy") == 0.0 and bigram_overlap("", "") == 0.0


def test_min_overlap_pairs_only_profiles_that_share_their_template():
    """User 1: the best (0.9) shares no bigram with the others; 0.5 and 0.1 share 1 of 3 bigrams: with
    min_overlap 0.3 the pair is 0.5 over 0.1, with 0.5 none is left. User 2's two profiles are the same text but the
    last word: 3 of their 5 bigrams shared (0.6). Worked by hand."""
    sc = _scores({1: [0.9, 0.5, 0.1], 2: [0.8, 0.2]}).with_columns(text=pl.Series([
        "a fan of westerns", "likes dark comedies", "likes dark dramas", "likes war films a lot", "likes war films a bit"]))
    picked, dropped = select_pairs(sc, min_overlap=0.3)
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 1, 2), (2, 0, 1)]
    assert picked["margin"].to_list() == pytest.approx([0.4, 0.6])
    assert dict(dropped) == {}
    strict, dropped = select_pairs(sc, min_overlap=0.5)
    assert strict.select("user_id", "chosen_idx", "rejected_idx").rows() == [(2, 0, 1)]
    assert dict(dropped) == {"no_pair_within_tolerance": 1}
    assert select_pairs(sc)[0].select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 2), (2, 0, 1)]
    with pytest.raises(ValueError, match="pairs.min_overlap"):
        load_recipe(None, ["pairs.min_overlap=1.5"])


def test_agree_with_takes_the_largest_margin_pair_no_other_judge_contradicts():
    """Lexical picks; genres may not rank the chosen profile below the rejected one. User 1: lexical's best pair
    (0.9 over 0.1) and 0.5 over 0.1 are ranked the other way by genres (0.2 < 0.6), so the pair is 0.9 over 0.5 (genres
    ties: no veto). User 2: genres contradicts its only pair. User 3: genres cannot judge (NaN), so it vetoes nothing
    and the pair is best vs worst. Worked by hand."""
    nan = float("nan")
    sc = _scores({1: [0.9, 0.5, 0.1], 2: [0.8, 0.2], 3: [0.7, 0.3]}).with_columns(
        genres=pl.Series([0.2, 0.2, 0.6, 0.1, 0.4, nan, nan]))
    picked, dropped = select_pairs(sc, agree_with=("genres",))
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 1), (3, 0, 1)]
    assert picked["margin"].to_list() == pytest.approx([0.4, 0.4])
    assert dict(dropped) == {"no_pair_within_tolerance": 1}
    # off, it is best vs worst; with length too, both must hold
    plain, _ = select_pairs(sc)
    assert plain.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 2), (2, 0, 1), (3, 0, 1)]
    both, _ = select_pairs(sc.with_columns(n_tokens=pl.Series([10, 40, 12, 10, 10, 10, 10])), length_tolerance=5,
                           agree_with=("genres",))
    assert both.select("user_id", "chosen_idx", "rejected_idx").rows() == [(3, 0, 1)]
    with pytest.raises(ValueError, match="pairs.agree_with"):
        load_recipe(None, ["pairs.agree_with=[reranker]"])


def test_agree_with_a_judge_the_scores_lack_is_refused_by_name(tmp_path):
    prof, sc = _stage_inputs(tmp_path, {1: [0.9, 0.1]})
    with pytest.raises(StageError, match="pairs.agree_with names genres.*rerun the score stage"):
        pairs_stage(load_recipe(None, ["pairs.agree_with=[genres]"]), prof, sc, tmp_path / "pairs", round=1)
    assert not (tmp_path / "pairs" / "stage.json").exists()


def test_stage_reports_what_tells_chosen_from_rejected(tmp_path):
    """Every user's chosen profile says what the others' say ("likes drama films"), the rejected ones are their own:
    the summary shows the chosen side more typical and less diverse; with typicality_tolerance=0 no pair is left."""
    texts = {u: ["likes drama films", f"only {w} here"] for u, w in ((1, "noir"), (2, "westerns"), (3, "musicals"))}
    prof, sc = _stage_inputs(tmp_path, {1: [0.9, 0.1], 2: [0.8, 0.2], 3: [0.7, 0.3]}, texts=texts)
    out = pairs_stage(load_recipe(None), prof, sc, tmp_path / "pairs", round=1)
    sides = read_stage_json(out)["sides"]
    assert sides["chosen"]["typicality"] == pytest.approx(1.0) and sides["rejected"]["typicality"] == pytest.approx(0.0)
    assert sides["chosen"]["distinct_2"] == pytest.approx(2 / 6) and sides["rejected"]["distinct_2"] == pytest.approx(1.0)
    assert sides["chosen"]["mean_tokens"] == sides["rejected"]["mean_tokens"] == 3
    recipe = load_recipe(None, ["pairs.typicality_tolerance=0"])
    out = pairs_stage(recipe, prof, sc, tmp_path / "pairs_t", round=1)
    assert read_artifact(out, "pairs").is_empty()
    assert read_stage_json(out)["dropped"] == {"no_pair_within_tolerance": 3}
    # the two-sided band from the recipe: typicality 1 vs 0 differs by 1, within a band of 1, outside 0.5
    band = pairs_stage(load_recipe(None, ["pairs.typicality_band=0.5"]), prof, sc, tmp_path / "pairs_b", round=1)
    assert read_stage_json(band)["dropped"] == {"no_pair_within_tolerance": 3}
    wide = pairs_stage(load_recipe(None, ["pairs.typicality_band=1"]), prof, sc, tmp_path / "pairs_w", round=1)
    assert read_artifact(wide, "pairs").height == 3
    with pytest.raises(ValueError, match="pairs.typicality_band"):
        load_recipe(None, ["pairs.typicality_band=1.5"])


def test_pairing_options_reach_the_stage_and_its_fingerprint_only_when_set(tmp_path):
    from rlrf.config import fingerprint

    assert "length_tolerance" not in fingerprint(load_recipe(None).pairs) and "ended_only" not in fingerprint(load_recipe(None).pairs)
    recipe = load_recipe(None, ["pairs.length_tolerance=0"])
    assert fingerprint(recipe.pairs)["length_tolerance"] == 0
    # profile_rows counts words as tokens: user 1's two profiles are 5 words each, user 3's 5 and 6
    prof, sc = _stage_inputs(tmp_path, {1: [0.2, 0.9], 3: [0.7, 0.1]}, texts={1: ["a b c d e", "f g h i j"], 3: ["a b c d e", "a b c d e f"]})
    out = pairs_stage(recipe, prof, sc, tmp_path / "pairs", round=1)
    assert read_artifact(out, "pairs")["user_id"].to_list() == [1]
    assert read_stage_json(out)["dropped"] == {"no_pair_within_length": 1}
    with pytest.raises(ValueError, match="pairs.length_tolerance"):
        load_recipe(None, ["pairs.length_tolerance=-2"])


def test_stage_writes_trl_rows_and_llamafactory_export(tmp_path):
    recipe = load_recipe(None, ["pairs.min_margin=0.0"])
    prof, sc = _stage_inputs(tmp_path, {1: [0.2, 0.9], 2: [0.4, 0.4], 3: [0.7, 0.1]})
    out = pairs_stage(recipe, prof, sc, tmp_path / "pairs", round=2)
    df = read_artifact(out, "pairs")
    assert df["user_id"].to_list() == [1, 3] and set(df["round"].to_list()) == {2}
    row = df.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "Given a user 1 who watched films. Analyze user's preferences."}]
    assert row["chosen"] == [{"role": "assistant", "content": "user 1 profile 1: likes drama"}]
    assert row["rejected"] == [{"role": "assistant", "content": "user 1 profile 0: likes drama"}]
    info = read_stage_json(out)
    assert info["dropped"] == {"tie": 1} and info["rows"] == {"pairs": 2, "heldout_pairs": 0}

    lf = out / "llamafactory"
    entry = json.loads((lf / "dataset_info.json").read_text())[dataset_name(2)]
    assert entry["ranking"] is True and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    data = json.loads((lf / entry["file_name"]).read_text())
    assert data[1] == {"conversations": [{"from": "human", "value": row["prompt"][0]["content"].replace("1", "3")}],
                       "chosen": {"from": "gpt", "value": "user 3 profile 0: likes drama"},
                       "rejected": {"from": "gpt", "value": "user 3 profile 1: likes drama"}}


def test_only_the_configured_splits_become_pairs(tmp_path):
    recipe = load_recipe(None)
    prof, sc = _stage_inputs(tmp_path, {1: [0.2, 0.9]}, split="valid")
    with pytest.raises(Exception, match="pairs.splits"):
        pairs_stage(recipe, prof, sc, tmp_path / "pairs", round=1)


def test_parquet_loads_with_datasets_and_dpo_trainer_tokenizes_it(tmp_path):
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from tests.test_dpo import tiny_model_dir

    recipe = load_recipe(None)
    prof, sc = _stage_inputs(tmp_path, {1: [0.2, 0.9], 3: [0.7, 0.1]})
    out = pairs_stage(recipe, prof, sc, tmp_path / "pairs", round=1)
    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "pairs").glob("*.parquet")),
                               split="train")
    assert ds.num_rows == 2 and ds[0]["prompt"][0]["role"] == "user"
    model_dir = tiny_model_dir(tmp_path / "model")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "o"), report_to=[], max_steps=1,
                                                     gradient_checkpointing=False, bf16=False, use_cpu=True),
                         train_dataset=ds, processing_class=tok)
    ex = trainer.train_dataset[0]
    assert len(ex["prompt_ids"]) > 10 and len(ex["chosen_ids"]) > 3 and len(ex["rejected_ids"]) > 3
    # the completion tokens are the profile text (plus the template's end-of-turn), not the prompt
    assert "likes drama" in tok.decode(ex["chosen_ids"])


def test_cross_user_pairs_take_the_first_other_user_the_reward_scores_lower_worked_by_hand():
    """Three users' chosen profiles; the reward pays 0.3 for text "e" (user 3's) and 0 otherwise, whoever judges.
    User 2 (chosen reward 0.2) can only be paired against a profile scored below 0.2, so never against "e"; with a
    length tolerance of 5 tokens user 2's 30-token profile has no other user near its length."""
    import numpy as np

    from rlrf.pairs import cross_user_pairs

    picked = pl.DataFrame({"user_id": [1, 2, 3], "chosen_idx": [0, 1, 2], "chosen_reward": [0.5, 0.2, 0.9],
                           "rejected_idx": [1, 0, 0], "rejected_reward": [0.1, 0.1, 0.1], "margin": [0.4, 0.1, 0.8]})
    prof = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "sample_idx": [0, 1, 0, 1, 2, 0],
                         "text": ["a", "b", "c", "d", "e", "f"], "n_tokens": [10, 10, 10, 30, 12, 12]})
    seen = []

    def reward(texts, user_ids):
        seen.extend(zip(texts, np.asarray(user_ids).tolist()))
        return {"reward": np.array([0.3 if t == "e" else 0.0 for t in texts])}

    got, none = cross_user_pairs(picked, prof, reward, n=2)
    rows = {(r["user_id"], r["rejected_user"]): r for r in got.iter_rows(named=True)}
    # user 1: both others qualify (0.0 and 0.3 < 0.5); user 2: only user 1's "a"; user 3: both
    assert set(rows) == {(1, 2), (1, 3), (2, 1), (3, 1), (3, 2)} and none == 0
    assert rows[(1, 3)] == pytest.approx({"user_id": 1, "chosen_idx": 0, "chosen_reward": 0.5, "rejected_user": 3,
                                          "rejected_idx": 2, "rejected_reward": 0.3, "margin": 0.2})
    assert rows[(2, 1)]["rejected_idx"] == 0 and rows[(2, 1)]["margin"] == pytest.approx(0.2)
    # every profile is judged on the pair's own user, never on its author
    assert ("d", 1) in seen and ("a", 2) in seen and all(t != {1: "a", 2: "d", 3: "e"}[u] for t, u in seen)
    one, _ = cross_user_pairs(picked, prof, reward, n=1)
    assert one["user_id"].to_list() == [1, 2, 3]
    assert one.equals(cross_user_pairs(picked, prof, reward, n=1)[0])  # seeded: the same draw every time
    near, none = cross_user_pairs(picked, prof, reward, n=1, length_tolerance=5)
    assert near["user_id"].to_list() == [1, 3] and none == 1
    small, none = cross_user_pairs(picked, prof, reward, n=2, min_margin=0.25)  # gaps must exceed 0.25
    assert {(r["user_id"], r["rejected_user"]) for r in small.iter_rows(named=True)} == {(1, 2), (3, 1), (3, 2)}
    assert none == 1
    # a profile the reward cannot judge (NaN: e.g. no held-out positive) is never the rejected side
    nan_a = lambda texts, user_ids: {"reward": np.array([np.nan if t == "a" else 0.0 for t in texts])}  # noqa: E731
    got, none = cross_user_pairs(picked, prof, nan_a, n=2)
    assert 1 not in got["rejected_user"].to_list() and got["user_id"].to_list() == [1, 1, 2, 3] and none == 0
    off, none = cross_user_pairs(picked, prof, reward, n=0)
    assert off.is_empty() and none == 0 and off.columns == got.columns


def test_cross_user_pairs_through_the_stage_with_the_real_lexical_reward(tmp_path):
    """Each train user writes one profile naming the genre its held-out positives hold and one naming the next
    genre; the lexical reward (TF-IDF over the item texts) picks the own pairs, and pairs.cross_user=1 adds, per
    user, a pair against another user's chosen profile that names another genre (a same-taste user's profile scores
    the same, so it is never the rejected side). The prompt is always the pair's own user's."""
    from rlrf.config import fingerprint
    from rlrf.reward import load_reward
    from tests.reward_fixtures import GENRES, make_recipe, taste, write_prepare

    recipe = make_recipe(tmp_path, "score.reward=lexical", "score.retrieval_k=10", "pairs.cross_user=1")
    assert "cross_user" not in fingerprint(load_recipe(None).pairs) and fingerprint(recipe.pairs)["cross_user"] == 1
    write_prepare(recipe)
    users = list(range(1, 9))
    texts = {u: [f"This user loves {GENRES[taste(u)]} films.", f"This user loves {GENRES[(taste(u) + 1) % 4]} films."]
             for u in users}
    r = load_reward(recipe)([t for u in users for t in texts[u]], [u for u in users for _ in texts[u]])["reward"]
    rewards = {u: r[2 * i: 2 * i + 2].tolist() for i, u in enumerate(users)}
    prof = write_stage(tmp_path / "sample", "sample", "profiles", profile_rows(texts))
    sc = write_stage(tmp_path / "score", "score", "scores", score_rows(rewards))
    out = pairs_stage(recipe, prof, sc, tmp_path / "run" / "round_1" / "pairs", round=1)
    df = read_artifact(out, "pairs")
    own = df.filter(pl.col("rejected_user") == pl.col("user_id"))
    cross = df.filter(pl.col("rejected_user") != pl.col("user_id"))
    assert own["user_id"].to_list() == users and cross["user_id"].to_list() == users
    for row in cross.iter_rows(named=True):
        u, v = row["user_id"], row["rejected_user"]
        assert taste(v) != taste(u) and row["rejected_reward"] < row["chosen_reward"]
        assert row["chosen"][0]["content"] == texts[u][0] and row["rejected"][0]["content"] == texts[v][0]
        assert row["prompt"][0]["content"].startswith(f"Given a user {u} ")
    info = read_stage_json(out)
    assert info["cross_user_pairs"] == len(users) and info["rows"]["pairs"] == 2 * len(users)
    # each chosen profile is in two pairs, and counts once in what the sides summary says of the chosen side
    from rlrf.quality import distinct_n

    assert info["sides"]["chosen"]["distinct_2"] == pytest.approx(distinct_n([texts[u][0] for u in users]))
    # the LLaMA-Factory export holds the same pairs
    lf = json.loads((out / "llamafactory" / f"{dataset_name(1)}.json").read_text())
    assert len(lf) == 2 * len(users)
    # `rlrf inspect pairs` names whose profile a rejected one is when it is another user's
    from rlrf.inspect import show_pairs

    shown = show_pairs(tmp_path / "run", 1, users[0], False, 0)
    v = cross.filter(pl.col("user_id") == users[0])["rejected_user"][0]
    assert f"REJECTED user {v} #0" in shown and "REJECTED #1" in shown
    with pytest.raises(ValueError, match="pairs.cross_user"):
        load_recipe(None, ["pairs.cross_user=-1"])


def test_coin_flip_swaps_a_seeded_half_of_the_pairs_and_keeps_the_held_out_labels(tmp_path):
    """pairs.coin_flip, the null control: half of the pairs (floor) have chosen and rejected swapped with their
    rewards and indices, the same half every time; the held-out pairs keep the reward's labels."""
    train = {u: [0.1 * (u % 3), 0.5 + 0.01 * u] for u in range(1, 8)}
    valid = {u: [0.9, 0.2] for u in range(20, 23)}
    texts = {u: [f"user {u} profile {i}" for i in range(2)] for u in [*train, *valid]}
    prof = write_stage(tmp_path / "sample", "sample", "profiles",
                       profile_rows({u: texts[u] for u in train}) + profile_rows({u: texts[u] for u in valid}, "valid"))
    sc = write_stage(tmp_path / "score", "score", "scores", score_rows(train) + score_rows(valid, "valid"))
    plain = read_artifact(pairs_stage(load_recipe(None), prof, sc, tmp_path / "plain", round=1), "pairs")
    recipe = load_recipe(None, ["pairs.coin_flip=true"])
    flipped = read_artifact(pairs_stage(recipe, prof, sc, tmp_path / "flip", round=1), "pairs")
    again = read_artifact(pairs_stage(recipe, prof, sc, tmp_path / "flip2", round=1), "pairs")
    assert flipped.equals(again) and flipped["user_id"].to_list() == plain["user_id"].to_list()
    swapped = flipped["chosen_idx"] != plain["chosen_idx"]
    assert int(swapped.sum()) == 3  # floor(7 / 2)
    for a, b in zip(plain.iter_rows(named=True), flipped.iter_rows(named=True)):
        if a["chosen_idx"] == b["chosen_idx"]:
            assert a == b
        else:
            assert (b["chosen"], b["rejected"], b["chosen_reward"], b["rejected_idx"]) == \
                (a["rejected"], a["chosen"], a["rejected_reward"], a["chosen_idx"])
            assert b["margin"] == pytest.approx(-a["margin"])
    held = read_artifact(tmp_path / "flip", "heldout_pairs")
    assert held["user_id"].to_list() == [20, 21, 22] and held["chosen_idx"].to_list() == [0, 0, 0]
    with pytest.raises(ValueError, match="pairs.coin_flip"):
        load_recipe(None, ["pairs.coin_flip=true", "pairs.cross_user=1"])


def test_swap_genres_replaces_every_spelling_of_each_named_genre_worked_by_hand():
    """Comedy and Drama are named 100 times, Sci-Fi and Western 10: a swap takes a genre of like popularity."""
    import numpy as np

    from rlrf.quality import swap_genres

    genres = ["Comedy", "Drama", "Sci-Fi", "Western"]
    freq = np.array([100, 100, 10, 10])
    rng = np.random.default_rng(0)
    assert swap_genres("Loves science fiction, and more sci-fi.", genres, freq, rng, nearest=1) == \
        "Loves Western, and more Western."
    assert swap_genres("Comedy fan", genres, freq, rng, nearest=1) == "Drama fan"  # the popular one for the popular
    two = swap_genres("Comedy and drama fan", genres, freq, rng, nearest=2)
    assert sorted(two.replace(" fan", "").split(" and ")) == ["Sci-Fi", "Western"]  # each its own; none left closer
    assert swap_genres("Likes long films", genres, freq, rng) is None  # no genre named
    assert swap_genres("comedy, drama, sci-fi", genres, freq, rng) is None  # too few genres left to swap in


def test_genre_swap_pairs_through_the_stage_with_the_real_lexical_reward(tmp_path):
    """Each train user's chosen profile names the genre its held-out positives hold; pairs.genre_swap pairs it against
    itself with that genre swapped for another, kept where the lexical reward scores the swap lower: the rejected side
    differs from the chosen in the genre word alone, and the prompt is the user's own."""
    from rlrf.inspect import show_pairs
    from tests.reward_fixtures import GENRES, make_recipe, taste, write_prepare

    recipe = make_recipe(tmp_path, "score.reward=lexical", "score.retrieval_k=10", "pairs.genre_swap=true")
    write_prepare(recipe)
    users = list(range(1, 9))
    texts = {u: [f"This user loves {GENRES[taste(u)]} films.", "This user watches films."] for u in users}
    prof = write_stage(tmp_path / "sample", "sample", "profiles", profile_rows(texts))
    sc = write_stage(tmp_path / "score", "score", "scores", score_rows({u: [0.9, 0.1] for u in users}))
    out = pairs_stage(recipe, prof, sc, tmp_path / "run" / "round_1" / "pairs", round=1)
    df = read_artifact(out, "pairs")
    assert df.height >= len(users) // 2 and (df["rejected_idx"] == -1).all() and (df["margin"] > 0).all()
    for row in df.iter_rows(named=True):
        u = row["user_id"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == texts[u][0] and rejected != chosen
        assert rejected.replace(rejected.split()[3], "X") == chosen.replace(GENRES[taste(u)], "X")  # the genre alone
        assert row["prompt"][0]["content"].startswith(f"Given a user {u} ")
    info = read_stage_json(out)
    assert info["dropped"].get("no_genre_swap", 0) == len(users) - df.height
    assert "(the chosen, genres swapped)" in show_pairs(tmp_path / "run", 1, df["user_id"][0], False, 0)
    with pytest.raises(ValueError, match="pairs.genre_swap"):
        load_recipe(None, ["pairs.genre_swap=true", "pairs.cross_user=1"])


def test_divpo_pairs_the_rarest_good_profile_with_the_commonest_bad_one():
    """pairs.diverse (DivPO): user 1's best-rewarded half is {0 (diversity 0), 1 (1)}, its worst half {2 (0),
    3 (5)}: the pair is 1 over 2, not best (0) over worst (3); user 2 has 3 profiles, a pool of one each: best over
    worst. With a pool of 1/4 user 1 is best over worst too. Worked by hand."""
    sc = _scores({1: [0.9, 0.8, 0.2, 0.1], 2: [0.5, 0.4, 0.3]}).with_columns(
        div=pl.Series([0.0, 1.0, 0.0, 5.0, 1.0, 2.0, 3.0]))
    picked, dropped = select_pairs(sc, diverse="div")
    assert picked.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 1, 2), (2, 0, 2)]
    assert picked["margin"].to_list() == pytest.approx([0.6, 0.2]) and dict(dropped) == {}
    assert select_pairs(sc, diverse="div", diverse_pool=0.25)[0].select(
        "user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 3), (2, 0, 2)]
    # with the length tolerance both hold: 1 (40 tokens) is far from both of the worst half, so the pair is the
    # allowed one with the largest diversity lead, 0 over 2; user 2 has no like-length pair across its pools
    both, dropped = select_pairs(sc.with_columns(n_tokens=pl.Series([10, 40, 12, 11, 10, 30, 50])), diverse="div",
                                 length_tolerance=5)
    assert both.select("user_id", "chosen_idx", "rejected_idx").rows() == [(1, 0, 2)]
    assert dict(dropped) == {"no_pair_within_tolerance": 1}
    # a diversity lead never buys a pair whose chosen profile is below its rejected one, nor a tie
    flat = _scores({3: [0.5, 0.5]}).with_columns(div=pl.Series([0.0, 9.0]))
    assert select_pairs(flat, diverse="div")[1] == {"tie": 1}


def test_divpo_stage_by_typicality_and_by_surprisal(tmp_path, tiny_model):
    """The stage with pairs.diverse: by typicality the chosen profile is the better half's one that the other users'
    profiles do not echo; by surprisal each profile's mean token NLL on its own under sample.model (here a tiny
    random Llama) is the criterion, NaN for an empty text, and the choice follows it."""
    from rlrf.pairs import with_diversity
    from rlrf.quality import token_nll
    from rlrf.llm import load_generator

    texts = {u: ["likes drama films", f"only {w} here", "likes drama films too", f"dislikes {w} a lot"]
             for u, w in ((1, "noir"), (2, "westerns"), (3, "musicals"))}
    rewards = {u: [0.9, 0.8, 0.2, 0.1] for u in texts}
    prof, sc = _stage_inputs(tmp_path, rewards, texts=texts)
    out = pairs_stage(load_recipe(None, ["pairs.diverse=typicality"]), prof, sc, tmp_path / "pairs_t", round=1)
    pairs = read_artifact(out, "pairs")
    assert [m[0]["content"] for m in pairs["chosen"]] == ["only noir here", "only westerns here", "only musicals here"]
    assert [m[0]["content"] for m in pairs["rejected"]] == ["likes drama films too"] * 3

    profiles = read_artifact(prof, "profiles").with_columns(
        text=pl.when(pl.col("sample_idx") == 3).then(pl.lit("")).otherwise(pl.col("text")))
    got = with_diversity(profiles, "surprisal", str(tiny_model))["diversity"].to_numpy()
    nll, count = token_nll(profiles["text"].to_list(), *load_generator(tiny_model))
    want = nll / count.clip(1)
    assert got[profiles["sample_idx"].to_numpy() != 3] == pytest.approx(want[profiles["sample_idx"].to_numpy() != 3])
    assert all(x != x for x in got[profiles["sample_idx"].to_numpy() == 3])  # NaN: nothing to measure
    recipe = load_recipe(None, ["pairs.diverse=surprisal", f"sample.model={tiny_model}"])
    out = pairs_stage(recipe, prof, sc, tmp_path / "pairs_s", round=1)
    full = with_diversity(read_artifact(prof, "profiles"), "surprisal", str(tiny_model))
    for row in read_artifact(out, "pairs").iter_rows(named=True):
        d = dict(full.filter(pl.col("user_id") == row["user_id"]).select("sample_idx", "diversity").iter_rows())
        assert row["chosen"][0]["content"] == texts[row["user_id"]][max((0, 1), key=d.get)]
        assert row["rejected"][0]["content"] == texts[row["user_id"]][min((2, 3), key=d.get)]


def test_divpo_recipe_keys_are_checked():
    from rlrf.config import fingerprint

    assert "diverse" not in fingerprint(load_recipe(None).pairs)
    assert fingerprint(load_recipe(None, ["pairs.diverse=surprisal"]).pairs)["diverse"] == "surprisal"
    for bad, key in (("pairs.diverse=entropy", "pairs.diverse"), ("pairs.diverse_pool=0.75", "pairs.diverse_pool"),
                     ("pairs.diverse_pool=0", "pairs.diverse_pool")):
        with pytest.raises(ValueError, match=key):
            load_recipe(None, [bad])
    with pytest.raises(ValueError, match="pairs.diverse.*pairs.cross_user"):
        load_recipe(None, ["pairs.diverse=typicality", "pairs.cross_user=1"])
