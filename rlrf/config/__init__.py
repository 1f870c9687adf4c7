"""Typed recipe config: YAML recipes, `key.sub=value` overrides, validation, hashing.

A recipe is one YAML file with a section per stage (see recipes/ml100k_smollm2.yaml). Each section is a dataclass
(rlrf/config/sections.py) whose fields carry a help text and whose `__post_init__` validates; rlrf/config/keys.py
says what a key is (help, late and speed marks, allowed values) and how a section is fingerprinted. Unknown keys
are errors that name the closest known key; values are type-checked (YAML's `5e-5` is a float here).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlrf.config.keys import (Backbone, Candidates, ConfigError, DatasetName, Divergence, DPOBackend, DType, GRPOLoss,
                              Layout, Pooling, RerankLoss, Reward, SampleBackend, ScaleRewards, TextReward, Trim,
                              WithoutProfile, _check, _f, choices, fingerprint)
from rlrf.config.sections import (CheckConfig, DataConfig, DPOConfig, EncodeConfig, EvaluateConfig, GRPOConfig, PairsConfig,
                                  PrepareConfig, RerankerConfig, RoundsConfig, SampleConfig, ScoreConfig)

__all__ = [
    "Recipe", "load_recipe", "find_recipe", "shipped_recipes", "parse_value", "describe", "ConfigError", "fingerprint",
    "choices", "DataConfig", "PrepareConfig", "SampleConfig", "EncodeConfig", "RerankerConfig", "ScoreConfig",
    "PairsConfig", "DPOConfig", "GRPOConfig", "RoundsConfig", "CheckConfig", "EvaluateConfig", "Backbone", "Candidates",
    "DatasetName", "Divergence", "DPOBackend", "DType", "GRPOLoss", "Layout", "Pooling", "RerankLoss", "Reward",
    "SampleBackend", "ScaleRewards", "TextReward", "Trim", "WithoutProfile",
]


@dataclass
class Recipe:
    """A whole recipe: the run's name, place and seed, then one section per stage. The trainers' sections (one per
    rlrf.trainers.TRAINERS entry: dpo, grpo) are each trainer module's own SECTION, held in `trainer_sections` and
    read as `recipe.dpo`, `recipe.grpo`: a new trainer is its module and a registry line, not a field here."""

    run: str = _f("demo", "run name: artifacts land in <runs_dir>/<run>/")
    runs_dir: str = _f("runs", "where runs live")
    seed: int = _f(1234, "the run's seed: splits, list padding, sampling, training")
    data: DataConfig = _f(None, "dataset", init=True)
    prepare: PrepareConfig = _f(None, "prepare stage")
    sample: SampleConfig = _f(None, "sample stage")
    encode: EncodeConfig = _f(None, "encode stage")
    reranker: RerankerConfig = _f(None, "train-reranker stage")
    score: ScoreConfig = _f(None, "score stage")
    pairs: PairsConfig = _f(None, "pairs stage")
    rounds: RoundsConfig = _f(None, "what makes each round's generator, and the bootstrap of every interval")
    check: CheckConfig = _f(None, "check stage (is it learning? generator k-1 vs k on the valid users)")
    evaluate: EvaluateConfig = _f(None, "evaluate stage")
    trainer_sections: dict = dataclasses.field(default_factory=dict, repr=False, metadata={"internal": True})

    def __post_init__(self):
        from rlrf.trainers import TRAINERS, section_class

        for f in dataclasses.fields(self):
            if not f.metadata.get("internal") and getattr(self, f.name) is None:
                setattr(self, f.name, _hint(Recipe, f.name)())
        unknown = sorted(set(self.trainer_sections) - set(TRAINERS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: no trainer of that name is registered (rlrf.trainers.TRAINERS: "
                              f"{', '.join(TRAINERS)})")
        self.trainer_sections = {name: self.trainer_sections.get(name) or section_class(name)() for name in TRAINERS}
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.run) is not None, "run",
               f"{self.run!r} must be letters, digits, '_', '-', '.' (it names a directory)")

    def __getattr__(self, name: str):
        """A trainer's section: `recipe.dpo` is trainer_sections["dpo"]."""
        sections = self.__dict__.get("trainer_sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def section_names(self) -> list[str]:
        """Every section's name in the recipe's order: the stages' sections, each trainer's after pairs."""
        return [n for n, tp in _keys(Recipe) if dataclasses.is_dataclass(tp)]

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name, _ in _keys(Recipe)}

    def sections(self, *names: str) -> dict:
        """The named sections as a stage fingerprints them (config.fingerprint): what its output depends on."""
        return {n: fingerprint(getattr(self, n)) for n in names}

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections (and the seed)."""
        payload = {"seed": self.seed, **self.sections(*names)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _keys(cls) -> list[tuple[str, Any]]:
    """(key, type) of every key of `cls` a recipe can set, in order; for Recipe each trainer's section after pairs."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        out.append((f.name, _hint(cls, f.name)))
        if cls is Recipe and f.name == "pairs":
            from rlrf.trainers import TRAINERS, section_class

            out += [(name, section_class(name)) for name in TRAINERS]
    return out


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader whose floats include `5e-5` and `1e3` (YAML 1.1 wants `5.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse a command-line value the way the recipe would (YAML scalar or flow list)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"override value {text!r} is not a YAML value ({str(e).splitlines()[0]}); quote it "
                          f"(key.sub='...')") from None


def _hint(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if choices(tp) is not None:  # the section's __post_init__ checks the value against the choices
        return _coerce(value, str, key)
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    types_ = dict(_keys(cls))
    names = list(types_)
    fields = {f.name for f in dataclasses.fields(cls)}  # for Recipe, the names past these are trainers' sections
    kwargs, trainer_sections = {}, {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in MOVED:
            raise ConfigError(f"{key} is now {MOVED[key]}; rename it in the recipe (or the override)")
        if k not in names:
            raise ConfigError(_unknown(key, k, names, prefix))
        value = _coerce(v, types_[k], key)
        if k not in fields:
            trainer_sections[k] = value
        else:
            kwargs[k] = value
    if cls is Recipe:
        kwargs["trainer_sections"] = trainer_sections
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'recipe'}: {e}") from e


# keys that moved to another section: a recipe that still names the old key is told the new one
MOVED = {"rounds.learning_check_users": "check.users", "rounds.learning_check_n": "check.n"}


def _unknown(key: str, k: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"unknown key {key!r}{hint} (known: {', '.join(names)})"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def shipped_recipes() -> dict[str, Path]:
    """The recipes inside the package (rlrf.recipes: the repo's recipes/ directory), by name."""
    from importlib.resources import files

    root = Path(str(files("rlrf.recipes")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_recipe(path: str | Path) -> Path:
    """A recipe file: `path` itself, else the shipped recipe of that name (`tiny`, `tiny.yaml`, or
    `recipes/tiny.yaml` outside a checkout), else a ConfigError listing the shipped ones."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if name in shipped and (len(p.parts) == 1 or p.parent.name == "recipes"):
        return shipped[name]
    raise ConfigError(f"recipe {p} not found; give a YAML file or the name of a recipe shipped in recipes/ "
                      f"({', '.join(shipped)}; `rlrf recipes` lists them, `rlrf recipes cp NAME` copies one)")


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe and apply `key.sub=value` overrides; validates everything."""
    tree: dict = {}
    if path is not None:
        p = find_recipe(path)
        try:
            tree = yaml.load(p.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {p}: the top level must be a mapping of sections")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value (e.g. sample.n=4)")
        k, v = o.split("=", 1)
        _set_path(tree, k.strip(), parse_value(v))
    where = f" (recipe {path})" if path else ""
    try:
        return _build(Recipe, tree)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def describe(cls=Recipe, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field, for `--help` output and docs."""
    rows = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in _keys(cls):
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows
