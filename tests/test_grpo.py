"""The GRPO stage (rlrf/grpo.py): its rollout on a real (tiny, random) model, and a whole GRPO round on the
tiny recipe with the real SmolLM2 (integration tier)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from rlrf.grpo import group_runs
from tests.conftest import run_stage, stage_ok
from tests.fixtures_llm import smollm2_dir, tiny_model  # noqa: F401  (pytest fixtures)


def test_group_runs_finds_each_prompts_group_in_order():
    assert group_runs(["a", "a", "b", "b", "a", "a"]) == [(0, 2), (2, 2), (4, 2)]
    assert group_runs(["x"]) == [(0, 1)]
    assert group_runs([]) == []


def policy(tiny_model):
    from peft import LoraConfig, get_peft_model

    from rlrf.llm import load_generator

    model, tok = load_generator(tiny_model, "float32")
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    return model, tok


def fake_trainer(model, tok, step: int = 0):
    return SimpleNamespace(model=model, processing_class=tok, state=SimpleNamespace(global_step=step),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m))


def test_rollout_samples_each_group_from_the_policy_and_gives_the_model_back(tiny_model):
    """TRL hands each prompt num_generations times in a row: one completion per row comes back, in that order,
    from the policy in memory (LoRA and all), ending with its stop token where it stopped; the policy's attention
    and train mode are as they were, and the same step samples the same texts whatever else is in the batch."""
    from rlrf.config import load_recipe
    from rlrf.grpo import Rollout

    model, tok = policy(tiny_model)
    attn = model.get_base_model().config._attn_implementation
    recipe = load_recipe(None, ["sample.max_new_tokens=12", "sample.max_prompt_tokens=64"])
    a = [{"role": "user", "content": "I liked Fargo and Heat."}]
    b = [{"role": "user", "content": "I liked Alien."}]
    out = Rollout(recipe)([a, a, b, b], fake_trainer(model, tok))
    assert set(out) >= {"prompt_ids", "completion_ids", "logprobs"}
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == 4
    ids_a = tok.apply_chat_template(a, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out["prompt_ids"][0] == out["prompt_ids"][1] == list(ids_a) != out["prompt_ids"][2]
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist()) | {tok.eos_token_id}
    for c in out["completion_ids"]:
        assert 1 <= len(c) <= 13 and not set(c[:-1]) & eos  # a stop token only at the end
    assert model.training and model.get_base_model().config._attn_implementation == attn
    # b's group alone, at the same step, samples the same texts as beside a
    alone = Rollout(recipe)([b, b], fake_trainer(model, tok))
    assert alone["completion_ids"] == out["completion_ids"][2:]
    # a prompt that comes twice in one call gets two different groups
    twice = Rollout(recipe)([b, b, a, b, b], fake_trainer(model, tok))
    assert twice["completion_ids"][:2] != twice["completion_ids"][3:]
    # the next step samples anew
    later = Rollout(recipe)([a, a, b, b], fake_trainer(model, tok, step=1))
    assert later["completion_ids"] != out["completion_ids"]
    # a training forward still works after sampling (the attention was given back)
    x = tok("hello there", return_tensors="pt")
    assert model(**x).logits.requires_grad


def test_grpo_seed_reseeds_the_rollouts_and_trl_but_not_the_users(tiny_model, tmp_path):
    """grpo.seed is the training seed: the rollouts sample other texts, TRL's seed and data_seed follow it, and the
    train users GRPO draws stay the recipe seed's (a replicate on the same users); the recipe's own value changes
    nothing."""
    from rlrf.config import load_recipe
    from rlrf.grpo import Rollout, trl_args

    model, tok = policy(tiny_model)
    over = ["sample.max_new_tokens=12", "sample.max_prompt_tokens=64"]
    plain = load_recipe(None, over)
    b = [{"role": "user", "content": "I liked Alien."}]
    out = Rollout(plain)([b, b], fake_trainer(model, tok))["completion_ids"]
    same = load_recipe(None, over + [f"grpo.seed={plain.seed}"])
    assert Rollout(same)([b, b], fake_trainer(model, tok))["completion_ids"] == out
    other = load_recipe(None, over + [f"grpo.seed={plain.seed + 1}"])
    assert Rollout(other)([b, b], fake_trainer(model, tok))["completion_ids"] != out
    args = trl_args(other, tmp_path)
    assert args.seed == args.data_seed == plain.seed + 1 and trl_args(plain, tmp_path).seed == plain.seed
    assert other.seed == plain.seed  # the split and GRPO's users (select_users) still come from the recipe's seed


def test_rollout_samples_from_the_merged_update_and_puts_the_base_weights_back_bit_for_bit(tiny_model):
    """grpo.merged_rollout: inside the block the model is the policy (base + LoRA update) in one matmul per
    projection; after it, every base weight is what it was, bit for bit, also in bf16 where peft's own unmerge
    would leave a rounding error, and the LoRA path is live again (its gradients flow)."""
    import torch

    from rlrf.grpo import lora_merged

    for dtype in (torch.float32, torch.bfloat16):
        model, tok = policy(tiny_model)
        model.to(dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: give the update a size
                    p.copy_(torch.randn_like(p) * 0.5)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
        x = tok("I liked Fargo and Heat.", return_tensors="pt")
        with torch.no_grad():
            want = model(**x).logits.float()
            with lora_merged(model):
                got = model(**x).logits.float()
                assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
            after = model(**x).logits.float()
        tol = 1e-4 if dtype == torch.float32 else 0.15
        assert torch.allclose(got, want, atol=tol), (dtype, (got - want).abs().max())
        assert torch.equal(after, want)
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        model(**x).logits.float().sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_length_term_is_flat_inside_the_range_and_weighted_in_trl(tmp_path):
    from rlrf.config import ConfigError, load_recipe
    from rlrf.grpo import LengthTerm, trl_args

    term = LengthTerm(3, 5)
    assert term(completions=["a"] * 4, completion_ids=[[1, 2], [1, 2, 3], [1] * 5, [1] * 6]) == [-1.0, 0.0, 0.0, -1.0]
    on = load_recipe(None, ["grpo.length_range=[20, 80]", "grpo.length_weight=0.3"])
    assert trl_args(on, tmp_path).reward_weights == [1.0, 0.3]
    assert trl_args(load_recipe(None, []), tmp_path).reward_weights is None
    for bad in ("[80, 20]", "[5]", "[-1, 3]"):
        with pytest.raises(ConfigError, match="grpo.length_range"):
            load_recipe(None, [f"grpo.length_range={bad}"])


def test_typicality_term_pays_the_profile_written_for_its_user(tmp_path):
    from rlrf.config import ConfigError, load_recipe
    from rlrf.grpo import TypicalityTerm, trl_args

    term = TypicalityTerm()
    common = "the user likes action and comedy movies"
    texts = [common, "a fan of quiet french dramas about family", common, common, "loves old westerns with horses"]
    users = [1, 1, 2, 3, 4]
    got = term(completions=[[{"role": "assistant", "content": t}] for t in texts], user_id=users)
    assert got[0] == pytest.approx(-2 / 3)  # all its bigrams in 2 of the 3 other users' profiles
    assert got[1] == 0.0 and got[4] == 0.0 and got[2] == pytest.approx(-2 / 3)
    assert got[1] > got[0]  # within user 1's group, the profile written for them wins
    on = load_recipe(None, ["grpo.length_range=[20, 80]", "grpo.typicality_weight=0.5"])
    assert trl_args(on, tmp_path).reward_weights == [1.0, 0.1, 0.5]
    assert trl_args(load_recipe(None, ["grpo.typicality_weight=0.2"]), tmp_path).reward_weights == [1.0, 0.2]
    with pytest.raises(ConfigError, match="grpo.typicality_weight"):
        load_recipe(None, ["grpo.typicality_weight=-1"])
    with pytest.raises(ValueError, match="user_id"):
        term(completions=["a b"])


def test_grpo_refuses_the_reranker_reward_and_wrong_trainer(tmp_path):
    from rlrf.config import ConfigError, load_recipe
    from rlrf.errors import StageError
    from rlrf.grpo import grpo_stage

    with pytest.raises(ConfigError, match="grpo.reward"):
        load_recipe(None, ["grpo.reward=reranker"])
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        load_recipe(None, ["grpo.num_generations=3", "grpo.per_device_train_batch_size=8"])
    recipe = load_recipe(None, [f"runs_dir={tmp_path}", "score.reward=reranker", "rounds.trainer=grpo"])
    with pytest.raises(StageError, match="set grpo.reward"):
        grpo_stage(recipe, "smollm2-135m-instruct", tmp_path / "grpo")


def test_grpo_fingerprint_follows_the_reward_it_learns_from():
    """Every key that changes the reward changes the stage's fingerprint; a late key at its default leaves the
    fingerprint of runs made before it existed as it was."""
    from rlrf.config import load_recipe
    from rlrf.grpo import stage_config

    def fp(*o):
        return stage_config(load_recipe(None, ["score.reward=lexical", *o]), "g", "h")

    base = fp("score.contrast=5")
    assert "contrast_weight" not in base["score"]
    assert fp("score.contrast=5", "score.contrast_weight=0.5") != base != fp("score.contrast=3")
    assert fp("score.contrast=5", "grpo.reward=genres") != base != fp("score.contrast=5", "sample.temperature=0.9")


@pytest.mark.integration
def test_grpo_round_on_the_tiny_recipe(ml100k_dir, tmp_path):
    """prepare -> grpo (killed after its first checkpoint, resumed) -> check, real SmolLM2 and ML-100K: the merged
    generator differs from the base, every step logged its reward, every training profile is in the audit with
    a train user, and the check compares generator 0 and 1 under the training-free judges (no reranker here)."""
    from safetensors.torch import load_file

    from rlrf.llm import resolve_model

    # a deep cut-off: 16-token profiles rarely put a held-out positive in a top 10, and a group whose rewards
    # all tie teaches nothing (zero advantages, zero gradient)
    grpo = ("rounds.trainer=grpo", "score.retrieval_k=1000")
    stage_ok(run_stage("prepare", tmp_path))
    r = run_stage("grpo", tmp_path, *grpo, env={"RLRF_KILL_AFTER_SHARDS": "1"})
    assert r.returncode == -9, r.stderr[-2000:]
    r = stage_ok(run_stage("grpo", tmp_path, *grpo))
    d = tmp_path / "tiny" / "round_1" / "grpo"
    info = json.loads((d / "stage.json").read_text())
    assert info["steps"] == 2 and info["resumed_from"] and info["reward"] == "lexical"
    # grpo.share_prompt (on by default): the training forwards ran on packed rows, fewer tokens than TRL's rows
    packing = info["share_prompt"]
    assert packing["packed_forwards"] >= 1 and packing["packed_tokens"] < packing["row_tokens"]
    log = pl.read_csv(d / "train_log.csv")
    assert log.height == 2 and log["reward"].is_not_null().all() and (log["frac_reward_zero_std"] < 1).any()
    # where a step's time goes: sampling (Rollout) within TRL's step time; step 1 ran in the killed process
    assert log["rollout_s"].to_list()[0] is None and 0 < log["rollout_s"][1] < log["step_time"][1]
    assert info["rollout_s"] == pytest.approx(log["rollout_s"][1], abs=0.1)
    assert f"sampling {info['rollout_s']:.0f} s of the stage's" in r.stdout
    roll = pl.read_parquet(d / "rollouts.parquet")
    assert roll.height == 4 and roll["step"].to_list() == [2] * 4  # the resumed run's one step: 2 users x 2
    users = pl.read_parquet(tmp_path / "tiny" / "prepare" / "users" / "*.parquet")
    assert set(roll["user_id"]) <= set(users.filter(pl.col("split") == "train")["user_id"])
    base = load_file(next(resolve_model("smollm2-135m-instruct").glob("*.safetensors")))
    new = load_file(next((d / "merged").glob("*.safetensors")))
    q = next(k for k in base if k.endswith("self_attn.q_proj.weight"))
    assert not np.allclose(base[q].float().numpy(), new[q].float().numpy())
    # dpo refuses to train a round whose generator GRPO makes
    r = run_stage("dpo", tmp_path, *grpo)
    assert r.returncode != 0 and "rounds.trainer=grpo" in r.stderr
    stage_ok(run_stage("check", tmp_path, *grpo))
    check = json.loads((tmp_path / "tiny" / "round_1" / "check" / "stage.json").read_text())
    assert not any("reranker" in j for j in check["judges"]) and check["rows"]["users"] >= 1
    assert "GRPO (round 1, reward lexical)" in (tmp_path / "tiny" / "round_1" / "check" / "summary.md").read_text()


def test_shared_prompt_forward_gives_trl_log_probs_entropy_and_gradients(tiny_model, monkeypatch):
    """grpo.share_prompt packs each group's rows into [prompt | completion 1 | completion 2 | ...]: TRL's tempered
    per-token log-probs and entropy and the LoRA gradients of a GRPO-shaped loss match TRL's own row-per-completion
    forward, on left-padded prompts and right-padded completions of unequal lengths."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from rlrf import dpo_packed, grpo_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter (B starts at zero, which would hide a wrong gradient path)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    pad = 2
    prompts = [torch.randint(4, 400, (n,), generator=g) for n in (9, 5)]
    comps = [torch.randint(4, 400, (n,), generator=g) for n in (6, 2, 7, 1, 4, 7)]  # 3 per prompt
    P, C = 9, 7
    rows, masks = [], []
    for i, c in enumerate(comps):
        p = prompts[i // 3]
        ids = torch.full((P + C,), pad)
        ids[P - len(p):P], ids[P:P + len(c)] = p, c
        m = torch.zeros(P + C, dtype=torch.long)
        m[P - len(p):P + len(c)] = 1
        rows.append(ids)
        masks.append(m)
    input_ids, attention_mask = torch.stack(rows), torch.stack(masks)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # as TRL's _get_per_token_logps_and_entropies
    labels[:, :-C] = -100
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])

    def run():
        model.zero_grad()
        out = model(**kw)
        (-(out.log_probs.sum(1) * adv).sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    grpo_packed.install(model.get_base_model(), temperature=0.7)
    packed = grpo_packed.pack_groups(input_ids, attention_mask, labels)
    assert packed is not None and packed[0].shape == (2, 9 + 6 + 2 + 7)  # one row per group, the longest group's
    calls = []
    real = dpo_packed.token_outputs  # the packed forward both trainers share
    monkeypatch.setattr(dpo_packed, "token_outputs", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    got, got_grads = run()
    assert calls == [int(ref.label_mask.sum())]  # the packed path ran, scoring exactly TRL's labelled tokens
    assert torch.equal(got.label_mask, ref.label_mask)
    torch.testing.assert_close(got.log_probs, ref.log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 0
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-4, rtol=1e-3)
    # TRL shuffles a generation batch's rows before cutting it into micro-batches: a group's rows need not be
    # neighbours, and they still pack into one row per prompt with each row's own scores
    perm = torch.tensor([4, 0, 2, 5, 1, 3])
    mixed = {k: v[perm] for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}
    assert grpo_packed.pack_groups(**mixed)[0].shape[0] == 2
    calls.clear()
    out = model(**mixed, fused_lm_head=True)
    assert calls == [int(ref.label_mask.sum())]
    torch.testing.assert_close(out.log_probs, ref.log_probs[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.entropy, ref.entropy[perm], atol=1e-4, rtol=1e-4)
    # rows that share no prompt (nothing to save) and generation take the original forward
    lone = {k: v[[0, 3]] for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}
    assert grpo_packed.pack_groups(**lone) is None
    torch.testing.assert_close(model(**lone, fused_lm_head=True).log_probs, ref.log_probs[[0, 3]], atol=1e-4, rtol=1e-4)
    assert grpo_packed.supported(model.get_base_model()) is None


def test_checkpointing_reaches_trl_under_the_name_transformers_reads(tmp_path):
    """dpo/grpo.gradient_checkpointing reaches TRL's args without the deprecated name's FutureWarning (it printed on
    every GRPO step), and both names read the recipe's value."""
    import warnings

    from rlrf import dpo, grpo
    from rlrf.config import load_recipe

    for on in (True, False):
        r = load_recipe(None, [f"grpo.gradient_checkpointing={on}", f"dpo.gradient_checkpointing={on}"])
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = [grpo.trl_args(r, tmp_path), dpo.trl_args(r.dpo, tmp_path, r.seed, False)]
        assert all(a.gradient_checkpointing is on for a in args)
