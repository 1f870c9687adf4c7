"""The prepare stage: the protocol of docs/protocol.md checked row by row on fixtures, layout equivalence,
resume after kill -9, and the real MovieLens-100K counts."""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from rlrf import prompts
from rlrf.artifacts import read_artifact, read_stage_json
from rlrf.config import load_recipe
from rlrf.errors import StageError
from rlrf.prepare import prepare_stage
from rlrf.store import SHARDS

FIX = Path(__file__).parent / "fixtures"
ARTIFACTS = {"users": ["user_id"], "items": ["item_id"], "interactions": ["user_id", "position"],
             "lists": ["list_id"], "prompts": ["user_id"]}


def make_recipe(tmp_path, fixture="ml-100k-recbole", run="t", *extra):
    return load_recipe(None, [f"runs_dir={tmp_path}", f"run={run}", f"data.path={FIX / fixture}",
                              "prepare.shards=3", *extra])


def read_all(d) -> dict[str, pl.DataFrame]:
    return {a: read_artifact(d, a, "prepare").sort(keys) for a, keys in ARTIFACTS.items()}


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    r = make_recipe(tmp)
    d = prepare_stage(r)
    return r, d, read_all(d)


def test_grouplens_and_recbole_layouts_prepare_identically(tmp_path, fixture_run):
    _, _, rec = fixture_run
    gl = read_all(prepare_stage(make_recipe(tmp_path, "ml-100k-grouplens", "gl")))
    for name in ARTIFACTS:
        assert rec[name].equals(gl[name]), name


def test_history_labels_and_time_order(fixture_run):
    _, d, a = fixture_run
    raw = pl.read_csv(FIX / "ml-100k-recbole" / "ml-100k.inter", separator="\t",
                      schema_overrides={"user_id:token": pl.Utf8, "item_id:token": pl.Utf8})
    raw.columns = ["u", "i", "r", "t"]
    users = a["users"]
    items = dict(zip(a["items"]["item_id"], a["items"]["raw_item_id"]))
    # user 7 rated 2 items: history (2+1)//2 = 1 < prepare.min_history = 2 -> dropped and counted
    assert "7" not in users["raw_user_id"].to_list() and users.height == 6
    assert read_stage_json(d)["dropped"] == {"users_short_history": 1, "ratings_of_dropped_users": 2}
    for u in users.iter_rows(named=True):
        mine = raw.filter(pl.col("u") == u["raw_user_id"]).sort(["t", "i"])  # ties: raw item id as a string
        got = a["interactions"].filter(pl.col("user_id") == u["user_id"])
        assert [items[i] for i in got["item_id"]] == mine["i"].to_list()
        assert got["position"].to_list() == list(range(mine.height))
        assert got["label"].to_list() == [int(x > 3) for x in mine["r"]]
        h = min((mine.height + 1) // 2, 30)
        assert u["n_history"] == h == int(got["in_history"].sum())
        assert got["in_history"].to_list() == [True] * h + [False] * (mine.height - h)


def test_lists_are_chunks_of_four_padded_with_never_rated_items(fixture_run):
    _, d, a = fixture_run
    partial = 0
    for u in a["users"].iter_rows(named=True):
        got = a["interactions"].filter(pl.col("user_id") == u["user_id"])
        rated = set(got["item_id"])
        rest = got.filter(~pl.col("in_history"))
        lists = a["lists"].filter(pl.col("user_id") == u["user_id"]).sort("list_id")
        assert lists.height == u["n_lists"] == math.ceil(rest.height / 4)
        partial += rest.height % 4 > 0
        seen = []
        for k, lst in enumerate(lists.iter_rows(named=True)):
            chunk = rest.slice(4 * k, 4)
            ids, labels = lst["item_ids"], lst["labels"]
            assert len(ids) == len(labels) == 10 and len(set(ids)) == 10
            in_chunk = [i for i in ids if i in rated]
            assert sorted(in_chunk) == sorted(chunk["item_id"])  # the k-th 4 consecutive rated items
            lab = dict(zip(chunk["item_id"], chunk["label"]))
            for i, y in zip(ids, labels):
                assert y == lab.get(i, 0)  # padding items: never rated, label 0
            assert lst["split"] == u["split"]
            seen += in_chunk
        assert sorted(seen) == sorted(rest["item_id"])  # each non-history rating in exactly one list
    info = read_stage_json(d)
    assert info["partial_chunk_lists"] == partial > 0
    assert sorted(a["lists"]["list_id"]) == list(range(a["lists"].height))


def test_split_ids_items_and_prompts(fixture_run):
    r, _, a = fixture_run
    users = a["users"]
    # dense ids in natural order of the raw ids; the split is random.Random(seed) over them
    assert users["raw_user_id"].to_list() == ["1", "2", "3", "4", "5", "6"]
    assert users["user_id"].to_list() == [1, 2, 3, 4, 5, 6]
    order = [1, 2, 3, 4, 5, 6]
    random.Random(r.seed).shuffle(order)
    expect = {u: "train" for u in order[:4]} | {u: "test" for u in order[4:]}  # int(6*.8)=4, int(6*.1)=0
    assert dict(zip(users["user_id"], users["split"])) == expect
    items = a["items"]
    raw = items["raw_item_id"].to_list()
    assert raw == sorted(raw, key=int) and items["item_id"].to_list() == list(range(1, len(raw) + 1))
    toy = items.filter(pl.col("raw_item_id") == "121").row(0, named=True)
    assert toy["text"] == 'Movie: "Independence Day (ID4)" (1996). Genres: Action, Sci-Fi, War.'
    assert (items.filter(pl.col("raw_item_id") == "267")["attribute_id"] == 0).all()  # no genre
    titles = dict(zip(items["item_id"], items["title"]))
    for p in a["prompts"].iter_rows(named=True):
        u = users.filter(pl.col("user_id") == p["user_id"]).row(0, named=True)
        hist = a["interactions"].filter((pl.col("user_id") == p["user_id"]) & pl.col("in_history"))
        assert p["history_lines"] == [prompts.history_line(titles[i], x) for i, x in zip(hist["item_id"], hist["rating"])]
        assert p["prompt_head"] == prompts.prompt_head("movies", u["gender"], u["age"], u["occupation"])
        assert p["prompt"] == prompts.join_prompt(p["prompt_head"], p["history_lines"], p["prompt_tail"])
        assert p["domain"] == "movies" and p["split"] == u["split"]


def test_prompt_options_name_genres_and_ask_for_them(tmp_path, fixture_run):
    """prepare.history_genres puts each history item's genres in its line, prepare.instruction=genres asks for
    the liked genres; everything else (lists, interactions) is the default run's, and the defaults leave the
    fingerprint as it was before the options existed."""
    from rlrf.config import fingerprint

    r0, _, a0 = fixture_run
    r = make_recipe(tmp_path, "ml-100k-recbole", "t", "prepare.history_genres=true", "prepare.instruction=genres")
    a = read_all(prepare_stage(r))
    assert a["lists"].equals(a0["lists"]) and a["interactions"].equals(a0["interactions"])
    items = a["items"]
    titles = dict(zip(items["item_id"], items["title"]))
    genres = dict(zip(items["item_id"].to_list(), items["genres"].to_list()))
    assert any(genres.values())
    for p in a["prompts"].iter_rows(named=True):
        hist = a["interactions"].filter((pl.col("user_id") == p["user_id"]) & pl.col("in_history"))
        assert p["history_lines"] == [prompts.history_line(titles[i], x, genres[i])
                                      for i, x in zip(hist["item_id"], hist["rating"])]
        assert p["prompt_tail"] == prompts.instruction("movies", "genres")
        assert p["prompt"] == prompts.join_prompt(p["prompt_head"], p["history_lines"], p["prompt_tail"])
    assert any("(" in line for line in a["prompts"]["history_lines"].explode().to_list())
    assert "history_genres" not in fingerprint(r0.prepare) and "instruction" not in fingerprint(r0.prepare)
    assert fingerprint(r.prepare)["history_genres"] is True and fingerprint(r.prepare)["instruction"] == "genres"
    with pytest.raises(ValueError, match="prepare.instruction"):
        make_recipe(tmp_path, "ml-100k-recbole", "t2", "prepare.instruction=poem")


def test_rerun_is_a_noop_and_changed_config_refuses(tmp_path):
    r = make_recipe(tmp_path)
    d = prepare_stage(r)
    stamp = (d / "stage.json").stat().st_mtime_ns
    parts = {p: p.stat().st_mtime_ns for p in d.rglob("*.parquet")}
    assert prepare_stage(r) == d
    assert (d / "stage.json").stat().st_mtime_ns == stamp
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.parquet")} == parts
    with pytest.raises(StageError, match="--force"):
        prepare_stage(make_recipe(tmp_path, "ml-100k-recbole", "t", "seed=7"))


@pytest.mark.faults
def test_resume_after_kill_gives_a_clean_runs_rows(tmp_path, fixture_run):
    _, _, clean = fixture_run
    code = ("import sys; from rlrf.config import load_recipe; from rlrf.prepare import prepare_stage; "
            "prepare_stage(load_recipe(None, sys.argv[1:]))")
    args = [f"runs_dir={tmp_path}", "run=killed", f"data.path={FIX / 'ml-100k-recbole'}", "prepare.shards=3"]
    env = {**os.environ, "RLRF_KILL_AFTER_SHARDS": "1"}
    res = subprocess.run([sys.executable, "-c", code, *args], check=False, env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == -9, res.stderr
    d = tmp_path / "killed" / "prepare"
    assert not (d / "stage.json").exists()
    assert len(list((d / SHARDS).glob("*.json"))) == 1  # one shard marker written before the kill
    out = prepare_stage(make_recipe(tmp_path, "ml-100k-recbole", "killed"))
    resumed = read_all(out)
    for name in ARTIFACTS:
        assert resumed[name].equals(clean[name]), name
    assert read_stage_json(out)["rows"]["lists"] == clean["lists"].height


def test_amazon_books_prepare_threshold_history_and_drops(tmp_path):
    r = make_recipe(tmp_path, "amazon-books", "books", "data.dataset=amazon-books", "prepare.amazon_user_core=4",
                    "prepare.amazon_item_core=3", "prepare.list_size=2", "prepare.chunk_size=1")
    d = prepare_stage(r)
    a = read_all(d)
    info = read_stage_json(d)
    assert info["positive_threshold"] == 4.0 and info["history_max"] == 15 and info["domain"] == "books"
    # 6 books left; lists of 1 rated + 1 never-rated book: the 3 readers of all 6 cannot be padded
    assert info["dropped"]["users_too_few_unrated_items"] == 3
    assert info["dropped"]["reviews_below_core"] == 4
    assert a["users"]["raw_user_id"].to_list() == ["A1ZZ0000000004", "A1ZZ0000000006"]
    assert (a["interactions"]["label"] == (a["interactions"]["rating"] > 4).cast(pl.Int8)).all()
    p = a["prompts"].row(0, named=True)
    assert p["domain"] == "books" and p["prompt_head"].startswith("Given a user, this user's book reading")
    assert len(p["history_lines"]) == 3  # (5 + 1) // 2
    assert "by J.K. Rowling" in a["items"].filter(pl.col("raw_item_id") == "0000000116")["text"][0]


def test_real_movielens_100k(tmp_path, ml100k_dir):
    r = load_recipe(None, [f"runs_dir={tmp_path}", "run=real", f"data.path={ml100k_dir}", "prepare.shards=2"])
    d = prepare_stage(r)
    info = read_stage_json(d)
    assert info["n_users"] == 943 and info["n_items"] == 1682 and info["n_interactions"] == 100000
    assert info["dropped"] == {}
    assert info["users_by_split"] == {"test": 95, "train": 754, "valid": 94}
    assert info["lists_by_split"]["test"] == 1704  # docs/protocol.md's seed-1234 reference
    lists = read_artifact(d, "lists", "prepare").filter(pl.col("split") == "test")
    labels = np.array(lists["labels"].to_list())
    # a perfect ranking's NDCG@k = share of lists holding a positive: docs/protocol.md's 0.864
    assert (labels.sum(axis=1) > 0).mean() == pytest.approx(0.864, abs=1e-3)


def test_ml1m_prepare_words_in_prompt(tmp_path):
    d = prepare_stage(make_recipe(tmp_path, "ml-1m", "m1", "data.dataset=ml-1m"))
    a = read_all(d)
    assert a["users"].height == 5 and read_stage_json(d)["layout"] == "grouplens"
    p = a["prompts"].filter(pl.col("user_id") == 1)["prompt_head"][0]
    assert p == ("Given a female user who is aged under 18 and a K-12 student, this user's movie viewing "
                 "history over time is listed below.")
    assert (a["lists"]["item_ids"].list.len() == 10).all()


def test_missing_dataset_leaves_no_stage_behind(tmp_path):
    bad = load_recipe(None, [f"runs_dir={tmp_path}", "run=x", f"data.path={tmp_path / 'none'}"])
    with pytest.raises(StageError, match="make data"):
        prepare_stage(bad)
    assert not (tmp_path / "x" / "prepare" / "stage.json").exists()  # nothing that looks finished
    assert prepare_stage(make_recipe(tmp_path, "ml-100k-recbole", "x")).joinpath("stage.json").is_file()
