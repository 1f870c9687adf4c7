"""`dpo.backend: llamafactory`: the dpo stage's other trainer.

Writes a LLaMA-Factory recipe (llamafactory_dpo.yaml) over the pairs' sharegpt export, checks that LLaMA-Factory
tokenizes every pair as the sample stage did, runs `llamafactory-cli train` and leaves the TRL backend's outputs
(adapter/, merged/, train_log.csv, loss.png), plus llamafactory.log.

LLaMA-Factory runs in its own environment (`make llamafactory-env`): the dpo stage calls its python only through
`llamafactory-cli train` and rlrf/llamafactory_probe.py. Before training, the probe checks the versions LLaMA-Factory
demands and tokenizes every exported pair through LLaMA-Factory's own loader and template; the stage refuses to train
unless those ids equal the sample stage's prompt and TRL's completion ids, token for token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from rlrf.artifacts import read_artifact
from rlrf.config import Recipe
from rlrf.dpo import last_checkpoint, merge, write_log
from rlrf.errors import StageError
from rlrf.files import atomic_path
from rlrf.llm import SAFE_TOKENIZER
from rlrf.machine import has_cuda
from rlrf.store import peak_rss_mb

LLAMAFACTORY_INSTALL = "make llamafactory-env"  # its own venv, .venv-llamafactory: LLaMA-Factory pins older transformers/trl

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
        "seed": cfg.training_seed(recipe.seed),
        "data_seed": cfg.training_seed(recipe.seed),
        "report_to": "none",
    }
    if cfg.sft_weight > 0:  # RPO: LLaMA-Factory's SFT term in the DPO loss (the chosen side's mean token NLL)
        lf["pref_ftx"] = cfg.sft_weight
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
        write({**lf, **llamafactory_device(cfg.dtype, has_cuda(), False)})
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
    merge(model_dir, out_dir / "adapter", out_dir / "merged", scale=recipe.dpo.merge_scale)
    summary = next((h for h in reversed(state["log_history"]) if "train_loss" in h), {})
    return {"backend": "llamafactory", "recipe": str(path), "cli": cli, "versions": probe["versions"],
            "bf16": lf["bf16"], "use_cpu": lf["use_cpu"], "cutoff_len": cutoff_len, "longest_pair_tokens": longest,
            "steps": int(state["global_step"]), "pairs_used": len(expected),
            "train_loss": summary.get("train_loss"), "final": rows[-1] if rows else {}, "resumed_from": resume,
            # the stage's own peak_rss_mb is this process's; LLaMA-Factory trains in a child of its own
            "llamafactory_peak_rss_mb": peak_rss_mb(children=True),
            "heldout": None, "generator_out": str(out_dir / "merged")}
