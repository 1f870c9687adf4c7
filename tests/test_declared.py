"""Stages as declarations (runs.STAGES): the store builds each stage's fingerprint from the recipe sections it
declares, by one rule, so what a stage depends on is read in one table, not in eleven hand-built dicts."""

import dataclasses

import polars as pl
import pytest

from rlrf import runs
from rlrf.config import Recipe, load_recipe
from rlrf.runs import Declared
from rlrf.schema import PRODUCED_BY
from rlrf.store import Stage


def _configs(r: Recipe) -> dict[str, dict]:
    return {name: d.config(r) for name, d in runs.STAGES.items()}


def test_every_declared_section_and_key_is_one_the_recipe_has():
    r = load_recipe(None)
    sections = r.section_names()  # every section, each trainer's (rlrf.trainers) among them
    assert {"dpo", "grpo"} <= set(sections)
    for d in runs.STAGES.values():
        for name in (*d.sections, *(s for s, _ in d.some_keys)):
            assert name in sections and dataclasses.is_dataclass(getattr(r, name)), (d.name, name)
        for name, keys in d.some_keys:
            known = {f.name for f in dataclasses.fields(getattr(r, name))}
            assert set(keys) <= known, (d.name, name, set(keys) - known)
    # every artifact is written by a declared stage
    assert set(PRODUCED_BY.values()) <= set(runs.STAGES)


def test_a_key_changes_exactly_the_stages_that_declare_its_section():
    base = _configs(load_recipe(None))
    changed = {"dpo.beta=0.3": {"dpo"},
               "pairs.length_tolerance=7": {"pairs"},
               "encode.batch_size=7": {"encode", "train-reranker", "check", "evaluate"},
               "sample.temperature=0.5": {"sample", "grpo", "check", "evaluate"},
               "sample.n=3": {"sample", "check", "evaluate"},  # grpo reads only the decoding keys of sample
               "score.retrieval_k=50": {"score", "grpo", "check", "evaluate"},
               "score.judges=3": {"score", "check", "evaluate"}}  # train-reranker adds it as its own extra
    for override, stages in changed.items():
        now = _configs(load_recipe(None, [override]))
        assert {n for n in base if base[n] != now[n]} == stages, override


def test_the_seed_decides_every_stage_but_pairs_and_speed_or_place_keys_none():
    """check and evaluate sample with the run's seed: before the declarations their fingerprints left it out, so a
    new seed found them up to date."""
    base = _configs(load_recipe(None))
    seeded = _configs(load_recipe(None, ["seed=7"]))
    assert {n for n in base if base[n] != seeded[n]} == set(runs.STAGES) - {"pairs"}
    for override in ("sample.threads=2", "reranker.threads=2", "reranker.retrain_each_round=true"):
        assert _configs(load_recipe(None, [override])) == base, override


def test_a_late_key_enters_a_declared_fingerprint_only_away_from_its_default():
    r = load_recipe(None, ["score.reward=lexical"])
    assert "contrast_weight" not in runs.STAGES["grpo"].config(r)["score"]
    on = load_recipe(None, ["score.reward=lexical", "score.contrast=5", "score.contrast_weight=0.5"])
    assert runs.STAGES["grpo"].config(on)["score"]["contrast_weight"] == 0.5


def test_a_section_run_with_call_time_overrides_is_fingerprinted_as_used():
    r = load_recipe(None)
    prm = dataclasses.replace(r.reranker, backbone="prm")
    d = runs.STAGES["train-reranker"]
    assert d.config(r, {"reranker": prm})["reranker"]["backbone"] == "prm"
    assert d.config(r)["reranker"]["backbone"] == r.reranker.backbone


def test_a_stage_cannot_write_an_artifact_another_stage_makes(tmp_path):
    with Declared("encode", ("encode",)).open(load_recipe(None), tmp_path / "enc", quiet=True) as st:
        with pytest.raises(ValueError, match="the sample stage makes it"):
            st.write_shard(0, {"profiles": pl.DataFrame({"user_id": [1]})})
    with Stage(tmp_path / "toy", "toy", {}, quiet=True) as st:  # not a stage of rlrf's: a toy writes what it likes
        st.write_shard(0, {"profiles": pl.DataFrame({"user_id": [1]})})


def test_the_store_prints_one_line_per_stage_with_the_stage_own_figures(tmp_path, capsys):
    """Finished or found up to date, a stage says so in one line, its own figures (from stage.json) on it."""
    def line(info: dict) -> str:
        return f"{info['rows']['users']} users, mean age {info['age']}"

    for _ in range(2):
        with Stage(tmp_path / "p", "prepare", {"a": 1}, summary=line) as st:
            if not st.done:
                for i in st.todo(2):
                    st.write_shard(i, {"users": pl.DataFrame({"user_id": [i]})})
                st.finish({"age": 31})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("prepare: done in") and "up to date" in lines[1], lines
    assert all(ln.endswith("| 2 users, mean age 31") for ln in lines), lines
    # a stage.json from before a figure existed: the line goes without it, the stage is still up to date
    with Stage(tmp_path / "p", "prepare", {"a": 1}, summary=lambda info: f"{info['gone']}") as st:
        assert st.done
    assert capsys.readouterr().out.strip().endswith("Use --force to redo it.")
