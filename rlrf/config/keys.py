"""What a recipe key is: its help text and marks (late, speed), its allowed values (Literal), how a section is
fingerprinted, and the error a person must fix."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe or override a person must fix; the message says what, where and how."""


def _f(default: Any, help: str, late: bool = False, speed: bool = False, place: bool = False, **kw) -> Any:
    """A recipe key with its help text. `late=True` marks a key added after stages that read its section had
    already run: `fingerprint` leaves it out while it holds its default, so those stages stay up to date.
    `speed=True` marks a key that changes how fast a stage runs, never what it writes (threads): no fingerprint
    holds it, so a rerun with another value resumes. `place=True` marks a key that picks where a stage lives and
    which stage outputs it reads (reranker.retrain_each_round), never what it computes from them: the inputs'
    fingerprints already carry it, so the section's does not."""
    meta = {"help": help, **({"late": True} if late else {}), **({"speed": True} if speed else {}),
            **({"place": True} if place else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def fingerprint(section) -> dict:
    """A recipe section as a stage fingerprints it: every key but the `speed` and `place` keys and the `late` keys
    that hold their default."""
    out = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.metadata.get("speed") or f.metadata.get("place") or (f.metadata.get("late") and out[f.name] == default):
            out.pop(f.name)
    return out


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------- allowed values
# Each key with a fixed set of values is typed once, here, and the code that dispatches on it keys its table by the
# same Literal (tests hold each table's keys equal to its Literal's values).

DatasetName = Literal["ml-100k", "ml-1m", "amazon-books"]
Layout = Literal["auto", "grouplens", "recbole", "amazon"]
SampleBackend = Literal["hf", "vllm"]
DType = Literal["auto", "bfloat16", "float32"]
Trim = Literal["none", "sentence"]
Pooling = Literal["auto", "mean", "cls"]
Backbone = Literal["dlcm", "prm"]
RerankLoss = Literal["bce", "listwise"]
WithoutProfile = Literal["drop", "zero"]
Reward = Literal["reranker", "retrieval", "lexical", "genres"]
# derived from Reward, so that a new reward is named once: the training-free judges (pairs.agree_with), and those or
# "" (= score.reward) for grpo.reward
TextJudge = Literal[tuple(r for r in typing.get_args(Reward) if r != "reranker")]
TextReward = Literal[("", *typing.get_args(TextJudge))]
Candidates = Literal["catalogue", "lists"]
DPOBackend = Literal["trl", "llamafactory"]
Divergence = Literal["reverse_kl", "forward_kl", "js_divergence"]  # dpo.divergence: TRL's f_divergence_type
ScaleRewards = Literal["group", "batch", "none"]
GRPOLoss = Literal["dapo", "grpo", "dr_grpo", "bnpo"]
Diverse = Literal["", "surprisal", "typicality"]  # pairs.diverse: DivPO's diversity criterion ("" = off)
MatchFigure = Literal["corpus", "across"]  # check.match_figure: the distinct-2 check.match_distinct matches


def choices(tp: Any) -> tuple | None:
    """The values a Literal type allows (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _one_of(opts: tuple) -> str:
    names = [repr(o) if o == "" else str(o) for o in opts]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_choices(section, prefix: str) -> None:
    """ConfigError for the first Literal-typed key (or list of them) holding a value its type does not allow."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        tp, value = hints[f.name], getattr(section, f.name)
        if typing.get_origin(tp) is list and typing.get_args(tp):
            opts = choices(typing.get_args(tp)[0])
            bad = [v for v in value if v not in opts] if opts is not None else []
            if bad:
                raise ConfigError(f"{prefix}.{f.name}: unknown value {bad[0]!r}; each must be {_one_of(opts)}")
        elif (opts := choices(tp)) is not None:
            _check(value in opts, f"{prefix}.{f.name}", f"unknown value {value!r}; choose {_one_of(opts)}")
