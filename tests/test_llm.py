"""rlrf.llm: model resolution errors, loading, weights hashing; rlrf.generate's sampler and decode loop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlrf.generate import HFBackend, Sampling, sample_next
from rlrf.llm import ModelError, load_generator, resolve_model, weights_hash
from rlrf.threads import torch_threads
from tests.fixtures_llm import smollm2_dir, tiny_model  # noqa: F401


def test_unknown_model_names_the_fix():
    with pytest.raises(ModelError) as e:
        resolve_model("no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-model-xyz" in msg and "smollm2-135m-instruct" in msg and "sample.model" in msg


def test_missing_or_incomplete_dir_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))
    half = tmp_path / "half"
    shutil.copytree(tiny_model, half)
    for f in half.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="lacks weights"):
        resolve_model(str(half))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    shutil.copy(next(tiny_model.glob("*.safetensors")), tmp_path / "bad")
    shutil.copy(tiny_model / "tokenizer.json", tmp_path / "bad")
    with pytest.raises(ModelError, match="unreadable"):
        resolve_model(str(tmp_path / "bad"))


def test_load_generator_left_pads_and_picks_dtype(tiny_model):
    model, tok = load_generator(str(tiny_model), dtype="float32")
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    model, _ = load_generator(str(tiny_model), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_weights_hash_changes_with_the_weights_only(tmp_path, tiny_model):
    a = tmp_path / "a"
    shutil.copytree(tiny_model, a)
    h1 = weights_hash(a)
    assert h1 == weights_hash(a) and len(h1) == 16
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "comment": "x"}))
    assert weights_hash(a) == h1  # config edits are not weights
    model, _ = load_generator(str(a), dtype="float32")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # what one DPO step does, at the smallest scale
    model.save_pretrained(a)
    assert weights_hash(a) != h1


def test_nucleus_keeps_the_top_p_mass_and_samples_in_proportion():
    # probs 0.5 / 0.3 / 0.15 / 0.05, top_p 0.8: the nucleus is tokens {0, 1}, sampled 5:3
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4).contiguous()
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    tok = sample_next(logits, gens, temperature=1.0, top_p=0.8)
    counts = torch.bincount(tok, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.625) < 0.03
    # top_p = 1 keeps everything, temperature 0 is greedy
    tok = sample_next(logits, [torch.Generator().manual_seed(s) for s in range(4000)], 1.0, 1.0)
    assert torch.bincount(tok, minlength=4)[3] > 100
    assert (sample_next(logits[:3], gens[:3], 0.0, 0.9) == 0).all()


def test_min_p_drops_tokens_below_its_share_of_the_likeliest_and_scales_with_temperature():
    """min_p 0.2 on probs 0.5 / 0.3 / 0.15 / 0.05: the cut is 0.1, so token 3 is never drawn and tokens 0-2 are drawn
    0.5 : 0.3 : 0.15 of their renormalised 0.95; at temperature 2 the same cut keeps all four (0.05 is then 0.17 of the
    likeliest's mass); min_p 0 is the nucleus alone, draw for draw."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(6000, 4).contiguous()

    def draws(temperature, top_p, min_p, seed=0):
        gens = [torch.Generator().manual_seed(seed + s) for s in range(6000)]
        return sample_next(logits, gens, temperature, top_p, min_p)

    counts = torch.bincount(draws(1.0, 1.0, 0.2), minlength=4) / 6000
    assert counts[3] == 0
    assert counts[:3].tolist() == pytest.approx((probs[:3] / probs[:3].sum()).tolist(), abs=0.02)
    hot = probs.pow(0.5) / probs.pow(0.5).sum()  # temperature 2
    assert hot[3] / hot[0] > 0.2
    assert torch.bincount(draws(2.0, 1.0, 0.2), minlength=4)[3] > 500
    assert torch.equal(draws(1.0, 0.8, 0.0, seed=7), sample_next(
        logits, [torch.Generator().manual_seed(7 + s) for s in range(6000)], 1.0, 0.8))
    # min_p and top_p together: the nucleus of the renormalised survivors (0.5 / 0.95 alone is below 0.8: 2 tokens)
    assert set(draws(1.0, 0.8, 0.2).unique().tolist()) == {0, 1}
    assert (sample_next(logits[:3], [torch.Generator() for _ in range(3)], 0.0, 1.0, 0.5) == 0).all()  # greedy


def test_a_rows_token_depends_on_its_own_generator_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 3
    batch = sample_next(logits, [torch.Generator().manual_seed(100 + r) for r in range(6)], 1.0, 0.95)
    alone = [sample_next(logits[r:r + 1], [torch.Generator().manual_seed(100 + r)], 1.0, 0.95).item() for r in range(6)]
    assert batch.tolist() == alone


def _prompts(tok, texts):
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for t in texts]


TEXTS = ["Describe a user who likes Alien and Heat.", "Hi", "A user who rated Toy Story 5 stars and Fargo 2 stars; "
         "what do they like about movies, and why?", "Films?", "Analyze this user's preferences on movies."]


def test_texts_do_not_depend_on_batch_composition(tiny_model):
    # bf16, as the stage runs on this CPU; prompts padded to a fixed budget as the stage does
    be = HFBackend(str(tiny_model), dtype="bfloat16", batch_size=64, pad_to=96, threads=1)
    assert be.shared_prefix  # a Llama takes the shared-prefix attention path
    ps = _prompts(be.tokenizer, TEXTS)
    sp = Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=10)
    whole = be.generate(ps, [11, 22, 33, 44, 55], sp)
    be.batch_size = 6  # two prompts per batch, other neighbours
    pairs = be.generate(ps, [11, 22, 33, 44, 55], sp)
    alone = [be.generate([p], [s], sp)[0] for p, s in zip(ps, [11, 22, 33, 44, 55])]
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]  # noqa: E731
    assert ids(whole) == ids(pairs) == ids(alone)
    assert len({tuple(c.token_ids) for c in whole[0]}) > 1  # the n samples of a prompt differ
    again = be.generate(ps, [11, 22, 33, 44, 55], sp)
    assert ids(again) == ids(whole)
    other_seed = be.generate(ps[:1], [12], sp)
    assert ids(other_seed)[0] != ids(whole)[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_texts_do_not_depend_on_how_many_rows_share_a_step(tiny_model, threads):
    """fp32, as the stage runs on an AVX2-only CPU: with samples ending at uneven steps and prompts in batches of
    every size, each text is the one the prompt gets alone (rlrf.generate.row_padding makes up the decode step's
    row count where the CPU's fp32 matmuls round a row by its neighbours); the padding rows take no slot."""
    from rlrf.generate import row_padding

    be = HFBackend(str(tiny_model), dtype="float32", batch_size=64, pad_to=96, threads=threads)
    be.eos_ids = list(range(0, be.model.config.vocab_size, 4))  # a quarter of the vocabulary stops: uneven lengths
    ps, seeds = _prompts(be.tokenizer, TEXTS) * 2, list(range(11, 111, 10))
    sp = Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12)
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]  # noqa: E731
    batch = be.generate(ps, seeds, sp)
    assert len({c.n_tokens for cs in batch for c in cs}) > 2
    assert ids(batch) == ids([be.generate([p], [s], sp)[0] for p, s in zip(ps, seeds)])
    for size in (6, 9, 12):  # 2, 3, 4 prompts a batch
        be.batch_size = size
        assert ids(be.generate(ps, seeds, sp)) == ids(batch), size
    with torch_threads(threads):
        pad = row_padding(be.model)
    if pad is not None:  # this CPU rounds by row count: every count maps to one at least as large, in order
        assert all(m <= pad[m] <= pad[m + 1] for m in range(len(pad) - 1))
    be16 = HFBackend(str(tiny_model), dtype="bfloat16", threads=threads)
    assert row_padding(be16.model) is None  # bf16 texts stay those sampled before


def test_shared_prefix_attention_matches_transformers_cache(tiny_model):
    """The shared-prefix decode gives the tokens transformers' own sdpa + DynamicCache path gives."""
    be = HFBackend(str(tiny_model), dtype="float32", batch_size=64, threads=1)
    ps = _prompts(be.tokenizer, TEXTS)
    sp = Sampling(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8)
    ours = be.generate(ps, [1, 2, 3, 4, 5], sp)
    be.shared_prefix = False
    be.model.set_attn_implementation("sdpa")
    ref = be.generate(ps, [1, 2, 3, 4, 5], sp)
    assert [[c.token_ids for c in cs] for cs in ours] == [[c.token_ids for c in cs] for cs in ref]


def test_ended_samples_leave_the_decode_batch_and_the_rest_decode_as_before(tiny_model, monkeypatch):
    """A sample that ended leaves the model's batch at once, and its prompt the attention's layout once all its
    samples have (shared_prefix.PrefixKV.keep); the rows that stay sample what they sample alone, and what the
    samplers before (whole prompts leaving; the static batch) sampled. bf16, as the stage runs on a CPU with bf16
    (fp32, whose matmuls round a row by the number of rows on some CPUs: the next test)."""
    from rlrf import shared_prefix

    be = HFBackend(str(tiny_model), dtype="bfloat16", batch_size=64, pad_to=96, threads=1)
    be.eos_ids = list(range(0, be.model.config.vocab_size, 4))  # a quarter of the vocabulary stops: uneven lengths
    ps, seeds = _prompts(be.tokenizer, TEXTS) * 2, list(range(11, 111, 10))
    sp = Sampling(n=2, temperature=1.0, top_p=0.95, max_new_tokens=12)
    kept, keep = [], shared_prefix.PrefixKV.keep
    monkeypatch.setattr(shared_prefix.PrefixKV, "keep", lambda self, p: (kept.append(int(p.sum())), keep(self, p))[1])
    fed = []  # rows the model is fed per call (prefills one row each)
    be.model.get_input_embeddings().register_forward_hook(lambda m, i, o: fed.append(i[0].shape[0]))
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]  # noqa: E731
    batch = be.generate(ps, seeds, sp)
    assert kept and 0 < kept[0] < len(ps)  # some prompts left while others decoded on
    decode = fed[len(ps):]  # one batch: the prompts' prefills, then the decode steps
    assert any(r % 2 for r in decode)  # a sample that ended left the batch alone, its prompt's other one decoding on
    # every row fed once per token it sampled after the first, and never after it ended
    assert sum(decode) == sum(c.n_tokens - (c.finish_reason == "length") for cs in batch for c in cs)
    assert len({c.n_tokens for cs in batch for c in cs}) > 2
    alone = [be.generate([p], [s], sp)[0] for p, s in zip(ps, seeds)]
    assert ids(batch) == ids(alone)
    be.batch_size = 6  # three prompts a batch: other neighbours, other leaving steps
    assert ids(be.generate(ps, seeds, sp)) == ids(batch)
    kept.clear(), fed.clear()
    be.batch_size, be.leave = 64, "prompts"  # rows leave with their prompt only (the sampler before)
    assert ids(be.generate(ps, seeds, sp)) == ids(batch) and kept
    assert all(r % 2 == 0 for r in fed[len(ps):]) and sum(fed[len(ps):]) > sum(decode)
    kept.clear(), fed.clear()
    be.leave = ""  # the static batch (benchmarks/evaluate_sampling.py's baseline)
    assert ids(be.generate(ps, seeds, sp)) == ids(batch) and not kept
    assert set(fed[len(ps):]) == {2 * len(ps)}  # every row to the longest sample


def test_finish_reason_eos_length_and_empty(tiny_model):
    be = HFBackend(str(tiny_model), dtype="float32", batch_size=64, threads=1)
    V = be.model.config.vocab_size
    be.eos_ids = list(range(V // 2))  # half the vocabulary stops: some samples end at once, some run out
    ps = _prompts(be.tokenizer, TEXTS)
    out = [c for cs in be.generate(ps, [1, 2, 3, 4, 5], Sampling(n=4, max_new_tokens=3)) for c in cs]
    reasons = {c.finish_reason for c in out}
    assert reasons == {"eos", "length"}
    assert all(c.n_tokens == 3 for c in out if c.finish_reason == "length")
    assert all(c.n_tokens < 3 for c in out if c.finish_reason == "eos")
    assert any(c.n_tokens == 0 and c.text == "" for c in out)  # empty generations come back, marked eos
    # min_new_tokens holds EOS back
    forced = [c for cs in be.generate(ps, [1, 2, 3, 4, 5], Sampling(n=4, max_new_tokens=3, min_new_tokens=3))
              for c in cs]
    assert all(c.n_tokens == 3 and c.finish_reason == "length" for c in forced)


def test_the_decode_loop_samples_with_min_p(tiny_model):
    """Sampling.min_p reaches the decode loop: a cut just under the likeliest token keeps only it, so a hot
    temperature decodes the greedy texts; without the cut the same temperature does not."""
    be = HFBackend(str(tiny_model), dtype="float32", batch_size=64, threads=1)
    ps = _prompts(be.tokenizer, TEXTS)

    def texts(**kw):
        return [c.token_ids for cs in be.generate(ps, [1, 2, 3, 4, 5], Sampling(n=2, max_new_tokens=8, **kw))
                for c in cs]

    greedy = texts(temperature=0.0)
    assert texts(temperature=3.0, top_p=1.0, min_p=0.999) == greedy
    assert texts(temperature=3.0, top_p=1.0) != greedy


@pytest.mark.integration
def test_real_smollm2_converts_loads_and_writes_sense(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    be = HFBackend("smollm2-135m-instruct", batch_size=8)
    ps = _prompts(be.tokenizer, ["Name three movies a fan of Star Wars (1977) and Alien (1979) would enjoy."])
    out = be.generate(ps, [7], Sampling(n=2, temperature=0.7, max_new_tokens=40))
    assert all(len(c.text) > 20 for c in out[0])
    assert any(w in (out[0][0].text + out[0][1].text).lower() for w in ("star", "alien", "movie", "film"))


@pytest.mark.faults
def test_pickle_weights_and_remote_code_are_refused_before_loading(tmp_path, tiny_model):
    """A model directory is data: rlrf loads safetensors only (a pickle can run code when unpickled) and never
    imports code shipped beside a model (auto_map), whatever the stage; both are named with what to do."""
    from rlrf.llm import SAFE_MODEL

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        resolve_model(str(pickled))
    from transformers import AutoModelForCausalLM
    with pytest.raises(OSError):  # and transformers itself refuses, whatever path reaches it
        AutoModelForCausalLM.from_pretrained(pickled, **SAFE_MODEL)

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    (remote / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    with pytest.raises(ModelError, match=r"auto_map.*never runs code from a model directory"):
        resolve_model(str(remote))
    assert not (tmp_path / "ran").exists()
