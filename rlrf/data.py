"""Dataset loaders: each dataset's original files into one canonical form (ratings, items, users).

    ds = load_dataset(recipe.data, recipe.prepare)     # -> Dataset

Layouts read:
  ml-100k  recbole atomic files (ml-100k.inter / .item / .user, the embedded default, `make data`)
           or GroupLens's own (u.data, u.item, u.user); both give the same canonical rows
  ml-1m    GroupLens (ratings.dat, movies.dat, users.dat; `::`-separated, latin-1)
  amazon-books  Amazon Review Data 2018 (Books_5.json.gz reviews, meta_Books.json.gz), with KAR's
           user / item cores applied here

Canonical columns (raw ids are strings; dense ids are the prepare stage's business):
  ratings  raw_user_id, raw_item_id, rating (f64), timestamp (i64)
  items    raw_item_id, title, year (i32, null if unknown), genres (list[str], GroupLens order for
           MovieLens, category path for books), author (null for movies)
  users    raw_user_id, gender, age, occupation (words for the prompt; null where the data has none)
"""

from __future__ import annotations

import gzip
import html
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm import tqdm

from rlrf.config import DataConfig, PrepareConfig
from rlrf.errors import StageError


class DataError(StageError):
    """A dataset that is missing or malformed; the message names the file (and line) and the fix.
    (A StageError, so `rlrf.cli.run_main` prints it as one line and exits 2.)"""


# GroupLens's genre order (u.genre); recbole's `class` column keeps it.
ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
             "War", "Western"]

# MovieLens-1M README codes -> words (KAR maps them to words the same way for its prompts)
ML1M_AGES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
             "56": "56 and over"}
ML1M_OCCUPATIONS = {
    "0": "other", "1": "academic/educator", "2": "artist", "3": "clerical/admin", "4": "college/grad student",
    "5": "customer service", "6": "doctor/health care", "7": "executive/managerial", "8": "farmer",
    "9": "homemaker", "10": "K-12 student", "11": "lawyer", "12": "programmer", "13": "retired",
    "14": "sales/marketing", "15": "scientist", "16": "self-employed", "17": "technician/engineer",
    "18": "tradesman/craftsman", "19": "unemployed", "20": "writer",
}
GENDERS = {"M": "male", "F": "female"}

RATINGS_SCHEMA = {"raw_user_id": pl.Utf8, "raw_item_id": pl.Utf8, "rating": pl.Float64, "timestamp": pl.Int64}
ITEMS_SCHEMA = {"raw_item_id": pl.Utf8, "title": pl.Utf8, "year": pl.Int32, "genres": pl.List(pl.Utf8),
                "author": pl.Utf8}
USERS_SCHEMA = {"raw_user_id": pl.Utf8, "gender": pl.Utf8, "age": pl.Utf8, "occupation": pl.Utf8}

FETCH_HINTS = {
    "ml-100k": "run `make data` (or `python -m rlrf.fetch ml-100k`) to fetch the recbole layout into "
               "data/raw/ml-100k, or unzip GroupLens's ml-100k.zip there",
    "ml-1m": "download ml-1m.zip from https://grouplens.org/datasets/movielens/1m/ and unzip it there",
    "amazon-books": "download Books_5.json.gz (the 5-core reviews) and meta_Books.json.gz from the Amazon "
                    "Review Data (2018) page, https://nijianmo.github.io/amazon/index.html, into it",
}


@dataclass
class Dataset:
    name: str
    domain: str  # movies | books: picks the prompt's wording and factors
    layout: str
    path: Path
    ratings: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    dropped: Counter = field(default_factory=Counter)  # rows the loader removed, by reason


# ----------------------------------------------------------------------------- entry point


def load_dataset(data: DataConfig, prepare: PrepareConfig | None = None) -> Dataset:
    """Read `data.path` in its layout (auto-detected unless data.layout says) into a Dataset."""
    prepare = prepare or PrepareConfig()
    path = Path(data.path)
    layout = data.layout if data.layout != "auto" else detect_layout(data.dataset, path)
    if data.dataset == "ml-100k" and layout == "recbole":
        return load_recbole_ml100k(path)
    if data.dataset == "ml-100k" and layout == "grouplens":
        return load_grouplens_ml100k(path)
    if data.dataset == "ml-1m" and layout == "grouplens":
        return load_grouplens_ml1m(path)
    if data.dataset == "amazon-books" and layout == "amazon":
        return load_amazon_books(path, prepare.amazon_user_core, prepare.amazon_item_core)
    raise DataError(f"data.layout={layout!r} does not fit data.dataset={data.dataset!r}: ml-100k reads "
                    f"recbole or grouplens, ml-1m reads grouplens, amazon-books reads amazon (or use auto)")


EXPECTED = {
    ("ml-100k", "recbole"): ["ml-100k.inter", "ml-100k.item", "ml-100k.user"],
    ("ml-100k", "grouplens"): ["u.data", "u.item", "u.user"],
    ("ml-1m", "grouplens"): ["ratings.dat", "movies.dat", "users.dat"],
    ("amazon-books", "amazon"): ["Books_5.json.gz", "meta_Books.json.gz"],
}


def detect_layout(dataset: str, path: Path) -> str:
    """The first layout of `dataset` whose files are all in `path`; else an error naming them."""
    options = [(layout, files) for (ds, layout), files in EXPECTED.items() if ds == dataset]
    for layout, files in options:
        if all((path / f).is_file() for f in files):
            return layout
    expected = " or ".join(f"{', '.join(files)} ({layout} layout)" for layout, files in options)
    what = "does not exist" if not path.is_dir() else "lacks the dataset files"
    raise DataError(f"{path} (data.path) {what}: {dataset} expects {expected}. "
                    f"To get them: {FETCH_HINTS[dataset]}.")


def _require(path: Path, dataset: str, layout: str) -> None:
    missing = [f for f in EXPECTED[(dataset, layout)] if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path} (data.path) is missing {', '.join(missing)} for {dataset} in the {layout} "
                        f"layout. To get them: {FETCH_HINTS[dataset]}.")


# ----------------------------------------------------------------------------- line readers


def _split_lines(path: Path, sep: str, n_fields: int, what: str, encoding: str = "utf-8", header: bool = False):
    """Yield (line_number, fields) of a delimited text file; a malformed line names file and line."""
    with open(path, encoding=encoding, newline="") as f:
        for no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if (header and no == 1) or not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) != n_fields:
                raise DataError(f"{path}:{no}: expected {n_fields} {sep!r}-separated fields ({what}), got "
                                f"{len(parts)}: {line[:120]!r}. Is this the original file, uncorrupted?")
            yield no, parts


def _num(value: str, kind, path: Path, no: int, col: str):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise DataError(f"{path}:{no}: column {col} is {value!r}, expected a number") from None


def _ratings_frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=RATINGS_SCHEMA, orient="row")


def _title_year(raw_title: str, year_text: str | None) -> tuple[str, int | None]:
    """Canonical (title, year): the same for GroupLens's `Title (1995)` and recbole's split columns.

    recbole cut the last parenthesised group off GroupLens's title and took it as the year; a title
    like `Land Before Time III: ... (1995) (V)` thus became title `... (1995)`, year `V`. Both layouts
    go through this function so they agree: a non-numeric year is dropped and a trailing `(YYYY)` left
    in the title becomes the year. recbole also spells item 267's `unknown` title `unkonwn`.
    """
    title = raw_title.strip()
    year = int(year_text) if year_text and re.fullmatch(r"\d{4}", year_text.strip()) else None
    m = re.fullmatch(r"(.*\S)\s+\((\d{4})\)", title)
    if year is None and m:
        title, year = m.group(1), int(m.group(2))
    if title == "unkonwn":
        title = "unknown"
    return title, year


def _clean_genres(genres: list[str]) -> list[str]:
    # GroupLens's "unknown" genre flag means "no genre": leave the list empty (attribute id 0)
    return [g for g in genres if g and g != "unknown"]


# ----------------------------------------------------------------------------- MovieLens-100K


def load_recbole_ml100k(path: Path) -> Dataset:
    """recbole atomic files: tab-separated with a `name:type` header line."""
    path = Path(path)
    _require(path, "ml-100k", "recbole")
    inter = _recbole_table(path / "ml-100k.inter", ["user_id", "item_id", "rating", "timestamp"])
    ratings = _ratings_frame([(u, i, _num(r, float, f, no, "rating"), _num(t, int, f, no, "timestamp"))
                              for f, no, (u, i, r, t) in inter])
    items = []
    for f, no, (iid, title, year, cls) in _recbole_table(path / "ml-100k.item",
                                                         ["item_id", "movie_title", "release_year", "class"]):
        t, y = _title_year(title, year)
        items.append((iid, t, y, _clean_genres(cls.split(" ")), None))
    users = [(uid, GENDERS.get(g, g), age, occ)
             for f, no, (uid, age, g, occ) in _recbole_table(path / "ml-100k.user",
                                                             ["user_id", "age", "gender", "occupation"])]
    return Dataset("ml-100k", "movies", "recbole", path, ratings,
                   pl.DataFrame(items, schema=ITEMS_SCHEMA, orient="row"),
                   pl.DataFrame(users, schema=USERS_SCHEMA, orient="row"))


def _recbole_table(file: Path, columns: list[str]):
    """Yield (file, line number, [values of `columns`]) from a recbole atomic file."""
    with open(file, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{file}:1: header {header} lacks {missing}; expected a recbole atomic file "
                        f"with columns {columns} (`make data` fetches the right one)")
    idx = [names.index(c) for c in columns]
    for no, parts in _split_lines(file, "\t", len(names), " / ".join(names), header=True):
        yield file, no, [parts[i] for i in idx]


def load_grouplens_ml100k(path: Path) -> Dataset:
    """GroupLens's ml-100k: u.data (tab), u.item and u.user (`|`, latin-1)."""
    path = Path(path)
    _require(path, "ml-100k", "grouplens")
    f = path / "u.data"
    ratings = _ratings_frame([(u, i, _num(r, float, f, no, "rating"), _num(t, int, f, no, "timestamp"))
                              for no, (u, i, r, t) in _split_lines(f, "\t", 4, "user, item, rating, timestamp")])
    items = []
    f = path / "u.item"
    for no, p in _split_lines(f, "|", 5 + len(ML_GENRES), "id, title, release date, video date, url, "
                              "19 genre flags", encoding="latin-1"):
        m = re.fullmatch(r"(.*?)\s*\(([^()]*)\)", p[1].strip())  # recbole's cut: the last "(...)" is the year
        title, year = _title_year(*(m.groups() if m else (p[1], None)))
        flags = p[5:]
        if any(x not in ("0", "1") for x in flags):
            raise DataError(f"{f}:{no}: genre flags must be 0/1, got {flags}")
        items.append((p[0], title, year, _clean_genres([g for g, x in zip(ML_GENRES, flags) if x == "1"]), None))
    f = path / "u.user"
    users = [(p[0], GENDERS.get(p[2], p[2]), p[1], p[3])
             for no, p in _split_lines(f, "|", 5, "id, age, gender, occupation, zip", encoding="latin-1")]
    return Dataset("ml-100k", "movies", "grouplens", path, ratings,
                   pl.DataFrame(items, schema=ITEMS_SCHEMA, orient="row"),
                   pl.DataFrame(users, schema=USERS_SCHEMA, orient="row"))


# ----------------------------------------------------------------------------- MovieLens-1M


def load_grouplens_ml1m(path: Path) -> Dataset:
    """GroupLens's ml-1m: ratings.dat, movies.dat, users.dat, `::`-separated, latin-1."""
    path = Path(path)
    _require(path, "ml-1m", "grouplens")
    f = path / "ratings.dat"
    rows = [(u, i, _num(r, float, f, no, "rating"), _num(t, int, f, no, "timestamp"))
            for no, (u, i, r, t) in tqdm(_split_lines(f, "::", 4, "UserID::MovieID::Rating::Timestamp",
                                                      encoding="latin-1"), desc="ml-1m ratings", leave=False)]
    items = []
    for no, (iid, title, genres) in _split_lines(path / "movies.dat", "::", 3, "MovieID::Title::Genres",
                                                 encoding="latin-1"):
        t, y = _title_year(title, None)
        items.append((iid, t, y, _clean_genres(genres.split("|")), None))
    users = []
    f = path / "users.dat"
    for no, (uid, g, age, occ, _zip) in _split_lines(f, "::", 5, "UserID::Gender::Age::Occupation::Zip-code",
                                                     encoding="latin-1"):
        if age not in ML1M_AGES or occ not in ML1M_OCCUPATIONS:
            raise DataError(f"{f}:{no}: age {age!r} / occupation {occ!r} is not one of ML-1M's codes "
                            f"(ages {sorted(ML1M_AGES, key=int)}, occupations 0-20; see the ML-1M README)")
        users.append((uid, GENDERS.get(g, g), ML1M_AGES[age], ML1M_OCCUPATIONS[occ]))
    return Dataset("ml-1m", "movies", "grouplens", path, _ratings_frame(rows),
                   pl.DataFrame(items, schema=ITEMS_SCHEMA, orient="row"),
                   pl.DataFrame(users, schema=USERS_SCHEMA, orient="row"))


# ----------------------------------------------------------------------------- Amazon-Books 2018

REVIEW_FIELDS = {"reviewerID": pl.Utf8, "asin": pl.Utf8, "overall": pl.Float64, "unixReviewTime": pl.Int64}
META_FIELDS = {"asin": pl.Utf8, "title": pl.Utf8, "brand": pl.Utf8, "date": pl.Utf8, "category": pl.List(pl.Utf8)}


def _read_json_lines(file: Path, schema: dict, batch_lines: int = 500_000) -> pl.DataFrame:
    """A gzipped JSON-lines file in batches (Books_5 is ~27M lines); only `schema`'s fields are kept.

    polars parses each batch; if a batch fails, json.loads finds the offending line to name it.
    """
    frames, batch, first_no = [], [], 1
    bar = tqdm(desc=file.name, unit=" lines", unit_scale=True, leave=False)

    def flush():
        if not batch:
            return
        try:
            frames.append(pl.read_ndjson(io.BytesIO(b"".join(batch)), schema=schema))
        except Exception as e:  # noqa: BLE001 - locate the bad line, then report it
            for k, line in enumerate(batch):
                try:
                    json.loads(line)
                except ValueError as je:
                    raise DataError(f"{file}:{first_no + k}: not a JSON object ({je}): {line[:120]!r}. "
                                    f"Is the download complete?") from None
            raise DataError(f"{file}: lines {first_no}-{first_no + len(batch) - 1} do not fit the expected "
                            f"fields {list(schema)} ({e})") from None
        bar.update(len(batch))

    try:
        with gzip.open(file, "rb") as fh:
            for line in fh:
                if line.strip():
                    batch.append(line if line.endswith(b"\n") else line + b"\n")
                else:
                    batch.append(b"{}\n")  # keeps line numbers aligned; dropped below as all-null
                if len(batch) >= batch_lines:
                    flush()
                    first_no += len(batch)
                    batch = []
            flush()
    except (OSError, EOFError) as e:
        raise DataError(f"{file}: cannot read it as gzip ({e}); re-download it") from None
    finally:
        bar.close()
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def load_amazon_books(path: Path, user_core: int = 60, item_core: int = 40) -> Dataset:
    """Amazon Review Data 2018 books: 5-core reviews + metadata, then KAR's user/item cores.

    Cores are applied iteratively (drop users with < user_core ratings and items with < item_core,
    repeat until stable), after dropping reviews of items without a title and repeated
    (user, item) reviews (the earliest is kept).
    """
    path = Path(path)
    _require(path, "amazon-books", "amazon")
    dropped: Counter = Counter()
    rev = _read_json_lines(path / "Books_5.json.gz", REVIEW_FIELDS)
    bad = rev.filter(pl.any_horizontal(pl.all().is_null()))
    if bad.height:
        dropped["reviews_missing_fields"] += bad.height
        rev = rev.drop_nulls()
    rev = rev.rename({"reviewerID": "raw_user_id", "asin": "raw_item_id", "overall": "rating",
                      "unixReviewTime": "timestamp"}).select(list(RATINGS_SCHEMA))

    meta = _read_json_lines(path / "meta_Books.json.gz", META_FIELDS).filter(pl.col("asin").is_not_null())
    meta = meta.unique("asin", keep="first", maintain_order=True)
    items = pl.DataFrame([_book_item(r) for r in meta.iter_rows(named=True)], schema=ITEMS_SCHEMA, orient="row")
    items = items.filter(pl.col("title").is_not_null() & (pl.col("title") != ""))

    n = rev.height
    rev = rev.filter(pl.col("raw_item_id").is_in(items["raw_item_id"].implode()))
    dropped["reviews_item_without_title"] += n - rev.height
    n = rev.height
    rev = rev.sort(["raw_user_id", "raw_item_id", "timestamp"]).unique(["raw_user_id", "raw_item_id"],
                                                                       keep="first", maintain_order=True)
    dropped["reviews_repeated_user_item"] += n - rev.height
    n = rev.height
    while True:
        before = rev.height
        rev = rev.filter(pl.len().over("raw_user_id") >= user_core)
        rev = rev.filter(pl.len().over("raw_item_id") >= item_core)
        if rev.height == before:
            break
    dropped["reviews_below_core"] += n - rev.height
    items = items.filter(pl.col("raw_item_id").is_in(rev["raw_item_id"].unique().implode()))
    users = pl.DataFrame({"raw_user_id": rev["raw_user_id"].unique().sort()}).with_columns(
        gender=pl.lit(None, pl.Utf8), age=pl.lit(None, pl.Utf8), occupation=pl.lit(None, pl.Utf8))
    return Dataset("amazon-books", "books", "amazon", path, rev, items, users, dropped)


def _book_item(r: dict) -> tuple:
    title = html.unescape(r["title"] or "").strip() or None
    author = (r["brand"] or "").strip()
    # the 2018 metadata keeps a book's author in `brand`, often as "Visit Amazon's <name> Page"
    author = re.sub(r"^Visit Amazon's\s+(.*?)\s+Page$", r"\1", author)
    author = html.unescape(author) or None
    m = re.search(r"\b(1[5-9]\d\d|20\d\d)\b", r["date"] or "")
    cats = [html.unescape(c).strip() for c in (r["category"] or []) if c and c.strip()]
    cats = [c for c in cats if c != "Books"]  # every item here is a book: the root says nothing
    return (r["asin"], title, int(m.group(1)) if m else None, cats, author)
