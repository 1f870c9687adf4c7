"""A generator source is one module and one line in rlrf.trainers.TRAINERS: its recipe section, its stage, its
`rlrf <name>` command and the home of the generator it writes all follow from the registry. Shown here with a
toy trainer written as a module of its own (generator k = generator k-1's files copied: a registry test, not a
learner), registered by one line."""

import sys
import textwrap

import pytest

from rlrf import check, runs, trainers
from rlrf.cli import main as cli_main
from rlrf.config import ConfigError, load_recipe
from rlrf.errors import StageError

TOY = '''
"""copy: generator k is generator k-1's files, unchanged."""
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlrf import runs
from rlrf.config.keys import _check, _f


@dataclass
class CopyConfig:
    note: str = _f("none", "a key of the toy trainer's own")
    steps: int = _f(1, "must be >= 1")

    def __post_init__(self):
        _check(self.steps >= 1, "copy.steps", "must be >= 1")


SECTION = CopyConfig
STAGE = runs.Declared("copy", ("copy",))


def make_generator(recipe, k, *, force=False):
    out = runs.stage_dir(recipe, "copy", k)
    with STAGE.open(recipe, out, force=force, extra={"round": k}) as st:
        if st.done:
            return out
        (out / "merged").mkdir(parents=True, exist_ok=True)
        src = Path(runs.generator_for_round(recipe, k))
        (out / "merged" / "source.txt").write_text(str(src) + " " + recipe.copy.note)
        st.finish(extra={"steps": recipe.copy.steps})
    return out
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_trainer.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(trainers.TRAINERS, "copy", "toy_trainer")  # the one registry line
    yield tmp_path
    sys.modules.pop("toy_trainer", None)


def test_a_registered_trainer_is_a_recipe_section_and_a_value_of_rounds_trainer(toy):
    r = load_recipe("tiny", ["rounds.trainer=copy", "copy.note=hi", "copy.steps=3"])
    assert (r.copy.note, r.copy.steps, r.rounds.trainer) == ("hi", 3, "copy")
    assert r.section_names().index("copy") == r.section_names().index("pairs") + 3  # after pairs, dpo, grpo
    assert r.to_dict()["copy"] == {"note": "hi", "steps": 3}
    with pytest.raises(ConfigError, match=r"unknown key 'copy.stpes'; did you mean copy.steps\?"):
        load_recipe("tiny", ["copy.stpes=2"])
    with pytest.raises(ConfigError, match="copy.steps: must be >= 1"):
        load_recipe("tiny", ["copy.steps=0"])


def test_an_unregistered_trainer_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"rounds.trainer: unknown value 'copy'; choose dpo or grpo"):
        load_recipe("tiny", ["rounds.trainer=copy"])
    with pytest.raises(ConfigError, match=r"unknown key 'copy'"):
        load_recipe("tiny", ["copy.note=hi"])


def test_a_registered_trainer_is_a_stage_after_pairs_with_its_section_in_its_fingerprint(toy):
    assert list(runs.STAGES)[list(runs.STAGES).index("pairs") + 1:][:3] == ["dpo", "grpo", "copy"]
    base = {n: d.config(load_recipe("tiny")) for n, d in runs.STAGES.items()}
    now = {n: d.config(load_recipe("tiny", ["copy.note=other"])) for n, d in runs.STAGES.items()}
    assert {n for n in base if base[n] != now[n]} == {"copy"}


def test_rlrf_runs_a_registered_trainer_and_the_next_round_samples_from_its_generator(toy, capsys):
    args = ["--recipe", "tiny", "--round", "1", f"runs_dir={toy / 'runs'}", "rounds.trainer=copy", "copy.note=hi"]
    cli_main(["copy", *args])
    assert "copy: generator 1 ->" in capsys.readouterr().out
    r = load_recipe("tiny", args[4:])
    merged = toy / "runs" / "tiny" / "round_1" / "copy" / "merged"
    assert runs.generator(r, 1) == str(merged) == runs.generator_for_round(r, 2)
    assert (merged / "source.txt").read_text() == f"{r.sample.model} hi"
    assert (merged.parent / "stage.json").is_file()
    # a trainer without reward_kind learned from the round's pairs: the check judges with the recipe as it is
    assert trainers.learned_reward(r) is None and check.judged(r) is r
    # the trainer refuses a round whose generator another trainer makes (rounds.trainer is the one switch)
    with pytest.raises(StageError, match="rounds.trainer=dpo, so round 1's generator comes from the dpo stage"):
        trainers.train_round(load_recipe("tiny", args[4:5]), "copy", 1)


def test_grpo_names_the_reward_it_learned_from_and_dpo_learns_from_pairs():
    r = load_recipe("tiny", ["rounds.trainer=grpo", "score.reward=lexical", "grpo.reward=retrieval"])
    assert trainers.learned_reward(r) == "retrieval" and check.judged(r).score.reward == "retrieval"
    assert trainers.learned_reward(load_recipe("tiny")) is None
