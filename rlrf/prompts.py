"""KAR's prompts: the user prompt (preference reasoning), the item prompt (factual knowledge), and
the metadata item text.

A user prompt is kept in three parts so the sample stage can drop the oldest history lines to fit a
token budget and rebuild it with `join_prompt(head, lines, tail)`:

    Given a male user who is aged 24 and a technician, this user's movie viewing history over time is listed below.
    "Toy Story", 5 stars;
    ...
    Analyze user's preferences on movies (consider factors like genre, ...). Provide clear explanations ...
"""

from __future__ import annotations

DOMAINS = ("movies", "books")

FACTORS = {
    "movies": "genre, director/actors, time period/country, character, plot/theme, mood/tone, critical "
              "acclaim/award, production quality, and soundtrack",
    "books": "genre, author, writing style, theme, setting, length and complexity, time period, literary "
             "quality, critical acclaim",
}
HISTORY = {"movies": "movie viewing history", "books": "book reading history"}
NOUN = {"movies": "movie", "books": "book"}
ITEM_FACTORS = {
    "movies": "genre, director/cast, country, character, plot/theme, mood/tone, critical acclaim/award, "
              "production quality, and soundtrack",
    "books": "genre, author, writing style, theme, setting, length and complexity, time period, literary "
             "quality, and critical acclaim",
}

# occupation word (ML-100K's words, ML-1M's code words) -> the phrase after "aged X and"
OCCUPATIONS = {
    "administrator": "an administrator", "artist": "an artist", "doctor": "a doctor", "educator": "an educator",
    "engineer": "an engineer", "entertainment": "working in entertainment", "executive": "an executive",
    "healthcare": "working in healthcare", "homemaker": "a homemaker", "lawyer": "a lawyer",
    "librarian": "a librarian", "marketing": "working in marketing", "none": "not employed",
    "other": "in an unknown occupation", "programmer": "a programmer", "retired": "retired",
    "salesman": "a salesman", "scientist": "a scientist", "student": "a student", "technician": "a technician",
    "writer": "a writer",
    "academic/educator": "an academic/educator", "clerical/admin": "a clerical/admin worker",
    "college/grad student": "a college/grad student", "customer service": "a customer service worker",
    "doctor/health care": "a doctor/health care worker", "executive/managerial": "an executive/manager",
    "farmer": "a farmer", "K-12 student": "a K-12 student", "sales/marketing": "a sales/marketing worker",
    "self-employed": "self-employed", "technician/engineer": "a technician/engineer",
    "tradesman/craftsman": "a tradesman/craftsman", "unemployed": "unemployed",
}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def occupation_phrase(occupation: str) -> str:
    if occupation in OCCUPATIONS:
        return OCCUPATIONS[occupation]
    return ("an " if occupation[:1].lower() in "aeiou" else "a ") + occupation


def rating_text(rating: float) -> str:
    return str(int(rating)) if float(rating).is_integer() else f"{rating:g}"


def prompt_head(domain: str, gender: str | None = None, age: str | None = None,
                occupation: str | None = None) -> str:
    """KAR's opening sentence, with whichever of gender / age / occupation the dataset has."""
    _check_domain(domain)
    who = f"a {gender} user" if gender else "a user"
    about = []
    if age:
        about.append(f"aged {age}")
    if occupation:
        about.append(occupation_phrase(occupation))
    if about:
        who += " who is " + " and ".join(about)
    return f"Given {who}, this user's {HISTORY[domain]} over time is listed below."


def history_line(title: str, rating: float, genres: list[str] | None = None) -> str:
    """One history line; with `genres` (prepare.history_genres) the item's genres follow its title."""
    named = f' ({", ".join(genres)})' if genres else ""
    return f'"{title}"{named}, {rating_text(rating)} stars;'


def prompt_tail(domain: str) -> str:
    _check_domain(domain)
    return (f"Analyze user's preferences on {domain} (consider factors like {FACTORS[domain]}). Provide clear "
            f"explanations based on relevant details from the user's {HISTORY[domain]} and other pertinent factors.")


INSTRUCTIONS = ("kar", "genres")


def instruction(domain: str, kind: str = "kar") -> str:
    """The prompt's closing request (prepare.instruction).

    kar     KAR's request: analyse the user's preferences over many factors, with explanations (long answers).
    genres  a short profile a small model can write from the history alone: the genres most frequent among the
            items the user rated highest, and two of those items (pair it with prepare.history_genres, so the
            genres are in the prompt to be counted).
    """
    _check_domain(domain)
    if kind == "kar":
        return prompt_tail(domain)
    if kind == "genres":
        what = "genres" if domain == "movies" else "categories"
        return (f"Which {what} does this user like most? Name the {what} that appear most among the {domain} this "
                f"user rated 4 or 5 stars, then name two of those {domain}, in two or three sentences.")
    raise ValueError(f"unknown instruction {kind!r}; expected one of {INSTRUCTIONS}")


def join_prompt(head: str, history_lines: list[str], tail: str) -> str:
    """The full user prompt from its parts (the sample stage calls this after trimming history lines)."""
    return "\n".join([head, *history_lines, tail])


def item_prompt(title: str, domain: str = "movies", year: int | None = None) -> str:
    """KAR's item prompt: asks the LLM for factual knowledge about one item."""
    _check_domain(domain)
    name = f"{title} ({year})" if year else title
    return (f"Introduce {NOUN[domain]} {name} and describe its attributes (including but not limited to "
            f"{ITEM_FACTORS[domain]}).")


def item_text(title: str, domain: str = "movies", year: int | None = None, genres: list[str] | None = None,
              author: str | None = None) -> str:
    """Factual item knowledge from metadata alone (what the encoder reads when no LLM item text exists)."""
    _check_domain(domain)
    parts = [f'{NOUN[domain].capitalize()}: "{title}"']
    if author:
        parts.append(f"by {author}")
    if year:
        parts.append(f"({year})")
    text = " ".join(parts) + "."
    if genres:
        text += f" {'Genres' if domain == 'movies' else 'Categories'}: {', '.join(genres)}."
    return text
