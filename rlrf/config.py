"""Typed recipe config: YAML recipes, `key.sub=value` overrides, validation, hashing.

A recipe is one YAML file with a section per stage (see recipes/ml100k_smollm2.yaml). Each section is
a dataclass below whose fields carry a help text and whose `__post_init__` validates. Unknown keys are
errors that name the closest known key; values are type-checked (YAML's `5e-5` is a float here).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlrf.prompts import INSTRUCTIONS


class ConfigError(ValueError):
    """A recipe or override a person must fix; the message says what, where and how."""


def _f(default: Any, help: str, late: bool = False, **kw) -> Any:
    """A recipe key with its help text. `late=True` marks a key added after stages that read its section had
    already run: `fingerprint` leaves it out while it holds its default, so those stages stay up to date."""
    meta = {"help": help, **({"late": True} if late else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def fingerprint(section, drop: tuple[str, ...] = ()) -> dict:
    """A recipe section as a stage fingerprints it: every key but those in `drop` (keys that change speed, not
    results) and the `late` keys that hold their default."""
    out = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name in drop or (f.metadata.get("late") and out[f.name] == default):
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
TextReward = Literal["", "retrieval", "lexical", "genres"]  # grpo.reward: "" = score.reward
Candidates = Literal["catalogue", "lists"]
DPOBackend = Literal["trl", "llamafactory"]
ScaleRewards = Literal["group", "batch", "none"]
GRPOLoss = Literal["dapo", "grpo", "dr_grpo", "bnpo"]
Trainer = Literal["dpo", "grpo"]


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
            bad = [v for v in value if opts is not None and v not in opts]
            _check(not bad, f"{prefix}.{f.name}", f"unknown value {bad[0]!r}; each must be {_one_of(opts)}" if bad else "")
        elif (opts := choices(tp)) is not None:
            _check(value in opts, f"{prefix}.{f.name}", f"unknown value {value!r}; choose {_one_of(opts)}")


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    dataset: DatasetName = _f("ml-100k", "ml-100k | ml-1m | amazon-books")
    path: str = _f("data/raw/ml-100k", "directory holding the dataset's original files")
    layout: Layout = _f("auto", "auto | grouplens | recbole | amazon (auto detects from the files present)")

    def __post_init__(self):
        _check_choices(self, "data")


@dataclass
class PrepareConfig:
    positive_threshold: float = _f(-1.0, "rating > this is a positive; -1 = dataset default (3 MovieLens, 4 Amazon)")
    history_max: int = _f(-1, "max prompt-history items; -1 = dataset default (30 MovieLens, 15 Amazon)")
    chunk_size: int = _f(4, "consecutive rated items per rerank list")
    list_size: int = _f(10, "items per list after padding with never-rated items")
    min_history: int = _f(2, "users with fewer prompt-history items are dropped (and counted)")
    history_genres: bool = _f(False, "each prompt-history line also names the item's genres (categories for books): "
                                     "what a small LLM needs in its prompt to write a profile about this user's genres", late=True)
    instruction: str = _f("kar", "the prompt's closing request: kar (KAR's multi-factor analysis) | genres (name the "
                                 "genres most frequent among the user's highest-rated items, and two of them: short)", late=True)
    split: list = _f([0.8, 0.1, 0.1], "train / valid / test share of users")
    amazon_user_core: int = _f(60, "Amazon-Books: keep users with at least this many ratings (KAR)")
    amazon_item_core: int = _f(40, "Amazon-Books: keep items with at least this many ratings (KAR)")
    shards: int = _f(1, "output shards (users are hashed into shards)")

    def __post_init__(self):
        _check(len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and min(self.split) >= 0,
               "prepare.split", f"needs three non-negative shares summing to 1, got {self.split}")
        _check(0 < self.chunk_size <= self.list_size, "prepare.chunk_size", "must be in (0, list_size]")
        _check(self.shards >= 1, "prepare.shards", "must be >= 1")
        _check(self.instruction in INSTRUCTIONS, "prepare.instruction",
               f"unknown instruction {self.instruction!r}; choose one of {', '.join(INSTRUCTIONS)}")


@dataclass
class SampleConfig:
    model: str = _f("smollm2-135m-instruct", "hub id, local directory, or the alias smollm2-135m-instruct")
    backend: SampleBackend = _f("hf", "hf (transformers generate) | vllm")
    n: int = _f(4, "profiles sampled per user")
    splits: list = _f(["train", "valid", "test"], "which user splits to sample")
    max_users: int = _f(-1, "cap users per split (first by user id order after a seeded shuffle); -1 = all")
    temperature: float = _f(1.0, "sampling temperature; higher spreads profiles (more reward signal) but rambles")
    top_p: float = _f(0.95, "nucleus sampling mass")
    max_new_tokens: int = _f(128, "profile length cap; longer profiles cost time linearly")
    min_new_tokens: int = _f(0, "force at least this many tokens (benchmarks)")
    max_prompt_tokens: int = _f(1024, "prompt budget; history is trimmed oldest-first to fit (and counted)")
    batch_size: int = _f(64, "sequences per generate call (prompts x n); larger is faster until memory binds")
    dtype: DType = _f("auto", "auto (bf16 where the CPU has AMX/AVX512-bf16, else fp32) | bfloat16 | float32")
    threads: int = _f(0, "torch CPU threads for the hf backend; 0 = torch's default (all cores). 1 wins when "
                         "other jobs share the cores")
    shards: int = _f(8, "at most this many user shards (the unit of resume), each of whole generate batches")
    item_knowledge: bool = _f(False, "also generate KAR item texts with the LLM (slow); off = metadata texts")
    trim: Trim = _f("none", "a profile cut by max_new_tokens: none (kept mid-sentence) | sentence (cut back to its last "
                           "sentence end, finish_reason 'sentence'), so DPO compares profiles that end instead of two "
                           "cut-off texts that both learn to stop mid-word", late=True)

    def __post_init__(self):
        _check_choices(self, "sample")
        _check(self.n >= 1, "sample.n", "must be >= 1")
        _check(self.temperature >= 0, "sample.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "sample.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "sample.max_new_tokens", "must be >= 1")
        _check(set(self.splits) <= {"train", "valid", "test"} and self.splits, "sample.splits",
               f"must be a non-empty subset of train, valid, test; got {self.splits}")
        _check(self.shards >= 1, "sample.shards", "must be >= 1")
        _check(self.threads >= 0, "sample.threads", "must be >= 0 (0 = torch's default)")
        _check(self.batch_size >= 1, "sample.batch_size", "must be >= 1")
        _check(0 <= self.min_new_tokens <= self.max_new_tokens, "sample.min_new_tokens", "must be in [0, max_new_tokens]")
        _check(self.max_prompt_tokens >= 16, "sample.max_prompt_tokens", "must be >= 16")


@dataclass
class EncodeConfig:
    encoder: str = _f("all-MiniLM-L6-v2", "sentence-transformers model: all-MiniLM-L6-v2 (offline, from PyPI), hub id or path")
    pooling: Pooling = _f("auto", "auto (the model's own) | mean | cls")
    batch_size: int = _f(64, "texts per encoder batch")
    max_seq_length: int = _f(256, "encoder truncation length in tokens")
    shards: int = _f(4, "user shards (+1 for item texts); the unit of resume")

    def __post_init__(self):
        _check_choices(self, "encode")
        _check(self.batch_size >= 1, "encode.batch_size", "must be >= 1")
        _check(self.max_seq_length >= 8, "encode.max_seq_length", "must be >= 8")
        _check(self.shards >= 1, "encode.shards", "must be >= 1")


@dataclass
class RerankerConfig:
    backbone: Backbone = _f("dlcm", "dlcm | prm")
    knowledge: bool = _f(True, "use the hybrid-expert adaptor over profile/item-text embeddings (KAR); off = base model")
    loss: RerankLoss = _f("bce", "bce (per item, KAR) | listwise (softmax cross-entropy over the list)")
    lr: float = _f(1e-3, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    dropout: float = _f(0.0, "dropout on each candidate's input features; fights the id embeddings' overfitting")
    history: int = _f(0, "user-history features: each candidate matched against the user's last N liked / not-liked "
                         "prompt-history items (0 = off, KAR's item-only lists). Off for the reward reranker: one that "
                         "knows the history needs the profile less, so a user's profiles score alike; evaluate.history "
                         "turns it on for the evaluation rerankers")
    without_profile: WithoutProfile = _f("drop", "train lists of users with no profile: drop (KAR needs every user's knowledge) "
                                      "| zero (kept with a zero profile vector, so the item side learns from every "
                                      "train list when the sample stage drew only some users)", late=True)
    threads: int = _f(1, "torch threads for training and the reward forward: the model is tiny, so a second "
                         "thread mostly waits (and thrashes on a busy 2-core machine)")
    batch_size: int = _f(256, "lists per step")
    epochs: int = _f(20, "max epochs; early stopping on valid MAP@5 usually ends sooner")
    patience: int = _f(3, "epochs without valid MAP@5 improvement before stopping")
    seeds: list = _f([1234], "training seeds; metrics are reported as mean +- std over them")
    retrain_each_round: bool = _f(False, "retrain the reward reranker on each round's knowledge (paper: once, round 1)")
    folds: int = _f(2, "the reward judge is cross-fitted: users with a profile are cut into this many folds and each "
                       "fold is judged by members trained on the other folds (never in-sample); more folds train each "
                       "member on more users and cost one training each")
    stop_share: float = _f(0.15, "share of a judge member's training users held out for its early stopping (neither "
                                 "trained on nor judged by that member)")

    def __post_init__(self):
        _check_choices(self, "reranker")
        _check(self.lr > 0, "reranker.lr", "must be > 0")
        _check(len(self.seeds) >= 1, "reranker.seeds", "needs at least one seed")
        _check(0 <= self.dropout < 1, "reranker.dropout", "must be in [0, 1)")
        _check(self.threads >= 1, "reranker.threads", "must be >= 1")
        _check(self.history >= 0, "reranker.history", "must be >= 0 (0 = no history features)")
        _check(self.folds >= 2, "reranker.folds", "must be >= 2 (cross-fitting needs a fold to judge and one to train on)")
        _check(0 < self.stop_share < 1, "reranker.stop_share", "must be in (0, 1)")


@dataclass
class ScoreConfig:
    reward: Reward = _f("reranker", "what rewards a profile (and picks the pairs): reranker (KAR: the cross-fitted reranker "
                                 "judge's score.metric over the user's lists) | retrieval (LangPTune: NDCG of the user's "
                                 "held-out positives ranked by cosine(profile, item text) in the encoder's space; no "
                                 "training) | lexical (the same ranking by word TF-IDF cosine: rewards naming the titles "
                                 "and genres the user goes on to like) | genres (the same ranking in the catalogue's genre "
                                 "space: the genres a profile names against each item's genre labels, ties by "
                                 "popularity; reads no other word)")
    contrast: int = _f(0, "the personal reward: the judge on the profile's own user minus its mean on this many other "
                          "users of the same split (0 = off): what would serve any user (naming nothing, the popular "
                          "genres) scores ~0 and only what is specific to the user counts; retrieval | lexical | genres", late=True)
    judges: int = _f(1, "seeds in the reranker judge's ensemble (each cross-fitted over reranker.folds, averaged): more "
                        "is less noise, one reranker training per seed and fold; an independent twin of as many "
                        "seeds measures the judge's reliability")
    retrieval_candidates: Candidates = _f("catalogue", "retrieval reward's candidates: catalogue (every item but the user's "
                                                "prompt history: more evidence per user) | lists (the user's rerank lists)")
    retrieval_k: int = _f(10, "retrieval reward = NDCG@retrieval_k; larger counts deeper hits (smoother, less top-heavy)")
    metric: str = _f("ndcg@5", "reranker reward = this metric averaged over the user's lists: ndcg@k | map@k")
    batch_size: int = _f(512, "profiles per reward forward")
    shards: int = _f(4, "user shards; the unit of resume")
    tie_break: float = _f(1e-6, "reward = metric + tie_break * tanh(margin): the reranker's continuous positive-vs-"
                                "negative score margin breaks exact metric ties (common: NDCG@k is a step function), "
                                "too small to reorder profiles whose metric differs; 0 = the pure metric")

    def __post_init__(self):
        _check(0 <= self.tie_break <= 1e-3, "score.tie_break", "must be in [0, 1e-3] (it only breaks ties)")
        _check(re.fullmatch(r"(ndcg|map)@\d+", self.metric) is not None, "score.metric",
               f"expected ndcg@k or map@k, got {self.metric!r}")
        _check(self.batch_size >= 1, "score.batch_size", "must be >= 1")
        _check(self.shards >= 1, "score.shards", "must be >= 1")
        _check_choices(self, "score")
        _check(self.judges >= 1, "score.judges", "must be >= 1")
        _check(self.contrast >= 0, "score.contrast", "must be >= 0 (0 = off)")
        _check(self.contrast == 0 or self.reward != "reranker", "score.contrast",
               "applies to the training-free rewards (retrieval | lexical | genres), not score.reward=reranker")
        _check(self.retrieval_k >= 1, "score.retrieval_k", "must be >= 1")


@dataclass
class PairsConfig:
    min_margin: float = _f(0.0, "drop users whose best-worst reward gap is <= this (ties always dropped)")
    splits: list = _f(["train"], "user splits that become pairs (valid users judge the is-it-learning check, test users the evaluation)")
    heldout_splits: list = _f(["valid"], "user splits whose pairs are written apart (`heldout_pairs`) and never trained "
                                         "on: DPO reports its implicit-reward accuracy on them; [] = none")
    llamafactory_export: bool = _f(True, "also write a LLaMA-Factory sharegpt ranking dataset + dataset_info.json")
    length_tolerance: int = _f(-1, "tokens: the pair is the largest-margin one whose profiles differ by at most this "
                                   "much in length, so a reward that grows with length cannot teach DPO 'longer' "
                                   "(-1 = off: best vs worst)", late=True)
    ended_only: bool = _f(False, "leave profiles cut at sample.max_new_tokens out of the pairs (a cut profile is "
                                 "often a copied history list, which the retrieval rewards pay for)", late=True)
    typicality_tolerance: float = _f(-1.0, "the chosen profile may be at most this much more typical than the rejected "
                                           "one (typicality: the mean share of the split's other users whose profiles "
                                           "use each of its word bigrams), so a reward that pays for what every "
                                           "profile says cannot teach DPO to write alike for all (-1 = off; 0 = never "
                                           "more typical)", late=True)

    def __post_init__(self):
        _check(self.min_margin >= 0, "pairs.min_margin", "must be >= 0 (ties are always dropped)")
        _check(self.length_tolerance >= -1, "pairs.length_tolerance", "must be >= 0 tokens, or -1 (off)")
        _check(self.typicality_tolerance == -1 or 0 <= self.typicality_tolerance <= 1, "pairs.typicality_tolerance",
               f"must be in [0, 1], or -1 (off); got {self.typicality_tolerance}")
        _check(set(self.splits) <= {"train", "valid", "test"} and self.splits, "pairs.splits",
               f"must be a non-empty subset of train, valid, test; got {self.splits}")
        _check(set(self.heldout_splits) <= {"train", "valid", "test"} and not set(self.heldout_splits) & set(self.splits),
               "pairs.heldout_splits", f"must be splits not in pairs.splits (held out from DPO); got {self.heldout_splits}")


@dataclass
class DPOConfig:
    backend: DPOBackend = _f("trl", "trl | llamafactory (writes a LLaMA-Factory recipe and runs llamafactory-cli)")
    beta: float = _f(0.1, "DPO beta; smaller lets the policy move further from the reference")
    sft_weight: float = _f(0.0, "RPO (Pang et al., 2024): add this weight x the chosen profile's mean token NLL to the "
                                "DPO loss, so DPO cannot lower the chosen text's likelihood along with the rejected "
                                "one's and move the mass to some other text (TRL loss_type [sigmoid, sft]; "
                                "LLaMA-Factory pref_ftx). 0 = plain DPO", late=True)
    learning_rate: float = _f(5e-5, "AdamW learning rate")
    per_device_train_batch_size: int = _f(2, "pairs per forward")
    gradient_accumulation_steps: int = _f(8, "forwards per optimizer step")
    num_train_epochs: float = _f(3.0, "epochs over the pairs")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1 = by epochs)")
    max_length: int = _f(1024, "prompt + completion tokens; longer is truncated")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "modules LoRA adapts")
    dtype: DType = _f("auto", "frozen base weights during DPO (LoRA stays fp32): auto (bf16 where the CPU/GPU does bf16 natively) | bfloat16 | float32")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward: less memory, more time; off "
                                             "suits a small model on CPU")
    precompute_ref_log_probs: bool = _f(False, "reference log-probs for ALL pairs in one pass up front instead of a no-grad forward per step: pays only over several epochs (a demo run with max_steps below one epoch computes more than it trains on)")
    precompute_ref_batch_size: int = _f(16, "pairs per no-grad reference forward when precomputing (larger is faster up to memory)")
    share_prompt: bool = _f(True, "encode each pair's prompt once ([prompt | chosen | rejected] in one row with a 4D mask) "
                                  "instead of TRL's two rows: same log-probs, P+C+R tokens instead of 2(P+C) (rlrf/dpo_packed.py)")
    group_by_length: bool = _f(True, "batch pairs of similar token length together (less padding per step; order stays seeded)")
    save_steps: int = _f(10, "checkpoint every this many steps (the unit of resume)")
    logging_steps: int = _f(1, "log loss / reward margins / accuracies every this many steps")
    template: str = _f("auto", "LLaMA-Factory chat template: auto = built from the model's own chat template (the one the sample "
                               "stage uses); a name (chatml, llama3, ...) picks LLaMA-Factory's built-in one. Either way the stage "
                               "refuses to train unless LLaMA-Factory tokenizes every pair as the sample stage did")
    llamafactory_cli: str = _f("auto", "llamafactory-cli to run (auto: on PATH, else .venv-llamafactory/bin/)")
    heldout_max_pairs: int = _f(64, "held-out pairs (pairs.heldout_splits) scored after training for the implicit-reward "
                                    "accuracy; each costs a policy and a reference forward; 0 = skip")

    def __post_init__(self):
        _check_choices(self, "dpo")
        _check(self.beta > 0, "dpo.beta", "must be > 0")
        _check(self.sft_weight >= 0, "dpo.sft_weight", "must be >= 0 (0 = plain DPO)")
        _check(self.learning_rate > 0, "dpo.learning_rate", "must be > 0")
        _check(self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
               "dpo.per_device_train_batch_size", "batch size and gradient_accumulation_steps must be >= 1")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "dpo.max_steps",
               "set max_steps > 0 or num_train_epochs > 0")
        _check(self.save_steps >= 1, "dpo.save_steps", "must be >= 1")
        _check(0 < self.lora_r and 0 <= self.lora_dropout < 1, "dpo.lora_r", "lora_r must be > 0, lora_dropout in [0, 1)")


@dataclass
class GRPOConfig:
    reward: TextReward = _f("", "the reward GRPO learns from: retrieval | lexical | genres (training-free, so never in-sample); "
                         "empty = score.reward")
    max_users: int = _f(100, "train users whose KAR prompts GRPO samples from (first by user id after a seeded shuffle, as "
                             "the sample stage picks them); -1 = all")
    num_generations: int = _f(4, "profiles per prompt per step; the group whose rewards are normalised together")
    per_device_train_batch_size: int = _f(8, "completions per forward (a multiple of num_generations: whole groups)")
    gradient_accumulation_steps: int = _f(4, "forwards per optimizer step; one sampling call per step serves them all "
                                             "(per_device_train_batch_size x this completions, on policy)")
    max_steps: int = _f(25, "optimizer steps; each samples per_device_train_batch_size x gradient_accumulation_steps "
                            "completions with the current policy")
    learning_rate: float = _f(5e-5, "AdamW learning rate (LoRA)")
    beta: float = _f(0.0, "KL coefficient against the base model (0 = TRL's default: no KL term, no reference forward)")
    scale_rewards: ScaleRewards = _f("group", "advantage normalisation: group (std within a prompt's group) | batch | none")
    loss_type: GRPOLoss = _f("dapo", "TRL's GRPO loss: dapo | grpo | dr_grpo | bnpo")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "modules LoRA adapts")
    dtype: DType = _f("auto", "frozen base weights (LoRA stays fp32): auto (bf16 where the CPU/GPU does it natively) | "
                            "bfloat16 | float32")
    save_steps: int = _f(5, "checkpoint every this many steps (the unit of resume)")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward (TRL's GRPO default: less memory, "
                                            "more time); the 25-step demo measured with it on peaked at 5.2 GB")
    length_range: list = _f([], "[lo, hi] profile tokens (stop token included): a flat length term, 0 inside the range "
                                "and -1 outside, added with grpo.length_weight (the profile-verbalizer works' format "
                                "reward: keeps a policy from buying reward with length, and with hi < "
                                "sample.max_new_tokens asks for profiles that end); [] = off")
    length_weight: float = _f(0.1, "weight of the length term beside the recommender reward (weight 1)")

    def __post_init__(self):
        _check(self.length_range == [] or (len(self.length_range) == 2 and all(isinstance(x, int) for x in self.length_range)
                                           and 0 <= self.length_range[0] <= self.length_range[1]),
               "grpo.length_range", f"[] or [lo, hi] token counts with 0 <= lo <= hi; got {self.length_range}")
        _check(self.length_weight >= 0, "grpo.length_weight", "must be >= 0")
        _check(self.reward != "reranker", "grpo.reward", "retrieval | lexical | genres, or empty for score.reward (the "
               "reranker judge is cross-fitted on the sample stage's users, which GRPO does not draw)")
        _check_choices(self, "grpo")
        _check(self.num_generations >= 2, "grpo.num_generations", "must be >= 2 (advantages compare a group's profiles)")
        _check(self.per_device_train_batch_size % self.num_generations == 0, "grpo.per_device_train_batch_size",
               f"must be a multiple of grpo.num_generations ({self.num_generations}): each forward holds whole groups")
        _check(self.max_steps >= 1 and self.gradient_accumulation_steps >= 1, "grpo.max_steps",
               "max_steps and gradient_accumulation_steps must be >= 1")
        _check(self.learning_rate > 0 and self.beta >= 0, "grpo.learning_rate", "learning_rate must be > 0, beta >= 0")
        _check(self.save_steps >= 1 and self.lora_r > 0, "grpo.save_steps", "save_steps and lora_r must be >= 1")


@dataclass
class RoundsConfig:
    learning_check_users: int = _f(-1, "valid users sampled by both generators for the is-it-learning figure; -1 = all")
    learning_check_n: int = _f(2, "profiles per valid user per generator in the is-it-learning check")
    bootstrap: int = _f(2000, "bootstrap resamples for the 95% interval")
    trainer: Trainer = _f("dpo", "what makes generator k from generator k-1: dpo (the round's pairs; RLRF4Rec) | grpo (online, "
                             "from the reward itself; the grpo stage)", late=True)

    def __post_init__(self):
        _check_choices(self, "rounds")


@dataclass
class EvaluateConfig:
    rounds: list = _f([1], "generator rounds to evaluate besides the base model (0)")
    backbones: list[Backbone] = _f(["dlcm", "prm"], "reranker backbones in the tables")
    seeds: list = _f([1, 2, 3], "reranker seeds; tables show mean +- std")
    n: int = _f(1, "profiles per user per generator")
    max_users: int = _f(-1, "cap users per split for every generator (-1 = all users; small only for tests)")
    history: int = _f(30, "reranker.history for the evaluation rerankers (base and knowledge alike): the user-history "
                          "features lift base DLCM/PRM from popularity's level (README: the ranking baselines)")

    def __post_init__(self):
        _check(len(self.rounds) >= 1 and all(isinstance(k, int) and k >= 1 for k in self.rounds), "evaluate.rounds",
               f"needs rounds >= 1 (round k's DPO makes generator k; 0, the base model, is always evaluated), got {self.rounds}")
        _check(len(self.backbones) >= 1, "evaluate.backbones", "needs at least one backbone")
        _check_choices(self, "evaluate")
        _check(len(self.seeds) >= 1, "evaluate.seeds", "needs at least one seed")
        _check(self.n >= 1, "evaluate.n", "must be >= 1")
        _check(self.history >= 0, "evaluate.history", "must be >= 0 (0 = no history features)")


@dataclass
class Recipe:
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
    dpo: DPOConfig = _f(None, "dpo stage")
    grpo: GRPOConfig = _f(None, "grpo stage (online RL from the same reward; rounds.trainer=grpo)")
    rounds: RoundsConfig = _f(None, "round bookkeeping and the is-it-learning check")
    evaluate: EvaluateConfig = _f(None, "evaluate stage")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, _hint(Recipe, f.name)())
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.run) is not None, "run",
               f"{self.run!r} must be letters, digits, '_', '-', '.' (it names a directory)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections (and the seed): what a stage's output depends on."""
        d = self.to_dict()
        payload = {"seed": self.seed, **{n: d[n] for n in names}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(_unknown(key, k, names, prefix))
        kwargs[k] = _coerce(v, _hint(cls, k), key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'recipe'}: {e}") from e


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
    for f in dataclasses.fields(cls):
        tp = _hint(cls, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows
