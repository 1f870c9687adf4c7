"""The prepare stage: a dataset's original files -> KAR's reranking data (users, items, interactions,
lists, prompts), the protocol of docs/protocol.md.

- Labels: rating > prepare.positive_threshold (default 3 for MovieLens, 4 for Amazon-Books).
- Each user's ratings in time order; ties (same timestamp, common in MovieLens) broken by the raw item
  id compared as a string, so the order never depends on the file's line order or layout (and matches
  the run behind docs/protocol.md's reference figures: perfect-ranking NDCG@5 0.864 on ML-100K test lists).
- Prompt history: the first h = min((n+1)//2, history_max) ratings (30 MovieLens, 15 Amazon). They are
  never rerank samples. Users with h < prepare.min_history are dropped (counted in stage.json).
- The remaining ratings are cut into chunks of chunk_size (4) consecutive items; each chunk is padded to
  list_size (10) with items the user never rated (label 0), drawn by a generator seeded from
  (recipe.seed, user_id), and shuffled by it. A final partial chunk (1-3 rated items) is kept as a list
  padded with more never-rated items: dropping it would discard the user's most recent ratings. Such
  lists are counted in stage.json (`partial_chunk_lists`). With the seed-1234 split this gives the
  1704 ML-100K test lists of docs/protocol.md's reference figures.
- Users split train / valid / test by prepare.split: the dense user ids shuffled with
  random.Random(recipe.seed), the first int(n * 0.8) train, the next int(n * 0.1) valid, the rest test.
- Dense ids: users and items numbered 1..n in their raw ids' natural order (numeric where all raw ids
  are numbers); 0 is padding. Raw ids are kept in raw_user_id / raw_item_id.

Output shards hold users by user_id % prepare.shards (items go with shard 0); a rerun after a kill
finishes the missing shards and gives exactly a clean run's rows.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from rlrf import prompts, runs, schema
from rlrf.config import Recipe
from rlrf.data import DataError, Dataset, load_dataset

DEFAULT_THRESHOLD = {"movies": 3.0, "books": 4.0}
DEFAULT_HISTORY_MAX = {"movies": 30, "books": 15}


def prepare_stage(recipe: Recipe, out_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Run the prepare stage into out_dir (default runs/<run>/prepare); returns the stage directory."""
    out_dir = Path(out_dir) if out_dir is not None else runs.prepare_dir(recipe)
    with runs.STAGES["prepare"].open(recipe, out_dir, force=force) as st:
        if st.done:
            return out_dir
        ds = load_dataset(recipe.data, recipe.prepare)
        plan = Plan(ds, recipe)
        st.counters.update(plan.dropped)
        n_shards = recipe.prepare.shards
        for i in tqdm(st.todo(n_shards), desc="prepare shards", leave=False):
            st.write_shard(i, plan.shard(i, n_shards))
        st.finish(extra=plan.summary())
    return out_dir


def _natural(raw_ids: list[str]) -> list[str]:
    if all(r.isdigit() for r in raw_ids):
        return sorted(raw_ids, key=int)
    return sorted(raw_ids)


class Plan:
    """Everything decided globally (drops, dense ids, split, history cut); shards then build lists."""

    def __init__(self, ds: Dataset, recipe: Recipe):
        p = recipe.prepare
        self.ds, self.p, self.seed = ds, p, recipe.seed
        self.domain = ds.domain
        self.threshold = p.positive_threshold if p.positive_threshold >= 0 else DEFAULT_THRESHOLD[ds.domain]
        self.history_max = p.history_max if p.history_max > 0 else DEFAULT_HISTORY_MAX[ds.domain]
        self.dropped = dict(ds.dropped)

        r = ds.ratings
        known = r["raw_item_id"].is_in(ds.items["raw_item_id"].implode())
        self._drop("ratings_item_without_metadata", r.height - int(known.sum()))
        r = r.filter(known)
        n = r.height
        r = r.sort(["raw_user_id", "raw_item_id", "timestamp"]).unique(["raw_user_id", "raw_item_id"],
                                                                       keep="first", maintain_order=True)
        self._drop("ratings_repeated_user_item", n - r.height)

        # users: drop short histories and users the catalogue cannot pad
        n_items_all = r["raw_item_id"].n_unique()
        cs, ls = p.chunk_size, p.list_size
        per_user = r.group_by("raw_user_id").agg(n=pl.len()).with_columns(
            h=pl.min_horizontal((pl.col("n") + 1) // 2, pl.lit(self.history_max)))
        per_user = per_user.with_columns(rest=pl.col("n") - pl.col("h"))
        short = per_user.filter(pl.col("h") < p.min_history)
        self._drop("users_short_history", short.height)
        per_user = per_user.filter(pl.col("h") >= p.min_history)
        # the emptiest list of a user (a partial chunk) needs this many never-rated items
        smallest = pl.when(pl.col("rest") % cs == 0).then(cs).otherwise(pl.col("rest") % cs)
        need = per_user.with_columns(need=ls - pl.min_horizontal(smallest, pl.col("rest")))
        cannot = need.filter(n_items_all - pl.col("n") < pl.col("need"))
        self._drop("users_too_few_unrated_items", cannot.height)
        per_user = per_user.filter(~pl.col("raw_user_id").is_in(cannot["raw_user_id"].implode()))
        if per_user.height == 0:
            raise DataError(f"prepare: no user of {ds.path} has a prompt history of at least "
                             f"prepare.min_history={p.min_history} items; lower it or check the data")
        self._drop("ratings_of_dropped_users", r.height - int(per_user["n"].sum()))
        r = r.filter(pl.col("raw_user_id").is_in(per_user["raw_user_id"].implode()))

        # dense ids in natural raw-id order
        uids = pl.DataFrame({"raw_user_id": _natural(per_user["raw_user_id"].to_list())}).with_row_index(
            "user_id", offset=1).with_columns(pl.col("user_id").cast(pl.Int64))
        iids = pl.DataFrame({"raw_item_id": _natural(r["raw_item_id"].unique().to_list())}).with_row_index(
            "item_id", offset=1).with_columns(pl.col("item_id").cast(pl.Int64))
        self.items = self._items(iids)
        self.n_items = self.items.height

        # split: dense ids shuffled by the seed
        order = list(range(1, uids.height + 1))
        random.Random(self.seed).shuffle(order)
        n_train, n_valid = int(len(order) * p.split[0]), int(len(order) * p.split[1])
        split_of = {u: "train" for u in order[:n_train]}
        split_of.update({u: "valid" for u in order[n_train:n_train + n_valid]})
        split_of.update({u: "test" for u in order[n_train + n_valid:]})

        per_user = per_user.join(uids, on="raw_user_id").with_columns(
            n_lists=(pl.col("rest") + cs - 1) // cs,
            partial=(pl.col("rest") % cs > 0).cast(pl.Int64)).sort("user_id")
        per_user = per_user.with_columns(
            first_list_id=pl.col("n_lists").cum_sum() - pl.col("n_lists"),
            split=pl.col("user_id").replace_strict(split_of, return_dtype=pl.Utf8))
        self.per_user = per_user

        users = per_user.join(ds.users, on="raw_user_id", how="left").sort("user_id")
        self.users = users.select(
            pl.col("user_id"), pl.col("raw_user_id"), pl.col("split"), pl.col("gender"), pl.col("age"),
            pl.col("occupation"), pl.col("n").cast(pl.Int32).alias("n_interactions"),
            pl.col("h").cast(pl.Int32).alias("n_history"), pl.col("n_lists").cast(pl.Int32))

        inter = r.join(uids, on="raw_user_id").join(iids, on="raw_item_id").join(
            per_user.select("user_id", "h"), on="user_id")
        inter = inter.sort(["user_id", "timestamp", "raw_item_id"]).with_columns(
            position=pl.int_range(pl.len()).over("user_id").cast(pl.Int32))
        self.interactions = inter.select(
            "user_id", "item_id", "rating", "timestamp",
            (pl.col("rating") > self.threshold).cast(pl.Int8).alias("label"),
            "position", (pl.col("position") < pl.col("h")).alias("in_history"))

    def _drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)

    def _items(self, iids: pl.DataFrame) -> pl.DataFrame:
        items = iids.join(self.ds.items, on="raw_item_id", how="left").sort("item_id")
        first = items["genres"].list.first()
        attrs = sorted({g for g in first.to_list() if g})
        attr_id = {g: k for k, g in enumerate(attrs, start=1)}
        texts = [prompts.item_text(t, self.domain, y, g, a) for t, y, g, a in
                 items.select("title", "year", "genres", "author").iter_rows()]
        extra = [c for c in ("author",) if items[c].null_count() < items.height]  # books only
        return items.with_columns(
            attribute_id=pl.Series([attr_id.get(g, 0) for g in first.to_list()], dtype=pl.Int64),
            text=pl.Series(texts, dtype=pl.Utf8),
        ).select(*schema.SCHEMAS["items"], *extra)

    # ------------------------------------------------------------------ per shard

    def shard(self, i: int, n_shards: int) -> dict[str, pl.DataFrame]:
        users = self.users.filter(pl.col("user_id") % n_shards == i)
        inter = self.interactions.filter(pl.col("user_id") % n_shards == i)
        meta = self.per_user.filter(pl.col("user_id") % n_shards == i)
        titles = self.items["title"].to_list()  # index item_id - 1
        genres = self.items["genres"].to_list() if self.p.history_genres else None
        all_items = np.arange(1, self.n_items + 1, dtype=np.int64)
        by_user = inter.partition_by("user_id", as_dict=True, maintain_order=True)

        lists, prompt_rows = [], []
        for u in meta.iter_rows(named=True):
            uid = u["user_id"]
            rows = by_user[(uid,)]
            item_ids = rows["item_id"].to_numpy()
            labels = rows["label"].to_numpy()
            h = u["h"]
            lists += self._lists(uid, u["split"], u["first_list_id"], item_ids[h:], labels[h:],
                                 np.setdiff1d(all_items, item_ids, assume_unique=True))
            lines = [prompts.history_line(titles[it - 1], rt, genres[it - 1] if genres else None)
                     for it, rt in zip(item_ids[:h], rows["rating"].to_list()[:h])]
            prompt_rows.append(self._prompt(uid, u["split"], lines))

        frames = {
            "users": users,
            "interactions": inter,
            "lists": pl.DataFrame(lists, schema=schema.SCHEMAS["lists"], orient="row"),
            "prompts": pl.DataFrame(prompt_rows, schema=schema.SCHEMAS["prompts"], orient="row"),
        }
        if i == 0:
            frames["items"] = self.items
        for name, df in frames.items():
            schema.check(df, name, where=f"prepare shard {i}")
        return frames

    def _lists(self, uid, split, first_id, item_ids, labels, unrated) -> list[tuple]:
        rng = np.random.default_rng([self.seed, uid])  # per user: shards and resumes draw the same
        cs, ls = self.p.chunk_size, self.p.list_size
        out = []
        for k, start in enumerate(range(0, len(item_ids), cs)):
            chunk, lab = item_ids[start:start + cs], labels[start:start + cs]
            neg = rng.choice(unrated, size=ls - len(chunk), replace=False)
            ids = np.concatenate([chunk, neg])
            lab = np.concatenate([lab, np.zeros(len(neg), dtype=lab.dtype)])
            perm = rng.permutation(ls)
            out.append((first_id + k, uid, split, ids[perm].tolist(), lab[perm].tolist()))
        return out

    def _prompt(self, uid: int, split: str, lines: list[str]) -> tuple:
        u = self.users.row(uid - 1, named=True)  # users are sorted by dense id
        head = prompts.prompt_head(self.domain, u["gender"], u["age"], u["occupation"])
        tail = prompts.instruction(self.domain, self.p.instruction)
        return (uid, split, self.domain, head, lines, tail, prompts.join_prompt(head, lines, tail))

    def summary(self) -> dict:
        pu = self.per_user
        by_split = pu.group_by("split").agg(users=pl.len(), lists=pl.col("n_lists").sum()).sort("split")
        return {
            "dataset": self.ds.name, "layout": self.ds.layout, "domain": self.domain,
            "positive_threshold": self.threshold, "history_max": self.history_max,
            "n_users": self.users.height, "n_items": self.n_items, "n_interactions": self.interactions.height,
            "positive_rate": round(float(self.interactions["label"].cast(pl.Float64).mean()), 4),
            "users_by_split": {r["split"]: r["users"] for r in by_split.iter_rows(named=True)},
            "lists_by_split": {r["split"]: int(r["lists"]) for r in by_split.iter_rows(named=True)},
            "partial_chunk_lists": int(pu["partial"].sum()),
        }
