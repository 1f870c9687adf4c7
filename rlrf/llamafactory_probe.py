"""Runs inside LLaMA-Factory's own environment (`make llamafactory-env`), never imported by rlrf:

    .venv-llamafactory/bin/python -P rlrf/llamafactory_probe.py --check
    .venv-llamafactory/bin/python -P rlrf/llamafactory_probe.py RECIPE.yaml OUT.json

--check is the install's smoke test: the versions LLaMA-Factory demands, and its train path imports
(torchaudio included). With a recipe it also tokenizes the recipe's dataset through LLaMA-Factory's own
dataset loader and chat template and writes, per example, the prompt / chosen / rejected token ids it
would train on, so rlrf can compare them with the sample stage's. (-P: rlrf/ must not shadow the stdlib.)
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

PACKAGES = ("llamafactory", "torch", "torchvision", "torchaudio", "transformers", "trl", "peft", "datasets",
            "accelerate")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, LLaMA-Factory's own version check, the train path's imports, and the device."""
    out = {"versions": {p: _version(p) for p in PACKAGES}, "python": sys.executable}
    if out["versions"]["llamafactory"] is None:
        out["error"] = f"missing: llamafactory is not installed for {sys.executable}"
        return out
    try:
        from llamafactory.extras.misc import check_dependencies

        check_dependencies()  # the same check `llamafactory-cli train` runs first
    except ImportError as e:  # transformers.utils.versions: "<req> is required ... but found <pkg>==<v>"
        out["error"] = f"version: {e}"
        return out
    try:
        import llamafactory.data  # noqa: F401  (imports torchaudio, torchvision: the train path)
        import llamafactory.train.tuner  # noqa: F401
    except Exception as e:  # a torchaudio that does not match torch fails here (OSError from its .so)
        out["error"] = f"import: {type(e).__name__}: {e}"
        return out
    import torch

    out["cuda"] = torch.cuda.is_available()
    out["bf16_cuda"] = bool(out["cuda"] and torch.cuda.is_bf16_supported())
    return out


def render(recipe: dict) -> list[dict]:
    """Token ids of every example of the recipe's dataset, as LLaMA-Factory's DPO workflow builds them."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(recipe)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    ds = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)["train_dataset"]
    rows = []
    for ex in ds:
        labels = ex["chosen_labels"]
        n = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        rows.append({"prompt": ex["chosen_input_ids"][:n], "chosen": ex["chosen_input_ids"][n:],
                     "rejected": ex["rejected_input_ids"][n:]})
    return rows


def main(argv: list[str]) -> int:
    env = environment()
    if argv == ["--check"]:
        print(json.dumps(env, indent=1))
        return 1 if "error" in env else 0
    recipe_path, out_path = argv
    if "error" not in env:
        import yaml

        env["examples"] = render(yaml.safe_load(open(recipe_path)))
    with open(out_path, "w") as f:
        json.dump(env, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
