"""What makes generator k from generator k-1 (rounds.trainer): the trainers, one registry.

A trainer is one module that defines

    SECTION                                       its recipe section, `<name>:` in a recipe: a dataclass whose
                                                  fields are keys (rlrf.config.keys._f), validated in __post_init__
    STAGE                                         its declaration, rlrf.runs.Declared(<name>, ...): what its output
                                                  depends on
    make_generator(recipe, k, *, force) -> Path   round k's stage directory; its merged/ is generator k
    reward_kind(recipe) -> str                    optional: the reward it learns from directly (a trainer without
                                                  it learns from the round's pairs, which score.reward picked)

and one line in TRAINERS. Its name is then a value of rounds.trainer, a recipe section (`recipe.<name>`), a stage
(runs.STAGES, after pairs; `rlrf <name> --recipe R --round k`) and the home of round k's generator
(runs/<run>/round_<k>/<name>/merged: runs.generator). Nothing here is imported until a recipe or a stage asks.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

TRAINERS: dict[str, str] = {
    "dpo": "rlrf.dpo",    # DPO on the round's pairs (RLRF4Rec); dpo.backend: trl | llamafactory
    "grpo": "rlrf.grpo",  # GRPO online from the reward itself
}


def check_name(name: str) -> None:
    """ConfigError unless `name` is a registered trainer (rounds.trainer's allowed values)."""
    from rlrf.config.keys import _check, _one_of

    _check(name in TRAINERS, "rounds.trainer", f"unknown value {name!r}; choose {_one_of(tuple(TRAINERS))}")


def trainer(name: str) -> ModuleType:
    """The trainer module registered under `name`."""
    check_name(name)
    return importlib.import_module(TRAINERS[name])


def section_class(name: str) -> type:
    """The dataclass of trainer `name`'s recipe section."""
    return trainer(name).SECTION


def learned_reward(recipe) -> str | None:
    """The reward round k's trainer learned from directly (GRPO's), or None for one that learned from the round's
    pairs (DPO: what picked them is score.reward, with pairs.agree_with's vetoes)."""
    kind = getattr(trainer(recipe.rounds.trainer), "reward_kind", None)
    return kind(recipe) if kind is not None else None


def train_round(recipe, name: str, k: int, *, force: bool = False) -> Path:
    """Run trainer `name` on round k (generator k-1 -> generator k); refuses unless rounds.trainer names it, so that
    the check, the next round and evaluate read the generator this writes."""
    from rlrf.errors import StageError

    if recipe.rounds.trainer != name:
        raise StageError(f"{name}: rounds.trainer={recipe.rounds.trainer}, so round {k}'s generator comes from the "
                         f"{recipe.rounds.trainer} stage (`rlrf {recipe.rounds.trainer}`); pass rounds.trainer={name} "
                         f"to this and every later stage of the run to train with {name}")
    return trainer(name).make_generator(recipe, k, force=force)


def main(name: str, argv: list[str] | None = None) -> None:
    """`rlrf <name> --recipe R --round k [key.sub=value ...]` for a trainer without a script of its own in
    pipelines/ (the shipped ones have one: pipelines/dpo.py, pipelines/grpo.py)."""
    from rlrf.cli import run_main, stage_args

    def run() -> None:
        recipe, args = stage_args(trainer(name).__doc__ or name, argv)
        out = train_round(recipe, name, args.round, force=args.force)
        print(f"{name}: generator {args.round} -> {out / 'merged'}")

    run_main(run)
