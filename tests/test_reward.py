"""The reward: hand-made lists with a reranker whose scores we control, the score stage, its resume."""

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.errors import StageError
from rlrf.judge import train_reranker_stage
from rlrf.rerank_train import train_stage
from rlrf.reward import METRICS, profile_rewards, reward_profiles, score_lists, with_tie_break
from rlrf.score import score_stage, spread_summary
from tests.reward_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.reward_fixtures import (make_recipe, profile_texts, write_fake_encode, write_prepare,
                                   write_profiles)


class SignScorer(torch.nn.Module):
    """score(item) = sign(profile[0]) * item_id: a positive profile ranks high ids first, a negative one low."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, item_ids, user_vecs, user_index):
        self.calls += 1
        return torch.sign(user_vecs[user_index, :1]) * item_ids.float()


class ScaleScorer(torch.nn.Module):
    """score(item) = profile[0] * item_id: same ranking for every positive profile, wider margins for larger ones."""

    def forward(self, item_ids, user_vecs, user_index):
        return user_vecs[user_index, :1] * item_ids.float()


def hand_lists():
    ids = list(range(1, 11))
    return pl.DataFrame({"list_id": [0, 1], "user_id": [7, 7], "split": ["train", "train"],
                         "item_ids": [ids, ids],
                         "labels": [[0] * 8 + [1, 1], [1] + [0] * 8 + [1]]},
                        schema={"list_id": pl.Int64, "user_id": pl.Int64, "split": pl.Utf8,
                                "item_ids": pl.List(pl.Int64), "labels": pl.List(pl.Int8)})


def test_reward_on_hand_made_lists():
    # list 0: positives are items 9, 10; list 1: items 1 and 10.
    # profile A (+1) ranks 10, 9, ..., 1: list 0 NDCG@5 = 1; list 1 puts 10 first and 1 last:
    #   DCG@5 = 1, IDCG = 1 + 1/log2(3) = 1.63093, NDCG@5 = 0.61315 -> reward (1 + 0.61315) / 2 = 0.80657
    # profile B (-1) ranks 1, ..., 10: list 0 has no positive in the top 5 -> 0; list 1 -> 0.61315 -> 0.30657
    # MAP@5: A = (1 + 1) / 2 = 1 (list 0: 1/1, 2/2; list 1: 1/1); B = (0 + 1) / 2 = 0.5
    vecs = np.array([[1.0], [-1.0]], dtype=np.float32)
    values, n = reward_profiles(SignScorer(), vecs, np.array([7, 7]), hand_lists(), "ndcg@5")
    np.testing.assert_allclose(values["ndcg@5"], [0.806574, 0.306574], atol=1e-5)
    np.testing.assert_allclose(values["map@5"], [1.0, 0.5])
    # NDCG@1: A: list 0 top is 10 (pos) = 1, list 1 top is 10 (pos) = 1; B: list 0 top is 1 (neg) = 0, list 1 = 1
    np.testing.assert_allclose(values["ndcg@1"], [1.0, 0.5])
    assert n.tolist() == [2, 2]
    assert set(values) == {*METRICS, "margin"}
    # margin: mean positive score - mean negative score. A, list 0: (9 + 10)/2 - mean(1..8) = 9.5 - 4.5 = 5;
    # list 1: (1 + 10)/2 - mean(2..9) = 5.5 - 5.5 = 0 -> 2.5. B is the mirror image: -2.5
    np.testing.assert_allclose(values["margin"], [2.5, -2.5])


def test_one_forward_per_batch_not_per_profile():
    lists = pl.concat([hand_lists().with_columns(pl.lit(u, pl.Int64).alias("user_id")) for u in (1, 2, 3)])
    vecs = np.array([[1.0], [-1.0], [1.0], [-1.0], [1.0], [2.0]], dtype=np.float32)
    users = np.array([1, 1, 2, 2, 3, 3])
    scorer = SignScorer()
    big, _ = reward_profiles(scorer, vecs, users, lists, "ndcg@5", batch_profiles=512)
    assert scorer.calls == 1
    small, _ = reward_profiles(scorer, vecs, users, lists, "ndcg@5", batch_profiles=4)
    assert scorer.calls == 1 + 2
    np.testing.assert_allclose(big["ndcg@5"], small["ndcg@5"])
    np.testing.assert_allclose(big["ndcg@5"], [0.806574, 0.306574] * 2 + [0.806574] * 2, atol=1e-5)


def test_tie_break_orders_equal_metrics_by_margin_only():
    # profiles +1 and +2 rank every list the same (equal NDCG@5) but +2 separates positives twice as far
    vecs = np.array([[1.0], [2.0], [-1.0]], dtype=np.float32)
    v, _ = reward_profiles(ScaleScorer(), vecs, np.array([7, 7, 7]), hand_lists())
    assert v["ndcg@5"][0] == v["ndcg@5"][1]
    np.testing.assert_allclose(v["margin"], [2.5, 5.0, -2.5])
    r = with_tie_break(v["ndcg@5"], v["margin"], 1e-6)
    assert r[1] > r[0] > r[2]                                   # the tie is broken, the order kept
    assert abs(r[0] - v["ndcg@5"][0]) < 1e-6 and np.array_equal(with_tie_break(v["ndcg@5"], v["margin"], 0), v["ndcg@5"])
    # a worse metric never wins by margin: a huge margin moves the reward by < tie_break
    assert with_tie_break(np.array([0.5]), np.array([1e9]), 1e-6)[0] < 0.5 + 2e-5


def test_no_profiles_or_no_lists_give_empty_or_nan_rewards():
    values, n = reward_profiles(SignScorer(), np.zeros((0, 1), np.float32), np.zeros(0, np.int64), hand_lists())
    assert len(values["ndcg@5"]) == 0 and len(n) == 0
    values, n = reward_profiles(SignScorer(), np.ones((1, 1), np.float32), np.array([99]), hand_lists())
    assert n.tolist() == [0] and np.isnan(values["ndcg@5"][0])


def test_profiles_without_lists_get_nan_and_unsorted_owner_is_refused():
    vals, n = profile_rewards(np.array([[2.0, 1.0]]), np.array([[1, 0]]), np.array([1]), 3, ("ndcg@1",))
    assert n.tolist() == [0, 1, 0] and vals["ndcg@1"][1] == 1.0 and np.isnan(vals["ndcg@1"][[0, 2]]).all()
    with pytest.raises(ValueError, match="sorted"):
        score_lists(SignScorer(), np.ones((2, 1), np.float32), np.array([1, 0]), np.ones((2, 3), np.int64))


def test_spread_summary_by_hand():
    df = pl.DataFrame({"user_id": [1, 1, 2, 2, 3], "reward": [0.5, 0.7, 0.4, 0.4, 0.9],
                       "empty_text": [False, True, False, False, False]})
    s = spread_summary(df)
    assert s["reward_mean"] == pytest.approx(0.58)
    assert s["within_user_range_mean"] == pytest.approx(0.1)   # (0.2 + 0) / 2, user 3 has one profile
    assert s["within_user_std_mean"] == pytest.approx(0.05)    # (0.1 + 0) / 2
    assert s["all_tie_share"] == pytest.approx(0.5) and s["users_with_2plus"] == 2 and s["empty_text"] == 1


@pytest.fixture
def scored_run(tmp_path):
    recipe = make_recipe(tmp_path)
    write_prepare(recipe)
    texts = profile_texts()
    enc1 = write_fake_encode(recipe, write_profiles(recipe, runs.stage_dir(recipe, "sample", 1),
                                                    {u: t[:1] for u, t in texts.items()}),
                             runs.stage_dir(recipe, "encode", 1))
    train_reranker_stage(recipe, runs.reranker_dir(recipe, 1), enc1)  # cross-fitted judges a and b
    # round 2's profiles: the taste (sample 0), the wrong genre (1), an empty text (2)
    texts2 = {u: [*t, ""] for u, t in texts.items()}
    prof2 = write_profiles(recipe, runs.stage_dir(recipe, "sample", 2), texts2, round=2)
    enc2 = write_fake_encode(recipe, prof2, runs.stage_dir(recipe, "encode", 2))
    return recipe, prof2, enc2


def test_score_stage_prefers_the_profile_that_names_the_taste(scored_run):
    recipe, prof, enc = scored_run
    out = score_stage(recipe, prof, enc, runs.reranker_dir(recipe, 2), runs.stage_dir(recipe, "score", 2))
    s = read_artifact(out, "scores").sort("user_id", "sample_idx")
    assert s.height == 40 * 3 and s["round"].unique().to_list() == [2]
    wide = s.pivot(on="sample_idx", index="user_id", values="reward")
    assert (wide["0"] > wide["1"]).mean() > 0.9
    # the empty profile still gets a finite reward, and is counted
    empty = s.filter(pl.col("sample_idx") == 2)
    assert empty["empty_text"].all() and empty["reward"].is_finite().all()
    assert s["n_lists"].unique().to_list() == [4]
    assert set(METRICS) <= set(s.columns)
    info = json.loads((out / "stage.json").read_text())["summary"]
    assert info["empty_text"] == 40 and info["all_tie_share"] < 0.1 and info["within_user_range_mean"] > 0.2
    assert info["reward_mean"] == pytest.approx(s["reward"].mean())
    np.testing.assert_allclose(s["reward"], s["ndcg@5"] + 1e-6 * np.tanh(s["margin"]), rtol=0, atol=1e-12)
    assert info["metric_all_tie_share"] >= info["all_tie_share"]


def test_score_refuses_a_base_reranker(scored_run, tmp_path):
    recipe, prof, enc = scored_run
    base = train_stage(recipe, tmp_path / "base", None, knowledge=False, seeds=[1])
    with pytest.raises(StageError, match="base reranker"):
        score_stage(recipe, prof, enc, base, tmp_path / "score")


@pytest.mark.faults
def test_score_resume_after_kill_gives_the_clean_rows(scored_run, tmp_path):
    recipe, prof, enc = scored_run
    rer = runs.reranker_dir(recipe, 2)
    clean = read_artifact(score_stage(recipe, prof, enc, rer, tmp_path / "clean"), "scores").sort("user_id", "sample_idx")
    killed = tmp_path / "killed"
    code = (f"from tests.reward_fixtures import make_recipe; from rlrf.score import score_stage; import torch; "
            f"torch.set_num_threads(1); "
            f"score_stage(make_recipe({str(tmp_path)!r}), {str(prof)!r}, {str(enc)!r}, {str(rer)!r}, {str(killed)!r})")
    env = {**os.environ, "RLRF_KILL_AFTER_SHARDS": "2"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.getcwd(), capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((killed / "_shards").glob("*.json"))) == 2 and not (killed / "stage.json").exists()
    again = read_artifact(score_stage(recipe, prof, enc, rer, killed), "scores").sort("user_id", "sample_idx")
    assert again.height == clean.height == again.select("user_id", "sample_idx").unique().height
    assert again.equals(clean)
