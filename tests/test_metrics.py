"""MAP@k / NDCG@k against figures worked out by hand (KAR's definitions, docs/protocol.md)."""

import math

import numpy as np
import pytest

from rlrf.metrics import map_at_k, ndcg_at_k, ranking_metrics


def test_design_check_two_lists():
    # [1,0,1] ranked as given: AP = (1/1 + 2/3) / 2 = 0.8333; DCG = 1 + 1/log2(4) = 1.5,
    # IDCG = 1 + 1/log2(3) = 1.6309, NDCG = 0.9197; [0,0,0] scores 0 and still counts.
    scores = [[3, 2, 1], [3, 2, 1]]
    labels = [[1, 0, 1], [0, 0, 0]]
    m = ranking_metrics(scores, labels, ks=(3,))
    assert m["map@3"] == pytest.approx(0.4167, abs=1e-4)
    assert m["ndcg@3"] == pytest.approx(0.4599, abs=1e-4)
    np.testing.assert_allclose(map_at_k(scores, labels, 3), [5 / 6, 0.0])
    np.testing.assert_allclose(ndcg_at_k(scores, labels, 3), [1.5 / (1 + 1 / math.log2(3)), 0.0])


def test_scores_decide_the_order_not_the_position():
    # scores put the list's last item first: ranking [1, 1, 0, 0] -> perfect
    labels = [[0, 0, 1, 1]]
    scores = [[0.1, 0.2, 0.3, 0.9]]
    assert ndcg_at_k(scores, labels, 2)[0] == pytest.approx(1.0)
    assert map_at_k(scores, labels, 2)[0] == pytest.approx(1.0)
    # reversed scores: ranking [0, 0, 1, 1]; @2 nothing hit, @4 hits at ranks 3 and 4
    rev = [[0.9, 0.3, 0.2, 0.1]]
    assert ndcg_at_k(rev, labels, 2)[0] == 0.0
    assert map_at_k(rev, labels, 4)[0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    dcg = 1 / math.log2(4) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(rev, labels, 4)[0] == pytest.approx(dcg / idcg)


def test_map_divides_by_hits_in_top_k_not_all_positives():
    # ranking [1, 0, 0, 1, 1]: @3 only one hit, precision 1 at rank 1 -> MAP@3 = 1.0 (KAR),
    # although two more positives sit below rank 3
    labels = [[1, 0, 0, 1, 1]]
    scores = [[5, 4, 3, 2, 1]]
    assert map_at_k(scores, labels, 3)[0] == pytest.approx(1.0)
    assert map_at_k(scores, labels, 5)[0] == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)


def test_graded_gain_is_two_to_the_rel_minus_one():
    # rels [1, 2] ranked as given: DCG = 1 + 3/log2(3); ideal [2, 1]: 3 + 1/log2(3)
    v = ndcg_at_k([[2, 1]], [[1, 2]], 2)[0]
    assert v == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))


def test_ties_keep_list_order():
    labels = np.array([[0, 1, 0], [1, 0, 0]])
    const = np.zeros((2, 3))
    # a constant scorer ranks each list as stored: first list's hit at rank 2, second at rank 1
    np.testing.assert_allclose(map_at_k(const, labels, 3), [0.5, 1.0])
    np.testing.assert_allclose(ndcg_at_k(const, labels, 1), [0.0, 1.0])


def test_k_beyond_list_length_and_single_list():
    assert ndcg_at_k([3, 1], [0, 1], 10)[0] == pytest.approx((1 / math.log2(3)) / 1.0)
    assert ranking_metrics([[1, 2]], [[1, 0]], ks=(1,)) == {"map@1": 0.0, "ndcg@1": 0.0}


def test_vectorised_equals_per_list_loop_on_random_lists():
    rng = np.random.default_rng(0)
    s = rng.random((200, 10))
    y = (rng.random((200, 10)) < 0.3).astype(int)
    for k in (1, 3, 5, 7):
        per = [map_at_k(s[i], y[i], k)[0] for i in range(200)]
        np.testing.assert_allclose(map_at_k(s, y, k), per)
        m = ranking_metrics(s, y, ks=(k,))
        assert m[f"ndcg@{k}"] == pytest.approx(float(np.mean([ndcg_at_k(s[i], y[i], k)[0] for i in range(200)])))


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="n_lists, list_size"):
        ndcg_at_k([[1, 2, 3]], [[1, 0]], 2)
    with pytest.raises(ValueError, match="k must be"):
        map_at_k([[1, 2]], [[1, 0]], 0)
