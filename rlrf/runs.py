"""Every stage of a run: what its output depends on (STAGES, from which the store's fingerprint is built), where
it lives, and which generator a round samples from.

    runs/<run>/prepare/                     users, items, interactions, lists, prompts
    runs/<run>/round_<k>/sample/            profiles sampled from generator k-1 (round 1: the base model)
    runs/<run>/round_<k>/encode/            user_texts (+ the shared cache runs/<run>/embeddings/)
    runs/<run>/reranker/                    the reward reranker (round_<k>/reranker/ when retrained each round)
    runs/<run>/round_<k>/score/             one reward per profile
    runs/<run>/round_<k>/pairs/             preference pairs + LLaMA-Factory export
    runs/<run>/round_<k>/dpo/               adapter, merged model (= generator k), training log
    runs/<run>/round_<k>/check/             is-it-learning: generator k-1 vs k on valid users
    runs/<run>/evaluate/                    results.md, results.json, plots
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from rlrf.config import Recipe
from rlrf.config.keys import fingerprint as section_fingerprint
from rlrf.store import Stage


@dataclass(frozen=True)
class Declared:
    """A stage as the store runs it: its name, the recipe sections whose every key decides what it writes, the
    sections of which it reads a few keys only, and whether the run's seed decides it too. Its fingerprinted config
    takes each section by one rule (rlrf.config.keys.fingerprint: speed and place keys never, late keys only away
    from their default)."""

    name: str
    sections: tuple[str, ...] = ()
    some_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ((section, (key, ...)), ...)
    seeded: bool = True

    def config(self, recipe: Any, used: dict | None = None, **extra) -> dict:
        """The stage's fingerprinted config: its sections as `recipe` holds them (or as `used` holds them, a
        section the stage runs with call-time overrides), and `extra`, what the recipe does not hold."""
        def section(name: str) -> dict:
            return section_fingerprint((used or {}).get(name, getattr(recipe, name)))

        out: dict = {"seed": recipe.seed} if self.seeded else {}
        out.update({name: section(name) for name in self.sections})
        for name, keys in self.some_keys:
            fp = section(name)
            out[name] = {k: fp[k] for k in keys if k in fp}  # a late key at its default is left out, as everywhere
        return {**out, **extra}

    def open(self, recipe: Any, stage_dir: str | Path, *, inputs: Iterable[str | Path] = (), used: dict | None = None,
             extra: dict | None = None, force: bool = False, shard: tuple[int, int] | None = None,
             quiet: bool = False, summary: Callable[[dict], str] | None = None) -> Stage:
        return Stage(stage_dir, self.name, self.config(recipe, used, **(extra or {})), inputs=inputs, force=force,
                     shard=shard, quiet=quiet, summary=summary)


# Every stage but the trainers, in the order a round runs them, with what its output depends on: the store builds
# each fingerprint from this line, the inputs' fingerprints and what the stage adds that the recipe does not hold
# (a round, a generator's weights hash). Each is `rlrf <name>` and pipelines/<name, "-" as "_">.py; what it writes
# is in rlrf.schema.PRODUCED_BY. The trainers (rlrf.trainers.TRAINERS: dpo, grpo) declare themselves in their
# modules (STAGE) and join STAGES after pairs.
_STAGES = (
    Declared("prepare", ("data", "prepare")),
    Declared("sample", ("sample",)),                          # + run, round, generator and its weights hash
    Declared("encode", ("encode",)),
    Declared("train-reranker", ("reranker", "encode")),       # + score.judges (the cross-fitted judge's members)
    Declared("score", ("score",)),                            # + the splits it scores
    Declared("pairs", ("pairs",), seeded=False),              # + round
    Declared("check", ("check", "rounds", "sample", "encode", "score")),  # + round, both generators' weights hashes
    Declared("evaluate", ("data", "prepare", "sample", "encode", "reranker", "score", "rounds", "evaluate")),
)


def stages() -> dict[str, Declared]:
    """Every stage by name, in the order a round runs them: _STAGES with each trainer's STAGE after pairs."""
    from rlrf.trainers import TRAINERS, trainer

    out: dict[str, Declared] = {}
    for d in _STAGES:
        out[d.name] = d
        if d.name == "pairs":
            for name in TRAINERS:
                declared = trainer(name).STAGE
                if declared.name != name:
                    raise ValueError(f"trainer {name!r} declares its stage as {declared.name!r}: they must be one name")
                out[name] = declared
    return out


def __getattr__(name: str):
    # runs.STAGES, built on each read (a dict over imported modules), not at import: the trainer modules import this
    # one for Declared
    if name == "STAGES":
        return stages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def script(stage: str) -> str:
    """The stage's script under pipelines/ (shipped as rlrf.pipelines)."""
    return stage.replace("-", "_")


def prepare_dir(r: Recipe) -> Path:
    return r.run_dir / "prepare"


def round_dir(r: Recipe, k: int) -> Path:
    if k < 1:
        raise ValueError(f"rounds count from 1 (round k samples from generator k-1); got round {k}")
    return r.run_dir / f"round_{k}"


def stage_dir(r: Recipe, stage: str, k: int) -> Path:
    return round_dir(r, k) / stage


def finished_check(r: Recipe, k: int) -> Path:
    """Round k's check directory; a StageError naming the command that makes it where the check has not finished
    (the reports in benchmarks/ that read a check)."""
    from rlrf.errors import StageError

    check = stage_dir(r, "check", k)
    if not (check / "stage.json").is_file():
        raise StageError(f"{check} is not a finished check stage: run `python pipelines/check.py --recipe <recipe> "
                         f"--round {k}` with the run's overrides first")
    return check


def check_sides(r: Recipe, k: int, stage: str, artifact: str):
    """(round k's finished check directory, generator k-1's and generator k's `artifact` of their `stage` sub-stage
    in it, e.g. "sample"/"profiles" or "score"/"scores"): what the reports in benchmarks/ that read a check start
    from; finished_check's StageError where the check has not finished."""
    from rlrf.artifacts import read_artifact

    check = finished_check(r, k)
    old, new = (read_artifact(check / side / stage, artifact, stage) for side in ("old", "new"))
    return check, old, new


def embeddings_cache(r: Recipe) -> Path:
    return r.run_dir / "embeddings"


def reranker_dir(r: Recipe, k: int) -> Path:
    """The reward reranker used to score round k (trained once in round 1 unless retrained each round)."""
    if r.reranker.retrain_each_round:
        return round_dir(r, k) / "reranker"
    return r.run_dir / "reranker"


def reranker_knowledge_round(r: Recipe, k: int) -> int:
    """Whose profiles the reward reranker of round k learns from (the round whose sample it reads)."""
    return k if r.reranker.retrain_each_round else 1


def trainer_stage(r: Recipe) -> str:
    """The stage that makes a round's generator: dpo (RLRF4Rec, from the pairs) or grpo (online, rounds.trainer)."""
    return r.rounds.trainer


def generator_dir(r: Recipe, k: int) -> Path:
    """Generator k's merged model (k >= 1): written by round k's dpo stage (whichever backend trained it), or by
    its grpo stage when rounds.trainer=grpo."""
    return stage_dir(r, trainer_stage(r), k) / "merged"


def generator(r: Recipe, k: int) -> str:
    """Generator k, the one name for it everywhere: the base model (sample.model) for k = 0, round k's merged
    model after that. Round k samples from generator k-1 and writes generator k."""
    if k < 0:
        raise ValueError(f"generators count from 0 (the base model); got generator {k}")
    return r.sample.model if k == 0 else str(generator_dir(r, k))


def generator_for_round(r: Recipe, k: int) -> str:
    """What round k samples from: generator k-1 (the base model for round 1)."""
    round_dir(r, k)  # refuses k < 1
    return generator(r, k - 1)


DECODING = ("temperature", "top_p", "min_p")  # the sample keys a generator's own decoding sets


def decoding(r: Recipe) -> dict:
    """{temperature, top_p, min_p} as the recipe's sample section holds them."""
    return {key: getattr(r.sample, key) for key in DECODING}


def generator_decoding(r: Recipe, k: int) -> dict:
    """How generator k samples, in round k+1's sample and check and in `evaluate`: {temperature, top_p, min_p}, the
    recipe's sample section, or with sample.temperature_from_check (k >= 1) the ones round k's check measured
    generator k at (its stage.json `temperature.new`: check.match_distinct's calibration, or check.temperature; and
    `decoding.new`: check.top_p and check.min_p; a check from before `decoding` was recorded: the recipe's)."""
    if k < 0:
        raise ValueError(f"generators count from 0 (the base model); got generator {k}")
    own = decoding(r)
    if k == 0 or not r.sample.temperature_from_check:
        return own
    from rlrf.artifacts import read_stage_json
    from rlrf.errors import StageError

    check = stage_dir(r, "check", k)
    info = read_stage_json(check) if (check / "stage.json").is_file() else None
    if info is None or not (info.get("temperature") or {}).get("new"):
        raise StageError(f"sample.temperature_from_check: generator {k} samples at the temperature round {k}'s check "
                         f"measured it at, and {check} has none yet: run `python pipelines/check.py --recipe <recipe> "
                         f"--round {k}` first (check.match_distinct calibrates it), or set "
                         f"sample.temperature_from_check=false to sample at sample.temperature")
    new = (info.get("decoding") or {}).get("new") or {}
    return {**own, **{key: float(new[key]) for key in ("top_p", "min_p") if key in new},
            "temperature": float(info["temperature"]["new"])}


def generator_temperature(r: Recipe, k: int) -> float:
    """The temperature generator k samples at (generator_decoding's)."""
    return generator_decoding(r, k)["temperature"]


def with_decoding(r: Recipe, **decoding) -> Recipe:
    """The recipe with these sample keys (temperature, top_p, min_p) set; the same recipe where they already are."""
    unknown = set(decoding) - set(DECODING)
    if unknown:
        raise ValueError(f"with_decoding sets {', '.join(DECODING)}; got {', '.join(sorted(unknown))}")
    if all(getattr(r.sample, key) == v for key, v in decoding.items()):
        return r
    return replace(r, sample=replace(r.sample, **decoding))


def at_temperature(r: Recipe, t: float) -> Recipe:
    """The recipe with sample.temperature = t (the same recipe where it already is)."""
    return with_decoding(r, temperature=t)


def for_generator(r: Recipe, k: int) -> Recipe:
    """The recipe generator k samples with: its sample decoding set to generator_decoding(r, k)."""
    return with_decoding(r, **generator_decoding(r, k))


def cache_dir() -> Path:
    """Models converted once, wheels, and other reusable downloads: $RLRF_CACHE or ~/.cache/rlrf."""
    import os

    return Path(os.environ.get("RLRF_CACHE", Path.home() / ".cache" / "rlrf"))
