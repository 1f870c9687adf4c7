"""The LLaMA-Factory DPO backend with the real llamafactory-cli (`make llamafactory-env`; `make test-llamafactory`):
a whole round of the tiny recipe with dpo.backend=llamafactory (real ML-100K, real SmolLM2), its dpo stage killed
after its first checkpoint and resumed; round 2 sampling from LLaMA-Factory's merged generator; LLaMA-Factory's own
dataset loader and template rendering the exported pairs token for token as the sample stage; and the bad inputs:
a template that renders other text, versions LLaMA-Factory rejects, a run that fails."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
import yaml

from conftest import REPO, ROUND_STAGES, run_stage, stage_ok

LF_VENV = REPO / ".venv-llamafactory"
LF_PYTHON = LF_VENV / "bin" / "python"
ARGS = ["dpo.backend=llamafactory"]

pytestmark = [
    pytest.mark.llamafactory,
    pytest.mark.skipif(not (LF_VENV / "bin" / "llamafactory-cli").is_file(),
                       reason="no .venv-llamafactory: run `make llamafactory-env`"),
]


def _dpo_killed_after_first_checkpoint(runs_dir) -> None:
    """Start the dpo stage, SIGKILL it and its llamafactory-cli once checkpoint-1 is written (as a kill -9 would)."""
    cmd = [sys.executable, str(REPO / "pipelines" / "dpo.py"), "--recipe", str(REPO / "recipes" / "tiny.yaml"),
           "--round", "1", f"runs_dir={runs_dir}", f"data.path={REPO / 'data' / 'raw' / 'ml-100k'}", *ARGS]
    ckpt = runs_dir / "tiny" / "round_1" / "dpo" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), "the dpo stage ended before its first checkpoint"


@pytest.fixture(scope="module")
def lf_round1(ml100k_dir, tmp_path_factory):
    """runs/tiny after round 1 with dpo.backend=llamafactory; the dpo stage is killed after checkpoint-1, then rerun."""
    runs_dir = tmp_path_factory.mktemp("lfruns")
    stage_ok(run_stage("prepare", runs_dir, *ARGS))
    for name in ROUND_STAGES:
        if name == "dpo":
            _dpo_killed_after_first_checkpoint(runs_dir)
        stage_ok(run_stage(name, runs_dir, *ARGS))
    return runs_dir / "tiny"


def test_round1_leaves_the_trl_backends_outputs_from_llamafactory(lf_round1):
    from safetensors.torch import load_file

    from rlrf.llm import resolve_model

    dpo = lf_round1 / "round_1" / "dpo"
    info = json.loads((dpo / "stage.json").read_text())
    recipe = yaml.safe_load((dpo / "llamafactory_dpo.yaml").read_text())
    assert info["backend"] == "llamafactory" and info["versions"]["llamafactory"] == "0.9.5"
    assert info["resumed_from"].endswith("checkpoint-1") and info["steps"] == recipe["max_steps"] == 2
    assert "Resuming training from" in (dpo / "llamafactory.log").read_text()
    # LLaMA-Factory's own memory (a child process, outside the stage's peak_rss_mb): at least a model's worth
    assert info["llamafactory_peak_rss_mb"] > 200
    # the recipe LLaMA-Factory ran: the template from the tokenizer, no checkpointing, CPU-safe precision
    assert "template" not in recipe and recipe["disable_gradient_checkpointing"] is True
    assert recipe["use_cpu"] is True and recipe["cutoff_len"] >= info["longest_pair_tokens"]
    # train_log.csv and loss.png from LLaMA-Factory's log history; nothing logged twice across the kill
    rows = list(csv.DictReader(open(dpo / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert abs(float(rows[0]["loss"]) - 0.6931) < 0.01  # policy = reference at step 1: loss log 2
    assert all(r["rewards/margins"] not in ("", None) for r in rows)
    assert (dpo / "loss.png").stat().st_size > 1000
    # the adapter trained (LoRA B starts at zero) and was merged into the attention weights only
    adapter = load_file(dpo / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    base = load_file(resolve_model("smollm2-135m-instruct") / "model.safetensors")
    merged = load_file(dpo / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    assert any(not torch.equal(base[k], merged[k]) for k in base if "q_proj" in k)
    assert all(torch.equal(base[k], merged[k]) for k in base if "mlp" in k)
    check = json.loads((lf_round1 / "round_1" / "check" / "stage.json").read_text())
    assert check["rows"]["users"] >= 1


def test_llamafactory_renders_exported_pairs_token_for_token_as_the_sample_stage(lf_round1, tmp_path):
    """LLaMA-Factory's own dataset loader and template (rlrf/llamafactory_probe.py, in its environment) on the round's
    export and recipe: each prompt equals the sample stage's tokenized prompt, each answer the profile's tokens and
    the chat template's end tokens."""
    from transformers import AutoTokenizer

    from rlrf.llm import resolve_model
    from rlrf.sample import chat_ids

    r1 = lf_round1 / "round_1"
    recipe = yaml.safe_load((r1 / "dpo" / "llamafactory_dpo.yaml").read_text())
    recipe = {**recipe, "output_dir": str(tmp_path / "out")}
    recipe.pop("resume_from_checkpoint", None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = subprocess.run([str(LF_PYTHON), "-P", str(REPO / "rlrf" / "llamafactory_probe.py"),
                          str(tmp_path / "recipe.yaml"), str(tmp_path / "probe.json")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rendered = json.loads((tmp_path / "probe.json").read_text())["examples"]

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    end = tok.encode("<|im_end|>\n", add_special_tokens=False)
    pairs = pl.read_parquet(r1 / "pairs" / "pairs" / "*.parquet").sort("user_id")
    profiles = pl.read_parquet(r1 / "sample" / "profiles" / "*.parquet")
    assert len(rendered) == pairs.height >= 1
    for got, pair in zip(rendered, pairs.iter_rows(named=True)):
        mine = profiles.filter(pl.col("user_id") == pair["user_id"])
        prompt = mine["prompt"][0]
        assert got["prompt"] == chat_ids(tok, prompt)  # the very function the sample stage tokenized with
        assert tok.decode(got["prompt"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        for side, idx in (("chosen", pair["chosen_idx"]), ("rejected", pair["rejected_idx"])):
            text = mine.filter(pl.col("sample_idx") == idx)["text"][0]
            assert got[side] == tok.encode(text, add_special_tokens=False) + end, (pair["user_id"], side)


def test_a_template_that_renders_other_text_is_refused(lf_round1, tmp_path):
    """LLaMA-Factory's built-in chatml has no default system message, SmolLM2's chat template has one."""
    from rlrf.config import load_recipe
    from rlrf.dpo import dpo_stage
    from rlrf.errors import StageError

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ARGS + ["dpo.template=chatml"])
    with pytest.raises(StageError) as e:
        dpo_stage(recipe, lf_round1 / "round_1" / "pairs", "smollm2-135m-instruct", tmp_path / "dpo")
    msg = str(e.value)
    assert "renders user" in msg and "prompt differently" in msg and "dpo.template=auto" in msg
    assert "You are a helpful AI assistant named SmolLM" in msg  # the sample stage's side of the difference
    assert not (tmp_path / "dpo" / "checkpoints").exists()  # refused before training


def test_versions_llamafactory_rejects_are_named_with_their_range(lf_round1, tmp_path, monkeypatch):
    """An environment whose transformers is outside LLaMA-Factory's range: a transformers 9.9.9 distribution's metadata
    put first on the LLaMA-Factory Python's path, so LLaMA-Factory's own check sees it."""
    from rlrf.config import load_recipe
    from rlrf.dpo import dpo_stage
    from rlrf.errors import StageError

    dist = tmp_path / "shadow" / "transformers-9.9.9.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 9.9.9\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    with pytest.raises(StageError) as e:
        dpo_stage(load_recipe(REPO / "recipes" / "tiny.yaml", ARGS), lf_round1 / "round_1" / "pairs",
                  "smollm2-135m-instruct", tmp_path / "dpo")
    msg = str(e.value)
    assert "rejects this environment's versions" in msg and "transformers==9.9.9" in msg
    assert "transformers>=4.55.0,<=5.6.0" in msg and "make llamafactory-env" in msg


def test_a_failed_run_leaves_no_generator_and_shows_its_log_tail(lf_round1, tmp_path):
    from rlrf.config import load_recipe
    from rlrf.dpo import dpo_stage
    from rlrf.errors import StageError

    out = tmp_path / "dpo"
    (out / "merged").mkdir(parents=True)  # an earlier attempt's generator, which the next round would load
    (out / "merged" / "config.json").write_text("{}")
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ARGS + ["dpo.lora_target_modules=[no_such_proj]"])
    with pytest.raises(StageError) as e:
        dpo_stage(recipe, lf_round1 / "round_1" / "pairs", "smollm2-135m-instruct", out)
    msg = str(e.value)
    assert "failed (exit" in msg and "no generator was written" in msg and str(out / "llamafactory.log") in msg
    assert "no_such_proj" in msg.split("its end:", 1)[1]  # peft's complaint, from LLaMA-Factory's output
    assert not (out / "merged").exists() and not (out / "stage.json").exists()


def test_round2_samples_from_llamafactorys_generator(lf_round1):
    stage_ok(run_stage("sample", lf_round1.parent, *ARGS, round_=2))
    profiles = pl.read_parquet(lf_round1 / "round_2" / "sample" / "profiles" / "*.parquet")
    assert set(profiles["round"].unique()) == {2} and (profiles["text"].str.len_chars() > 0).any()
    assert profiles["generator"][0].endswith(os.path.join("round_1", "dpo", "merged"))
