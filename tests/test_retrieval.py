"""The retrieval reward (rlrf/retrieval.py) on hand-made embeddings whose answers are known by hand."""

import math

import numpy as np
import polars as pl
import pytest

from rlrf.retrieval import RetrievalReward, catalogue_ndcg

E = np.zeros(0, np.int64)


def d(rank: int) -> float:
    """The NDCG discount of 0-based rank `rank`."""
    return 1.0 / math.log2(rank + 2)


# ----------------------------------------------------------------------------- catalogue_ndcg


def test_catalogue_ndcg_rank_two_and_exclusion():
    # 5 items; item 1 scores highest, item 2 (the relevant one) second
    scores = np.array([[0.1, 0.9, 0.8, 0.3, 0.2]])
    got = catalogue_ndcg(scores, [np.array([2])], [E], k=3)
    assert got[0] == pytest.approx(1 / math.log2(3))
    # excluding the item ranked above it makes item 2 rank first
    got = catalogue_ndcg(scores, [np.array([2])], [np.array([1])], k=3)
    assert got[0] == pytest.approx(1.0)
    # excluding items ranked below changes nothing
    got = catalogue_ndcg(scores, [np.array([2])], [np.array([0, 3, 4])], k=3)
    assert got[0] == pytest.approx(1 / math.log2(3))


def test_catalogue_ndcg_cutoff_two_relevant_and_rows():
    scores = np.array([[0.1, 0.9, 0.8, 0.3, 0.2],
                       [0.1, 0.9, 0.8, 0.3, 0.2],
                       [0.5, 0.4, 0.3, 0.2, 0.1]])
    rel = [np.array([4]), np.array([1, 3]), E]
    got = catalogue_ndcg(scores, rel, [E, E, E], k=3)
    assert got[0] == 0.0                       # item 4 ranks 5th: outside the top 3
    # items 1 (rank 0) and 3 (rank 2): (1 + 1/log2(4)) / (1 + 1/log2(3))
    assert got[1] == pytest.approx((1 + d(2)) / (1 + d(1)))
    assert np.isnan(got[2])                    # no relevant item -> NaN
    assert got.shape == (3,)


def test_catalogue_ndcg_constant_scorer_ties_are_pessimistic():
    scores = np.full((1, 5), 0.5)
    # the relevant item shares the worst rank of a 5-way tie (rank 4): outside k=3 -> 0
    assert catalogue_ndcg(scores, [np.array([2])], [E], k=3)[0] == 0.0
    # with k=5 it earns the discount of rank 4, not of rank 0
    assert catalogue_ndcg(scores, [np.array([2])], [E], k=5)[0] == pytest.approx(d(4))
    # excluding two tied items moves it up to rank 2
    assert catalogue_ndcg(scores, [np.array([2])], [np.array([0, 1])], k=3)[0] == pytest.approx(d(2))


# ----------------------------------------------------------------------------- RetrievalReward

# items 1..8 are one-hot vectors e_1..e_8 (id 0 has no item); item_vecs is indexed by item id
N_ITEMS = 9
ITEMS = np.eye(N_ITEMS, dtype=np.float32)
VALID = np.arange(1, N_ITEMS)


def lists_frame(rows):
    return pl.DataFrame(rows, schema={"list_id": pl.Int64, "user_id": pl.Int64, "item_ids": pl.List(pl.Int64),
                                      "labels": pl.List(pl.Int64)}, orient="row")


# user 1: list 10 (half a, its first list by list_id) has positive item 1; list 11 (half b) has positive 6.
# The rows are given out of list_id order on purpose. History: item 3 (never a candidate in the catalogue).
# user 2: lists without any positive. user 3: one list only (half a), positive item 7.
LISTS = lists_frame([
    (11, 1, [5, 6, 7, 8], [0, 1, 0, 0]),
    (10, 1, [2, 1, 4, 5], [0, 1, 0, 0]),
    (20, 2, [1, 2, 3, 4], [0, 0, 0, 0]),
    (21, 2, [5, 6, 7, 8], [0, 0, 0, 0]),
    (30, 3, [2, 4, 7, 8], [0, 0, 1, 0]),
])
HISTORY = {1: np.array([3]), 2: np.array([1]), 3: np.array([5])}


def reward(candidates="catalogue", k=10):
    return RetrievalReward(ITEMS, LISTS, HISTORY, candidates=candidates, k=k, valid_items=VALID)


def at(*weights: tuple[int, float]) -> np.ndarray:
    """A profile vector with the given weight on each item's direction."""
    v = np.zeros(N_ITEMS, np.float32)
    for i, w in weights:
        v[i] = w
    return v


@pytest.mark.parametrize("candidates", ["catalogue", "lists"])
def test_profile_at_the_positives_beats_one_elsewhere(candidates):
    r = reward(candidates)
    good = at((1, 1.0), (6, 0.9))    # the user's two positives first
    bad = at((8, 1.0), (2, 0.9))     # two negatives first
    got = r.ndcg(np.stack([good, bad]), [1, 1])
    assert got[0] == pytest.approx(1.0)
    assert got[1] < got[0]
    out = r.score_vectors(np.stack([good, bad]), [1, 1])
    assert "reward" in out and out["reward"].shape == (2,)
    np.testing.assert_allclose(out["reward"], got)
    assert f"retrieval_ndcg@{r.k}" in out


def test_catalogue_ndcg_by_hand():
    r = reward("catalogue")
    # profile ranks 8 > 2 > 1 > 6 > the rest (all 0): candidates = 1..8 minus history 3
    v = at((8, 0.4), (2, 0.3), (1, 0.2), (6, 0.1))
    assert r.ndcg(v[None], [1])[0] == pytest.approx((d(2) + d(3)) / (1 + d(1)))


def test_lists_ndcg_by_hand():
    r = reward("lists", k=3)
    # list 10: [2, 1, 4, 5], profile ranks 2 > 1 > ... -> positive 1 at rank 1: 1/log2(3)
    # list 11: [5, 6, 7, 8], profile ranks 6 first -> 1.0; the reward is the mean over the lists
    v = at((2, 0.4), (1, 0.3), (6, 0.5))
    assert r.ndcg(v[None], [1])[0] == pytest.approx((d(1) + 1.0) / 2)


def test_history_items_are_never_candidates():
    r = reward("catalogue")
    plain = at((1, 0.5), (6, 0.1))
    near_history = at((3, 1.0), (1, 0.5), (6, 0.1))  # the history item 3 is the nearest item
    got = r.ndcg(np.stack([plain, near_history]), [1, 1])
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(got[0])  # item 3 is out of the ranking: it pushes nothing down
    # the same lists without a history: item 3 is a candidate again and ranks above both positives
    r2 = RetrievalReward(ITEMS, LISTS, {1: E}, candidates="catalogue", k=10, valid_items=VALID)
    without_hist = r2.ndcg(near_history[None], [1])[0]
    assert without_hist == pytest.approx((d(1) + d(2)) / (1 + d(1)))


def test_id_without_item_is_never_a_candidate():
    # item id 0 has no item: even a profile pointing at it does not push the positive down
    v = at((0, 1.0), (1, 0.5))
    r = RetrievalReward(ITEMS, LISTS, HISTORY, candidates="catalogue", k=10, valid_items=VALID)
    assert r.ndcg(v[None], [1], half="a")[0] == pytest.approx(1.0)
    r_all = RetrievalReward(ITEMS, LISTS, HISTORY, candidates="catalogue", k=10, valid_items=None)
    assert r_all.ndcg(v[None], [1], half="a")[0] == pytest.approx(d(1))


@pytest.mark.parametrize("candidates", ["catalogue", "lists"])
def test_halves_use_even_and_odd_lists_in_list_id_order(candidates):
    r = reward(candidates)
    at_x = at((1, 1.0))  # item 1: the positive of list 10 (half a)
    at_y = at((6, 1.0))  # item 6: the positive of list 11 (half b)
    vecs = np.stack([at_x, at_y])
    a = r.ndcg(vecs, [1, 1], half="a")
    b = r.ndcg(vecs, [1, 1], half="b")
    assert a[0] == pytest.approx(1.0) and b[0] < 1.0
    assert b[1] == pytest.approx(1.0) and a[1] < 1.0
    assert r.has_positives(1) and not r.has_positives(2) and not r.has_positives(99)


def test_catalogue_half_removes_the_other_halfs_positives():
    r = reward("catalogue")
    # profile ranks 6 (half b's positive) first, then 1 (half a's): for half a, item 6 leaves the candidates,
    # so item 1 ranks first; for half b, item 1 leaves and 6 ranks first
    v = at((6, 1.0), (1, 0.5))
    assert r.ndcg(v[None], [1], half="a")[0] == pytest.approx(1.0)
    assert r.ndcg(v[None], [1], half="b")[0] == pytest.approx(1.0)
    # without halves both count: 6 at rank 0, 1 at rank 1 -> 1.0 as well; a third item in front lowers it
    w = at((8, 2.0), (6, 1.0), (1, 0.5))
    assert r.ndcg(w[None], [1])[0] == pytest.approx((d(1) + d(2)) / (1 + d(1)))
    assert r.ndcg(w[None], [1], half="a")[0] == pytest.approx(d(1))  # 8, (6 gone), 1


@pytest.mark.parametrize("candidates", ["catalogue", "lists"])
def test_users_without_heldout_positives_get_nan(candidates):
    r = reward(candidates)
    v = np.stack([at((1, 1.0), (6, 0.9))] * 3)
    got = r.ndcg(v, [2, 99, 1])
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == pytest.approx(1.0)
    # user 3 has a single list (half a): half b has nothing to judge with
    v3 = at((7, 1.0))[None]
    assert r.ndcg(v3, [3], half="a")[0] == pytest.approx(1.0)
    assert np.isnan(r.ndcg(v3, [3], half="b")[0])
    assert np.isnan(r.score_vectors(v[:1], [2])["reward"][0])


def test_empty_and_invalid_arguments():
    r = reward()
    assert r.ndcg(np.zeros((0, N_ITEMS), np.float32), []).shape == (0,)
    with pytest.raises(ValueError, match="half"):
        r.ndcg(at((1, 1.0))[None], [1], half="c")
    with pytest.raises(ValueError, match="candidates"):
        RetrievalReward(ITEMS, LISTS, HISTORY, candidates="everything")


def test_same_profile_same_reward_and_scale_invariance():
    r = reward()
    v = at((8, 0.4), (2, 0.3), (1, 0.2), (6, 0.1))
    once = r.ndcg(np.stack([v, 7 * v]), [1, 1])
    assert once[0] == once[1] and np.array_equal(once, r.ndcg(np.stack([v, 7 * v]), [1, 1]))


def test_from_artifacts_takes_history_from_interactions():
    inter = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [3, 2, 8], "in_history": [True, True, False]})
    items = pl.DataFrame({"item_id": VALID})
    r = RetrievalReward.from_artifacts(ITEMS, LISTS, inter, items, "catalogue", 10)
    assert sorted(r.history[1].tolist()) == [2, 3]
    # items 3 and 2 are history: a profile nearest them still ranks positive 1 first
    v = at((3, 1.0), (2, 0.9), (1, 0.5), (6, 0.4))
    assert r.ndcg(v[None], [1])[0] == pytest.approx(1.0)


def test_halves_alternate_over_three_lists():
    # lists 40 and 42 (1st and 3rd by list_id) are half a, 41 half b; rows given in reverse order
    lists = lists_frame([(42, 4, [5, 6, 7, 8], [0, 0, 1, 0]),
                         (41, 4, [1, 2, 4, 5], [0, 1, 0, 0]),
                         (40, 4, [1, 2, 4, 8], [0, 0, 1, 0])])
    r = RetrievalReward(ITEMS, lists, {}, candidates="catalogue", k=10, valid_items=VALID)
    assert r.lists[4]["pos"][0].tolist() == [4, 7] and r.lists[4]["pos"][1].tolist() == [2]
    v = at((4, 1.0), (7, 0.9))
    assert r.ndcg(v[None], [4], half="a")[0] == pytest.approx(1.0)
    assert r.ndcg(v[None], [4], half="b")[0] < 1.0
    assert r.ndcg(at((2, 1.0))[None], [4], half="b")[0] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["lexical", "genres"])
def test_text_space_reward_prefers_the_profile_naming_the_users_genre(tmp_path, kind):
    """score.reward=lexical (word TF-IDF fitted on the item texts) and score.reward=genres (the catalogue's genre
    labels) through the reward interface: a profile naming the genre of the user's held-out positives outranks one
    naming another genre, for every user, and the TRL reward function gives the same reward."""
    from rlrf.reward import load_reward
    from tests.reward_fixtures import GENRES, make_recipe, taste, write_prepare

    recipe = make_recipe(tmp_path, f"score.reward={kind}", "score.retrieval_k=10")
    write_prepare(recipe)
    reward = load_reward(recipe)
    users = list(range(1, 41))
    good = reward([f"This user loves {GENRES[taste(u)]} films." for u in users], users)["reward"]
    bad = reward([f"This user loves {GENRES[(taste(u) + 1) % 4]} films." for u in users], users)["reward"]
    assert reward.name == kind and (good > bad).all()
    f = reward.as_reward_func()
    assert f(prompts=["p"], completions=[[{"role": "assistant", "content": "loves Drama"}]], user_id=[4]) == \
        [float(reward(["loves Drama"], [4])["reward"][0])]


def test_a_new_text_space_reward_is_one_function_and_one_registry_line(tmp_path, monkeypatch):
    """A judge that reads the text in a space of its own: its `space` function and one REWARDS entry make it a reward
    (load_reward, TRL's reward function), a judge the score stage writes with its halves, and a named judge of the
    check."""
    from rlrf import reward as rw
    from rlrf.check import judges
    from tests.reward_fixtures import GENRES, make_recipe, taste, write_prepare

    monkeypatch.setitem(rw.REWARDS, "genres2", rw.Judge("genres2", ("genres2_a", "genres2_b"), "genres2 (a copy)",
                                                        space=rw._genres_space))
    recipe = make_recipe(tmp_path, "score.retrieval_k=10", "score.reward=lexical")
    write_prepare(recipe)
    reward = rw.load_reward(recipe, kind="genres2")
    users = list(range(1, 41))
    good = reward([f"This user loves {GENRES[taste(u)]} films." for u in users], users)["reward"]
    bad = reward([f"This user loves {GENRES[(taste(u) + 1) % 4]} films." for u in users], users)["reward"]
    assert reward.name == "genres2" and (good > bad).all()
    named = judges(recipe, ["retrieval", "genres2", "lexical"])
    assert named["genres2 (a copy)"] == "genres2" and list(named.values())[-1] == "lexical"  # the picker last


# ----------------------------------------------------------------------------- the genres space


def genre_items():
    from rlrf.schema import SCHEMAS

    rows = [(1, ["Drama"]), (2, ["Sci-Fi", "Action"]), (3, ["Comedy"]), (4, ["Drama"]), (5, ["unknown"]),
            (6, ["Drama", "Romance"])]
    return pl.DataFrame({"item_id": [r[0] for r in rows], "raw_item_id": [str(r[0]) for r in rows],
                         "title": [f"Movie {r[0]}" for r in rows], "year": [1990] * 6, "genres": [r[1] for r in rows],
                         "attribute_id": [1] * 6, "text": ["x"] * 6}, schema=SCHEMAS["items"])


def test_genres_space_reads_whole_word_genres_and_their_prose_spellings():
    from rlrf.retrieval import Genres

    g = Genres(genre_items())
    assert g.genres == ["Action", "Comedy", "Drama", "Romance", "Sci-Fi"]  # "unknown" is no genre
    v = g(["Loves science fiction and action.", "A dramatic, comedic soul.", "", None, "DRAMA; romance!"])
    assert v[0].tolist() == [1, 0, 0, 0, 1]
    assert v[1].tolist() == [0, 0, 0, 0, 0]  # "dramatic" and "comedic" name no genre
    assert v[2].sum() == 0 and v[3].sum() == 0
    assert v[4].tolist() == [0, 0, 1, 1, 0]
    assert g.item_vecs[6].tolist() == [0, 0, 1, 1, 0] and g.item_vecs[5].sum() == 0 and g.item_vecs[0].sum() == 0


def test_popularity_tie_break_orders_ties_and_never_a_cosine_gap():
    """In the genres space a profile naming one genre ties every item of it: popularity (prompt histories only)
    orders them, a profile naming nothing gets the popularity ranking, and the tie break stays below any gap."""
    from rlrf.retrieval import Genres, popularity_tie_break

    g = Genres(genre_items())
    # item 4 is in 3 histories, item 1 in 1; a held-out rating (in_history false) of item 1 does not count
    inter = pl.DataFrame({"user_id": [1, 2, 3, 4, 5, 9], "item_id": [4, 4, 4, 1, 3, 1],
                          "in_history": [True, True, True, True, False, False]})
    tb = popularity_tie_break(inter, len(g.item_vecs))
    assert tb[4] > tb[1] > 0 and tb[3] == 0 and tb.max() <= 1e-4
    lists = lists_frame([(0, 9, [1, 2, 3, 4], [1, 0, 0, 0])])  # user 9's held-out positive: item 1 (Drama)
    r = RetrievalReward(g.item_vecs, lists, {}, "catalogue", k=5, valid_items=np.arange(1, 7), tie_break=tb)
    drama, nothing, comedy = r.ndcg(g(["drama", "no genre named", "comedy"]), [9, 9, 9])
    assert drama == pytest.approx(d(1))  # items 1 and 4 tie on cosine; the more popular item 4 ranks first
    assert nothing == pytest.approx(d(1))  # popularity alone: 4, 1, ...
    assert comedy == pytest.approx(d(2))  # item 3 leads on cosine; then 4, then 1
    without = RetrievalReward(g.item_vecs, lists, {}, "catalogue", k=5, valid_items=np.arange(1, 7))
    assert without.ndcg(g(["no genre named"]), [9])[0] == 0.0  # every item ties: pessimistic rank, nothing earned
    with pytest.raises(ValueError, match="one value per item row"):
        RetrievalReward(g.item_vecs, lists, {}, tie_break=tb[:3])


# ----------------------------------------------------------------------------- the personal reward


def test_personal_reward_counts_only_what_is_specific_to_the_user(tmp_path):
    """score.contrast: the judge on the profile's own user minus its mean on other users of the same split. On the
    synthetic run (a user's positives are the items of its one taste genre), naming the user's own genre is
    personal; naming no genre (the popularity ranking, the same for everyone) is worth about nothing, however
    well the plain reward pays it."""
    from rlrf.reward import load_reward
    from tests.reward_fixtures import GENRES, make_recipe, split_of, taste, write_prepare

    recipe = make_recipe(tmp_path, "score.reward=genres", "score.retrieval_k=10", "score.contrast=5")
    write_prepare(recipe)
    reward = load_reward(recipe)
    scorer = reward.scorer
    users = list(range(1, 41))
    mine = reward([f"Loves {GENRES[taste(u)]} films." for u in users], users)
    nothing = reward(["Loves films." for _ in users], users)
    # (a user whose 5 others happen to share its taste gets less: its genre is less specific among them)
    assert (mine["reward"] > nothing["reward"]).all() and float(np.mean(mine["reward"])) > 0.2
    assert abs(float(np.nanmean(nothing["reward"]))) < 0.05 and float(np.nanmean(nothing["retrieval_ndcg@10"])) > 0.05
    assert np.array_equal(mine["personal"], mine["reward"])
    # the other users: same split, never the user, the same on every call, as many as asked
    for u in (1, 30, 40):
        o = scorer.others(u, 5, seed=7)
        assert len(o) == 5 and u not in o and {split_of(int(v), 40) for v in o} == {split_of(u, 40)}
        assert np.array_equal(o, scorer.others(u, 5, seed=7))
    with pytest.raises(ValueError, match="m >= 1"):
        scorer.personal(np.zeros((1, len(GENRES)), np.float32), [1], m=0)


def test_contrast_weight_takes_off_that_share_of_the_other_users_mean(tmp_path):
    """score.contrast_weight w: own - w * mean(others); w = 1 is the personal part, w = 0 the plain judge, and the
    reward is linear in w in between (by hand from the judge's own NDCGs)."""
    from rlrf.config import ConfigError, load_recipe
    from rlrf.reward import load_reward
    from tests.reward_fixtures import GENRES, make_recipe, write_prepare

    users = list(range(1, 41))
    texts = [f"Loves {GENRES[(u * 7) % len(GENRES)]} films." for u in users]
    got = {}
    for w in (0.0, 0.5, 1.0):
        recipe = make_recipe(tmp_path / str(w), "score.reward=genres", "score.retrieval_k=10", "score.contrast=5",
                             f"score.contrast_weight={w}")
        write_prepare(recipe)
        got[w] = load_reward(recipe)(texts, users)
    plain, personal = got[0.0]["retrieval_ndcg@10"], got[1.0]["reward"]
    assert np.allclose(got[0.0]["reward"], plain, equal_nan=True)
    assert np.allclose(got[0.5]["reward"], (plain + personal) / 2, equal_nan=True)
    assert not np.allclose(plain, personal, equal_nan=True)
    with pytest.raises(ConfigError, match="score.contrast_weight"):
        load_recipe(None, ["score.reward=lexical", "score.contrast=5", "score.contrast_weight=2"])


def test_contrast_is_refused_for_the_reranker_reward():
    from rlrf.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="score.contrast"):
        load_recipe(None, ["score.reward=reranker", "score.contrast=3"])
    assert load_recipe(None, ["score.reward=lexical", "score.contrast=3"]).score.contrast == 3
