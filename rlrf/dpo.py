"""DPO on the round's preference pairs: TRL DPOTrainer + a peft LoRA adapter -> the next generator.

The reference model is the base weights with the adapter disabled (a PEFT model and ref_model=None), so
only one copy of the model is held. Outputs in the stage directory:

    checkpoints/checkpoint-<step>/   Trainer checkpoints every dpo.save_steps (the unit of resume)
    adapter/                         the LoRA adapter (peft)
    merged/                          base + adapter merged in fp32, safetensors + tokenizer: generator k
    train_log.csv, loss.png          loss, rewards/margins, rewards/accuracies per logged step

`dpo.backend: llamafactory` trains with LLaMA-Factory instead (rlrf/llamafactory.py) and leaves the same outputs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from rlrf import runs
from rlrf.artifacts import part_paths, read_artifact
from rlrf.config import Recipe
from rlrf.config.sections import DPOConfig
from rlrf.errors import StageError
from rlrf.files import atomic_path
from rlrf.llm import SAFE_MODEL, SAFE_TOKENIZER, checkpointing
from rlrf.machine import has_cuda

# the trainer interface (rlrf.trainers): the recipe's `dpo:` section and what the stage's output depends on
SECTION = DPOConfig
STAGE = runs.Declared("dpo", ("dpo",))  # + generator and its weights hash

LOG_COLUMNS = ("step", "epoch", "loss", "rewards/margins", "rewards/accuracies", "rewards/chosen",
               "rewards/rejected", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "token_kl")


def use_bf16(setting: str) -> bool:
    """dpo.dtype: auto = bf16 where the hardware does it natively (CUDA, or a CPU with AMX / AVX512-bf16)."""
    import torch

    from rlrf.llm import pick_dtype

    return pick_dtype(setting) == torch.bfloat16


def lora_config(cfg, n_layers: int | None = None):
    """peft's LoraConfig for the dpo section; with dpo.lora_layers = K > 0, only the model's top K of its `n_layers`
    decoder layers are adapted."""
    from peft import LoraConfig

    layers = None
    if cfg.lora_layers:
        if n_layers is None:
            raise ValueError("lora_config: dpo.lora_layers needs the model's number of layers")
        if cfg.lora_layers > n_layers:
            raise StageError(f"dpo.lora_layers={cfg.lora_layers}: the model has {n_layers} decoder layers; "
                             f"set at most {n_layers}, or 0 for every layer")
        layers = list(range(n_layers - cfg.lora_layers, n_layers))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), layers_to_transform=layers, bias="none",
                      task_type="CAUSAL_LM")


def trl_args(cfg, output_dir: Path, seed: int, bf16: bool):
    """TRL DPOConfig from the recipe's dpo section (shared with benchmarks/dpo_step.py)."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(
        output_dir=str(output_dir),
        # H-DPO (dpo.entropy_alpha): beta x alpha against the reference's log-probs / alpha (dpo_packed scales them)
        beta=cfg.beta * cfg.entropy_alpha,
        # RPO: the chosen side's NLL beside the DPO loss (TRL sums the listed losses with their weights)
        loss_type=["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        f_divergence_type=cfg.divergence,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        # the held-out pairs' evaluation: TRL's default (8) held more than a training step at the demo's batch of 4
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        max_length=cfg.max_length,
        **checkpointing(cfg.gradient_checkpointing),
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.precompute_ref_batch_size,
        # the base weights are already bf16 when bf16 is on (see load_policy); autocast on top only adds casts
        bf16=False,
        # group_by_length orders the dataset itself (see group_by_length); the sampler then replays that order
        train_sampling_strategy="sequential" if cfg.group_by_length else "random",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to=[],
        disable_tqdm=False,
        dataloader_num_workers=0,
        # the held-out evaluation needs the loss and TRL's logged metrics only: without this, TRL runs one more
        # forward per batch to return logits (about twice the cost of a training step)
        prediction_loss_only=True,
        use_cpu=not has_cuda(),
    )


def load_pairs_dataset(pairs_dir: Path, cache_dir: Path, artifact: str = "pairs", limit: int | None = None):
    """The pairs parquet as a datasets.Dataset with only TRL's columns (prompt, chosen, rejected)."""
    import datasets

    df = read_artifact(pairs_dir, artifact, "pairs")  # schema check and a clear error when unfinished
    if artifact != "pairs":  # small: no need for the on-disk dataset cache
        df = df.sort("user_id").head(limit) if limit is not None else df
        return datasets.Dataset.from_polars(df.select("prompt", "chosen", "rejected"))
    files = [str(p) for p in part_paths(pairs_dir, artifact)]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache_dir))
    return ds.select_columns(["prompt", "chosen", "rejected"])


def heldout_accuracy(trainer, pairs_dir: Path, limit: int) -> dict | None:
    """DPO's implicit-reward accuracy (beta * log-ratio of chosen > rejected) on the held-out users' pairs
    (pairs.heldout_splits: never trained on), with a Wilson 95% interval; None when there are none."""
    import math

    if limit <= 0 or not (Path(pairs_dir) / "heldout_pairs").is_dir():
        return None
    ds = load_pairs_dataset(pairs_dir, Path(pairs_dir), "heldout_pairs", limit)
    if ds.num_rows == 0:
        return None
    m = trainer.evaluate(eval_dataset=ds, metric_key_prefix="heldout")
    # TRL logs its DPO metrics (eval_rewards/...) into the log history, not into evaluate()'s return value
    logged = next((h for h in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in h), None)
    if logged is None:
        raise StageError("dpo: TRL's evaluation logged no eval_rewards/accuracies; set dpo.heldout_max_pairs=0 to "
                         "skip the held-out accuracy with this TRL version")
    m = {**m, **{k.replace("eval_", "heldout_", 1): v for k, v in logged.items() if k.startswith("eval_")}}
    acc, n = float(m["heldout_rewards/accuracies"]), ds.num_rows
    z = 1.96
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": acc, "low": centre - half, "high": centre + half, "pairs": n,
            "loss": float(m["heldout_loss"]), "margin": float(m["heldout_rewards/margins"])}


def load_policy(model_dir: Path, bf16: bool):
    """The generator to tune: frozen base weights in bf16 when bf16 is on (LoRA weights stay fp32)."""
    from rlrf.llm import load_generator

    model, tok = load_generator(model_dir, dtype="bfloat16" if bf16 else "float32")
    tok.padding_side = "right"
    return model, tok


def share_prompt(trainer, entropy_alpha: float = 1.0, token_kl: bool = False) -> dict:
    """Each pair's prompt through the model once (rlrf/dpo_packed.py) under TRL's own DPO loss and metrics; with
    dpo.lora_layers the reference pass also reuses the policy pass's frozen layers; with dpo.entropy_alpha the
    reference pass's log-probs are divided by it (H-DPO); with `token_kl` each training step's token KL to the
    reference is left in the returned dict for dpo_trainer's loss. Returns the packed forward's counters (updated
    as it trains)."""
    from peft import PeftModel

    from rlrf import dpo_packed

    try:
        from trl.trainer.utils import FusedCausalLMOutput  # noqa: F401  (what the packed forward answers with)
    except ImportError:
        raise StageError("dpo.share_prompt: this TRL's DPOTrainer has no fused LM head (trl 1.16 is tested); "
                         "upgrade trl or set dpo.share_prompt=false") from None
    if trainer.use_weighting or trainer.aux_loss_enabled or trainer.ref_model is not None:
        raise StageError("dpo.share_prompt: needs a LoRA policy whose reference is the adapter disabled, without "
                         "WPO weighting or MoE aux loss; set dpo.share_prompt=false")
    model = trainer.model
    return dpo_packed.install(model.get_base_model() if isinstance(model, PeftModel) else model,
                              reference_scale=1.0 / entropy_alpha, token_kl=token_kl)


def dpo_trainer(token_kl: float = 0.0, beta: float = 0.1):
    """TRL's DPOTrainer, or with dpo.token_kl > 0 a subclass whose loss adds token_kl x beta x the batch's token KL
    (KL(reference || policy) summed over each profile's tokens, averaged over the batch's profiles) that the
    shared-prompt forward left in the trainer's `packed` dict (share_prompt(..., token_kl=True)); logged as
    `token_kl` beside TRL's metrics. Evaluation (no gradient) runs no KL and adds nothing."""
    from trl import DPOTrainer

    if token_kl <= 0:
        return DPOTrainer

    class TokenKLDPOTrainer(DPOTrainer):
        packed: dict | None = None  # share_prompt's counters, set after it installs the forward

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            kl = (self.packed or {}).pop("token_kl", None)
            if kl is None:
                return out
            self._metrics["train" if self.model.training else "eval"]["token_kl"].append(kl.item())
            term = token_kl * beta * kl
            return (out[0] + term, out[1]) if return_outputs else out + term

    return TokenKLDPOTrainer


def group_by_length(dataset, batch_size: int, seed: int, megabatch: int = 50):
    """The tokenized pairs reordered so each batch holds pairs of similar length (less padding).

    A seeded shuffle, then sorted by length inside megabatches of `megabatch` batches, then the batches
    shuffled: the same idea as transformers' LengthGroupedSampler, but a fixed order that a sequential
    sampler replays exactly when a killed run resumes (that sampler redraws from the global RNG, so a
    resumed run would see other batches). Each epoch repeats the order.
    """
    import numpy as np

    lengths = np.array([len(p) + max(len(c), len(r)) for p, c, r in
                        zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    step = batch_size * megabatch
    grouped = np.concatenate([m[np.argsort(-lengths[m], kind="stable")] for m in
                              (perm[i:i + step] for i in range(0, len(perm), step))])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
    return dataset.select(order.tolist())


def _checkpoint_callback():
    from transformers import TrainerCallback

    from rlrf.memory import trim_freed_memory
    from rlrf.store import _maybe_die

    class CheckpointIsAShard(TrainerCallback):
        """A saved checkpoint is this stage's shard: RLRF_KILL_AFTER_SHARDS kills right after it (resume tests).
        After each step and evaluation the heap's freed pages go back to the system (rlrf.memory)."""

        def on_save(self, args, state, control, **kw):
            _maybe_die()

        def on_step_end(self, args, state, control, **kw):
            trim_freed_memory()

        def on_evaluate(self, args, state, control, **kw):
            trim_freed_memory()

    return CheckpointIsAShard()


def last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def write_log_csv(log_history: list[dict], columns: tuple[str, ...], key: str, out_dir: Path) -> list[dict]:
    """out_dir/train_log.csv: `columns` of every logged step that has `key` (a Trainer's log_history); the rows."""
    rows = [{c: h.get(c) for c in columns} for h in log_history if key in h]
    with atomic_path(out_dir / "train_log.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return rows


def write_log(log_history: list[dict], out_dir: Path) -> list[dict]:
    """train_log.csv (one row per logged step) and loss.png; returns the rows."""
    rows = write_log_csv(log_history, LOG_COLUMNS, "loss", out_dir)
    from rlrf.plots import pyplot, save_png

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["loss"] for r in rows], marker=".")
    a.axhline(0.6931, color="grey", lw=0.8, ls="--", label="log 2 (no preference)")
    a.set(xlabel="optimizer step", ylabel="DPO loss", title="loss")
    a.legend(fontsize=8)
    b.plot(steps, [r["rewards/margins"] for r in rows], marker=".", label="reward margin")
    b.plot(steps, [r["rewards/accuracies"] for r in rows], marker=".", label="reward accuracy")
    b.set(xlabel="optimizer step", title="implicit rewards")
    b.legend(fontsize=8)
    save_png(fig, out_dir / "loss.png")
    return rows


def merge(model_dir: Path, adapter_dir: Path, out: Path, scale: float = 1.0) -> Path:
    """Base + scale x the adapter's update, merged in fp32 (a bf16 merge would round the small LoRA update away),
    saved atomically. scale < 1 interpolates the trained policy towards its initialisation (dpo.merge_scale)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **SAFE_MODEL)
    policy = PeftModel.from_pretrained(base, adapter_dir)
    if scale != 1.0:
        for module in policy.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)  # each layer's update B A x alpha/r, times scale
    merged = policy.merge_and_unload()
    tok = AutoTokenizer.from_pretrained(model_dir, **SAFE_TOKENIZER)
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (model_dir / extra).is_file() and not (tmp / extra).is_file():
                shutil.copy(model_dir / extra, tmp / extra)
    return out


def train_trl(recipe: Recipe, pairs_dir: Path, model_dir: Path, out_dir: Path, log=print) -> dict:
    import torch

    cfg = recipe.dpo
    bf16 = use_bf16(cfg.dtype)
    seed = cfg.training_seed(recipe.seed)
    torch.manual_seed(seed)
    ds = load_pairs_dataset(pairs_dir, out_dir / "hf_cache")
    model, tok = load_policy(model_dir, bf16)
    ckpt_dir = out_dir / "checkpoints"
    trainer = dpo_trainer(cfg.token_kl, cfg.beta)(
        model=model, args=trl_args(cfg, ckpt_dir, seed, bf16), train_dataset=ds, processing_class=tok,
        peft_config=lora_config(cfg, model.config.num_hidden_layers), callbacks=[_checkpoint_callback()])
    packed = share_prompt(trainer, cfg.entropy_alpha, cfg.token_kl > 0) if cfg.share_prompt else None
    if cfg.token_kl > 0:
        trainer.packed = packed
    if cfg.group_by_length:
        trainer.train_dataset = group_by_length(trainer.train_dataset, cfg.per_device_train_batch_size, seed)
    resume = last_checkpoint(ckpt_dir)
    if resume:
        log(f"dpo: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    adapter = out_dir / "adapter"
    with atomic_path(adapter) as tmp:
        trainer.model.save_pretrained(tmp)
    rows = write_log(trainer.state.log_history, out_dir)
    held = heldout_accuracy(trainer, pairs_dir, cfg.heldout_max_pairs)
    if held:
        log(f"dpo: held-out pairs ({held['pairs']}, users never trained on): implicit-reward accuracy "
            f"{held['accuracy']:.3f} [{held['low']:.3f}, {held['high']:.3f}], margin {held['margin']:+.4f}")
    del trainer, model
    merge(model_dir, adapter, out_dir / "merged", scale=cfg.merge_scale)
    last = rows[-1] if rows else {}
    return {"backend": "trl", "bf16": bf16, "steps": int(result.global_step), "pairs_used": ds.num_rows,
            "train_loss": float(result.training_loss), "final": last, "resumed_from": resume,
            "heldout": held, "packed_forward": packed, "generator_out": str(out_dir / "merged")}


# ----------------------------------------------------------------------------- the stage


def check_memory(recipe: Recipe, model_dir: Path, log=print) -> float | None:
    """The TRL step's estimated peak (rlrf.memory), refused before loading anything when the machine cannot hold
    it; None on a GPU, whose memory is another budget."""
    import torch

    from rlrf.llm import pick_dtype
    from rlrf.memory import Shape, dpo_peak_mb, preflight

    if torch.cuda.is_available():
        return None
    cfg = recipe.dpo
    need = dpo_peak_mb(Shape.from_dir(model_dir), batch=cfg.per_device_train_batch_size, max_length=cfg.max_length,
                       completion_tokens=recipe.sample.max_new_tokens, share_prompt=cfg.share_prompt,
                       bytes_per=pick_dtype(cfg.dtype).itemsize, checkpointing=cfg.gradient_checkpointing,
                       adapted_layers=cfg.lora_layers)
    preflight("dpo", need, "dpo.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
                           "pairs per step), dpo.max_length, or turn dpo.gradient_checkpointing on", log)
    return round(need, 1)


def make_generator(recipe: Recipe, k: int, *, force: bool = False) -> Path:
    """Round k's dpo stage (rlrf.trainers): generator k-1 tuned on round k's pairs; its merged/ is generator k."""
    return dpo_stage(recipe, runs.stage_dir(recipe, "pairs", k), runs.generator_for_round(recipe, k),
                     runs.stage_dir(recipe, "dpo", k), force=force)


def dpo_stage(recipe: Recipe, pairs_dir, generator: str, out_dir, *, force: bool = False) -> Path:
    """Tune `generator` on the pairs in `pairs_dir`; out_dir/merged is the next round's generator."""
    from rlrf.llm import resolve_model, weights_hash

    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    model_dir = resolve_model(generator)
    with STAGE.open(recipe, out_dir, inputs=[pairs_dir], force=force, extra={
            "generator": str(generator), "generator_hash": weights_hash(model_dir)}) as st:
        if st.done:
            return out_dir
        pairs = read_artifact(pairs_dir, "pairs", "pairs")
        if pairs.is_empty():
            raise StageError(f"{pairs_dir}: no preference pairs (every user was dropped; see its stage.json "
                             f"'dropped'). Raise sample.n or sample.temperature, or lower pairs.min_margin.")
        extra = BACKENDS[recipe.dpo.backend](recipe, pairs_dir, model_dir, out_dir, st.log)
        st.finish(extra={**extra, "merge_scale": recipe.dpo.merge_scale}, rows={"pairs": pairs.height})
    return out_dir


def _trl(recipe: Recipe, pairs_dir: Path, model_dir: Path, out_dir: Path, log) -> dict:
    estimate = check_memory(recipe, model_dir, log)
    return {**train_trl(recipe, pairs_dir, model_dir, out_dir, log=log), "memory_estimate_mb": estimate}


def _llamafactory(recipe: Recipe, pairs_dir: Path, model_dir: Path, out_dir: Path, log) -> dict:
    from rlrf.llamafactory import run_llamafactory

    return run_llamafactory(recipe, pairs_dir, model_dir, out_dir, log=log)


# dpo.backend -> trainer(recipe, pairs_dir, model_dir, out_dir, log) -> the stage summary's extra keys; each leaves
# out_dir/adapter, out_dir/merged (the next round's generator), train_log.csv and loss.png
BACKENDS = {"trl": _trl, "llamafactory": _llamafactory}
