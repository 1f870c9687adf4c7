"""Shared test set-up: never touch the hub; keep torch to the cores we have."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real MovieLens-100K (fetched by `make data`); tests that need it skip with the fix when absent."""
    d = REPO / "data" / "raw" / "ml-100k"
    if not (d / "ml-100k.inter").is_file():
        pytest.skip("MovieLens-100K not fetched: run `make data`")
    return d
