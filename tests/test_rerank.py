"""The KAR rerankers: shapes, training, checkpoints, the train-reranker stage (synthetic run, fake embeddings)."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from rlrf import runs
from rlrf.metrics import ranking_metrics
from rlrf.rerank import HybridExpertAdaptor, Reranker, RerankerSpec, build_model, check_spec, load_reranker
from rlrf.rerank_train import fit, train_stage
from rlrf.artifacts import read_artifact
from rlrf.errors import StageError
from rlrf.rerank_data import load_data
from tests.reward_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.reward_fixtures import make_recipe, profile_texts, write_fake_encode, write_prepare, write_profiles


def spec(backbone="dlcm", knowledge=True, **kw):
    return RerankerSpec(backbone=backbone, knowledge=knowledge, n_items=21, n_attributes=5, list_size=10,
                        know_dim=12 if knowledge else 0, encoder="e" if knowledge else "", **kw)


@pytest.mark.parametrize("backbone", ["dlcm", "prm"])
@pytest.mark.parametrize("knowledge", [True, False])
def test_shapes_and_user_index(backbone, knowledge):
    torch.manual_seed(0)
    m = Reranker(spec(backbone, knowledge)).eval()
    ids = torch.randint(1, 21, (6, 10))
    users = torch.randn(2, 12) if knowledge else None
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    out = m(ids, users, owner if knowledge else None)
    assert out.shape == (6, 10) and torch.isfinite(out).all()
    if knowledge:
        # scoring 6 lists with 2 profiles by index == repeating the profiles per list
        assert torch.allclose(out, m(ids, users[owner]), atol=1e-5)
        # the profile changes the scores; the base model has no such input
        assert not torch.allclose(m(ids, users[[1, 1, 1, 0, 0, 0]]), out)
    # the model reads the whole list: swapping two other items changes item 0's score
    ids2 = ids.clone()
    ids2[:, [3, 4]] = ids[:, [4, 3]]
    assert not torch.allclose(m(ids2, users, owner if knowledge else None)[:, 0], out[:, 0])
    n_in = 64 + (64 if knowledge else 0)
    first = m.backbone.gru.input_size if backbone == "dlcm" else m.backbone.attn.embed_dim
    assert first == n_in


def test_adaptor_mixes_2_shared_and_5_dedicated_experts_per_task():
    a = HybridExpertAdaptor(12)
    assert len(a.shared) == 2 and [len(d) for d in a.dedicated] == [5, 5]
    assert a.shared[0][0].out_features == 128 and a.shared[0][2].out_features == 32
    x = torch.randn(4, 12)
    gate = torch.softmax(a.gates[0](x), -1)
    manual = sum(gate[:, j:j + 1] * e(x) for j, e in enumerate([*a.shared, *a.dedicated[0]]))
    assert torch.allclose(a.task(0, x), manual, atol=1e-6)
    assert not torch.allclose(a.task(0, x), a.task(1, x))  # each task has its own gate and experts


@pytest.fixture
def run(tmp_path):
    recipe = make_recipe(tmp_path)
    write_prepare(recipe)
    prof = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), profile_texts())
    enc = write_fake_encode(recipe, prof, runs.stage_dir(recipe, "encode", 1))
    return recipe, enc


def test_training_lowers_loss_changes_parameters_and_knowledge_helps(run):
    recipe, enc = run
    data = load_data(recipe, enc)
    s = data.spec("dlcm", True)
    torch.manual_seed(7)
    init = {k: v.clone() for k, v in build_model(s, data).state_dict().items()}
    model, log = fit(s, data, recipe.reranker, seed=7, progress=False)
    losses = [e["train_loss"] for e in log["epochs"]]
    assert losses[-1] < 0.8 * losses[0]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert any(k.startswith("adaptor.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    assert "item_emb.weight" in changed
    # the synthetic positives are the user's taste, which (besides the history) only the profile says
    base_data = load_data(recipe, None)
    base, _ = fit(base_data.spec("dlcm", False), base_data, recipe.reranker, seed=7, progress=False)
    from rlrf.rerank_train import predict
    kar = ranking_metrics(predict(model, data, "valid"), data.lists["valid"]["labels"])["map@5"]
    plain = ranking_metrics(predict(base, base_data, "valid"), base_data.lists["valid"]["labels"])["map@5"]
    assert kar > plain + 0.2 and kar > 0.9


def test_user_history_features_find_the_taste_without_a_profile(run):
    recipe, _ = run
    from rlrf.rerank_train import predict
    data = load_data(recipe, None, history=30)
    s = data.spec("dlcm", False)
    assert s.history == 30 and s.n_users == 41 and data.hist_items.shape == (41, 30)
    hist, _ = fit(s, data, recipe.reranker, seed=3, progress=False)
    plain, _ = fit(data.spec("dlcm", False, history=False), data, recipe.reranker, seed=3, progress=False)
    m = {name: ranking_metrics(predict(mod, data, "valid"), data.lists["valid"]["labels"])["map@5"]
         for name, mod in (("hist", hist), ("plain", plain))}
    # valid users' lists never train the model: only their history tells their taste
    assert m["hist"] > m["plain"] + 0.2, m
    with pytest.raises(ValueError, match="pass user_ids"):
        hist(torch.from_numpy(data.lists["valid"]["item_ids"][:2]))


def test_reward_forward_of_a_history_reranker_matches_its_training_forward(run, tmp_path):
    """reranker.history is off for the reward reranker by default, but one trained with it must score
    profiles exactly as it scored the lists it was evaluated on."""
    from rlrf.rerank_train import predict
    from rlrf.reward import reward_profiles
    recipe, enc = run
    recipe.reranker.history = 10
    out = train_stage(recipe, tmp_path / "hist", enc, seeds=[1])
    model, sp = load_reranker(out)
    assert sp.history == 10 and sp.n_users == 41 and sp.knowledge
    data = load_data(recipe, enc)
    valid = data.lists["valid"]
    users = np.unique(valid["user_id"])
    vecs = np.stack([data.user_know[int(u)] for u in users]).astype(np.float32)
    values, n = reward_profiles(model, vecs, users, read_artifact(runs.prepare_dir(recipe), "lists"), "ndcg@5")
    scores = predict(model, data, "valid")
    per_list = np.array([ranking_metrics(scores[i:i + 1], valid["labels"][i:i + 1])["ndcg@5"] for i in range(len(scores))])
    expect = [per_list[valid["user_id"] == u].mean() for u in users]
    np.testing.assert_allclose(values["ndcg@5"], expect, atol=1e-9)


def test_history_tables_and_cooccurrence_use_only_what_training_may_know():
    from rlrf.rerank_data import cooccurrence_similarity, history_tables
    inter = pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [3, 4, 5, 6, 3, 6, 7], "position": [0, 1, 2, 3, 0, 1, 2],
        "label": [1, 0, 1, 1, 1, 0, 1], "in_history": [True, True, True, False, True, True, False]})
    items, liked = history_tables(inter.sample(fraction=1.0, shuffle=True, seed=0), n_users=3, width=2)
    # the LAST 2 history items, in time order, left-aligned; user 0 has none
    assert items.tolist() == [[0, 0], [4, 5], [3, 6]]
    assert liked.tolist() == [[0, 0], [0, 1], [1, 0]]
    users = pl.DataFrame({"user_id": [1, 2], "split": ["train", "test"]})
    sim = cooccurrence_similarity(inter, users, n_items=8)
    assert sim.shape == (8, 8) and np.allclose(sim, sim.T) and np.all(np.diag(sim) == 0)
    assert sim[5, 6] > 0          # train user 1's list item 6 co-occurs with its history item 5
    assert sim[3, 7] == 0         # test user 2's list item 7 is never seen
    assert sim[3, 6] > 0          # test user 2's HISTORY is known


def test_bf16_precision_trains_and_scores_in_fp32_out_and_is_what_auto_picks_on_a_bf16_cpu(run, monkeypatch, tmp_path):
    from rlrf import llm, rerank

    recipe, enc = run
    data = load_data(recipe, enc)
    fp32, bf16 = data.spec("prm", True), data.spec("prm", True, precision="bfloat16")
    torch.manual_seed(0)
    m32 = build_model(fp32, data).eval()
    m16 = Reranker(bf16).eval()
    m16.load_state_dict(m32.state_dict())
    arr = data.lists["train"]
    ids, vecs = torch.from_numpy(arr["item_ids"][:8]), torch.from_numpy(arr["user_vecs"][:8])
    a, b = m32(ids, vecs), m16(ids, vecs)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # the same weights, the matmuls in bf16
    assert torch.allclose(a, b, atol=0.05)
    _, log = fit(bf16, data, recipe.reranker, seed=1, progress=False)
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]
    # a checkpoint keeps its precision (model.json); one written before the field existed is fp32
    assert RerankerSpec.from_dict(bf16.to_dict()).precision == "bfloat16"
    old = {k: v for k, v in fp32.to_dict().items() if k != "precision"}
    assert RerankerSpec.from_dict(old).precision == "float32"
    # reranker.dtype=auto: bf16 only where the CPU does it natively; the stage records what it ran in
    monkeypatch.setattr(llm, "cpu_has_bf16", lambda: True)
    assert rerank.precision("auto") == "bfloat16" and rerank.precision("float32") == "float32"
    out = train_stage(recipe, tmp_path / "auto", enc, seeds=[1])
    assert json.loads((out / "model.json").read_text())["precision"] == "bfloat16"
    assert json.loads((out / "stage.json").read_text())["precision"] == "bfloat16"
    monkeypatch.setattr(llm, "cpu_has_bf16", lambda: False)
    assert rerank.precision("auto") == "float32" and rerank.precision("bfloat16") == "bfloat16"


def test_listwise_loss_trains_prm(run):
    recipe, enc = run
    recipe.reranker.loss = "listwise"
    data = load_data(recipe, enc)
    _, log = fit(data.spec("prm", True), data, recipe.reranker, seed=1, progress=False)
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]


def test_nan_loss_names_step_and_batch(run):
    recipe, enc = run
    data = load_data(recipe, enc)
    data.lists["train"]["user_vecs"][:] = np.nan
    with pytest.raises(StageError, match=r"loss is nan at step 1 \(epoch 1, batch 0"):
        fit(data.spec("dlcm", True), data, recipe.reranker, seed=0, progress=False)


def test_train_stage_writes_checkpoints_metrics_predictions(run, tmp_path):
    recipe, enc = run
    out = tmp_path / "reranker"
    train_stage(recipe, out, enc, seeds=[1, 2])
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_seed"]) == {"1", "2"} and m["knowledge"] and m["backbone"] == "dlcm"
    for split in ("valid", "test"):
        assert set(m[split]) == {f"{x}@{k}" for x in ("map", "ndcg") for k in (1, 3, 5, 7)}
        vals = [m["per_seed"][s][split]["ndcg@5"] for s in ("1", "2")]
        assert m[split]["ndcg@5"]["mean"] == pytest.approx(np.mean(vals))
        assert m[split]["ndcg@5"]["std"] == pytest.approx(np.std(vals))
    preds = read_artifact(out, "predictions")
    n_lists = sum(m["n_lists"].values())
    assert preds.height == 2 * n_lists
    # anyone can recompute the metrics from the predictions
    t = preds.filter((pl.col("split") == "test") & (pl.col("seed") == 2)).sort("list_id")
    again = ranking_metrics(np.array(t["scores"].to_list()), np.array(t["labels"].to_list()))
    assert again["ndcg@5"] == pytest.approx(m["per_seed"]["2"]["test"]["ndcg@5"])
    # the checkpoint reloads to the same scores
    model, sp = load_reranker(out, seed=2)
    assert sp.knowledge and sp.know_dim == 8
    assert (out / "checkpoints" / "seed_1.safetensors").is_file()
    data = load_data(recipe, enc)
    from rlrf.rerank_train import predict
    test_scores = predict(model, data, "test")
    order = np.argsort(data.lists["test"]["list_id"])
    np.testing.assert_allclose(test_scores[order], np.array(t["scores"].to_list()), rtol=1e-5, atol=1e-5)
    # an up-to-date rerun does nothing
    train_stage(recipe, out, enc, seeds=[1, 2])


def test_without_profile_zero_keeps_train_lists_of_unsampled_users(tmp_path):
    recipe = make_recipe(tmp_path)
    write_prepare(recipe)
    # like the demo round: profiles for every valid/test user but only some train users (1..28 are train)
    texts = {u: t for u, t in profile_texts().items() if u > 14}
    prof = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), texts)
    enc = write_fake_encode(recipe, prof, runs.stage_dir(recipe, "encode", 1))
    drop, zero = load_data(recipe, enc), load_data(recipe, enc, without_profile="zero")
    assert set(drop.lists["train"]["user_id"]) == set(range(15, 29))
    assert set(zero.lists["train"]["user_id"]) == set(range(1, 29))  # every train user's lists
    no_profile = zero.lists["train"]["user_id"] <= 14
    assert zero.dropped == {"lists_without_profile": 0, "train_lists_with_zero_profile": int(no_profile.sum())}
    assert not zero.lists["train"]["user_vecs"][no_profile].any()  # a zero vector stands in
    assert zero.lists["train"]["user_vecs"][~no_profile].any(axis=1).all()
    for split in ("valid", "test"):  # judged with real profiles only, identical either way
        assert np.array_equal(zero.lists[split]["list_id"], drop.lists[split]["list_id"])
    # the unsampled users' lists teach the item side: valid MAP@5 0.38 against 0.31 from the 14 sampled users
    from rlrf.rerank_train import predict
    valid_map = {}
    for name, data in (("drop", drop), ("zero", zero)):
        model, _ = fit(data.spec("dlcm", True), data, recipe.reranker, seed=7, progress=False)
        valid_map[name] = ranking_metrics(predict(model, data, "valid"), data.lists["valid"]["labels"])["map@5"]
    assert valid_map["zero"] > valid_map["drop"] + 0.03
    # the stage records the switch only when it is not the default: older rerankers stay up to date
    z = train_stage(make_recipe(tmp_path, "reranker.without_profile=zero"), tmp_path / "z", enc, seeds=[1])
    d = train_stage(recipe, tmp_path / "d", enc, seeds=[1])
    assert json.loads((z / "stage.json").read_text())["config"]["reranker"]["without_profile"] == "zero"
    assert "without_profile" not in json.loads((d / "stage.json").read_text())["config"]["reranker"]
    assert json.loads((z / "stage.json").read_text())["dropped"]["train_lists_with_zero_profile"] > 0


def test_base_model_needs_no_knowledge(run, tmp_path):
    recipe, _ = run
    out = train_stage(recipe, tmp_path / "base", None, knowledge=False, backbone="prm", seeds=[3])
    sp = json.loads((out / "model.json").read_text())
    assert sp["knowledge"] is False and sp["know_dim"] == 0 and sp["backbone"] == "prm"
    with pytest.raises(StageError, match="needs an encode stage dir"):
        train_stage(recipe, tmp_path / "kar", None, knowledge=True)


def test_checkpoint_that_does_not_match_the_data_is_refused(run, tmp_path):
    recipe, enc = run
    out = train_stage(recipe, tmp_path / "r", enc, seeds=[1])
    expect = load_data(recipe, enc).spec("dlcm", True)
    load_reranker(out, expect=expect)  # matches
    other = RerankerSpec(**{**expect.to_dict(), "n_items": 100, "know_dim": 384, "prm_mlp": (200, 80)})
    with pytest.raises(StageError, match=r"n_items: checkpoint 49, data 100; know_dim: checkpoint 8, data 384"):
        load_reranker(out, expect=other)
    check_spec(expect, expect, "x")
