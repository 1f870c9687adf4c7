"""GRPO from the recommender's reward: TRL's GRPOTrainer + a LoRA adapter -> the next generator, online.

Where the dpo stage learns from one best/worst pair per user, fixed before training, GRPO samples
`grpo.num_generations` profiles per train user's KAR prompt with the CURRENT policy at every step, rewards each
with the rlrf reward (`grpo.reward`, a training-free judge: retrieval, lexical or genres, each profile judged on
its own user's held-out positives, through `ProfileReward.as_reward_func`), and pushes up the profiles above their
group's mean (`scale_rewards: group`). Sampling, the cost on a CPU, runs through the sample stage's own sampler
(rlrf.generate.HFBackend over the policy in memory: one prefill per prompt shared by its group, per-row seeds)
as TRL's `rollout_func`, not through `model.generate`.

Outputs in the stage directory (the dpo stage's layout, so sample, check and evaluate take its generator as they
take DPO's; `rounds.trainer: grpo` makes it generator k):

    checkpoints/checkpoint-<step>/   Trainer checkpoints every grpo.save_steps (the unit of resume)
    adapter/                         the LoRA adapter (peft)
    merged/                          base + adapter merged in fp32: generator k
    train_log.csv, grpo.png          reward (mean, std within groups), KL, loss, completion length per step
    rollouts.parquet                 every profile sampled in training with its user, step and reward (the audit:
                                     `rlrf inspect rollouts <run>` shows the highest-rewarded first)
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import numpy as np
import polars as pl

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.config.sections import GRPOConfig
from rlrf.errors import StageError
from rlrf.files import atomic_path, write_parquet
from rlrf.llm import checkpointing
from rlrf.machine import has_cuda
from rlrf.store import Stage

# the trainer interface (rlrf.trainers): the recipe's `grpo:` section and what the stage's output depends on
SECTION = GRPOConfig
STAGE = runs.Declared("grpo", ("grpo",), some_keys=(  # + reward, generator and its weights hash
    ("sample", ("temperature", "top_p", "min_p", "max_new_tokens", "min_new_tokens", "max_prompt_tokens")),
    ("score", ("retrieval_candidates", "retrieval_k", "contrast", "contrast_weight"))))

LOG_COLUMNS = ("step", "epoch", "loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
               "completions/mean_length", "completions/clipped_ratio", "learning_rate", "grad_norm",
               "step_time", "rollout_s")  # a step's seconds (TRL's), and of those the sampling's (Rollout's)


def reward_kind(recipe: Recipe) -> str:
    """The reward GRPO learns from (rlrf.trainers.learned_reward): grpo.reward, else score.reward."""
    return recipe.grpo.reward or recipe.score.reward


def reward_name(recipe: Recipe) -> str:
    """The reward as reports name it: its personal part when score.contrast is on."""
    c = recipe.score.contrast
    return reward_kind(recipe) + (f" personal (own user minus {c} others)" if c else "")


def train_prompts(recipe: Recipe, tokenizer) -> pl.DataFrame:
    """user_id, prompt (the KAR prompt text fitted to sample.max_prompt_tokens, as the sample stage fits it) of the
    grpo.max_users train users the sample stage would draw."""
    from rlrf.sample import fit_prompt, select_users

    prompts = read_artifact(runs.prepare_dir(recipe), "prompts", "prepare")
    users = select_users(prompts, ["train"], recipe.grpo.max_users, recipe.seed)
    if users.height == 0:
        raise StageError(f"grpo: no train users in {runs.prepare_dir(recipe)}; check the prepare stage's output")
    rows = []
    for r in users.iter_rows(named=True):
        text, _, _ = fit_prompt(tokenizer, r["prompt_head"], r["history_lines"], r["prompt_tail"],
                                recipe.sample.max_prompt_tokens)
        rows.append({"user_id": r["user_id"], "prompt": text})
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "prompt": pl.Utf8})


def group_runs(keys: list) -> list[tuple[int, int]]:
    """(start, length) of each run of equal consecutive keys: TRL hands a prompt's group in a row."""
    out: list[tuple[int, int]] = []
    for i, k in enumerate(keys):
        if out and keys[out[-1][0]] == k:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


class Rollout:
    """TRL's `rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}` with rlrf's sampler.

    Each run of identical prompts (a prompt's group) is one prompt sampled `len(run)` times: one prefill, the KV
    cache shared, sample j seeded (seed, step, user, j), so a resumed run samples what the killed one would have.
    The completion keeps its end-of-sequence token, so the policy is also taught where to stop."""

    def __init__(self, recipe: Recipe):
        from rlrf.generate import Sampling

        s = recipe.sample
        self.sp = Sampling(n=1, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                           min_new_tokens=s.min_new_tokens, min_p=s.min_p)
        self.seed, self.batch_size = recipe.grpo.training_seed(recipe.seed), s.batch_size
        self.pad_to = s.max_prompt_tokens
        self.merged = recipe.grpo.merged_rollout
        self.step, self.calls = -1, 0  # generation calls within the current optimizer step
        self.seconds: dict[int, float] = {}  # wall seconds sampling, by the optimizer step TRL logs them under

    def __call__(self, prompts: list, trainer) -> dict:
        import time

        t0 = time.perf_counter()
        out = self._sample(prompts, trainer)
        logged = int(trainer.state.global_step) + 1
        self.seconds[logged] = self.seconds.get(logged, 0.0) + time.perf_counter() - t0
        return out

    def _sample(self, prompts: list, trainer) -> dict:
        import dataclasses

        from rlrf import shared_prefix
        from rlrf.generate import HFBackend

        model = trainer.accelerator.unwrap_model(trainer.model)
        tok = trainer.processing_class
        step = int(trainer.state.global_step)
        if step != self.step:
            self.step, self.calls = step, 0
        keys = [p if isinstance(p, str) else repr(p) for p in prompts]
        groups = group_runs(keys)
        ids, seeds, seen = [], [], {}
        for start, _ in groups:
            p = prompts[start]
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            ids.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)))
            # seeded by the prompt itself (and its repeat within this call), not its position: a group samples the
            # same texts whatever else shares the call
            h = zlib.crc32(keys[start].encode())
            seen[h] = seen.get(h, -1) + 1
            seeds.append(int(np.random.SeedSequence([self.seed, step, self.calls, h, seen[h]]).generate_state(1)[0]) >> 1)
        self.calls += 1
        backend = HFBackend.wrap(model, tok, self.batch_size, pad_to=self.pad_to)
        prompt_ids, completion_ids = [], []
        with shared_prefix.generation(model), (lora_merged(model) if self.merged else contextlib.nullcontext()):
            # groups of one size share a call (TRL's groups all have num_generations rows)
            for n in sorted({g[1] for g in groups}):
                which = [i for i, g in enumerate(groups) if g[1] == n]
                comps = backend.generate([ids[i] for i in which], [seeds[i] for i in which],
                                         dataclasses.replace(self.sp, n=n))
                for i, cs in zip(which, comps):
                    for c in cs:
                        prompt_ids.append((groups[i][0], ids[i]))
                        completion_ids.append((groups[i][0], c.token_ids + ([c.stop_id] if c.stop_id is not None
                                                                             else [])))
        # back into TRL's order: group by group, in the order the prompts came
        order = np.argsort([s for s, _ in prompt_ids], kind="stable")
        return {"prompt_ids": [prompt_ids[i][1] for i in order], "completion_ids": [completion_ids[i][1] for i in order],
                "logprobs": None}


@contextlib.contextmanager
def lora_merged(model):
    """The LoRA update merged into the base weights for the block (peft's merge_adapter), and the base weights put
    back exactly after: peft's unmerge subtracts the update again, which in bf16 leaves a rounding error that would
    pile up in the frozen base over hundreds of steps, so the weights are restored from a copy instead."""
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, PeftModel):
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    with torch.no_grad():
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
        model.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            model.unmerge_adapter()
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)


class RewardLog:
    """The rlrf reward as TRL's reward function, keeping every (step, user, profile, reward) it scores."""

    def __init__(self, reward, trainer_ref: list):
        self.func = reward.as_reward_func()
        self.__name__ = self.func.__name__
        self.rows: list[dict] = []
        self.trainer_ref = trainer_ref

    def __call__(self, prompts=None, completions=None, user_id=None, **kwargs) -> list[float]:
        out = self.func(prompts=prompts, completions=completions, user_id=user_id, **kwargs)
        step = int(self.trainer_ref[0].state.global_step) if self.trainer_ref else -1
        for u, c, r in zip(user_id, completions, out):
            text = c[-1]["content"] if isinstance(c, list) else c
            self.rows.append({"step": step + 1, "user_id": int(u), "text": text, "reward": float(r)})
        return out


class LengthTerm:
    """grpo.length_range: 0 for a profile of lo..hi tokens (its stop token included), -1 outside; TRL weighs it by
    grpo.length_weight beside the recommender reward."""

    __name__ = "rlrf_length"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        return [0.0 if self.lo <= len(ids) <= self.hi else -1.0 for ids in completion_ids]


class TypicalityTerm:
    """grpo.typicality_weight: minus each profile's typicality among the profiles of the *other* users sampled in the
    same step (0 = none of its word bigrams is in another user's profile, -1 = all are in all of them). The reward
    alone lets every user's profile drift to one template, which corpus distinct-2 measures falling; this term is its
    per-profile side, so within a group the profile written for this user beats the one written like everyone's."""

    __name__ = "rlrf_typicality"

    def __call__(self, prompts=None, completions=None, user_id=None, **kwargs) -> list[float]:
        from rlrf.quality import typicality

        if user_id is None:
            raise ValueError("rlrf typicality term: the dataset needs a `user_id` column")
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [-float(t) for t in typicality(texts, list(user_id))]


def reward_terms(cfg) -> tuple[list, list[float] | None]:
    """The terms beside the recommender reward (length, typicality) and TRL's reward_weights (None: the reward alone)."""
    terms, weights = [], [1.0]
    if cfg.length_range:
        terms.append(LengthTerm(*cfg.length_range))
        weights.append(cfg.length_weight)
    if cfg.typicality_weight > 0:
        terms.append(TypicalityTerm())
        weights.append(cfg.typicality_weight)
    return terms, (weights if terms else None)


def trl_args(recipe: Recipe, output_dir: Path):
    from trl import GRPOConfig as TRLGRPOConfig

    cfg, s = recipe.grpo, recipe.sample
    return TRLGRPOConfig(
        output_dir=str(output_dir), learning_rate=cfg.learning_rate, beta=cfg.beta,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps,
        num_generations=cfg.num_generations, max_completion_length=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, min_p=s.min_p or None,
        scale_rewards=cfg.scale_rewards, loss_type=cfg.loss_type,
        bf16=False,  # the frozen base is bf16 already where bf16 is on (load_policy); LoRA stays fp32
        save_strategy="steps", save_steps=cfg.save_steps, logging_steps=1, seed=cfg.training_seed(recipe.seed),
        data_seed=cfg.training_seed(recipe.seed),
        report_to=[], disable_tqdm=False, dataloader_num_workers=0, use_cpu=not has_cuda(),
        remove_unused_columns=False,  # user_id travels to the reward function
        reward_weights=reward_terms(cfg)[1],
        **checkpointing(cfg.gradient_checkpointing),
    )


def write_log(log_history: list[dict], out_dir: Path) -> list[dict]:
    """train_log.csv (one row per step) and grpo.png; returns the rows."""
    from rlrf.dpo import write_log_csv

    rows = write_log_csv(log_history, LOG_COLUMNS, "reward", out_dir)
    from rlrf.plots import pyplot, save_png

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["reward"] for r in rows], marker=".", label="mean reward of the step's profiles")
    a.set(xlabel="optimizer step", ylabel="reward", title="reward (training users, current policy)")
    a.legend(fontsize=8)
    if any(r["kl"] is not None for r in rows):
        b.plot(steps, [r["kl"] for r in rows], marker=".", label="KL to the base model")
    b.plot(steps, [r["completions/mean_length"] for r in rows], marker=".", label="mean profile tokens")
    b.set(xlabel="optimizer step", title="drift")
    b.set_yscale("symlog")
    b.legend(fontsize=8)
    save_png(fig, out_dir / "grpo.png")
    return rows


def share_prompt(trainer) -> dict:
    """Each group's prompt through the model once (rlrf/grpo_packed.py) under TRL's own GRPO loss, KL and metrics."""
    from peft import PeftModel

    from rlrf import grpo_packed

    model = trainer.model
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    why = grpo_packed.supported(base)
    if why is None and trainer.ref_model is not None:
        why = "the reference is a model of its own, not the policy with its adapter disabled"
    if why:
        raise StageError(f"grpo.share_prompt: {why}; set grpo.share_prompt=false")
    return grpo_packed.install(base, trainer.temperature)  # the temperature TRL's fused head divides the logits by


def train(recipe: Recipe, model_dir: Path, out_dir: Path, log=print) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from rlrf.dpo import _checkpoint_callback, last_checkpoint, load_policy, merge, use_bf16
    from rlrf.reward import load_reward

    cfg = recipe.grpo
    bf16 = use_bf16(cfg.dtype)
    torch.manual_seed(cfg.training_seed(recipe.seed))
    model, tok = load_policy(model_dir, bf16)
    tok.padding_side = "left"
    prompts = train_prompts(recipe, tok)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts["prompt"].to_list()],
                            "user_id": prompts["user_id"].to_list()})
    trainer_ref: list = []
    reward = RewardLog(load_reward(recipe, kind=reward_kind(recipe)), trainer_ref)
    ckpt_dir = out_dir / "checkpoints"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented hook, marked experimental
    funcs = [reward, *reward_terms(cfg)[0]]
    rollout = Rollout(recipe)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=trl_args(recipe, ckpt_dir), train_dataset=ds,
                          processing_class=tok, peft_config=lora, rollout_func=rollout,
                          callbacks=[_checkpoint_callback()])
    trainer_ref.append(trainer)
    packing = share_prompt(trainer) if cfg.share_prompt else None
    resume = last_checkpoint(ckpt_dir)
    if resume:
        log(f"grpo: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    adapter = out_dir / "adapter"
    with atomic_path(adapter) as tmp:
        trainer.model.save_pretrained(tmp)
    for h in trainer.state.log_history:  # steps a resumed run did not redo have no rollout_s
        if h.get("step") in rollout.seconds and "reward" in h:
            h["rollout_s"] = round(rollout.seconds[h["step"]], 2)
    rows = write_log(trainer.state.log_history, out_dir)
    rollouts = pl.DataFrame(reward.rows, schema={"step": pl.Int32, "user_id": pl.Int64, "text": pl.Utf8,
                                                 "reward": pl.Float64})
    write_parquet(out_dir / "rollouts.parquet", rollouts)
    del trainer, model
    merge(model_dir, adapter, out_dir / "merged")
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {"backend": "trl-grpo", "bf16": bf16, "reward": reward_name(recipe), "steps": int(result.global_step),
            "train_users": prompts.height, "profiles_sampled": rollouts.height, "resumed_from": resume,
            "reward_first_step": first.get("reward"), "reward_last_step": last.get("reward"), "final": last,
            "rollouts_logged_from_step": int(rollouts["step"].min()) if rollouts.height else None,
            # grpo.share_prompt: forwards answered from packed rows, and their tokens against TRL's rows' (padding too)
            "share_prompt": packing,
            # the part of the run spent sampling through rlrf's sampler (steps this process ran)
            "rollout_s": round(sum(rollout.seconds.values()), 1),
            "generator_out": str(out_dir / "merged")}


def stage_config(recipe: Recipe, generator: str, generator_hash: str) -> dict:
    """What the grpo stage's output depends on (runs.STAGES: its section, the decoding, the judge's keys), the
    reward and the generator."""
    return STAGE.config(recipe, reward=reward_kind(recipe), generator=str(generator),
                                      generator_hash=generator_hash)


def make_generator(recipe: Recipe, k: int, *, force: bool = False) -> Path:
    """Round k's grpo stage (rlrf.trainers): generator k-1 tuned online; its merged/ is generator k."""
    return grpo_stage(recipe, runs.generator_for_round(recipe, k), runs.stage_dir(recipe, "grpo", k), force=force)


def grpo_stage(recipe: Recipe, generator: str, out_dir, *, force: bool = False) -> Path:
    """Tune `generator` online on the train users' prompts; out_dir/merged is the next round's generator."""
    from rlrf.llm import resolve_model, weights_hash

    if reward_kind(recipe) == "reranker":
        raise StageError("grpo: score.reward=reranker, and the reranker judge is cross-fitted on the sample stage's "
                         "users, not the ones GRPO draws: set grpo.reward to retrieval, lexical or genres")
    out_dir = Path(out_dir)
    model_dir = resolve_model(generator)
    config = stage_config(recipe, generator, weights_hash(model_dir))
    with Stage(out_dir, "grpo", config, inputs=[runs.prepare_dir(recipe)], force=force, summary=_line) as st:
        if st.done:
            return out_dir
        st.finish(extra=train(recipe, model_dir, out_dir, log=st.log))
    return out_dir


def _line(info: dict) -> str:
    return (f"{info['steps']} steps on {info['train_users']} users, {info['reward']} mean training reward "
            f"{info['reward_first_step']:.4f} (step 1) -> {info['reward_last_step']:.4f} (last); sampling "
            f"{info['rollout_s']:.0f} s of the stage's {info['wall_s']:.0f} s")
