"""The retrieval reward (LangPTune's design): a profile is good when its embedding retrieves the user's
held-out positives.

reward(profile) = NDCG@k of the user's held-out positive items (label 1 in the user's rerank lists, never
the prompt history) ranked by cosine(profile embedding, item text embedding), either among the candidates
of each of the user's lists (`lists`: the reranker's task, averaged over lists) or among the whole
catalogue minus the items of the user's prompt history (`catalogue`). Nothing is trained, so nothing is
judged in-sample, and the same profile always gets the same reward. A user with no held-out positive gets
NaN (counted by the caller).

The profile and item vectors come from the encode stage's text encoder (`retrieval`: dense, MiniLM by
default), from a word TF-IDF fitted on the item texts (`lexical`: a profile is close to the items whose
titles and genres it names), or from the catalogue's genre labels (`genres`: a profile is the set of catalogue
genres it names in words, an item its genre labels; a structured space that reads no other word of the
profile, with ties broken by the item's popularity in the prompt histories, so a profile that names nothing
gets the popularity ranking). Each makes different mistakes, so each judges the others independently.

The personal reward (`contrast` > 0): the same judge on the profile's own user minus its mean on `contrast`
other users of the same split (fixed per user, so a user's N profiles are compared against the same others);
`contrast_weight` w < 1 takes off only w times that mean.
A profile that would serve anyone (naming nothing, so the popularity ranking; naming the popular genres) earns
about as much on another user's positives as on its own and scores about 0; only what is specific to its own
user counts. On run `learn300` DPO learned exactly that generic part from the plain lexical and genres rewards
(benchmarks/check_personal.py): the personal reward is built to remove it.

Two independent versions of the reward for its reliability: half "a" judges with the positives of the
user's even-numbered lists, half "b" with the odd-numbered ones (in the catalogue ranking, the other half's
positives leave the candidates, so they count neither for nor against).
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl

from rlrf.metrics import ndcg_at_k

CANDIDATES = ("catalogue", "lists")
HALVES = (None, "a", "b")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def catalogue_ndcg(scores: np.ndarray, relevant: list[np.ndarray], excluded: list[np.ndarray],
                   k: int) -> np.ndarray:
    """NDCG@k per row of `scores` (P, n_items) with binary relevance `relevant[p]` (item ids), items
    `excluded[p]` removed from the candidates; NaN for a row with no relevant item. Ties rank pessimistically
    (a relevant item shares the worst rank of its tie), so a constant scorer earns nothing."""
    out = np.full(len(scores), np.nan)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    for p, (s, rel, exc) in enumerate(zip(scores, relevant, excluded)):
        if len(rel) == 0:
            continue
        s = s.astype(np.float64, copy=True)
        s[exc] = -np.inf
        # rank of each relevant item = how many candidates score at least as high, itself excluded
        rank = (s[None, :] >= s[rel][:, None]).sum(1) - 1
        dcg = disc[rank[rank < k]].sum()
        idcg = disc[:min(k, len(rel))].sum()
        out[p] = dcg / idcg
    return out


class RetrievalReward:
    """Training-free reward over profile embeddings; `score_vectors(vecs, user_ids)` -> {name: (P,)}.

    Built from a run's prepare artifacts (`from_artifacts`) or from plain arrays (tests)."""

    name = "retrieval"
    trained_users: frozenset = frozenset()  # it learns nothing from anyone

    def __init__(self, item_vecs: np.ndarray, lists: pl.DataFrame, history: dict[int, np.ndarray],
                 candidates: str = "catalogue", k: int = 10, valid_items: np.ndarray | None = None,
                 tie_break: np.ndarray | None = None):
        if candidates not in CANDIDATES:
            raise ValueError(f"retrieval candidates must be one of {CANDIDATES}, got {candidates!r}")
        self.items = unit(item_vecs)
        # added to every cosine: orders items the profile cannot tell apart (a coarse space's ties); keep it far
        # below the space's smallest cosine gap so it never reorders items the profile does tell apart
        self.tie_break = None if tie_break is None else np.asarray(tie_break, dtype=np.float32)
        if self.tie_break is not None and self.tie_break.shape != (len(item_vecs),):
            raise ValueError(f"tie_break needs one value per item row ({len(item_vecs)}), got {self.tie_break.shape}")
        self.candidates, self.k = candidates, int(k)
        n_items = len(item_vecs)
        # ids with no item (e.g. 0 when ids start at 1) are never candidates
        self.no_item = (np.setdiff1d(np.arange(n_items), valid_items) if valid_items is not None
                        else np.zeros(0, np.int64))
        self.history = history
        self.contrast, self.contrast_seed, self.contrast_weight = 0, 0, 1.0  # the personal reward: see `personal`
        self.lists: dict[int, dict] = {}
        self.split_of: dict[int, str] = {}
        self._pools: dict[str | None, np.ndarray] = {}
        if "split" in lists.columns:
            self.split_of = dict(zip(*lists.select("user_id", "split").unique("user_id").get_columns()))
        for (u,), g in lists.sort("list_id").group_by("user_id", maintain_order=True):
            ids = np.asarray(g["item_ids"].to_list(), dtype=np.int64)
            lab = np.asarray(g["labels"].to_list(), dtype=np.int8)
            half = np.arange(len(ids)) % 2  # 0 -> half a, 1 -> half b
            pos = [np.unique(ids[half == h][lab[half == h] > 0]) for h in (0, 1)]
            self.lists[int(u)] = {"ids": ids, "labels": lab, "half": half, "pos": pos,
                                  "all_pos": np.unique(np.concatenate(pos))}

    @classmethod
    def from_artifacts(cls, item_vecs: np.ndarray, lists: pl.DataFrame, interactions: pl.DataFrame,
                       items: pl.DataFrame, candidates: str, k: int,
                       tie_break: np.ndarray | None = None) -> "RetrievalReward":
        hist = (interactions.filter(pl.col("in_history")).group_by("user_id")
                .agg(pl.col("item_id")))
        history = {int(u): np.asarray(i, dtype=np.int64) for u, i in zip(hist["user_id"], hist["item_id"])}
        return cls(item_vecs, lists, history, candidates, k, valid_items=items["item_id"].to_numpy(),
                   tie_break=tie_break)

    def has_positives(self, user_id: int) -> bool:
        u = self.lists.get(int(user_id))
        return u is not None and len(u["all_pos"]) > 0

    def score_vectors(self, vecs: np.ndarray, user_ids) -> dict[str, np.ndarray]:
        """{"reward": (P,)} (= NDCG@k, or its personal part when `contrast` > 0) for profile embeddings (P, d) of
        `user_ids`: the reward interface."""
        r = self.ndcg(vecs, user_ids)
        out = {"reward": r, f"retrieval_ndcg@{self.k}": r}
        if self.contrast > 0:
            out["reward"] = out["personal"] = self.personal(vecs, user_ids)
        return out

    def others(self, user_id: int, m: int, seed: int = 0) -> np.ndarray:
        """`m` other users of `user_id`'s split who have held-out positives, the same for every call (seeded by
        the user): the reference users of its personal reward."""
        split = self.split_of.get(int(user_id))
        if split not in self._pools:
            self._pools[split] = np.array(sorted(u for u, info in self.lists.items() if len(info["all_pos"])
                                                 and self.split_of.get(u) == split), dtype=np.int64)
        pool = self._pools[split]
        pool = pool[pool != int(user_id)]
        if len(pool) == 0:
            return pool
        rng = np.random.default_rng([int(seed), int(user_id)])
        return rng.choice(pool, size=min(m, len(pool)), replace=False)

    def personal(self, vecs: np.ndarray, user_ids, half: str | None = None, m: int | None = None,
                 seed: int | None = None) -> np.ndarray:
        """NDCG@k on the profile's own user minus `contrast_weight` (1 unless set) times its mean over `m` (default
        `contrast`) other users of the same split; NaN where the user has no positive or no other user is left."""
        m = self.contrast if m is None else m
        seed = self.contrast_seed if seed is None else seed
        if m < 1:
            raise ValueError("the personal reward needs m >= 1 other users")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        own = self.ndcg(vecs, user_ids, half)
        refs = [self.others(u, m, seed) for u in user_ids.tolist()]
        width = max((len(r) for r in refs), default=0)
        if width == 0:
            return np.full(len(user_ids), np.nan)
        other = np.full((len(user_ids), width), np.nan)
        for j in range(width):
            rows = np.array([i for i, r in enumerate(refs) if len(r) > j], dtype=np.int64)
            if len(rows):
                other[rows, j] = self.ndcg(vecs[rows], np.array([refs[i][j] for i in rows]), half)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no other user, NaN below
            return own - self.contrast_weight * np.nanmean(other, axis=1)

    def ndcg(self, vecs: np.ndarray, user_ids, half: str | None = None) -> np.ndarray:
        """NDCG@k of each profile embedding (P, d) for its user; `half` in (None, "a", "b")."""
        if half not in HALVES:
            raise ValueError(f"half must be None, 'a' or 'b', got {half!r}")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if len(user_ids) == 0:
            return np.zeros(0)
        sims = unit(vecs) @ self.items.T  # (P, n_items)
        if self.tie_break is not None:
            sims = sims + self.tie_break[None]
        h = {None: None, "a": 0, "b": 1}[half]
        if self.candidates == "lists":
            return self._lists(sims, user_ids, h)
        rel, exc = [], []
        empty = np.zeros(0, np.int64)
        for u in user_ids.tolist():
            info = self.lists.get(u)
            hist = self.history.get(u, empty)
            if info is None:
                rel.append(empty)
                exc.append(hist)
                continue
            rel.append(info["all_pos"] if h is None else info["pos"][h])
            other = empty if h is None else np.setdiff1d(info["pos"][1 - h], info["pos"][h])
            exc.append(np.concatenate([hist, other, self.no_item]))
        return catalogue_ndcg(sims, rel, exc, self.k)

    def _lists(self, sims: np.ndarray, user_ids: np.ndarray, h: int | None) -> np.ndarray:
        out = np.full(len(user_ids), np.nan)
        for p, u in enumerate(user_ids.tolist()):
            info = self.lists.get(u)
            if info is None:
                continue
            keep = np.ones(len(info["ids"]), bool) if h is None else info["half"] == h
            ids, lab = info["ids"][keep], info["labels"][keep]
            if not (lab > 0).any():
                continue
            out[p] = ndcg_at_k(sims[p][ids], lab, self.k).mean()
        return out


class Lexical:
    """Word TF-IDF (sublinear tf, English stop words) fitted on the item texts: texts -> dense unit vectors."""

    def __init__(self, item_texts: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit(item_texts)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.vectorizer.transform(["" if t is None else t for t in texts]).toarray().astype(np.float32)


class Genres:
    """The catalogue's genre space: a text -> multi-hot of the catalogue genres it names as whole words (prose
    spellings such as "science fiction" count; rlrf.quality.names_genre), an item -> its genre labels.

    Negation is not read ("not a fan of horror" names horror), as in the lexical space."""

    def __init__(self, items: pl.DataFrame):
        self.genres = sorted({g for gs in items["genres"].to_list() for g in (gs or []) if g.lower() != "unknown"})
        if not self.genres:
            raise ValueError("the genres reward needs item genres: the prepare stage's items have none")
        index = {g: i for i, g in enumerate(self.genres)}
        self.item_vecs = np.zeros((int(items["item_id"].max()) + 1, len(self.genres)), np.float32)
        for iid, gs in zip(items["item_id"].to_list(), items["genres"].to_list()):
            for g in gs or []:
                if g in index:
                    self.item_vecs[iid, index[g]] = 1.0

    def __call__(self, texts: list[str]) -> np.ndarray:
        from rlrf.quality import names_genre, padded

        out = np.zeros((len(texts), len(self.genres)), np.float32)
        for i, t in enumerate(texts):
            body = padded(t or "")
            out[i] = [names_genre(body, g) for g in self.genres]
        return out


def popularity_tie_break(interactions: pl.DataFrame, n_items: int, scale: float = 1e-4) -> np.ndarray:
    """scale * log(1 + count) / max over items, counted in the prompt histories only (never a held-out rating):
    at most 1e-4, under the genre space's smallest gap between two distinct cosines (4.5e-4 for profiles naming up to
    18 genres and items of up to 6)."""
    pop = np.zeros(n_items)
    c = interactions.filter(pl.col("in_history")).group_by("item_id").len()
    pop[c["item_id"].to_numpy()] = c["len"].to_numpy()
    prior = np.log1p(pop)
    return (scale * prior / max(prior.max(), 1e-12)).astype(np.float32)
