"""The recipe's sections, one dataclass per stage: each field a key with its help text, each `__post_init__` the
section's validation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlrf.config.keys import (Backbone, Candidates, DatasetName, Diverse, Divergence, DPOBackend, DType, GRPOLoss,
                              Layout, MatchFigure, Pooling, RerankLoss, Reward, SampleBackend, ScaleRewards, TextJudge,
                              TextReward, Trim, WithoutProfile, _check, _check_choices, _f)
from rlrf.prompts import INSTRUCTIONS


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
    min_p: float = _f(0.0, "min-p sampling (Nguyen et al., 2024): a token is drawn only if its probability is at "
                           "least this share of the likeliest token's, so a high temperature spreads over the "
                           "plausible tokens without the tail (0 = off; 0.05-0.1 usual, with top_p 1)", late=True)
    max_new_tokens: int = _f(128, "profile length cap; longer profiles cost time linearly")
    min_new_tokens: int = _f(0, "force at least this many tokens (benchmarks)")
    max_prompt_tokens: int = _f(1024, "prompt budget; history is trimmed oldest-first to fit (and counted)")
    batch_size: int = _f(64, "sequences per generate call (prompts x n); larger is faster until memory binds")
    dtype: DType = _f("auto", "auto (bf16 where the CPU has AMX/AVX512-bf16, else fp32) | bfloat16 | float32")
    threads: int = _f(0, "torch CPU threads for the hf backend; 0 = torch's default (all cores). 1 wins when "
                         "other jobs share the cores", speed=True)
    shards: int = _f(8, "at most this many user shards (the unit of resume), each of whole generate batches")
    item_knowledge: bool = _f(False, "also generate KAR item texts with the LLM (slow); off = metadata texts")
    trim: Trim = _f("none", "a profile cut by max_new_tokens: none (kept mid-sentence) | sentence (cut back to its last "
                           "sentence end, finish_reason 'sentence'), so DPO compares profiles that end instead of two "
                           "cut-off texts that both learn to stop mid-word", late=True)
    temperature_from_check: bool = _f(False, "each tuned generator samples at the temperature its round's check "
                                             "measured it at (check.match_distinct's calibration, or check.temperature) "
                                             "instead of sample.temperature: round k > 1 samples generator k-1 at round "
                                             "k-1's, so its pairs and its check start from profiles as diverse as "
                                             "round 1's, and `make evaluate` samples each generator at its own. Needs "
                                             "round k-1's check; the grpo stage's online rollouts keep "
                                             "sample.temperature. Not fingerprinted itself: the temperature it picks is, "
                                             "in every stage that samples at it",
                                      place=True)

    def __post_init__(self):
        _check_choices(self, "sample")
        _check(self.n >= 1, "sample.n", "must be >= 1")
        _check(self.temperature >= 0, "sample.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "sample.top_p", "must be in (0, 1]")
        _check(0 <= self.min_p < 1, "sample.min_p", f"must be in [0, 1) (0 = off), got {self.min_p}")
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
    dtype: DType = _f("auto", "the reranker's forward (training and scoring): auto (bf16 autocast where the CPU has "
                              "AVX512-bf16/AMX, about 1.3-1.5x; else fp32) | bfloat16 | float32", late=True)
    threads: int = _f(1, "torch threads for training and the reward forward: the model is tiny, so a second "
                         "thread mostly waits (and thrashes on a busy 2-core machine)", speed=True)
    batch_size: int = _f(256, "lists per step")
    epochs: int = _f(20, "max epochs; early stopping on valid MAP@5 usually ends sooner")
    patience: int = _f(3, "epochs without valid MAP@5 improvement before stopping")
    seeds: list = _f([1234], "training seeds; metrics are reported as mean +- std over them")
    retrain_each_round: bool = _f(False, "retrain the reward reranker on each round's knowledge (paper: once, round 1)",
                                  place=True)
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
    contrast_weight: float = _f(1.0, "how much of the other users' mean the personal reward takes off: own - w * others; "
                                     "1 = the personal part alone, 0 = the plain judge, between = a reward that still "
                                     "pays for what serves any user but less than for what serves this one", late=True)
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
        _check(0 <= self.contrast_weight <= 1, "score.contrast_weight", "must be in [0, 1]")
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
    typicality_band: float = _f(-1.0, "the two profiles' typicality differs by at most this much either way, so the "
                                      "pairs carry no typicality direction on average (-1 = off; "
                                      "benchmarks/pair_sides.py measures what a band leaves)", late=True)
    genres_tolerance: int = _f(-1, "the two profiles name as many of the catalogue's genres, give or take this many, "
                                   "so a reward that pays for naming more genres cannot teach DPO 'name more genres' "
                                   "(-1 = off; 0 = as many)", late=True)
    genre_swap: bool = _f(False, "each pair's rejected side is its chosen profile with every genre it names swapped for "
                                 "the unnamed genre closest in how often the profiles name it, kept where the swap's "
                                 "popularity stays close and the reward's lead of the chosen over the swap on its user "
                                 "exceeds its mean lead on other users: the two sides differ only in which genres they "
                                 "name, so what every profile shares cancels out of what DPO learns", late=True)
    min_overlap: float = _f(0.0, "minimal pairs: the two profiles share at least this share of their word bigrams "
                                 "(Jaccard), so they differ in what they say, not in template (0 = off)", late=True)
    agree_with: list[TextJudge] = _f([], "other judges (score columns: retrieval | lexical | genres) that must not rank "
                                         "the chosen profile below the rejected one: the pair is the largest-margin one "
                                         "none of them contradicts, so DPO learns only what the reward and these judges "
                                         "share. A judge named here no longer judges the round independently of its "
                                         "pairs. [] = off", late=True)
    cross_user: int = _f(0, "besides each user's own pair, up to this many pairs whose rejected profile is another "
                            "pair user's chosen one (within pairs.length_tolerance of it) that the reward scores lower "
                            "on this user's held-out positives: what every user's profile shares cancels between the "
                            "two sides, so DPO learns what tells this user's profile from another's (0 = off)",
                         late=True)
    coin_flip: bool = _f(False, "a null control: swap chosen and rejected in a seeded half of the pairs, so DPO trains "
                                "as it would but on labels the reward did not give; what such a round changes (a "
                                "judge, distinct-2) is DPO's own doing, not the reward's. The held-out pairs keep "
                                "the reward's labels", late=True)
    diverse: Diverse = _f("", "DivPO (Lanchantin et al., 2025): the chosen profile is the most diverse of the user's "
                              "best-rewarded pairs.diverse_pool share of profiles and the rejected one the least "
                              "diverse of the worst-rewarded share, diversity by this criterion: surprisal (the "
                              "profile's mean token NLL on its own under the generator that sampled it: rare text) | "
                              "typicality (minus rlrf.quality.typicality: what few other users' profiles say). DPO "
                              "then pushes up rare good profiles and down common bad ones ('' = off: the largest "
                              "reward margin; README H27-H29: on the demo neither holds distinct-2 with a gain)",
                          late=True)
    diverse_pool: float = _f(0.5, "pairs.diverse: the share of a user's profiles (rounded down, at least one) in each "
                                  "of the best- and worst-rewarded pools", late=True)
    cross_user_draws: int = _f(16, "other users' chosen profiles tried per user for pairs.cross_user, in a seeded order "
                                   "(the first ones the reward scores lower are taken)", late=True)

    def __post_init__(self):
        _check(self.min_margin >= 0, "pairs.min_margin", "must be >= 0 (ties are always dropped)")
        _check(self.cross_user >= 0, "pairs.cross_user", f"must be >= 0 pairs a user (0 = off); got {self.cross_user}")
        _check(not (self.genre_swap and self.cross_user), "pairs.genre_swap",
               "replaces each user's rejected profile; it does not combine with pairs.cross_user")
        _check(not (self.coin_flip and self.cross_user), "pairs.coin_flip",
               "is a control on a user's own pairs; it does not combine with pairs.cross_user")
        _check(self.cross_user_draws >= self.cross_user, "pairs.cross_user_draws",
               f"must be >= pairs.cross_user ({self.cross_user}); got {self.cross_user_draws}")
        _check(self.length_tolerance >= -1, "pairs.length_tolerance", "must be >= 0 tokens, or -1 (off)")
        _check(self.typicality_tolerance == -1 or 0 <= self.typicality_tolerance <= 1, "pairs.typicality_tolerance",
               f"must be in [0, 1], or -1 (off); got {self.typicality_tolerance}")
        _check(self.typicality_band == -1 or 0 <= self.typicality_band <= 1, "pairs.typicality_band",
               f"must be in [0, 1], or -1 (off); got {self.typicality_band}")
        _check(self.genres_tolerance >= -1, "pairs.genres_tolerance", f"must be >= 0 genres, or -1 (off); got "
                                                                      f"{self.genres_tolerance}")
        _check(0 < self.diverse_pool <= 0.5, "pairs.diverse_pool", f"must be in (0, 0.5] (the two pools never share "
                                                                     f"a profile); got {self.diverse_pool}")
        _check(not (self.diverse and (self.genre_swap or self.cross_user)), "pairs.diverse",
               "picks both sides from the user's own profiles; it does not combine with pairs.genre_swap or "
               "pairs.cross_user")
        _check(0 <= self.min_overlap <= 1, "pairs.min_overlap", f"must be in [0, 1] (0 = off); got {self.min_overlap}")
        _check_choices(self, "pairs")
        _check(set(self.splits) <= {"train", "valid", "test"} and self.splits, "pairs.splits",
               f"must be a non-empty subset of train, valid, test; got {self.splits}")
        _check(set(self.heldout_splits) <= {"train", "valid", "test"} and not set(self.heldout_splits) & set(self.splits),
               "pairs.heldout_splits", f"must be splits not in pairs.splits (held out from DPO); got {self.heldout_splits}")


class _TrainingSeed:
    """A trainer section's `seed` key: -1 = the recipe's `seed`."""

    def training_seed(self, recipe_seed: int) -> int:
        return recipe_seed if self.seed < 0 else self.seed


@dataclass
class DPOConfig(_TrainingSeed):
    backend: DPOBackend = _f("trl", "trl | llamafactory (writes a LLaMA-Factory recipe and runs llamafactory-cli)")
    beta: float = _f(0.1, "DPO beta; smaller lets the policy move further from the reference")
    sft_weight: float = _f(0.0, "RPO (Pang et al., 2024): add this weight x the chosen profile's mean token NLL to the "
                                "DPO loss, so DPO cannot lower the chosen text's likelihood along with the rejected "
                                "one's and move the mass to some other text (TRL loss_type [sigmoid, sft]; "
                                "LLaMA-Factory pref_ftx). 0 = plain DPO", late=True)
    divergence: Divergence = _f("reverse_kl", "what ties the policy to the reference (f-DPO, Wang et al., 2023; TRL's "
                                              "f_divergence_type): reverse_kl (DPO: mode-seeking, the policy may "
                                              "collapse onto one kind of answer) | js_divergence | forward_kl (mass-"
                                              "covering: pays for every answer the reference gives, its most likely "
                                              "long ones included; README: Is it learning? has what each did). TRL "
                                              "backend only", late=True)
    entropy_alpha: float = _f(1.0, "H-DPO (Omura et al., 2024): the reverse KL's entropy term weighted by this, so "
                                   "the policy DPO aims at is (reference x exp(reward / beta)) ^ (1 / alpha): above 1 "
                                   "flatter than the reference (keeps the policy's spread as it learns), below 1 "
                                   "sharper; 1 = DPO. Trained as DPO at beta x alpha against the reference's log-"
                                   "probabilities / alpha (the same loss). TRL backend, reverse_kl, dpo.share_prompt",
                                   late=True)
    token_kl: float = _f(0.0, "a token-level forward KL to the reference beside the DPO loss (TDPO's sequential KL, "
                              "Zeng et al., 2024, as an added term): + this x beta x the mean over the batch's chosen "
                              "and rejected profiles of the sum over their tokens of KL(reference || policy) of the "
                              "next-token distributions. Mass-covering: the policy pays for every token it stops "
                              "giving probability where the reference gives it, so DPO cannot narrow it onto one kind "
                              "of profile for free. On the demo 0.1 kept the gain with less narrowing, 0.3 and 1 held "
                              "the policy near the reference and lost it (README: H52). 0 = plain DPO. TRL backend, "
                              "dpo.share_prompt", late=True)
    merge_scale: float = _f(1.0, "generator k = generator k-1 + this x the adapter's update: 1 = the trained policy; "
                                 "below 1 interpolates it towards its initialisation (WiSE-FT; WARP's LITI, Rame et "
                                 "al., 2024), which keeps part of the reward for less drift from the base model. "
                                 "Applied at the merge, either backend; the held-out pair accuracy is the trained "
                                 "policy's", late=True)
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
    lora_layers: int = _f(0, "adapt only the top this many decoder layers (0 = every layer): the backward then stops "
                             "below the lowest adapted one, the layers under it keep no activations for it, and "
                             "with dpo.share_prompt the reference pass reuses their output from the policy pass "
                             "(SmolLM2's top 15 of 30: a step about 1.5x faster than every layer's, a third less "
                             "memory; without gradient checkpointing, which runs the backward through every layer "
                             "whatever this says). TRL backend only", late=True)
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
    seed: int = _f(-1, "the training seed (LoRA init, pair order, dropout); -1 = the recipe's `seed`, which also draws "
                       "the users' split and the samples: set this, not `seed`, for a replicate of the round's DPO on "
                       "the same pairs", late=True)

    def __post_init__(self):
        _check_choices(self, "dpo")
        _check(self.beta > 0, "dpo.beta", "must be > 0")
        _check(self.sft_weight >= 0, "dpo.sft_weight", "must be >= 0 (0 = plain DPO)")
        _check(self.divergence == "reverse_kl" or self.backend == "trl", "dpo.divergence",
               f"{self.divergence}: LLaMA-Factory's DPO has the reverse KL only; set dpo.backend=trl or drop the key")
        _check(self.entropy_alpha > 0, "dpo.entropy_alpha", f"{self.entropy_alpha}: must be > 0 (1 = DPO)")
        _check(self.entropy_alpha == 1 or (self.backend == "trl" and self.divergence == "reverse_kl"
                                           and self.share_prompt), "dpo.entropy_alpha",
               f"{self.entropy_alpha}: H-DPO is built on the TRL backend's reverse KL through the shared-prompt "
               f"forward (it scales the reference pass there); set dpo.backend=trl, dpo.divergence=reverse_kl and "
               f"dpo.share_prompt=true, or drop the key")
        _check(self.token_kl >= 0, "dpo.token_kl", f"{self.token_kl}: must be >= 0 (0 = plain DPO)")
        _check(self.token_kl == 0 or (self.backend == "trl" and self.share_prompt), "dpo.token_kl",
               f"{self.token_kl}: the token KL is computed in the TRL backend's shared-prompt forward; set "
               f"dpo.backend=trl and dpo.share_prompt=true, or drop the key")
        _check(0 < self.merge_scale <= 1, "dpo.merge_scale", f"{self.merge_scale}: must be in (0, 1] (1 = the "
                                                             f"trained policy; 0 would be the base model itself)")
        _check(self.learning_rate > 0, "dpo.learning_rate", "must be > 0")
        _check(self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
               "dpo.per_device_train_batch_size", "batch size and gradient_accumulation_steps must be >= 1")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "dpo.max_steps",
               "set max_steps > 0 or num_train_epochs > 0")
        _check(self.save_steps >= 1, "dpo.save_steps", "must be >= 1")
        _check(0 < self.lora_r and 0 <= self.lora_dropout < 1, "dpo.lora_r", "lora_r must be > 0, lora_dropout in [0, 1)")
        _check(self.lora_layers >= 0, "dpo.lora_layers", f"{self.lora_layers}: the number of top layers to adapt, "
                                                         f"or 0 for every layer")
        _check(self.lora_layers == 0 or self.backend == "trl", "dpo.lora_layers",
               "LLaMA-Factory's LoRA adapts every layer; set dpo.backend=trl or drop the key")
        _check(self.seed >= -1, "dpo.seed", "a seed >= 0, or -1 for the recipe's")


@dataclass
class GRPOConfig(_TrainingSeed):
    reward: TextReward = _f("", "the reward GRPO learns from: retrieval | lexical | genres (training-free, so never in-sample); "
                         "empty = score.reward")
    max_users: int = _f(100, "train users whose KAR prompts GRPO samples from (first by user id after a seeded shuffle, as "
                             "the sample stage picks them); -1 = all")
    num_generations: int = _f(4, "profiles per prompt per step; the group whose rewards are normalised together")
    per_device_train_batch_size: int = _f(8, "completions per forward (a multiple of num_generations). TRL shuffles a "
                                             "step's rows before cutting them into forwards, so with share_prompt one "
                                             "forward of the whole step (this = the step's completions, accumulation 1) "
                                             "packs every group whole: the fewest tokens, if the memory allows")
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
                                            "more time; README: Online has the demo's peak)")
    share_prompt: bool = _f(True, "each group's prompt through the model once, its num_generations completions packed "
                                  "behind it (rlrf/grpo_packed.py): the same log-probs from a fraction of the tokens "
                                  "in the policy forward, its backward and the KL term's reference forward (float "
                                  "sums in another order: in the fingerprint, as dpo.share_prompt is)")
    merged_rollout: bool = _f(True, "sample each step's profiles with the LoRA update merged into the weights, one "
                                    "matmul per projection instead of three small ones a token, the base weights put "
                                    "back bit for bit after (the policy sampled is the same up to the weights' "
                                    "rounding: in the fingerprint)")
    length_range: list = _f([], "[lo, hi] profile tokens (stop token included): a flat length term, 0 inside the range "
                                "and -1 outside, added with grpo.length_weight (the profile-verbalizer works' format "
                                "reward: keeps a policy from buying reward with length, and with hi < "
                                "sample.max_new_tokens asks for profiles that end); [] = off")
    length_weight: float = _f(0.1, "weight of the length term beside the recommender reward (weight 1)")
    typicality_weight: float = _f(0.0, "weight of a diversity term: minus the profile's typicality among the other users' "
                                       "profiles sampled in the same step (rlrf.quality.typicality: the per-profile side "
                                       "of corpus distinct-2), so a profile written like everyone's earns less than one "
                                       "of its group written for this user; 0 = off", late=True)
    seed: int = _f(-1, "the training seed (LoRA init, each step's rollouts, data order); -1 = the recipe's `seed`, which "
                       "also draws the users' split and which train users GRPO samples: set this, not `seed`, for a "
                       "replicate on the same users", late=True)

    def __post_init__(self):
        _check(self.length_range == [] or (len(self.length_range) == 2 and all(isinstance(x, int) for x in self.length_range)
                                           and 0 <= self.length_range[0] <= self.length_range[1]),
               "grpo.length_range", f"[] or [lo, hi] token counts with 0 <= lo <= hi; got {self.length_range}")
        _check(self.length_weight >= 0, "grpo.length_weight", "must be >= 0")
        _check(self.typicality_weight >= 0, "grpo.typicality_weight", "must be >= 0")
        _check(self.seed >= -1, "grpo.seed", "a seed >= 0, or -1 for the recipe's")
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
class CheckConfig:
    users: int = _f(-1, "valid users sampled by both generators for the is-it-learning figure; -1 = all")
    n: int = _f(2, "profiles per valid user per generator (generator k-1's are taken from the round's own sample when "
                   "it has that many)")
    temperature: float | None = _f(None, "generator k's sampling temperature in the check (generator k-1's is "
                                         "sample.temperature); null = sample.temperature. A tuned generator is "
                                         "sharper than its base: this measures it at a recalibrated temperature",
                                   late=True)
    top_p: float | None = _f(None, "generator k's nucleus mass in the check, its calibration included (generator "
                                   "k-1 keeps sample.top_p); null = sample.top_p", late=True)
    min_p: float | None = _f(None, "generator k's min-p in the check, its calibration included (generator k-1 keeps "
                                   "sample.min_p); null = sample.min_p. A tuned generator brought back to its base's "
                                   "diversity by temperature alone draws from the tail too (x1.3 perplexity for "
                                   "0.2 of temperature on the base); with a min-p cut the same diversity costs less "
                                   "fluency (README: H51). With sample.temperature_from_check the next round samples "
                                   "generator k with these too", late=True)
    match_distinct: bool = _f(False, "generator k's check temperature calibrated, not set: the lowest of "
                                     "check.match_temperatures at which generator k's profiles of "
                                     "check.match_users train users outside the round's sample (no pair came from "
                                     "them) are as diverse (corpus distinct-2) as generator k-1's at "
                                     "sample.temperature; valid users play no part in the choice. A DPO-tuned generator is sharper than its base; this measures it "
                                     "at the temperature that gives back the base's diversity", late=True)
    match_temperatures: list[float] = _f([round(0.7 + 0.025 * i, 3) for i in range(13)],
                                         "the temperatures check.match_distinct chooses among (ascending; a "
                                         "bisection samples about log2 of them: 0.7 to 1.0 by 0.025, 4 of 13; on "
                                         "the demo distinct-2 rises ~0.01 a 0.01 of temperature there)", late=True)
    match_users: int = _f(96, "train users check.match_distinct samples at each temperature it tries "
                              "(check.match_n profiles each)", late=True)
    match_n: int | None = _f(None, "profiles a user check.match_distinct samples at each temperature; null = check.n. "
                                   "A check of 16 a user calibrated at 4 costs the calibration nothing more; the "
                                   "corpus distinct-2 reads differently at 4 and at 16 a user, distinct-2 across "
                                   "users does not (check.match_figure)", late=True)

    match_figure: MatchFigure = _f(
        "corpus", "the diversity check.match_distinct matches: corpus (distinct-2 of all the calibration's "
                  "profiles, which also counts the variety within a user, so its reading depends on the profiles a "
                  "user: at 4 it under-reads the check's own figure at 16 by 0.01-0.03) | across (distinct-2 across "
                  "users: each profile slot's corpus of one profile a user, averaged; what a shared template lowers, "
                  "the same at any profile count; the check reports it as distinct_2_across)", late=True)

    def __post_init__(self):
        _check_choices(self, "check")
        _check(self.n >= 1, "check.n", "must be >= 1")
        _check(self.temperature is None or self.temperature > 0, "check.temperature",
               f"must be > 0 (or null for sample.temperature), got {self.temperature}")
        _check(self.top_p is None or 0 < self.top_p <= 1, "check.top_p",
               f"must be in (0, 1] (or null for sample.top_p), got {self.top_p}")
        _check(self.min_p is None or 0 <= self.min_p < 1, "check.min_p",
               f"must be in [0, 1) (or null for sample.min_p), got {self.min_p}")
        _check(not (self.match_distinct and self.temperature is not None), "check.match_distinct",
               f"calibrates the temperature that check.temperature={self.temperature} sets; use one of the two")
        t = self.match_temperatures
        _check(len(t) >= 1 and all(x > 0 for x in t) and list(t) == sorted(set(t)), "check.match_temperatures",
               f"must be distinct temperatures > 0 in ascending order, got {t}")
        _check(self.match_users >= 1, "check.match_users", f"must be >= 1, got {self.match_users}")
        _check(self.match_n is None or self.match_n >= 1, "check.match_n",
               f"must be >= 1 (or null for check.n), got {self.match_n}")
        _check(self.users == -1 or self.users >= 1, "check.users", "must be -1 (all valid users) or >= 1")


@dataclass
class RoundsConfig:
    bootstrap: int = _f(2000, "bootstrap resamples for the 95% interval")
    trainer: str = _f("dpo", "what makes generator k from generator k-1, a name in rlrf.trainers.TRAINERS: dpo (the "
                             "round's pairs; RLRF4Rec) | grpo (online, from the reward itself; the grpo stage)", late=True)

    def __post_init__(self):
        from rlrf.trainers import check_name

        check_name(self.trainer)


@dataclass
class EvaluateConfig:
    rounds: list = _f([1], "generator rounds to evaluate besides the base model (0)")
    backbones: list[Backbone] = _f(["dlcm", "prm"], "reranker backbones in the tables")
    seeds: list = _f([1, 2, 3], "reranker seeds; tables show mean +- std")
    n: int = _f(1, "profiles per user per generator")
    max_users: int = _f(-1, "cap users per split for every generator (-1 = all users; small only for tests)")
    batch_size: int = _f(128, "sequences per decode batch of the evaluation sampling (sample.batch_size is the "
                              "round's): at one profile a user, 128 rows with ended prompts leaving sample ~1.2-1.3x "
                              "the users/s of 64 (docs/performance.md); a row's text does not depend on it", late=True)
    workers: int = _f(0, "evaluation rerankers trained at once, each in its own process at reranker.threads (0 = as "
                         "many as the CPU cores allow; 1 = one after the other in this process)", speed=True)
    history: int = _f(30, "reranker.history for the evaluation rerankers (base and knowledge alike): the user-history "
                          "features lift base DLCM/PRM from popularity's level (README: the ranking baselines)")

    def __post_init__(self):
        _check(len(self.rounds) >= 1 and all(isinstance(k, int) and k >= 1 for k in self.rounds), "evaluate.rounds",
               f"needs rounds >= 1 (round k's DPO makes generator k; 0, the base model, is always evaluated), got {self.rounds}")
        _check(len(self.backbones) >= 1, "evaluate.backbones", "needs at least one backbone")
        _check_choices(self, "evaluate")
        _check(len(self.seeds) >= 1, "evaluate.seeds", "needs at least one seed")
        _check(self.n >= 1, "evaluate.n", "must be >= 1")
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
        _check(self.history >= 0, "evaluate.history", "must be >= 0 (0 = no history features)")
        _check(self.workers >= 0, "evaluate.workers", "must be >= 0 (0 = as many as the CPU cores allow)")
