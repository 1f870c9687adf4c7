"""DPO on the round's preference pairs: TRL DPOTrainer + a peft LoRA adapter -> the next generator.

The reference model is the base weights with the adapter disabled (a PEFT model and ref_model=None), so
only one copy of the model is held. Outputs in the stage directory:

    checkpoints/checkpoint-<step>/   Trainer checkpoints every dpo.save_steps (the unit of resume)
    adapter/                         the LoRA adapter (peft)
    merged/                          base + adapter merged in fp32, safetensors + tokenizer: generator k
    train_log.csv, loss.png          loss, rewards/margins, rewards/accuracies per logged step

`dpo.backend: llamafactory` instead writes a LLaMA-Factory recipe (llamafactory_dpo.yaml) over the pairs' sharegpt
export, checks that LLaMA-Factory tokenizes every pair as the sample stage did, runs `llamafactory-cli train` (its
own environment, `make llamafactory-env`) and leaves the same outputs, plus llamafactory.log.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

from rlrf.config import Recipe
from rlrf.llm import SAFE_MODEL, SAFE_TOKENIZER
from rlrf.store import Stage, StageError, atomic_path, read_artifact

LOG_COLUMNS = ("step", "epoch", "loss", "rewards/margins", "rewards/accuracies", "rewards/chosen",
               "rewards/rejected", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm")
LLAMAFACTORY_INSTALL = "make llamafactory-env"  # its own venv, .venv-llamafactory: LLaMA-Factory pins older transformers/trl


def use_bf16(setting: str) -> bool:
    """dpo.dtype: auto = bf16 where the hardware does it natively (CUDA, or a CPU with AMX / AVX512-bf16)."""
    import torch

    from rlrf.llm import pick_dtype

    return pick_dtype(setting) == torch.bfloat16


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")


def trl_args(cfg, output_dir: Path, seed: int, bf16: bool):
    """TRL DPOConfig from the recipe's dpo section (shared with benchmarks/dpo_step.py)."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
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
        # forward per batch to return logits (measured 80 s per 8 pairs on the demo, twice a training step of 4)
        prediction_loss_only=True,
        use_cpu=not _cuda(),
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_pairs_dataset(pairs_dir: Path, cache_dir: Path, artifact: str = "pairs", limit: int | None = None):
    """The pairs parquet as a datasets.Dataset with only TRL's columns (prompt, chosen, rejected)."""
    import datasets

    df = read_artifact(pairs_dir, artifact, "pairs")  # schema check and a clear error when unfinished
    if artifact != "pairs":  # small: no need for the on-disk dataset cache
        df = df.sort("user_id").head(limit) if limit is not None else df
        return datasets.Dataset.from_polars(df.select("prompt", "chosen", "rejected"))
    files = sorted(str(p) for p in (Path(pairs_dir) / artifact).glob("part-*.parquet"))
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


def share_prompt(trainer) -> None:
    """Each pair's prompt through the model once (rlrf/dpo_packed.py) under TRL's own DPO loss and metrics."""
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
    dpo_packed.install(model.get_base_model() if isinstance(model, PeftModel) else model)


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

    from rlrf.store import _maybe_die

    class CheckpointIsAShard(TrainerCallback):
        """A saved checkpoint is this stage's shard: RLRF_KILL_AFTER_SHARDS kills right after it (resume tests)."""

        def on_save(self, args, state, control, **kw):
            _maybe_die()

    return CheckpointIsAShard()


def last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def write_log(log_history: list[dict], out_dir: Path) -> list[dict]:
    """train_log.csv (one row per logged step) and loss.png; returns the rows."""
    rows = [{c: h.get(c) for c in LOG_COLUMNS} for h in log_history if "loss" in h]
    with atomic_path(out_dir / "train_log.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["loss"] for r in rows], marker=".")
    a.axhline(0.6931, color="grey", lw=0.8, ls="--", label="log 2 (no preference)")
    a.set(xlabel="optimizer step", ylabel="DPO loss", title="loss")
    a.legend(fontsize=8)
    b.plot(steps, [r["rewards/margins"] for r in rows], marker=".", label="reward margin")
    b.plot(steps, [r["rewards/accuracies"] for r in rows], marker=".", label="reward accuracy")
    b.set(xlabel="optimizer step", title="implicit rewards")
    b.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return rows


def merge(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Base + adapter merged in fp32 (a bf16 merge would round the small LoRA update away), saved atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **SAFE_MODEL)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
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
    from trl import DPOTrainer

    cfg = recipe.dpo
    bf16 = use_bf16(cfg.dtype)
    torch.manual_seed(recipe.seed)
    ds = load_pairs_dataset(pairs_dir, out_dir / "hf_cache")
    model, tok = load_policy(model_dir, bf16)
    ckpt_dir = out_dir / "checkpoints"
    trainer = DPOTrainer(model=model, args=trl_args(cfg, ckpt_dir, recipe.seed, bf16), train_dataset=ds,
                         processing_class=tok, peft_config=lora_config(cfg), callbacks=[_checkpoint_callback()])
    if cfg.share_prompt:
        share_prompt(trainer)
    if cfg.group_by_length:
        trainer.train_dataset = group_by_length(trainer.train_dataset, cfg.per_device_train_batch_size, recipe.seed)
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
    merge(model_dir, adapter, out_dir / "merged")
    last = rows[-1] if rows else {}
    return {"backend": "trl", "bf16": bf16, "steps": int(result.global_step), "pairs_used": ds.num_rows,
            "train_loss": float(result.training_loss), "final": last, "resumed_from": resume,
            "heldout": held, "generator_out": str(out_dir / "merged")}


# ----------------------------------------------------------------------------- LLaMA-Factory
#
# LLaMA-Factory runs in its own environment (`make llamafactory-env`): the dpo stage calls its python only through
# `llamafactory-cli train` and rlrf/llamafactory_probe.py. Before training, the probe checks the versions LLaMA-Factory
# demands and tokenizes every exported pair through LLaMA-Factory's own loader and template; the stage refuses to train
# unless those ids equal the sample stage's prompt and TRL's completion ids, token for token.

LLAMAFACTORY_PROBE = Path(__file__).with_name("llamafactory_probe.py")
LLAMAFACTORY_LOG = "llamafactory.log"
_LF_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def find_llamafactory_cli(setting: str) -> str | None:
    """dpo.llamafactory_cli: a path or command name; auto = on PATH, else .venv-llamafactory/bin of the working
    directory or of this checkout."""
    if setting != "auto":
        return shutil.which(setting) or (setting if Path(setting).is_file() else None)
    found = shutil.which("llamafactory-cli")
    if found:
        return found
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        local = root / ".venv-llamafactory" / "bin" / "llamafactory-cli"
        if local.is_file():
            return str(local)
    return None


def llamafactory_python(cli: str) -> str:
    """The interpreter of LLaMA-Factory's environment: the one named on llamafactory-cli's #! line."""
    try:
        first = Path(cli).read_bytes()[:512].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError) as e:
        raise StageError(f"dpo: cannot read {cli} ({e}); set dpo.llamafactory_cli to LLaMA-Factory's "
                         f"llamafactory-cli, or install it with `{LLAMAFACTORY_INSTALL}`") from None
    words = first[2:].split() if first.startswith("#!") else []
    if words and Path(words[0]).name == "env" and len(words) > 1:
        words = [shutil.which(words[1]) or words[1]]
    if not words or not Path(words[0]).is_file():
        raise StageError(f"dpo: {cli} names no Python interpreter on its first line ({first[:120]!r}); point "
                         f"dpo.llamafactory_cli at the llamafactory-cli that pip installed, e.g. "
                         f".venv-llamafactory/bin/llamafactory-cli (`{LLAMAFACTORY_INSTALL}`)")
    return words[0]


def expected_token_ids(model_dir: Path, pairs) -> list[dict]:
    """Per pair, the ids DPO must train on: the prompt exactly as the sample stage tokenized it (sample.chat_ids)
    and each completion as TRL takes it (the chat template of prompt + answer, after the prompt)."""
    from transformers import AutoTokenizer

    from rlrf.sample import chat_ids

    tok = AutoTokenizer.from_pretrained(model_dir, **SAFE_TOKENIZER)
    out = []
    for r in pairs.iter_rows(named=True):
        prompt = chat_ids(tok, r["prompt"][-1]["content"])
        row = {"user_id": r["user_id"], "prompt": prompt}
        for side in ("chosen", "rejected"):
            full = list(tok.apply_chat_template(list(r["prompt"]) + list(r[side]), tokenize=True, return_dict=False))
            if full[:len(prompt)] != prompt:
                raise StageError(f"dpo: {model_dir}'s chat template renders user {r['user_id']}'s prompt differently "
                                 f"once an answer follows it; neither backend can train on the prompt the sample "
                                 f"stage used with this template")
            row[side] = full[len(prompt):]
        out.append(row)
    return out


def llamafactory_recipe(recipe: Recipe, pairs_dir: Path, model_dir: Path, out_dir: Path, cutoff_len: int) -> dict:
    """The LLaMA-Factory training recipe equivalent to the trl backend's settings (device keys: llamafactory_device).

    `template` is left out under dpo.template=auto: LLaMA-Factory then builds the template from the tokenizer's own
    chat template, the one the sample stage used (its named templates can differ, e.g. chatml lacks SmolLM2's
    default system message). `cutoff_len` must hold the longest pair whole: LLaMA-Factory shortens a pair by cutting
    the end of the prompt as well as the answers."""
    from rlrf.pairs import LLAMAFACTORY_DIR, dataset_name

    cfg = recipe.dpo
    info = read_artifact(pairs_dir, "pairs", "pairs")
    rounds = sorted(set(info["round"].to_list())) or [1]
    lf_dir = Path(pairs_dir) / LLAMAFACTORY_DIR
    if not (lf_dir / "dataset_info.json").is_file():
        raise StageError(f"{lf_dir}/dataset_info.json not found: rerun the pairs stage with "
                         f"pairs.llamafactory_export=true --force")
    lf = {
        "model_name_or_path": str(Path(model_dir).resolve()),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "lora_target": ",".join(cfg.lora_target_modules),
        "pref_beta": cfg.beta,
        "pref_loss": "sigmoid",
        "dataset": dataset_name(rounds[0]),
        "dataset_dir": str(lf_dir.resolve()),
        "cutoff_len": cutoff_len,
        "overwrite_cache": True,
        "output_dir": str((Path(out_dir) / "checkpoints").resolve()),
        "logging_steps": cfg.logging_steps,
        "save_steps": cfg.save_steps,
        "plot_loss": False,  # loss.png comes from the same log_history as the trl backend's
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "lr_scheduler_type": "linear",
        # LLaMA-Factory turns checkpointing on unless told not to; `gradient_checkpointing: false` is ignored
        "disable_gradient_checkpointing": not cfg.gradient_checkpointing,
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "report_to": "none",
    }
    if cfg.template != "auto":
        lf["template"] = cfg.template
    return lf


def llamafactory_device(setting: str, cuda: bool, bf16_cuda: bool) -> dict:
    """bf16 as dpo.dtype says (auto: where the GPU, or the CPU with AVX512-bf16/AMX, does it natively); on a CPU
    transformers refuses bf16 unless use_cpu is set."""
    from rlrf.llm import cpu_has_bf16

    bf16 = setting == "bfloat16" or (setting == "auto" and (bf16_cuda if cuda else cpu_has_bf16()))
    return {"bf16": bf16, "use_cpu": not cuda}


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _lf_env() -> dict:
    env = {**os.environ, "WANDB_DISABLED": "true"}
    env.setdefault("HF_HUB_OFFLINE", "1")  # every path LLaMA-Factory gets is local (resolve_model ran first)
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def probe_llamafactory(python: str, lf: dict, out_dir: Path) -> dict:
    """Run rlrf/llamafactory_probe.py in LLaMA-Factory's environment on recipe `lf`: versions, device, and every
    pair's token ids as LLaMA-Factory renders them. Raises StageError naming what to fix."""
    import yaml

    scratch = out_dir / ".llamafactory_probe"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        (scratch / "recipe.yaml").write_text(yaml.safe_dump({**lf, "output_dir": str(scratch / "out")}))
        log = out_dir / "llamafactory_probe.log"
        with open(log, "w") as fh:
            res = subprocess.run([python, "-P", str(LLAMAFACTORY_PROBE), str(scratch / "recipe.yaml"),
                                  str(scratch / "probe.json")], stdout=fh, stderr=subprocess.STDOUT, env=_lf_env())
        if res.returncode != 0 or not (scratch / "probe.json").is_file():
            raise StageError(f"dpo: LLaMA-Factory could not load the recipe's dataset (exit {res.returncode}); "
                             f"full output in {log}, its end:\n{_tail(log)}")
        probe = json.loads((scratch / "probe.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "error" in probe:
        kind, _, msg = probe["error"].partition(": ")
        versions = ", ".join(f"{k} {v}" for k, v in probe["versions"].items())
        what = {"version": "LLaMA-Factory rejects this environment's versions",
                "missing": "this is not LLaMA-Factory's environment"}.get(kind, "LLaMA-Factory's train path does not import")
        raise StageError(f"dpo: {what}: {msg.split('To fix:')[0].strip()}\n  environment: {probe['python']} ({versions})\n"
                         f"  Rebuild it: rm -rf .venv-llamafactory && {LLAMAFACTORY_INSTALL}")
    return probe


def check_same_tokens(expected: list[dict], rendered: list[dict], tokenizer_dir: Path) -> None:
    """StageError at the first pair whose LLaMA-Factory ids differ from the sample stage's / TRL's."""
    if len(rendered) != len(expected):
        raise StageError(f"dpo: LLaMA-Factory loaded {len(rendered)} of the {len(expected)} exported pairs "
                         f"(it drops malformed rows); rerun the pairs stage with --force")
    for want, got in zip(expected, rendered):
        for part in ("prompt", "chosen", "rejected"):
            a, b = want[part], got[part]
            if a == b:
                continue
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir, **SAFE_TOKENIZER)
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise StageError(
                f"dpo: LLaMA-Factory renders user {want['user_id']}'s {part} differently from the sample stage "
                f"(first difference at token {i}; {len(b)} tokens against {len(a)}):\n"
                f"  LLaMA-Factory: {tok.decode(b[max(0, i - 8):i + 24])!r}\n"
                f"  sample stage:  {tok.decode(a[max(0, i - 8):i + 24])!r}\n"
                f"  DPO would train on text the generator never sees. Set dpo.template=auto (LLaMA-Factory then "
                f"reads the model's own chat template) or a template that matches it.")


def _copy_adapter(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        for name in _LF_ADAPTER_FILES:
            shutil.copy(src / name, tmp / name)


def _run_logged(cmd: list[str], log: Path, env: dict) -> int:
    """Run `cmd`, its output both on this terminal and appended to `log` (tqdm's carriage returns kept)."""
    import sys

    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
            fh.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return proc.wait()


def run_llamafactory(recipe: Recipe, pairs_dir: Path, model_dir: Path, out_dir: Path, log=print) -> dict:
    """Write <out_dir>/llamafactory_dpo.yaml and run `llamafactory-cli train` on it; then the same outputs as the trl
    backend: adapter/, merged/ (generator k), train_log.csv and loss.png (from LLaMA-Factory's trainer_state.json)."""
    import yaml

    cfg = recipe.dpo
    pairs = read_artifact(pairs_dir, "pairs", "pairs")
    expected = expected_token_ids(model_dir, pairs)
    longest = max(len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in expected)
    cutoff_len = max(cfg.max_length, longest)
    if cutoff_len > cfg.max_length:
        log(f"dpo: the longest pair is {longest} tokens (prompt + answer + end tokens), over dpo.max_length="
            f"{cfg.max_length}: LLaMA-Factory's cutoff_len is {cutoff_len} so it cuts no prompt")
    lf = llamafactory_recipe(recipe, pairs_dir, model_dir, out_dir, cutoff_len)
    path = out_dir / "llamafactory_dpo.yaml"
    cli = find_llamafactory_cli(cfg.llamafactory_cli)

    def write(recipe_dict: dict) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("# LLaMA-Factory DPO recipe written by rlrf (dpo.backend: llamafactory)\n"
                           f"#   llamafactory-cli train {path}\n" + yaml.safe_dump(recipe_dict, sort_keys=False))

    if cli is None:
        write({**lf, **llamafactory_device(cfg.dtype, _cuda(), False)})
        raise StageError(f"dpo.backend=llamafactory: llamafactory-cli not found (looked on PATH and in "
                         f".venv-llamafactory/bin). The recipe is written: {path}. Install LLaMA-Factory with "
                         f"`{LLAMAFACTORY_INSTALL}` (or set dpo.llamafactory_cli=/path/to/llamafactory-cli), then "
                         f"rerun this stage, or run `llamafactory-cli train {path}` yourself.")
    # a merged model left by an earlier attempt must not outlive a failed run: the next round would load it
    for stale in ("merged", "adapter"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    python = llamafactory_python(cli)
    probe = probe_llamafactory(python, lf, out_dir)
    check_same_tokens(expected, probe["examples"], model_dir)
    log(f"dpo: LLaMA-Factory {probe['versions']['llamafactory']} renders all {len(expected)} pairs token for token "
        f"as the sample stage (longest {longest} tokens)")
    lf.update(llamafactory_device(cfg.dtype, probe["cuda"], probe["bf16_cuda"]))
    lf_out = out_dir / "checkpoints"
    finished = all((lf_out / f).is_file() for f in (*_LF_ADAPTER_FILES, "trainer_state.json"))
    resume = None if finished else last_checkpoint(lf_out)
    if resume:
        lf["resume_from_checkpoint"] = resume
        log(f"dpo: resuming from {resume}")
    write(lf)
    if finished:
        log(f"dpo: LLaMA-Factory's training already finished in {lf_out}; merging")
    else:
        log(f"dpo: {cli} train {path}")
        rc = _run_logged([cli, "train", str(path)], out_dir / LLAMAFACTORY_LOG, _lf_env())
        if rc != 0:
            raise StageError(f"`{cli} train {path}` failed (exit {rc}); no generator was written. Full output in "
                             f"{out_dir / LLAMAFACTORY_LOG}, its end:\n{_tail(out_dir / LLAMAFACTORY_LOG)}")
    state = json.loads((lf_out / "trainer_state.json").read_text())
    _copy_adapter(lf_out, out_dir / "adapter")
    rows = write_log(state["log_history"], out_dir)
    merge(model_dir, out_dir / "adapter", out_dir / "merged")
    summary = next((h for h in reversed(state["log_history"]) if "train_loss" in h), {})
    return {"backend": "llamafactory", "recipe": str(path), "cli": cli, "versions": probe["versions"],
            "bf16": lf["bf16"], "use_cpu": lf["use_cpu"], "cutoff_len": cutoff_len, "longest_pair_tokens": longest,
            "steps": int(state["global_step"]), "pairs_used": len(expected),
            "train_loss": summary.get("train_loss"), "final": rows[-1] if rows else {}, "resumed_from": resume,
            "heldout": None, "generator_out": str(out_dir / "merged")}


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
                       bytes_per=pick_dtype(cfg.dtype).itemsize, checkpointing=cfg.gradient_checkpointing)
    preflight("dpo", need, "dpo.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
                           "pairs per step), dpo.max_length, or turn dpo.gradient_checkpointing on", log)
    return round(need, 1)


def dpo_stage(recipe: Recipe, pairs_dir, generator: str, out_dir, *, force: bool = False) -> Path:
    """Tune `generator` on the pairs in `pairs_dir`; out_dir/merged is the next round's generator."""
    from rlrf.llm import resolve_model, weights_hash

    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    model_dir = resolve_model(generator)
    config = {"dpo": recipe.to_dict()["dpo"], "seed": recipe.seed, "generator": str(generator),
              "generator_hash": weights_hash(model_dir)}
    with Stage(out_dir, "dpo", config, inputs=[pairs_dir], force=force) as st:
        if st.done:
            return out_dir
        pairs = read_artifact(pairs_dir, "pairs", "pairs")
        if pairs.is_empty():
            raise StageError(f"{pairs_dir}: no preference pairs (every user was dropped; see its stage.json "
                             f"'dropped'). Raise sample.n or sample.temperature, or lower pairs.min_margin.")
        if recipe.dpo.backend == "llamafactory":
            extra = run_llamafactory(recipe, pairs_dir, model_dir, out_dir, log=st.log)
        else:
            estimate = check_memory(recipe, model_dir, st.log)
            extra = {**train_trl(recipe, pairs_dir, model_dir, out_dir, log=st.log), "memory_estimate_mb": estimate}
        st.finish(extra=extra, rows={"pairs": pairs.height})
    return out_dir
