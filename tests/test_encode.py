"""The encode stage: the offline MiniLM, the embedding cache (nothing is encoded twice), resume."""

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from rlrf import runs
from rlrf.artifacts import read_artifact
from rlrf.encode import EmbeddingCache, encode_stage, encoder_id, text_key, within_user_cosine
from tests.reward_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.reward_fixtures import make_recipe, write_prepare, write_profiles

LONG = "The user loves slow, atmospheric dramas with morally complex characters. " * 40  # > 256 tokens


def texts(n_users=6):
    return {u: [f"User {u} enjoys {g} films from the {d}s." for g, d in (("noir", 1940), ("space opera", 1980))]
            for u in range(1, n_users + 1)}


def test_key_depends_on_encoder_and_text(tmp_path):
    a = make_recipe(tmp_path).encode
    b = make_recipe(tmp_path, "encode.max_seq_length=128").encode
    assert text_key(encoder_id(a), "x") != text_key(encoder_id(b), "x") != text_key(encoder_id(b), "y")
    assert text_key(encoder_id(a), "x") == text_key(encoder_id(a), "x")


def test_cache_is_append_only_and_reloads(tmp_path):
    c = EmbeddingCache(tmp_path, "enc")
    c.add(["a", "b"], np.array([[1, 0], [0, 1]], dtype=np.float32))
    c.add(["c"], np.array([[2, 2]], dtype=np.float32))
    again = EmbeddingCache(tmp_path, "enc")
    assert len(again) == 3 and len(list(again.dir.glob("part-*.parquet"))) == 2
    np.testing.assert_array_equal(again.get(["c", "a"]), [[2, 2], [1, 0]])
    assert len(EmbeddingCache(tmp_path, "another encoder")) == 0
    with pytest.raises(Exception, match="no embedding"):
        again.get(["zzz"])


def test_within_user_cosine_by_hand():
    v = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    # user 1: orthogonal pair -> 0; user 2: identical pair -> 1
    assert within_user_cosine(np.array([1, 1, 2, 2]), v) == pytest.approx(0.5)


def test_encode_stage_caches_across_rounds(tmp_path):
    recipe = make_recipe(tmp_path)
    write_prepare(recipe, n_users=6, n_items=12)
    t = texts()
    t[1][1] = ""      # an empty profile still gets an embedding (and is counted)
    t[2][0] = LONG    # truncated at 256 tokens (and counted)
    p1 = write_profiles(recipe, runs.stage_dir(recipe, "sample", 1), t, n_users=6)
    e1 = encode_stage(recipe, p1, runs.stage_dir(recipe, "encode", 1))
    info = json.loads((e1 / "stage.json").read_text())
    assert info["encoded_this_run"] == 12 + 12 and info["dim"] == 384
    assert info["empty_text"] == 1 and info["truncated_share"] == pytest.approx(1 / 12)
    ut = read_artifact(e1, "user_texts")
    it = read_artifact(e1, "item_texts")
    assert ut.height == 12 and it.height == 12
    cache = EmbeddingCache(runs.embeddings_cache(recipe), encoder_id(recipe.encode))
    v = cache.get(ut.sort("user_id", "sample_idx")["text_hash"].to_list())
    assert np.isfinite(v).all() and not np.allclose(v[2], v[3])  # a user's profiles embed differently
    # semantic sanity: the same genre's profiles are closer than different genres'
    noir, space = v[[2 * i for i in range(2, 6)]], v[[2 * i + 1 for i in range(2, 6)]]
    assert (noir @ noir.T).mean() > (noir @ space.T).mean()
    parts = len(list(cache.dir.glob("part-*.parquet")))
    # round 2 samples the same texts plus one new one: only the new one is encoded
    t2 = {**t, 7: ["User 7 enjoys musicals."]}
    p2 = write_profiles(recipe, runs.stage_dir(recipe, "sample", 2), t2, n_users=6, round=2)
    e2 = encode_stage(recipe, p2, runs.stage_dir(recipe, "encode", 2))
    assert json.loads((e2 / "stage.json").read_text())["encoded_this_run"] == 1
    assert len(list(cache.dir.glob("part-*.parquet"))) == parts + 1
    ut2 = read_artifact(e2, "user_texts").sort("user_id", "sample_idx")
    assert ut2.filter(pl.col("user_id") <= 6)["text_hash"].to_list() == ut.sort("user_id", "sample_idx")["text_hash"].to_list()


@pytest.mark.faults
def test_encode_resume_after_kill_gives_the_clean_rows(tmp_path):
    clean_r = make_recipe(tmp_path / "clean")
    killed_r = make_recipe(tmp_path / "killed")
    for r in (clean_r, killed_r):
        write_prepare(r, n_users=6, n_items=12)
        write_profiles(r, runs.stage_dir(r, "sample", 1), texts(), n_users=6)
    clean = encode_stage(clean_r, runs.stage_dir(clean_r, "sample", 1), runs.stage_dir(clean_r, "encode", 1))
    out = runs.stage_dir(killed_r, "encode", 1)
    code = (f"from tests.reward_fixtures import make_recipe; from rlrf.encode import encode_stage; "
            f"r = make_recipe({str(tmp_path / 'killed')!r}); "
            f"encode_stage(r, {str(runs.stage_dir(killed_r, 'sample', 1))!r}, {str(out)!r})")
    env = {**os.environ, "RLRF_KILL_AFTER_SHARDS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.getcwd(), capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((out / "_shards").glob("*.json"))) == 2 and not (out / "stage.json").exists()
    encode_stage(killed_r, runs.stage_dir(killed_r, "sample", 1), out)
    for art in ("user_texts", "item_texts"):
        a = read_artifact(out, art).sort(pl.all())
        b = read_artifact(clean, art).sort(pl.all())
        assert a.equals(b) and a.height == a.unique().height
    # the resumed run encoded only the shard that was not done (item texts were shard 0)
    assert json.loads((out / "stage.json").read_text())["encoded_this_run"] < 12


def test_item_text_appends_the_llm_item_knowledge_when_sampled(tmp_path):
    from rlrf.encode import item_texts
    from rlrf.schema import SCHEMAS
    from rlrf.store import Stage

    recipe = make_recipe(tmp_path)
    prep = write_prepare(recipe, n_users=6, n_items=12)
    plain = write_profiles(recipe, tmp_path / "plain", texts(), n_users=6)
    assert item_texts(prep, plain)["text"].to_list()[0] == "Movie 1 (1991) is a Drama film."
    know = pl.DataFrame({"item_id": [1, 2], "prompt": ["p", "p"], "text": ["A quiet drama about a farm.", " "],
                         "n_tokens": [7, 1], "finish_reason": ["eos", "eos"], "round": [1, 1], "generator": ["g", "g"],
                         "generator_hash": ["h", "h"], "seed": [1, 2]}, schema=SCHEMAS["item_knowledge"])
    d = tmp_path / "with_knowledge"
    with Stage(d, "sample", {"k": 1}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"item_knowledge": know})
        st.finish()
    got = item_texts(prep, d).sort("item_id")["text"].to_list()[:3]
    assert got == ["Movie 1 (1991) is a Drama film.\nA quiet drama about a farm.",
                   "Movie 2 (1992) is a Comedy film.",  # blank LLM text: metadata only
                   "Movie 3 (1993) is a Horror film."]  # no LLM text
