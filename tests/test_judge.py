"""The cross-fitted reranker judge (rlrf/judge.py) and the reward interface as a TRL reward function.

One tiny synthetic run (tests/reward_fixtures.py: 40 users, 48 items) is trained once for the module."""

import json

import numpy as np
import polars as pl
import pytest
import torch

import rlrf.reward
from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.errors import StageError
from rlrf.judge import RerankerJudge, fold_of, judge_seeds, member_roles, train_reranker_stage
from rlrf.reward import ProfileReward, judge_scorer, retrieval_scorer
from tests.reward_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.reward_fixtures import (GENRES, fake_vector, make_recipe, profile_texts, taste, write_fake_encode,
                                   write_prepare, write_profiles)

N_USERS = 40
JUDGES = 2  # score.judges: seeds per judge, so each user is judged by 2 members of a and 2 of b


# ----------------------------------------------------------------------------- folds and roles


def test_fold_of_is_balanced_and_seeded():
    users = np.arange(1, 11)
    f = fold_of(users, 3, seed=7)
    assert set(f) == set(range(1, 11)) and set(f.values()) == {0, 1, 2}
    sizes = np.bincount(list(f.values()))
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 10
    assert fold_of(users, 3, seed=7) == f
    # unsorted, duplicated ids give the same assignment
    assert fold_of(np.concatenate([users[::-1], users[:3]]), 3, seed=7) == f
    assert fold_of(users, 3, seed=8) != f
    for n, k in [(40, 2), (41, 4), (7, 7)]:
        s = np.bincount(list(fold_of(range(n), k, 1).values()), minlength=k)
        assert s.max() - s.min() <= 1 and s.min() >= 1


def test_member_roles_partition_the_users():
    fold = fold_of(range(1, 41), 2, seed=3)
    for f in (0, 1):
        train, stop, judged = member_roles(fold, f, 0.15, seed=3)
        assert judged == {u for u, g in fold.items() if g == f}
        assert not (train & stop) and not (train & judged) and not (stop & judged)
        assert train | stop | judged == set(range(1, 41))
        assert len(stop) == round(0.15 * 20) and stop
        assert member_roles(fold, f, 0.15, seed=3) == (train, stop, judged)
    # a tiny share still stops on one user
    _, stop, _ = member_roles(fold, 0, 0.001, seed=3)
    assert len(stop) == 1


# ----------------------------------------------------------------------------- the trained judge


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory):
    """Round-1 profiles (sample 0 only, naming each user's taste) for all 40 users, fake-encoded, and the
    cross-fitted judges a and b trained on them (2 seeds x 2 folds each)."""
    tmp = tmp_path_factory.mktemp("judge")
    recipe = make_recipe(tmp, "reranker.epochs=4", "reranker.lr=0.02", f"score.judges={JUDGES}")
    write_prepare(recipe)
    texts = profile_texts()
    prof = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), {u: t[:1] for u, t in texts.items()})
    enc = write_fake_encode(recipe, prof, runs.stage_dir(recipe, "encode", 1))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_reranker_stage(recipe, runs.reranker_dir(recipe, 1), enc)
    finally:
        torch.set_num_threads(n)
    return recipe, out


def embed(texts):
    return np.stack([fake_vector(t) for t in texts])  # dim 8, as write_fake_encode


def test_members_never_judge_a_user_they_saw(judged_run):
    recipe, out = judged_run
    members = json.loads((out / "members.json").read_text())
    seeds = judge_seeds(recipe)
    assert len(members) == 2 * JUDGES * recipe.reranker.folds
    everyone = set(range(1, N_USERS + 1))
    for m in members:
        judged, seen = set(m["judged_users"]), set(m["seen_users"])
        assert judged and seen
        assert not (judged & seen), m["name"]
        assert judged | seen == everyone  # all users are profiled: none is left out of a member
        assert m["seed"] in seeds[m["judge"]]
        assert (out / "checkpoints" / f"{m['name']}.safetensors").is_file()
    # every profiled user is judged by exactly score.judges members of each judge, and seen by the others
    for j in ("a", "b"):
        mine = [m for m in members if m["judge"] == j]
        for u in everyone:
            assert sum(u in m["judged_users"] for m in mine) == JUDGES
            assert sum(u not in m["seen_users"] for m in mine) == JUDGES
    sa = {m["seed"] for m in members if m["judge"] == "a"}
    sb = {m["seed"] for m in members if m["judge"] == "b"}
    assert len(sa) == len(sb) == JUDGES and not (sa & sb)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"heldout_ndcg@5", "popularity_ndcg@5"} <= set(metrics)
    assert metrics["members"] == len(members)
    assert 0 <= metrics["heldout_ndcg@5"]["mean"] <= 1 and 0 <= metrics["popularity_ndcg@5"]["mean"] <= 1


def test_no_profile_is_scored_by_a_member_that_saw_its_user(judged_run, monkeypatch):
    recipe, out = judged_run
    judge = judge_scorer(recipe, out, "a")
    assert len(judge.members) == JUDGES * recipe.reranker.folds
    assert judge.trained_users == frozenset()  # cross-fitted: no user was seen by every member
    seen_of = {id(model): seen for model, seen in judge.members}
    calls = []
    real = rlrf.reward.reward_profiles

    def recording(model, vecs, profile_users, *args, **kw):
        calls.append((id(model), np.asarray(profile_users).tolist()))
        return real(model, vecs, profile_users, *args, **kw)

    monkeypatch.setattr(rlrf.reward, "reward_profiles", recording)
    users = np.repeat(np.arange(1, N_USERS + 1), 2)
    texts = [t for u in range(1, N_USERS + 1) for t in profile_texts(N_USERS)[u]]
    r = judge.score_vectors(embed(texts), users)
    assert calls and {mid for mid, _ in calls} == set(seen_of)
    scored_by = {u: 0 for u in range(1, N_USERS + 1)}
    for mid, us in calls:
        bad = set(us) & seen_of[mid]
        assert not bad, f"member {mid} scored user(s) {sorted(bad)} it trained or early-stopped on"
        for u in set(us):
            scored_by[u] += 1
    assert set(scored_by.values()) == {JUDGES}  # and every user by all the members that never saw it
    assert np.isfinite(r["reward"]).all() and r["n_lists"].tolist() == [4] * len(users)


def test_judge_reward_is_the_mean_of_the_members_that_never_saw_the_user(judged_run):
    recipe, out = judged_run
    judge = judge_scorer(recipe, out, "a")
    u = 5
    v = embed([f"likes {GENRES[taste(u)]}"])
    got = judge.score_vectors(v, [u])
    lists = read_artifact(runs.prepare_dir(recipe), "lists", "prepare")
    by_hand = [rlrf.reward.reward_profiles(m, v, np.array([u]), lists, "ndcg@5")[0]["ndcg@5"][0]
               for m, seen in judge.members if u not in seen]
    assert len(by_hand) == JUDGES
    assert got["ndcg@5"][0] == pytest.approx(np.mean(by_hand))
    # reward = metric + tie_break * tanh(margin)
    assert got["reward"][0] == pytest.approx(got["ndcg@5"][0] + 1e-6 * np.tanh(got["margin"][0]), abs=1e-12)


def test_judge_prefers_the_profile_that_names_the_taste(judged_run):
    recipe, out = judged_run
    judge = judge_scorer(recipe, out, "a")
    users = np.arange(1, N_USERS + 1)
    good = embed([f"likes {GENRES[taste(u)]}" for u in users])
    bad = embed([f"likes {GENRES[(taste(u) + 2) % len(GENRES)]}" for u in users])
    rg, rb = judge.score_vectors(good, users)["reward"], judge.score_vectors(bad, users)["reward"]
    assert rg.mean() > rb.mean() + 0.1
    assert (rg > rb).mean() > 0.75


class Recorder(torch.nn.Module):
    """A stand-in reranker: scores item ids by the profile's first coordinate; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, item_ids, user_vecs, user_index):
        self.calls += 1
        return user_vecs[user_index, :1] * item_ids.float()


def hand_lists():
    ids = list(range(1, 11))
    return pl.DataFrame({"list_id": [0, 1], "user_id": [7, 8], "item_ids": [ids, ids],
                         "labels": [[0] * 9 + [1], [1] + [0] * 9]},
                        schema={"list_id": pl.Int64, "user_id": pl.Int64, "item_ids": pl.List(pl.Int64),
                                "labels": pl.List(pl.Int8)})


def test_judge_refuses_a_user_every_member_trained_on():
    model = Recorder()
    judge = RerankerJudge([(model, frozenset({7, 9}))], hand_lists(), where="the test judge")
    assert judge.trained_users == frozenset({7, 9})
    with pytest.raises(StageError, match="trained on") as e:
        judge.score_vectors(np.ones((1, 3), np.float32), [7])
    assert "[7]" in str(e.value) and "the test judge" in str(e.value)
    assert model.calls == 0
    # even next to a user it may score, the in-sample one is refused
    with pytest.raises(StageError, match="trained on"):
        judge.score_vectors(np.ones((2, 3), np.float32), [8, 7])
    # the user it never saw is scored
    r = judge.score_vectors(np.ones((1, 3), np.float32), [8])
    assert r["n_lists"].tolist() == [1] and r["ndcg@5"][0] < 1.0
    # with a second member that never saw 7, user 7 is scored by that member alone
    other = Recorder()
    judge2 = RerankerJudge([(model, frozenset({7})), (other, frozenset({8}))], hand_lists())
    assert judge2.trained_users == frozenset()
    calls = model.calls
    r = judge2.score_vectors(np.ones((1, 3), np.float32), [7])
    assert model.calls == calls and other.calls == 1 and r["ndcg@5"][0] == 1.0


def test_a_user_seen_by_every_member_of_a_trained_judge_is_refused(judged_run):
    recipe, out = judged_run
    judge = judge_scorer(recipe, out, "a")
    # rebuild the judge from only the members that saw user 3: each of them trained or stopped on it
    saw = [(m, s) for m, s in judge.members if 3 in s]
    assert len(saw) == JUDGES
    with pytest.raises(StageError, match="trained on"):
        RerankerJudge(saw, judge.lists).score_vectors(embed(["likes Drama"]), [3])


def test_unprofiled_users_train_every_member_and_are_never_judged(tmp_path):
    # train users 21..28 have no profile: they join every member's training with a zero profile
    # (split_of: users 1..28 are train, 29..34 valid, 35..40 test; valid and test users all have one)
    recipe = make_recipe(tmp_path, "reranker.epochs=1", "reranker.without_profile=zero")
    write_prepare(recipe)
    unprofiled = set(range(21, 29))
    texts = {u: t[:1] for u, t in profile_texts().items() if u not in unprofiled}
    prof = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), texts)
    enc = write_fake_encode(recipe, prof, runs.stage_dir(recipe, "encode", 1))
    out = train_reranker_stage(recipe, runs.reranker_dir(recipe, 1), enc)
    members = json.loads((out / "members.json").read_text())
    judged = set().union(*[set(m["judged_users"]) for m in members])
    assert judged == set(texts)
    for m in members:
        assert unprofiled <= set(m["seen_users"])
        assert not (set(m["judged_users"]) & set(m["seen_users"]))
    judge = judge_scorer(recipe, out, "a")
    assert judge.trained_users == frozenset(unprofiled)
    with pytest.raises(StageError, match="trained on"):
        judge.score_vectors(embed(["likes Drama"]), [25])
    assert np.isfinite(judge.score_vectors(embed(["likes Drama"]), [12])["reward"]).all()


def test_judge_trains_when_only_train_users_have_a_profile(tmp_path):
    """sample.splits=[train]: the valid and test splits have no list with a profile (empty arrays of no width)."""
    recipe = make_recipe(tmp_path, "reranker.epochs=1")
    write_prepare(recipe)
    texts = {u: t[:1] for u, t in profile_texts().items() if u <= 28}  # the train split only
    prof = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), texts)
    enc = write_fake_encode(recipe, prof, runs.stage_dir(recipe, "encode", 1))
    out = train_reranker_stage(recipe, runs.reranker_dir(recipe, 1), enc)
    members = json.loads((out / "members.json").read_text())
    assert set().union(*[set(m["judged_users"]) for m in members]) == set(texts)


# ----------------------------------------------------------------------------- the reward as a TRL reward function


def conversational(text):
    return [{"role": "assistant", "content": text}]


def trl_kwargs(user_ids, texts, conv=True):
    """The keyword arguments GRPOTrainer._calculate_rewards passes (trl 0.x/1.x): prompts, completions,
    completion_ids, every other dataset column (here user_id), trainer_state, log_extra, log_metric."""
    n = len(texts)
    prompts = [[{"role": "user", "content": f"Describe user {u}"}] for u in user_ids] if conv else \
        [f"Describe user {u}" for u in user_ids]
    return dict(prompts=prompts, completions=[conversational(t) for t in texts] if conv else list(texts),
                completion_ids=[[1, 2, 3][: 1 + i % 3] for i in range(n)], user_id=list(user_ids),
                trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)


@pytest.fixture(params=["retrieval", "reranker"])
def reward(request, judged_run):
    recipe, out = judged_run
    if request.param == "retrieval":
        items = read_artifact(runs.prepare_dir(recipe), "items", "prepare").sort("item_id")
        item_vecs = np.zeros((int(items["item_id"].max()) + 1, 8), np.float32)
        item_vecs[items["item_id"].to_numpy()] = embed(items["text"].to_list())
        scorer = retrieval_scorer(recipe, item_vecs)
    else:
        scorer = judge_scorer(recipe, out, "a")
    return ProfileReward(scorer, embed)


@pytest.mark.parametrize("conv", [True, False], ids=["conversational", "plain"])
def test_reward_func_called_as_grpo_trainer_calls_it(reward, conv):
    f = reward.as_reward_func()
    assert f.__name__ == f"rlrf_{reward.name}"
    users = [1, 2, 3, 4, 5, 6, 7, 8]
    good = [f"likes {GENRES[taste(u)]}" for u in users]
    bad = [f"likes {GENRES[(taste(u) + 2) % len(GENRES)]}" for u in users]
    rg = f(**trl_kwargs(users, good, conv))
    rb = f(**trl_kwargs(users, bad, conv))
    for r in (rg, rb):
        assert isinstance(r, list) and len(r) == len(users)
        assert all(type(x) is float and np.isfinite(x) for x in r)
    assert np.mean(rg) > np.mean(rb)
    if reward.name == "retrieval":  # training-free and exact: every user prefers its taste
        assert all(g > b for g, b in zip(rg, rb))
    # the same as calling the reward directly
    np.testing.assert_allclose(rg, reward(good, users)["reward"])


def test_reward_func_both_completion_kinds_agree_and_nan_becomes_nan_as(reward):
    f = reward.as_reward_func()
    users = [9, 10, 11]
    texts = ["likes Drama", "likes Comedy and Horror", ""]
    assert f(**trl_kwargs(users, texts, True)) == f(**trl_kwargs(users, texts, False))
    # a user with nothing to judge on (no lists) gets nan_as
    assert f(**trl_kwargs([9999], ["likes Drama"])) == [0.0]
    assert reward.as_reward_func(nan_as=-1.0)(**trl_kwargs([9999], ["likes Drama"])) == [-1.0]


def test_reward_func_needs_user_id(reward):
    f = reward.as_reward_func()
    kw = trl_kwargs([1], ["likes Drama"])
    del kw["user_id"]
    with pytest.raises(ValueError, match="user_id"):
        f(**kw)
    with pytest.raises(ValueError):
        reward(["a", "b"], [1])  # one user id for two texts
    assert reward([], [])["reward"].shape == (0,)


@pytest.mark.integration
def test_reward_func_through_trl_calculate_rewards(reward):
    """TRL's own code path (GRPOTrainer._calculate_rewards) on a stand-in trainer: no model is loaded,
    but importing trl takes ~8 s here, hence the integration mark."""
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    f = reward.as_reward_func()
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]), state=SimpleNamespace(global_step=0),
        reward_funcs=[f], reward_processing_classes=[None], reward_func_names=[f.__name__],
        _log_completion_extra=lambda *a, **k: None, _log_metric=lambda *a, **k: None, environments=None)
    users = [1, 2, 3, 4]
    texts = [f"likes {GENRES[taste(u)]}" for u in users[:2]] + \
        [f"likes {GENRES[(taste(u) + 2) % len(GENRES)]}" for u in users[2:]]
    inputs = [{"prompt": [{"role": "user", "content": f"user {u}"}], "user_id": u, "split": "train"} for u in users]
    prompts = [x["prompt"] for x in inputs]
    completions = [conversational(t) for t in texts]
    out = GRPOTrainer._calculate_rewards(fake, inputs, prompts, completions, [[1]] * len(users))
    assert out.shape == (len(users), 1)
    np.testing.assert_allclose(out[:, 0].numpy(), np.float32(f(**trl_kwargs(users, texts))), rtol=1e-6)
