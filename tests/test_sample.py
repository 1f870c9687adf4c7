"""The sample stage on a tiny random Llama: schema, seeding, shards, resume, trimming, marking, vLLM adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from rlrf import files, schema
from rlrf.artifacts import read_artifact
from rlrf.config import load_recipe
from rlrf.errors import StageError
from rlrf.llm import ModelError
from rlrf.sample import fit_prompt, sample_stage, select_users, user_seed, user_shards
from tests.fixtures_llm import fake_prepare, smollm2_dir, tiny_model  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
KEY = ["user_id", "sample_idx"]


def _overrides(runs_dir, tiny_model) -> list[str]:
    return [f"runs_dir={runs_dir}", "run=t", f"sample.model={tiny_model}", "sample.n=2", "sample.max_users=-1",
            "sample.max_new_tokens=6", "sample.max_prompt_tokens=160", "sample.batch_size=6", "sample.shards=3",
            "sample.dtype=bfloat16", "sample.threads=1"]


def _recipe(tmp_path, tiny_model, *extra):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [*_overrides(tmp_path, tiny_model), *extra])


def _killed_after_one_shard(r, tiny_model, call: str, *argv: str) -> None:
    """`call` (a sample_stage call on the recipe `r`, argv[1:] in sys.argv) in a process of its own, killed with -9
    after its first shard (RLRF_KILL_AFTER_SHARDS=1)."""
    code = ("import sys; from rlrf.config import load_recipe; from rlrf.sample import sample_stage; "
            f"r = load_recipe(sys.argv[1], sys.argv[{len(argv) + 2}:]); {call}")
    args = [sys.executable, "-c", code, str(REPO / "recipes" / "tiny.yaml"), *argv,
            *_overrides(r.runs_dir, tiny_model)]
    env = {**os.environ, "RLRF_KILL_AFTER_SHARDS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]


@pytest.fixture
def setup(tmp_path, tiny_model):
    r = _recipe(tmp_path, tiny_model)
    fake_prepare(r.run_dir)
    return r


def _rows(d):
    return read_artifact(d, "profiles", "sample").sort(KEY)


def test_profiles_schema_seeds_and_trimming(setup, tiny_model):
    r = setup
    out = sample_stage(r, r.run_dir / "s", str(tiny_model), 1)
    df = _rows(out)
    schema.check(df, "profiles")
    assert df.height == 9 * 2 and df["user_id"].n_unique() == 9
    assert set(df["sample_idx"]) == {0, 1} and set(df["round"]) == {1} and set(df["run"]) == {"t"}
    assert set(df["finish_reason"]) <= {"eos", "length"}
    assert (df["n_tokens"] <= 6).all()
    # seeds: (seed, user, round) -> base, + sample_idx; nothing else
    for row in df.iter_rows(named=True):
        assert row["seed"] == user_seed(1234, row["user_id"], 1) + row["sample_idx"]
    # later users have longer histories (fake_prepare), so the 160-token budget trims them, oldest first
    first = df.filter(pl.col("sample_idx") == 0)
    assert first["n_history_trimmed"].to_list()[-1] > first["n_history_trimmed"].to_list()[0] >= 0
    prompts = read_artifact(r.run_dir / "prepare", "prompts")
    u9 = prompts.filter(pl.col("user_id") == 9).row(0, named=True)
    kept = first.filter(pl.col("user_id") == 9)
    k = kept["n_history_trimmed"][0]
    assert kept["prompt"][0].splitlines()[1] == u9["history_lines"][k]  # the newest lines stay
    info = json.loads((out / "stage.json").read_text())
    assert info["users_history_trimmed"] == int((first["n_history_trimmed"] > 0).sum())
    assert info["history_lines_trimmed"] == int(first["n_history_trimmed"].sum())
    assert sum(info["finish_reason"].values()) == df.height


def test_fit_prompt_drops_the_fewest_oldest_lines(smollm2_dir):
    from transformers import AutoTokenizer

    from rlrf import prompts as kar
    from rlrf.sample import chat_ids

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    head, tail = kar.prompt_head("movies", "female", "30", "writer"), kar.prompt_tail("movies")
    lines = [kar.history_line(f"Movie number {i}", 1 + i % 5) for i in range(20)]
    full = len(chat_ids(tok, kar.join_prompt(head, lines, tail)))
    budget = full - 40
    text, ids, dropped = fit_prompt(tok, head, lines, tail, budget)
    assert len(ids) <= budget < len(chat_ids(tok, kar.join_prompt(head, lines[dropped - 1:], tail)))
    assert text == kar.join_prompt(head, lines[dropped:], tail) and dropped > 0
    assert fit_prompt(tok, head, lines, tail, full) == (kar.join_prompt(head, lines, tail), ids_full(tok, head, lines, tail), 0)


def ids_full(tok, head, lines, tail):
    from rlrf import prompts as kar
    from rlrf.sample import chat_ids

    return chat_ids(tok, kar.join_prompt(head, lines, tail))


def test_rerun_and_shard_slices_give_the_same_rows(setup, tiny_model, tmp_path):
    r = setup
    whole = _rows(sample_stage(r, r.run_dir / "whole", str(tiny_model), 1))
    # a rerun is a no-op
    sample_stage(r, r.run_dir / "whole", str(tiny_model), 1)
    assert _rows(r.run_dir / "whole").equals(whole)
    # slices 0/2 and 1/2 into one directory (the last one writes stage.json)
    d = r.run_dir / "sliced"
    sample_stage(r, d, str(tiny_model), 1, shard="0/2")
    assert not (d / "stage.json").exists()
    sample_stage(r, d, str(tiny_model), 1, shard=(1, 2))
    assert _rows(d).equals(whole)
    # another batch size (other neighbours in each batch) gives the same texts too
    r2 = _recipe(tmp_path, tiny_model, "sample.batch_size=2")
    assert _rows(sample_stage(r2, r.run_dir / "b2", str(tiny_model), 1)).drop("prompt").equals(whole.drop("prompt"))
    # another round: other seeds, other texts
    other = _rows(sample_stage(r, r.run_dir / "r2", str(tiny_model), 2))
    assert not other["text"].equals(whole["text"])


@pytest.mark.faults
def test_a_stage_takes_the_users_another_stage_holds_and_samples_the_rest(setup, tiny_model):
    """make evaluate's case: one profile for every user, offered a stage that holds some users' profiles with the
    same seeds, generator and decoding (a round's sample of its train and valid users). It takes those users,
    samples the rest, and writes what sampling them all writes. Killed after its first shard (the taken users) and
    resumed when the other stage is gone, it cuts the rest the same way (taken.json) and finishes the same."""
    r = setup
    every = ["train", "valid", "test"]
    cols = [*KEY, "text", "n_tokens", "finish_reason", "seed"]
    want = _rows(sample_stage(r, r.run_dir / "all", str(tiny_model), 1, splits=every, n=1)).select(cols)
    src = sample_stage(r, r.run_dir / "src", str(tiny_model), 1, splits=["valid", "train"])  # n=2, users 1,3,4,6,7,9
    gone = r.run_dir / "no_stage_here"
    one = sample_stage(r, r.run_dir / "one", str(tiny_model), 1, splits=every, n=1, source=[gone, src])
    assert _rows(one).select(cols).equals(want)
    assert json.loads((one / "stage.json").read_text())["reused"] == {"users": 6, "from": [str(src)]}
    assert json.loads((one / "taken.json").read_text())["users"] == [1, 3, 4, 6, 7, 9]
    # another round's seeds: nothing to take
    r2 = sample_stage(r, r.run_dir / "r2", str(tiny_model), 2, splits=every, n=1, source=[src])
    assert "reused" not in json.loads((r2 / "stage.json").read_text()) and not (r2 / "taken.json").exists()

    d = r.run_dir / "killed"
    _killed_after_one_shard(r, tiny_model, "sample_stage(r, sys.argv[2], r.sample.model, 1, splits=['train', 'valid', "
                            "'test'], n=1, source=[sys.argv[3]])", str(d), str(src))
    assert [p.name for p in (d / "_shards").glob("*.json")] == ["00000.json"] and (d / "taken.json").is_file()
    (src / "stage.json").unlink()  # the source no longer serves
    resumed = sample_stage(r, d, str(tiny_model), 1, splits=every, n=1, source=[src])
    assert _rows(resumed).select(cols).equals(want)
    assert json.loads((resumed / "stage.json").read_text())["reused"]["users"] == 6


@pytest.mark.faults
def test_resume_after_kill_gives_a_clean_runs_rows(setup, tiny_model):
    r = setup
    clean = _rows(sample_stage(r, r.run_dir / "clean", str(tiny_model), 1))
    d = r.run_dir / "killed"
    _killed_after_one_shard(r, tiny_model, "sample_stage(r, sys.argv[2], r.sample.model, 1)", str(d))
    assert len(list((d / "_shards").glob("*.json"))) == 1 and not (d / "stage.json").exists()
    sample_stage(r, d, str(tiny_model), 1)
    resumed = _rows(d)
    assert resumed.equals(clean) and resumed.select(KEY).is_unique().all()


def test_empty_and_length_limited_profiles_are_kept_and_counted(setup, tiny_model, monkeypatch):
    import rlrf.sample as sample_mod
    from rlrf.generate import open_backend

    def stopping_backend(*a, **kw):
        be = open_backend(*a, **kw)
        be.eos_ids = list(range(be.model.config.vocab_size // 2))  # half the vocabulary ends a profile
        return be

    monkeypatch.setattr(sample_mod, "open_backend", stopping_backend)
    r = setup
    out = sample_stage(r, r.run_dir / "s", str(tiny_model), 1)
    df = _rows(out)
    info = json.loads((out / "stage.json").read_text())
    assert df.height == 18  # nothing dropped
    assert info["finish_reason"]["eos"] == int((df["finish_reason"] == "eos").sum()) > 0
    assert info["finish_reason"]["length"] == int((df["finish_reason"] == "length").sum()) > 0
    assert info["empty_text"] == int((df["text"] == "").sum()) > 0


def test_errors_before_any_work(setup, tmp_path):
    r = setup
    with pytest.raises(ModelError, match="no-such-model"):
        sample_stage(r, r.run_dir / "x", "no-such-model", 1)
    assert not (r.run_dir / "x").exists()
    bare = _recipe(tmp_path / "other", "unused")
    with pytest.raises(StageError, match="prepare"):
        sample_stage(bare, bare.run_dir / "x", str(setup.sample.model), 1)


@pytest.mark.faults
def test_a_batch_the_machine_cannot_hold_is_refused_before_the_model_loads(setup, monkeypatch):
    import rlrf.sample
    from rlrf import memory

    monkeypatch.setattr(memory, "machine_mb", lambda: (50.0, 100.0))
    monkeypatch.setattr(rlrf.sample, "open_backend", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(StageError, match=r"sample: needs about .* 0.1 GB in all; lower sample.batch_size"):
        sample_stage(setup, setup.run_dir / "big", str(setup.sample.model), 1)
    assert not list((setup.run_dir / "big").glob("profiles/*"))


def test_select_users_caps_each_split_the_same_way_every_round(setup):
    prompts = read_artifact(setup.run_dir / "prepare", "prompts")
    a = select_users(prompts, ["train", "valid"], 2, 1234)
    assert a.group_by("split").len().sort("split")["len"].to_list() == [2, 2]
    assert a.equals(select_users(prompts, ["train", "valid"], 2, 1234))
    assert select_users(prompts, ["test"], -1, 1234).height == 3


# ----------------------------------------------------------------------------- vLLM adapter


def _fake_vllm(calls: list):
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, dtype="auto", tensor_parallel_size=1, trust_remote_code=False):
            calls.append(("init", model, dtype, trust_remote_code))

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(("generate", prompts, params))
            outs = []
            for p, sp in zip(prompts, params):
                comps = []
                for i in reversed(range(sp.n)):  # out of order on purpose: the adapter sorts by index
                    stop = (sp.seed + i) % 2 == 0
                    ids = [100 + i, 200] + ([2] if stop else [])
                    comps.append(types.SimpleNamespace(index=i, text=f" s{sp.seed + i} ", token_ids=ids,
                                                       finish_reason="stop" if stop else "length"))
                outs.append(types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=comps))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_backend_through_the_stage(setup, tiny_model, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    r = _recipe(setup.runs_dir, tiny_model, "sample.backend=vllm", "sample.n=3", "sample.min_p=0.05")
    out = sample_stage(r, r.run_dir / "v", str(tiny_model), 1)
    df = _rows(out)
    schema.check(df, "profiles")
    assert df.height == 27
    assert [c[3] for c in calls if c[0] == "init"] == [False]  # vLLM never runs a model directory's code
    gens = [c for c in calls if c[0] == "generate"]
    params = [p for c in gens for p in c[2]]
    assert {p.n for p in params} == {3} and {p.max_tokens for p in params} == {6}
    assert {p.temperature for p in params} == {r.sample.temperature} and {p.top_p for p in params} == {r.sample.top_p}
    assert {p.min_p for p in params} == {0.05}  # sample.min_p reaches vLLM's own min-p (against this fake: no GPU here)
    # SamplingParams(n, seed=base) -> sample i is vLLM's seed base + i: the seed column says so
    for row in df.iter_rows(named=True):
        assert row["text"] == f"s{row['seed']}" and row["seed"] == user_seed(1234, row["user_id"], 1) + row["sample_idx"]
        stop = row["seed"] % 2 == 0
        assert row["finish_reason"] == ("eos" if stop else "length") and row["n_tokens"] == 2


def test_vllm_missing_says_how_to_install(tiny_model, monkeypatch):
    from rlrf.generate import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="rlrf\\[vllm\\]"):
        VLLMBackend(str(tiny_model))


@pytest.mark.integration
def test_real_smollm2_stage_on_the_tiny_recipe(tmp_path, ml100k_dir):
    from rlrf.prepare import prepare_stage

    r = load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={tmp_path}", f"data.path={ml100k_dir}",
                                                      "sample.max_users=2", "sample.max_new_tokens=24"])
    prepare_stage(r)
    out = sample_stage(r, r.run_dir / "round_1" / "sample", r.sample.model, 1)
    df = _rows(out)
    assert df.height == 3 * 2 * r.sample.n
    assert (df["text"].str.len_chars() > 10).mean() > 0.8
    assert set(df["generator"]) == {"smollm2-135m-instruct"} and df["generator_hash"].n_unique() == 1


def test_user_shards_hold_whole_batches():
    users = list(range(100, 389))  # the demo's 289 users, 16 per batch (64 rows / n=4), at most 16 shards
    shards = user_shards(users, 16, 16)
    assert [u for s in shards for u in s] == users  # contiguous, each user once, in order
    assert len(shards) <= 16 and all(len(s) % 16 == 0 for s in shards[:-1])
    assert len(shards) == 10 and len(shards[0]) == 32 and len(shards[-1]) == 1
    # the is-it-learning check: 94 users, n=2 -> 3 full-ish batches instead of 16 shards of ~6 users
    assert [len(s) for s in user_shards(list(range(94)), 32, 16)] == [32, 32, 30]
    assert user_shards([], 16, 4) == [] and user_shards([7], 16, 4) == [[7]]
    assert [len(s) for s in user_shards(list(range(10)), 1, 3)] == [4, 4, 2]  # batch of 1: at most 3 shards


def test_a_half_done_stage_with_a_changed_part_redoes_that_shard(setup, tiny_model):
    """A part that is not what its shard's marker recorded (here: rows of other users, as an older rlrf cut them) is
    redone by the store on resume, not mixed in; --force gives the clean run's rows as well."""
    r = setup
    d = r.run_dir / "old_layout"
    sample_stage(r, d, str(tiny_model), 1)  # 9 users, 3 per batch -> shards {1,2,3} {4,5,6} {7,8,9}
    done = _rows(d)
    (d / "stage.json").unlink()
    for i in (1, 2):
        (d / "_shards" / f"{i:05d}.json").unlink()
        (d / "profiles" / f"part-{i:05d}.parquet").unlink()
    files.write_parquet(d / "profiles" / "part-00000.parquet", done.filter(pl.col("user_id") % 3 == 0))
    assert _rows(sample_stage(r, d, str(tiny_model), 1)).equals(done)
    assert _rows(sample_stage(r, d, str(tiny_model), 1, force=True)).equals(done)


def test_a_half_done_stage_from_another_machine_kind_is_refused_not_mixed(setup, tiny_model):
    """Shards sampled on another device or dtype (a bf16 CPU's against an fp32 one's: the same fingerprint, other
    texts) are not resumed beside: the error names the shards and both arithmetics and says what to do. Markers
    from before the arithmetic was recorded are trusted; --force redoes the stage here."""
    from rlrf.sample import arithmetic

    r = setup
    d = r.run_dir / "moved"
    sample_stage(r, d, str(tiny_model), 1)
    done = _rows(d)
    here = json.loads((d / "stage.json").read_text())["arithmetic"]
    assert here == arithmetic(r.sample) and here["dtype"] == "bfloat16" and here["backend"] == "hf"
    (d / "stage.json").unlink()
    (d / "_shards" / "00002.json").unlink()  # killed before its last shard
    marker = d / "_shards" / "00000.json"
    m = json.loads(marker.read_text())
    assert m["arithmetic"] == here
    marker.write_text(json.dumps({**m, "arithmetic": {**here, "dtype": "float32", "cpu_flags": ["avx2"]}}))
    with pytest.raises(StageError, match=r"(?s)1 done shard.*\[0\].*float32.*bfloat16.*--force"):
        sample_stage(r, d, str(tiny_model), 1)
    marker.write_text(json.dumps({k: v for k, v in m.items() if k != "arithmetic"}))  # an older marker
    assert _rows(sample_stage(r, d, str(tiny_model), 1)).equals(done)
    (d / "stage.json").unlink()
    (d / "_shards" / "00002.json").unlink()
    marker.write_text(json.dumps({**m, "arithmetic": {**here, "gpu": "another"}}))
    assert _rows(sample_stage(r, d, str(tiny_model), 1, force=True)).equals(done)


def test_item_knowledge_shard(setup, tiny_model):
    r = _recipe(setup.runs_dir, tiny_model, "sample.item_knowledge=true", "sample.splits=[test]")
    out = sample_stage(r, r.run_dir / "ik", str(tiny_model), 1)
    items = read_artifact(out, "item_knowledge", "sample")
    schema.check(items, "item_knowledge")
    assert items["item_id"].to_list() == [1, 2, 3, 4, 5]
    assert items["prompt"][0].startswith('Introduce movie Toy Story (1990) and describe its attributes')
    assert (items["n_tokens"] <= 6).all() and set(items["finish_reason"]) <= {"eos", "length"}
    assert _rows(out)["split"].unique().to_list() == ["test"]


def test_trim_to_sentence_cuts_a_length_limited_profile_back_to_its_last_sentence_end():
    from rlrf.sample import trim_to_sentence

    assert trim_to_sentence('Likes drama. Enjoys "Big" (1988). And the so') == 'Likes drama. Enjoys "Big" (1988).'
    assert trim_to_sentence("Genres:\n- drama\n- come") == "Genres:\n- drama"
    assert trim_to_sentence("a run-on sentence that never ends") is None      # nothing to cut back to
    assert trim_to_sentence("Hi. " + "word " * 30) is None                      # the cut would keep too little
    assert trim_to_sentence("Rated 3.5 stars overall and then") is None          # a decimal point is no sentence end


def test_sample_trim_sentence_cuts_length_limited_profiles_and_stays_out_of_the_default_fingerprint(
        setup, tiny_model, monkeypatch, tmp_path):
    import rlrf.sample as sample_mod
    from rlrf.generate import Completion

    texts = {"eos": "Likes drama.", "length": "Likes drama. Enjoys wes"}

    def fake_run(backend, prompt_ids, seeds, sp, desc, unit):
        return [[Completion(texts[f], [1] * 6, f) for f in ("eos", "length")][:sp.n] for _ in prompt_ids]

    monkeypatch.setattr(sample_mod, "_run", fake_run)
    r = load_recipe(None, [f"runs_dir={setup.runs_dir}", "run=t", f"sample.model={tiny_model}", "sample.n=2",
                           "sample.max_users=-1", "sample.max_prompt_tokens=160", "sample.trim=sentence"])
    out = sample_stage(r, r.run_dir / "trimmed", str(tiny_model), 1)
    df = _rows(out)
    assert set(df.filter(pl.col("sample_idx") == 1)["text"]) == {"Likes drama."}
    assert set(df["finish_reason"]) == {"eos", "sentence"}
    assert json.loads((out / "stage.json").read_text())["config"]["sample"]["trim"] == "sentence"
    plain = sample_stage(setup, setup.run_dir / "plain", str(tiny_model), 1)
    assert "trim" not in json.loads((plain / "stage.json").read_text())["config"]["sample"]  # old runs stay up to date
    assert set(_rows(plain).filter(pl.col("sample_idx") == 1)["text"]) == {"Likes drama. Enjoys wes"}
