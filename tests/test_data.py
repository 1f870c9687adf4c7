"""Dataset loaders on tiny fixtures in each dataset's original format, and the KAR prompts."""

import gzip
import shutil
from pathlib import Path

import polars as pl
import pytest

from rlrf import prompts
from rlrf.config import DataConfig
from rlrf.data import (
    DataError,
    detect_layout,
    load_amazon_books,
    load_dataset,
    load_grouplens_ml1m,
    load_grouplens_ml100k,
    load_recbole_ml100k,
)

FIX = Path(__file__).parent / "fixtures"


def _sorted(df: pl.DataFrame, *keys: str) -> pl.DataFrame:
    return df.sort(list(keys))


def test_grouplens_and_recbole_layouts_give_the_same_canonical_rows():
    rec = load_recbole_ml100k(FIX / "ml-100k-recbole")
    gl = load_grouplens_ml100k(FIX / "ml-100k-grouplens")
    assert rec.ratings.height == gl.ratings.height == 73
    assert _sorted(rec.ratings, "raw_user_id", "raw_item_id").equals(_sorted(gl.ratings, "raw_user_id", "raw_item_id"))
    assert _sorted(rec.items, "raw_item_id").equals(_sorted(gl.items, "raw_item_id"))
    assert _sorted(rec.users, "raw_user_id").equals(_sorted(gl.users, "raw_user_id"))


def test_movielens_titles_years_and_genres_are_normalised():
    items = {r["raw_item_id"]: r for r in load_grouplens_ml100k(FIX / "ml-100k-grouplens").items.iter_rows(named=True)}
    # only the last "(...)" is the year; an alternative title in parentheses stays
    assert (items["121"]["title"], items["121"]["year"]) == ("Independence Day (ID4)", 1996)
    assert items["121"]["genres"] == ["Action", "Sci-Fi", "War"]  # GroupLens order
    # item 267 has no title year or date; recbole spells it "unkonwn"
    assert (items["267"]["title"], items["267"]["year"], items["267"]["genres"]) == ("unknown", None, [])
    # latin-1 decoded
    assert items["543"]["title"] == "Misérables, Les"
    # "(1995) (V)": recbole kept "(1995)" in the title with year "V"; both become title + 1995
    assert items["1412"]["title"] == "Land Before Time III: The Time of the Great Giving"
    assert items["1412"]["year"] == 1995
    assert items["1373"]["genres"] == []  # the "unknown" genre flag means no genre


def test_ml100k_users_and_ratings():
    ds = load_recbole_ml100k(FIX / "ml-100k-recbole")
    u1 = ds.users.filter(pl.col("raw_user_id") == "1").row(0, named=True)
    assert u1 == {"raw_user_id": "1", "gender": "male", "age": "24", "occupation": "technician"}
    assert ds.ratings.schema == {"raw_user_id": pl.Utf8, "raw_item_id": pl.Utf8, "rating": pl.Float64,
                                 "timestamp": pl.Int64}
    assert set(ds.ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (ds.name, ds.domain, ds.layout) == ("ml-100k", "movies", "recbole")


def test_ml1m_codes_become_words_and_latin1_titles_decode():
    ds = load_grouplens_ml1m(FIX / "ml-1m")
    users = {r["raw_user_id"]: r for r in ds.users.iter_rows(named=True)}
    assert users["1"] == {"raw_user_id": "1", "gender": "female", "age": "under 18", "occupation": "K-12 student"}
    assert (users["2"]["age"], users["2"]["occupation"]) == ("56 and over", "self-employed")
    items = {r["raw_item_id"]: r for r in ds.items.iter_rows(named=True)}
    assert items["3409"]["title"] == "Cité des enfants perdus, La (City of Lost Children, The)"
    assert items["3409"]["year"] == 1995 and items["3409"]["genres"] == ["Adventure", "Sci-Fi"]
    assert ds.ratings.height == 57 and ds.ratings["timestamp"].min() > 978300000


def test_amazon_books_cores_dedupe_and_metadata():
    ds = load_amazon_books(FIX / "amazon-books", user_core=4, item_core=3)
    # reviewer 5 has 3 reviews (< 4): gone; then book 0000041696 keeps 1 reader (< 3): gone;
    # book 0000055093 has no title: its review is dropped before the cores
    assert sorted(ds.users["raw_user_id"]) == ["A1ZZ0000000001", "A1ZZ0000000002", "A1ZZ0000000003",
                                               "A1ZZ0000000004", "A1ZZ0000000006"]
    assert "0000041696" not in ds.items["raw_item_id"].to_list()
    assert ds.ratings.height == 28
    assert dict(ds.dropped) == {"reviews_item_without_title": 1, "reviews_repeated_user_item": 1,
                                "reviews_below_core": 4}
    # the repeated review (later, 1 star) lost to the first one
    first = ds.ratings.filter((pl.col("raw_user_id") == "A1ZZ0000000001") & (pl.col("raw_item_id") == "0000000116"))
    assert first.height == 1 and first["timestamp"][0] < 1302000000
    hp = ds.items.filter(pl.col("raw_item_id") == "0000000116").row(0, named=True)
    assert hp["title"] == "Harry Potter and the Sorcerer's Stone"  # HTML entity unescaped
    assert hp["author"] == "J.K. Rowling"  # from "Visit Amazon's J.K. Rowling Page"
    assert hp["year"] == 1998 and hp["genres"] == ["Children's Books", "Literature & Fiction"]
    assert ds.users["gender"].null_count() == ds.users.height  # no demographics in Amazon data
    assert ds.domain == "books"


def test_layout_detection_and_missing_directory_message(tmp_path):
    assert detect_layout("ml-100k", FIX / "ml-100k-recbole") == "recbole"
    assert detect_layout("ml-100k", FIX / "ml-100k-grouplens") == "grouplens"
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="ml-100k", path=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "does not exist" in msg and "u.data" in msg and "ml-100k.inter" in msg and "make data" in msg
    with pytest.raises(DataError, match="ratings.dat, movies.dat, users.dat.*grouplens.org"):
        load_dataset(DataConfig(dataset="ml-1m", path=str(tmp_path)))
    with pytest.raises(DataError, match="Books_5.json.gz, meta_Books.json.gz"):
        load_dataset(DataConfig(dataset="amazon-books", path=str(tmp_path)))
    with pytest.raises(DataError, match="does not fit"):
        load_dataset(DataConfig(dataset="ml-1m", path=str(FIX / "ml-1m"), layout="recbole"))


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_malformed_lines_name_file_and_line(tmp_path):
    d = _copy(FIX / "ml-100k-grouplens", tmp_path)
    lines = (d / "u.data").read_text().splitlines()
    lines[4] = "1\t117\t5"  # a field short
    (d / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u\.data:5: expected 4 '\\t'-separated fields"):
        load_grouplens_ml100k(d)

    d = _copy(FIX / "ml-100k-recbole", tmp_path)
    with open(d / "ml-100k.inter", "a") as f:
        f.write("3\t117\tfive\t880000000\n")
    n = len((d / "ml-100k.inter").read_text().splitlines())
    with pytest.raises(DataError, match=rf"ml-100k\.inter:{n}: column rating is 'five'"):
        load_recbole_ml100k(d)

    d = _copy(FIX / "ml-1m", tmp_path)
    with open(d / "users.dat", "a") as f:
        f.write("6::M::30::4::12345\n")  # 30 is no ML-1M age code
    with pytest.raises(DataError, match=r"users\.dat:6: age '30'"):
        load_grouplens_ml1m(d)

    d = _copy(FIX / "amazon-books", tmp_path)
    raw = gzip.decompress((d / "Books_5.json.gz").read_bytes()).splitlines(keepends=True)
    raw.insert(2, b'{"overall": 5.0, "reviewerID": \n')
    (d / "Books_5.json.gz").write_bytes(gzip.compress(b"".join(raw)))
    with pytest.raises(DataError, match=r"Books_5\.json\.gz:3: not a JSON object"):
        load_amazon_books(d, 4, 3)


# ----------------------------------------------------------------------------- prompts


def test_user_prompt_movies_kar_wording():
    head = prompts.prompt_head("movies", "male", "24", "technician")
    assert head == ("Given a male user who is aged 24 and a technician, this user's movie viewing history "
                    "over time is listed below.")
    assert prompts.prompt_head("movies", "female", "53", "other").endswith(
        "aged 53 and in an unknown occupation, this user's movie viewing history over time is listed below.")
    assert prompts.history_line("Toy Story", 5.0) == '"Toy Story", 5 stars;'
    assert prompts.history_line("Dune", 4.5) == '"Dune", 4.5 stars;'
    tail = prompts.prompt_tail("movies")
    assert tail == ("Analyze user's preferences on movies (consider factors like genre, director/actors, time "
                    "period/country, character, plot/theme, mood/tone, critical acclaim/award, production "
                    "quality, and soundtrack). Provide clear explanations based on relevant details from the "
                    "user's movie viewing history and other pertinent factors.")
    assert prompts.join_prompt(head, ["a", "b"], tail) == f"{head}\na\nb\n{tail}"


def test_prompt_options_genres_in_history_and_the_genres_instruction():
    assert prompts.history_line("Dune", 4.0, ["Sci-Fi", "Drama"]) == '"Dune" (Sci-Fi, Drama), 4 stars;'
    assert prompts.history_line("Dune", 4.0, []) == '"Dune", 4 stars;'  # an item without genres: no empty ()
    assert prompts.instruction("movies", "kar") == prompts.prompt_tail("movies")
    assert prompts.instruction("movies", "genres") == (
        "Which genres does this user like most? Name the genres that appear most among the movies this user rated "
        "4 or 5 stars, then name two of those movies, in two or three sentences.")
    assert "Which categories" in prompts.instruction("books", "genres") and "books" in prompts.instruction("books", "genres")
    with pytest.raises(ValueError, match="unknown instruction 'poem'"):
        prompts.instruction("movies", "poem")


def test_user_prompt_books_has_no_demographics():
    assert prompts.prompt_head("books") == ("Given a user, this user's book reading history over time is "
                                            "listed below.")
    assert "genre, author, writing style, theme, setting, length and complexity, time period, literary " \
           "quality, critical acclaim" in prompts.prompt_tail("books")


def test_item_prompt_and_text():
    assert prompts.item_prompt("Toy Story") == (
        "Introduce movie Toy Story and describe its attributes (including but not limited to genre, "
        "director/cast, country, character, plot/theme, mood/tone, critical acclaim/award, production "
        "quality, and soundtrack).")
    assert prompts.item_prompt("Toy Story", year=1995).startswith("Introduce movie Toy Story (1995) and")
    assert prompts.item_prompt("Dune", "books").startswith("Introduce book Dune and describe its attributes")
    assert prompts.item_text("Toy Story", "movies", 1995, ["Animation", "Comedy"]) == \
        'Movie: "Toy Story" (1995). Genres: Animation, Comedy.'
    assert prompts.item_text("Dune", "books", None, ["Science Fiction"], "Frank Herbert") == \
        'Book: "Dune" by Frank Herbert. Categories: Science Fiction.'
    with pytest.raises(ValueError, match="unknown domain"):
        prompts.item_prompt("x", "music")
