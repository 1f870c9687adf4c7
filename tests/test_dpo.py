"""dpo stage on a tiny random Llama: LoRA parameters change, the log is written, the merged model loads and
generates, a killed run resumes from its checkpoint, and the LLaMA-Factory backend writes its recipe and refuses a
missing or wrong llamafactory-cli (the real LLaMA-Factory runs in tests/test_llamafactory.py)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlrf.artifacts import read_stage_json
from rlrf.config import load_recipe
from rlrf.errors import StageError
from rlrf.pairs import pairs_stage
from tests.loop_fixtures import profile_rows, score_rows, write_stage

REPO = Path(__file__).resolve().parent.parent
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("given a user who watched films analyze preferences likes dislikes drama comedy action romance thriller "
         "horror old new slow fast plots actors music the and of profile this user's to is 0 1 2 3 4 5 6 7 8 9 : . , "
         "system assistant").split()


def tiny_model_dir(d: Path) -> Path:
    """A 2-layer random LlamaForCausalLM with a word-level ChatML tokenizer, saved like a real model dir."""
    if (d / "config.json").is_file():
        return d
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="[UNK]")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _pairs(tmp_path: Path, n_users: int = 8) -> Path:
    texts = {u: [f"this user likes drama and old films {u}", f"this user dislikes comedy {u % 10} fast plots"]
             for u in range(1, n_users + 1)}
    rewards = {u: [0.8, 0.3] for u in texts}
    # 4 valid users with the same preference: the held-out pairs DPO never trains on
    held = {u: [f"this user likes drama and old films {u}", f"this user dislikes comedy {u % 10} fast plots"]
            for u in range(101, 105)}
    prof = write_stage(tmp_path / "sample", "sample", "profiles",
                       profile_rows(texts) + profile_rows(held, split="valid"))
    sc = write_stage(tmp_path / "score", "score", "scores",
                     score_rows(rewards) + score_rows({u: [0.8, 0.3] for u in held}, split="valid"))
    return pairs_stage(load_recipe(None), prof, sc, tmp_path / "pairs", round=1)


TINY = ["dpo.per_device_train_batch_size=2", "dpo.gradient_accumulation_steps=1", "dpo.max_steps=4",
        "dpo.save_steps=2", "dpo.max_length=128", "dpo.lora_r=4", "dpo.lora_alpha=8", "dpo.learning_rate=0.01",
        "dpo.dtype=float32", "dpo.lora_dropout=0.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    model_dir = tiny_model_dir(tmp / "model")
    pairs = _pairs(tmp)
    from rlrf.dpo import dpo_stage

    out = dpo_stage(load_recipe(None, TINY), pairs, str(model_dir), tmp / "dpo")
    return tmp, model_dir, pairs, out


def test_lora_parameters_change_and_loss_is_logged(trained):
    from safetensors.torch import load_file

    tmp, model_dir, pairs, out = trained
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.shape[1] == 4 for v in lora_b)
    # LoRA B starts at zero: any non-zero entry was put there by DPO updates
    assert max(float(v.abs().max()) for v in lora_b) > 1e-4
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    losses = [float(r["loss"]) for r in rows]
    assert abs(losses[0] - 0.6931) < 0.01  # the policy starts equal to the reference: loss = log 2
    assert losses[-1] < losses[0]
    assert float(rows[-1]["rewards/margins"]) > 0
    assert (out / "loss.png").stat().st_size > 1000
    info = read_stage_json(out)
    assert info["steps"] == 4 and info["rows"] == {"pairs": 8}
    # the implicit-reward accuracy on the valid users' pairs, never trained on: same preference, so it generalises
    held = info["heldout"]
    assert held["pairs"] == 4 and held["accuracy"] > 0.5 and held["low"] < held["accuracy"] <= held["high"] <= 1


def test_sft_weight_adds_the_chosen_nll_and_keeps_chosen_likely(trained, tmp_path):
    """dpo.sft_weight (RPO) reaches TRL as loss_type [sigmoid, sft]: the first step's loss is log 2 plus the weight
    x the chosen profiles' mean token NLL, and after the same steps from the same seed the chosen profiles are
    more likely than under plain DPO (which may lower chosen and rejected together)."""
    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, plain = trained
    out = dpo_stage(load_recipe(None, TINY + ["dpo.sft_weight=5"]), pairs, str(model_dir), tmp_path / "dpo")
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    base = list(csv.DictReader(open(plain / "train_log.csv")))
    first = rows[0]
    # step 1: the policy is the reference, so the DPO part is log 2 and logps/chosen is the chosen NLL summed per
    # pair; the tiny model's random chosen NLL is far above 0, so the loss is far above plain DPO's log 2
    assert float(base[0]["loss"]) == pytest.approx(0.6931, abs=0.01)
    assert float(first["loss"]) > 0.6931 + 5 * 1.0
    assert float(rows[-1]["logps/chosen"]) > float(base[-1]["logps/chosen"])
    assert read_stage_json(out)["config"]["dpo"]["sft_weight"] == 5
    assert "sft_weight" not in read_stage_json(plain)["config"]["dpo"]  # a late key: old runs keep their fingerprint


def test_lora_layers_adapts_the_top_layers_only_and_the_backward_stops_below_them(trained, tmp_path):
    """dpo.lora_layers=1 on the 2-layer tiny model: the stage's adapter holds layer 1's LoRA only and still learns,
    and in a policy forward the frozen layer under it builds no autograd graph (nothing kept for a backward)."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlrf.dpo import dpo_stage, lora_config

    _, model_dir, pairs, plain = trained
    out = dpo_stage(load_recipe(None, TINY + ["dpo.lora_layers=1"]), pairs, str(model_dir), tmp_path / "dpo")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".layers.1." in k for k in adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-4
    info = read_stage_json(out)
    assert info["config"]["dpo"]["lora_layers"] == 1
    # every training step's reference pass (and the held-out pairs' evaluation) started above the frozen layer
    assert info["packed_forward"]["frozen_layers_shared"] == 1
    assert info["packed_forward"]["reference_passes_reusing"] >= info["steps"] == 4
    assert "lora_layers" not in read_stage_json(plain)["config"]["dpo"]  # a late key: old runs keep their fingerprint

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, lora_config(load_recipe(None, TINY + ["dpo.lora_layers=1"]).dpo, 2))
    seen = {}
    for i, layer in enumerate(model.get_base_model().model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o)
                                                                          .requires_grad))
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert seen == {0: False, 1: True}
    with pytest.raises(StageError, match=r"dpo.lora_layers=3: the model has 2 decoder layers"):
        lora_config(load_recipe(None, TINY + ["dpo.lora_layers=3"]).dpo, 2)


def test_the_reference_pass_reuses_the_frozen_layers_and_gets_the_same_log_probs(tmp_path):
    """dpo.lora_layers: the reference forward (adapter disabled) on the batch the policy just ran starts from the
    hidden states the policy pass kept at the lowest adapted layer: the layers under it do not run again, and the
    reference log-probs are exactly those of a full reference forward. Another batch runs every layer."""
    from peft import get_peft_model
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head
    from transformers import AutoModelForCausalLM

    from rlrf import dpo_packed
    from rlrf.dpo import lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "model"), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(model, lora_config(load_recipe(None, TINY + ["dpo.lora_layers=1"]).dpo, 2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    stats = dpo_packed.install(model.get_base_model())
    assert stats["frozen_layers_shared"] == 1
    runs = []
    model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda *a: runs.append(1))
    g = torch.Generator().manual_seed(0)

    def batch():
        ex = [{"prompt_ids": torch.randint(4, 40, (p,), generator=g).tolist(),
               "chosen_ids": torch.randint(4, 40, (c,), generator=g).tolist(),
               "rejected_ids": torch.randint(4, 40, (r,), generator=g).tolist()} for p, c, r in [(9, 5, 7), (4, 8, 1)]]
        b = DataCollatorForPreference(pad_token_id=2)(ex)
        return dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], fused_lm_head=True,
                    labels=b["input_ids"].masked_fill(b["completion_mask"] == 0, -100))

    def reference(kw):
        with torch.no_grad(), model.disable_adapter():
            return model(**kw).log_probs

    kw = batch()
    policy = model(**kw).log_probs  # the adapter on, as TRL's training forward: the frozen layer's output is kept
    assert len(runs) == 1
    shared = reference(kw)
    assert len(runs) == 1 and stats["reference_passes_reusing"] == 1  # layer 0 did not run again
    full = reference(kw)  # used once: a second reference call runs every layer
    assert len(runs) == 2 and torch.equal(shared, full)
    assert not torch.equal(shared, policy.detach())  # the adapter matters above the shared layer
    other = batch()
    model(**kw)
    reference(other)  # not the batch the policy ran: every layer
    assert len(runs) == 4 and stats["reference_passes_reusing"] == 1


def test_token_kl_is_the_reference_to_policy_kl_of_each_scored_token(tmp_path):
    """dpo.token_kl's forward: a training policy pass (adapter on, gradients on) leaves, with its own log-probs
    untouched, the batch's KL(reference || policy) summed over every scored token of chosen and rejected and divided
    by TRL's rows, the same as from two plain whole-model forwards (adapter off, on) row by row; its gradient reaches
    the LoRA weights. TRL's reference call next on that batch is answered from the pass the KL ran (the same log-probs
    as a real reference forward), once; without gradients (evaluation) no KL is made. With LoRA's B at 0 the KL is 0."""
    from peft import get_peft_model
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head
    from transformers import AutoModelForCausalLM

    from rlrf import dpo_packed
    from rlrf.dpo import lora_config

    def fresh(perturb: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "model"), dtype=torch.float32)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        model = get_peft_model(model, lora_config(load_recipe(None, TINY + ["dpo.lora_layers=1"]).dpo, 2))
        if perturb:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.5)
        return model, dpo_packed.install(model.get_base_model(), token_kl=True)

    g = torch.Generator().manual_seed(0)
    ex = [{"prompt_ids": torch.randint(4, 40, (p,), generator=g).tolist(),
           "chosen_ids": torch.randint(4, 40, (c,), generator=g).tolist(),
           "rejected_ids": torch.randint(4, 40, (r,), generator=g).tolist()} for p, c, r in [(9, 5, 7), (4, 8, 1)]]
    b = DataCollatorForPreference(pad_token_id=2)(ex)
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], fused_lm_head=True, labels=labels)

    model, stats = fresh(perturb=True)
    with torch.no_grad():  # the same quantity from plain whole-model forwards, TRL's two rows per pair
        plain = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        pol = torch.log_softmax(model(**plain).logits[:, :-1].float(), -1)
        with model.disable_adapter():
            ref = torch.log_softmax(model(**plain).logits[:, :-1].float(), -1)
            ref_targets = model(**kw).log_probs
        scored = labels[:, 1:] != -100
        expected = ((ref.exp() * (ref - pol)).sum(-1) * scored).sum() / labels.shape[0]
    assert "token_kl" not in stats  # no gradient: an evaluation pass makes none
    policy = model(**kw).log_probs
    kl = stats.pop("token_kl")
    assert kl.item() == pytest.approx(expected.item(), rel=1e-4) and kl.item() > 0
    assert torch.allclose(policy.detach(), model(**kw).log_probs.detach(), atol=1e-6)  # its own log-probs untouched
    stats.pop("token_kl")
    with torch.no_grad(), model.disable_adapter():
        cached = model(**kw).log_probs  # TRL's reference call right after: answered, not run
        assert stats["reference_passes_cached"] == 1
        assert torch.allclose(cached, ref_targets, atol=1e-5)
        assert torch.allclose(model(**kw).log_probs, ref_targets, atol=1e-5)  # used once: the next one runs
    assert stats["reference_passes_cached"] == 1
    model(**kw)
    stats.pop("token_kl").backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(x is not None for x in grads) and any(x.abs().sum() > 0 for x in grads)

    model, stats = fresh(perturb=False)
    model(**kw)
    assert stats["token_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_token_kl_adds_its_term_to_trls_loss(trained, tmp_path):
    """dpo.token_kl trains with the term in the loss: at step 1 the policy is the reference, so the KL is 0 and the
    loss log 2 as plain DPO's; the KL is logged each step and grows from 0, the later losses differ from plain DPO's
    on the same pairs and seed, and every training step's reference pass came from the KL's. A late key: plain runs
    keep their fingerprint; settings it cannot be built on are refused."""
    import math

    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, plain = trained
    out = dpo_stage(load_recipe(None, TINY + ["dpo.token_kl=1.0"]), pairs, str(model_dir), tmp_path / "dpo")
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    base = list(csv.DictReader(open(plain / "train_log.csv")))
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(rows[0]["token_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert all(float(r["token_kl"]) >= 0 for r in rows) and float(rows[-1]["token_kl"]) > 0
    assert [round(float(r["loss"]), 5) for r in rows[1:]] != [round(float(r["loss"]), 5) for r in base[1:]]
    assert all(r["token_kl"] == "" for r in base)
    info = read_stage_json(out)
    assert info["config"]["dpo"]["token_kl"] == 1.0 and "token_kl" not in read_stage_json(plain)["config"]["dpo"]
    assert info["packed_forward"]["reference_passes_cached"] == info["steps"]
    for bad in (["dpo.token_kl=-1"], ["dpo.token_kl=1", "dpo.share_prompt=false"],
                ["dpo.token_kl=1", "dpo.backend=llamafactory"]):
        with pytest.raises(ValueError, match="dpo.token_kl"):
            load_recipe(None, bad)


def test_training_seed_makes_a_replicate_on_the_same_pairs(trained, tmp_path):
    """dpo.seed replaces the recipe's seed in training only (LoRA init, pair order): the recipe's own value redoes the
    plain run loss for loss, another one trains differently on the same pairs. A late key: plain runs keep their
    fingerprint; -1 is the default and nothing below it is a seed."""
    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, plain = trained
    r = load_recipe(None, TINY)
    base = [round(float(x["loss"]), 5) for x in csv.DictReader(open(plain / "train_log.csv"))]

    def losses(seed: int) -> list[float]:
        out = dpo_stage(load_recipe(None, TINY + [f"dpo.seed={seed}"]), pairs, str(model_dir), tmp_path / f"s{seed}")
        assert read_stage_json(out)["config"]["dpo"]["seed"] == seed
        return [round(float(x["loss"]), 5) for x in csv.DictReader(open(out / "train_log.csv"))]

    assert losses(r.seed) == base
    assert losses(r.seed + 1)[1:] != base[1:]
    assert "seed" not in read_stage_json(plain)["config"]["dpo"]
    with pytest.raises(ValueError, match="dpo.seed"):
        load_recipe(None, ["dpo.seed=-2"])


def test_divergence_reaches_trls_loss(trained, tmp_path):
    """dpo.divergence is TRL's f_divergence_type: at step 1 the policy is the reference, so the JS loss is log 2 as
    plain DPO's (log 2 + logsigmoid(0) on both sides); from the same seed and pairs the later steps' losses differ,
    so the key reached the loss and not only the args. A late key: plain runs keep their fingerprint."""
    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, plain = trained
    out = dpo_stage(load_recipe(None, TINY + ["dpo.divergence=js_divergence"]), pairs, str(model_dir), tmp_path / "dpo")
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    base = list(csv.DictReader(open(plain / "train_log.csv")))
    assert float(rows[0]["loss"]) == pytest.approx(0.6931, abs=0.01)
    assert [round(float(r["loss"]), 4) for r in rows[1:]] != [round(float(r["loss"]), 4) for r in base[1:]]
    assert read_stage_json(out)["config"]["dpo"]["divergence"] == "js_divergence"
    assert "divergence" not in read_stage_json(plain)["config"]["dpo"]
    with pytest.raises(ValueError, match="dpo.divergence"):
        load_recipe(None, ["dpo.divergence=forward_kl", "dpo.backend=llamafactory"])


def test_entropy_alpha_is_h_dpos_loss(trained, tmp_path):
    """dpo.entropy_alpha (H-DPO) trains DPO at beta x alpha against the reference's log-probs / alpha: the implicit
    reward TRL logs is beta (alpha log pi - log pi_ref). At step 1 the policy is the reference (LoRA B starts at 0), so
    it reads beta (alpha - 1) log pi on each side, where plain DPO's reads 0 (and its loss log 2). A late key: plain runs keep their
    fingerprint; settings it cannot be built on are refused."""
    import math

    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, plain = trained
    alpha = 2.0
    out = dpo_stage(load_recipe(None, TINY + [f"dpo.entropy_alpha={alpha}"]), pairs, str(model_dir), tmp_path / "dpo")
    info = read_stage_json(out)
    beta = info["config"]["dpo"]["beta"]
    first = next(csv.DictReader(open(out / "train_log.csv")))
    first_plain = next(csv.DictReader(open(plain / "train_log.csv")))
    chosen, rejected = float(first["logps/chosen"]), float(first["logps/rejected"])
    assert chosen == pytest.approx(float(first_plain["logps/chosen"]), rel=1e-5)  # the policy pass is untouched
    assert float(first_plain["rewards/chosen"]) == pytest.approx(0.0, abs=1e-5)
    assert float(first["rewards/chosen"]) == pytest.approx(beta * (alpha - 1) * chosen, rel=1e-4)
    assert float(first["rewards/rejected"]) == pytest.approx(beta * (alpha - 1) * rejected, rel=1e-4)
    assert float(first["rewards/margins"]) == pytest.approx(beta * (alpha - 1) * (chosen - rejected), rel=1e-4)
    assert float(first_plain["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(first["loss"]) != pytest.approx(math.log(2), abs=1e-3)  # H-DPO's loss starts off log 2
    assert info["config"]["dpo"]["entropy_alpha"] == alpha and info["packed_forward"]["reference_scale"] == 0.5
    assert "entropy_alpha" not in read_stage_json(plain)["config"]["dpo"]
    for bad in (["dpo.entropy_alpha=0"], ["dpo.entropy_alpha=2", "dpo.divergence=js_divergence"],
                ["dpo.entropy_alpha=2", "dpo.share_prompt=false"], ["dpo.entropy_alpha=2", "dpo.backend=llamafactory"]):
        with pytest.raises(ValueError, match="dpo.entropy_alpha"):
            load_recipe(None, bad)


def test_merged_model_differs_from_base_loads_and_generates(trained):
    from safetensors.torch import load_file

    from rlrf.llm import load_generator

    tmp, model_dir, pairs, out = trained
    base = load_file(model_dir / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    changed = [k for k in base if "q_proj" in k and not torch.equal(base[k], merged[k])]
    assert changed, "LoRA was not merged into the q_proj weights"
    assert all(torch.equal(base[k], merged[k]) for k in base if "mlp" in k)  # not a LoRA target
    model, tok = load_generator(out / "merged", dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": "analyze this user's preferences"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5 or int(gen[0, -1]) == tok.eos_token_id


def test_merge_scale_interpolates_between_the_base_and_the_trained_policy(trained, tmp_path):
    """dpo.merge_scale: generator k = base + scale x the adapter's update, weight by weight (WARP's LITI)."""
    from safetensors.torch import load_file

    from rlrf.dpo import merge

    _, model_dir, _, out = trained
    base = load_file(model_dir / "model.safetensors")
    full = load_file(out / "merged" / "model.safetensors")
    half = load_file(merge(model_dir, out / "adapter", tmp_path / "half", scale=0.5) / "model.safetensors")
    assert set(half) == set(base)
    moved = [k for k in base if not torch.equal(base[k], full[k])]
    targets = load_recipe(None, TINY).dpo.lora_target_modules
    assert moved and all(any(t in k for t in targets) for k in moved)
    for k in base:
        torch.testing.assert_close(half[k], base[k] + 0.5 * (full[k] - base[k]), rtol=0, atol=1e-6)
        if k in moved:  # strictly between the two ends, not one of them
            assert not torch.equal(half[k], base[k]) and not torch.equal(half[k], full[k])
    assert read_stage_json(out)["merge_scale"] == 1.0  # the stage records the scale its generator was merged at
    assert load_recipe(None, ["dpo.merge_scale=0.5"]).dpo.merge_scale == 0.5
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(ValueError, match="dpo.merge_scale"):
            load_recipe(None, [f"dpo.merge_scale={bad}"])


@pytest.mark.faults
def test_a_step_the_machine_cannot_hold_is_refused_before_anything_loads(trained, tmp_path, monkeypatch):
    from rlrf import memory
    from rlrf.dpo import dpo_stage

    tmp, model_dir, pairs, out = trained
    assert read_stage_json(out)["memory_estimate_mb"] > memory.RUNTIME_MB  # recorded beside the measured peak
    monkeypatch.setattr(memory, "machine_mb", lambda: (100.0, 200.0))
    with pytest.raises(StageError, match=r"dpo: needs about .* GB .* 0.2 GB in all; lower "
                                         r"dpo.per_device_train_batch_size"):
        dpo_stage(load_recipe(None, TINY), pairs, str(model_dir), tmp_path / "dpo")
    assert not (tmp_path / "dpo" / "merged").exists() and not (tmp_path / "dpo" / "adapter").exists()


def test_rerun_is_a_noop_and_config_change_refuses(trained):
    from rlrf.dpo import dpo_stage

    tmp, model_dir, pairs, out = trained
    before = (out / "merged" / "model.safetensors").stat().st_mtime_ns
    dpo_stage(load_recipe(None, TINY), pairs, str(model_dir), out)
    assert (out / "merged" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(StageError, match="different config"):
        dpo_stage(load_recipe(None, TINY + ["dpo.beta=0.5"]), pairs, str(model_dir), out)


_RUN = """
import sys
from rlrf.config import load_recipe
from rlrf.dpo import dpo_stage
dpo_stage(load_recipe(None, sys.argv[4:]), sys.argv[1], sys.argv[2], sys.argv[3])
"""


@pytest.mark.faults
def test_killed_run_resumes_from_its_checkpoint_and_matches_a_clean_run(trained, tmp_path):
    from safetensors.torch import load_file

    _, model_dir, pairs, clean = trained
    out = tmp_path / "dpo"
    env = {**os.environ, "RLRF_KILL_AFTER_SHARDS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _RUN, str(pairs), str(model_dir), str(out), *TINY]
    died = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "stage.json").exists()
    env.pop("RLRF_KILL_AFTER_SHARDS")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    info = read_stage_json(out)
    assert info["resumed_from"].endswith("checkpoint-2") and info["steps"] == 4
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # nothing logged twice
    want = load_file(clean / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_llamafactory_backend_writes_its_recipe_and_says_how_to_install(trained, tmp_path):
    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, _ = trained
    recipe = load_recipe(None, TINY + ["dpo.backend=llamafactory", "dpo.template=chatml",
                                       "dpo.llamafactory_cli=/nonexistent/llamafactory-cli"])
    with pytest.raises(StageError) as e:
        dpo_stage(recipe, pairs, str(model_dir), tmp_path / "dpo")
    msg = str(e.value)
    assert "llamafactory-cli not found" in msg and "make llamafactory-env" in msg
    path = tmp_path / "dpo" / "llamafactory_dpo.yaml"
    assert str(path) in msg
    lf = yaml.safe_load(path.read_text())
    assert lf["stage"] == "dpo" and lf["finetuning_type"] == "lora" and lf["pref_loss"] == "sigmoid"
    assert lf["pref_beta"] == 0.1 and lf["template"] == "chatml" and lf["lora_rank"] == 4 and "pref_ftx" not in lf
    # LLaMA-Factory ignores `gradient_checkpointing: false`; bf16 on a CPU needs use_cpu (dtype=float32 here)
    assert lf["disable_gradient_checkpointing"] is True and "gradient_checkpointing" not in lf
    assert lf["use_cpu"] is not torch.cuda.is_available() and lf["bf16"] is False
    info = json.loads((Path(lf["dataset_dir"]) / "dataset_info.json").read_text())
    assert lf["dataset"] in info and info[lf["dataset"]]["ranking"] is True
    assert lf["model_name_or_path"] == str(model_dir.resolve())
    assert lf["output_dir"] == str((tmp_path / "dpo" / "checkpoints").resolve())
    # dpo.sft_weight (RPO) is LLaMA-Factory's pref_ftx
    with pytest.raises(StageError):
        dpo_stage(load_recipe(None, TINY + ["dpo.backend=llamafactory", "dpo.template=chatml", "dpo.sft_weight=0.5",
                                            "dpo.llamafactory_cli=/nonexistent/llamafactory-cli"]),
                  pairs, str(model_dir), tmp_path / "dpo_rpo")
    assert yaml.safe_load((tmp_path / "dpo_rpo" / "llamafactory_dpo.yaml").read_text())["pref_ftx"] == 0.5


def test_llamafactory_cutoff_holds_the_longest_pair_and_auto_leaves_the_template_to_the_tokenizer(trained, tmp_path):
    """LLaMA-Factory shortens an over-long pair by cutting the end of the prompt too: cutoff_len is never below the
    longest pair (prompt + answer + the template's end tokens), even when dpo.max_length is."""
    import polars as pl
    from transformers import AutoTokenizer

    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, _ = trained
    recipe = load_recipe(None, TINY + ["dpo.backend=llamafactory", "dpo.max_length=8",
                                       "dpo.llamafactory_cli=/nonexistent/llamafactory-cli"])
    with pytest.raises(StageError, match="llamafactory-cli not found"):
        dpo_stage(recipe, pairs, str(model_dir), tmp_path / "dpo")
    lf = yaml.safe_load((tmp_path / "dpo" / "llamafactory_dpo.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = pl.read_parquet(pairs / "pairs" / "*.parquet").to_dicts()
    longest = max(len(tok.apply_chat_template(r["prompt"] + r[side], tokenize=True, return_dict=False))
                  for r in rows for side in ("chosen", "rejected"))
    assert lf["cutoff_len"] == longest > 8
    assert "template" not in lf  # dpo.template=auto: LLaMA-Factory parses the tokenizer's chat template


def test_llamafactory_cli_outside_llamafactorys_environment_says_so_and_leaves_no_generator(trained, tmp_path):
    """A llamafactory-cli whose Python has no LLaMA-Factory (here: this test's own venv) is refused before training."""
    from rlrf.dpo import dpo_stage

    _, model_dir, pairs, _ = trained
    wrong = tmp_path / "llamafactory-cli"
    wrong.write_text(f"#!{sys.executable}\nraise SystemExit('never run: the probe comes first')\n")
    wrong.chmod(0o755)
    out = tmp_path / "dpo"
    (out / "merged").mkdir(parents=True)  # what an earlier attempt left: must not survive a failed run
    (out / "merged" / "config.json").write_text("{}")
    recipe = load_recipe(None, TINY + ["dpo.backend=llamafactory", f"dpo.llamafactory_cli={wrong}"])
    with pytest.raises(StageError) as e:
        dpo_stage(recipe, pairs, str(model_dir), out)
    msg = str(e.value)
    assert "not LLaMA-Factory's environment" in msg and "llamafactory is not installed" in msg
    assert sys.executable in msg and "make llamafactory-env" in msg
    assert not (out / "merged").exists() and not (out / "stage.json").exists()


def test_group_by_length_batches_similar_lengths_in_a_seeded_order():
    import datasets

    from rlrf.dpo import group_by_length

    lens = [3, 40, 5, 38, 4, 41, 6, 39]
    ds = datasets.Dataset.from_dict({"prompt_ids": [[0] * n for n in lens], "chosen_ids": [[1]] * 8,
                                     "rejected_ids": [[1, 1]] * 8, "i": list(range(8))})
    a = group_by_length(ds, batch_size=4, seed=1)
    assert sorted(a["i"]) == list(range(8))  # a permutation: nothing dropped or doubled
    batches = [sorted(lens[i] for i in a["i"][j:j + 4]) for j in (0, 4)]
    assert sorted(batches) == [[3, 4, 5, 6], [38, 39, 40, 41]]  # short with short, long with long
    assert group_by_length(ds, 4, seed=1)["i"] == a["i"]


@pytest.mark.integration
def test_real_smollm2_dpo_round_trip(tmp_path):
    """The tiny recipe's DPO on the real SmolLM2-135M: two steps, a merged generator the sampler can load."""
    from safetensors.torch import load_file

    from rlrf.dpo import dpo_stage
    from rlrf.llm import load_generator, resolve_model

    base = resolve_model("smollm2-135m-instruct")
    pairs = _pairs(tmp_path, n_users=4)
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={tmp_path}"])
    out = dpo_stage(recipe, pairs, "smollm2-135m-instruct", tmp_path / "dpo")
    info = read_stage_json(out)
    assert info["steps"] == recipe.dpo.max_steps and info["generator_out"].endswith("merged")
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert len(rows) == recipe.dpo.max_steps and abs(float(rows[0]["loss"]) - 0.6931) < 0.01
    a, b = load_file(base / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if "q_proj" in k)
    model, tok = load_generator(out / "merged")
    ids = tok.apply_chat_template([{"role": "user", "content": "Describe this user's taste in films."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    text = tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert text.strip()


def test_shared_prompt_forward_gives_trl_log_probs_and_gradients(tmp_path, monkeypatch):
    """dpo.share_prompt packs [prompt | chosen | rejected] into one row: TRL's per-token log-probs, entropy and
    top-1 (its metrics) and the LoRA gradients of the DPO loss match TRL's own two-row forward."""
    from peft import get_peft_model
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head
    from transformers import AutoModelForCausalLM

    from rlrf import dpo_packed
    from rlrf.dpo import lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "model"), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(model, lora_config(load_recipe(None, TINY).dpo))
    with torch.no_grad():  # a trained adapter (B starts at zero, which would hide a wrong gradient path)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    ex = [{"prompt_ids": torch.randint(4, 40, (p,), generator=g).tolist(),
           "chosen_ids": torch.randint(4, 40, (c,), generator=g).tolist(),
           "rejected_ids": torch.randint(4, 40, (r,), generator=g).tolist()}
          for p, c, r in [(9, 5, 7), (4, 8, 1), (12, 3, 3)]]
    batch = DataCollatorForPreference(pad_token_id=2)(ex)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)

    def run():
        model.zero_grad()
        out = model(**kw)
        lp = out.log_probs.sum(1)
        delta = (lp[:3] - lp[3:])  # a DPO-shaped loss through both halves
        torch.nn.functional.logsigmoid(delta).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    ref, ref_grads = run()
    dpo_packed.install(model.get_base_model())
    calls = []
    real = dpo_packed.token_outputs
    monkeypatch.setattr(dpo_packed, "token_outputs", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    got, got_grads = run()
    assert calls == [int(ref.label_mask.sum())]  # the packed path ran, scoring exactly TRL's labelled tokens
    assert torch.equal(got.label_mask, ref.label_mask)
    torch.testing.assert_close(got.log_probs, ref.log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.mean_logits, ref.mean_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.is_top1, ref.is_top1)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 0
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-4, rtol=1e-3)
    # generation and a batch whose halves do not share prompts take the original forward
    other = dict(kw, input_ids=kw["input_ids"].clone())
    other["input_ids"][3, 0] += 1
    assert dpo_packed.pack_pairs(other["input_ids"], other["attention_mask"], labels) is None
    torch.testing.assert_close(model(**other).log_probs[:3], ref.log_probs[:3], atol=1e-4, rtol=1e-4)
