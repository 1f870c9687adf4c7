"""Fake sub-stages for the evaluate stage's tests: sample / encode / train-reranker / score / the base LLM,
each a real rlrf.store.Stage whose outputs follow rlrf/schema.py and whose metrics are simple functions
of (backbone, generator, seed), so the tables can be checked against values worked out by hand.

Used in-process (monkeypatched into sys.modules) and from a subprocess for the kill -9 resume test:
    python tests/evaluate_fakes.py RUNS_DIR WORK_LOG
"""

from __future__ import annotations

import sys
import types
import zlib
from pathlib import Path

import polars as pl
import torch

from rlrf import runs
from rlrf.config import load_recipe
from rlrf.files import write_json
from rlrf.schema import SCHEMAS
from rlrf.store import Stage

REPO = Path(__file__).resolve().parent.parent
USERS = {1: "train", 2: "train", 3: "valid", 4: "test", 5: "test"}
# evaluate.workers=1: the fake modules live in this process, not in a spawned worker's
OVERRIDES = ["evaluate.backbones=[dlcm,prm]", "evaluate.seeds=[1,2,3]", "evaluate.rounds=[1]", "evaluate.workers=1"]


class WorkLog(list):
    """(stage, dir) of every fake sub-stage that did work (not 'up to date'); mirrored to a file if given."""

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path, self.loads, self.temperatures = path, [], {}

    def append(self, item):
        super().append(item)
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{item[0]}\t{item[1]}\n")


def recipe(runs_dir: Path, *over: str):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [f"runs_dir={runs_dir}", *OVERRIDES, *over])


def _finished(d: Path, name: str) -> None:
    with Stage(d, name, {"synthetic": name}, quiet=True) as st:
        st.finish()


def _write(d, name: str, config: dict, inputs: list, artifact: str, rows: list[dict], work: list) -> Path:
    with Stage(d, name, config, inputs=inputs, quiet=True) as st:
        if not st.done:
            work.append((name, str(d)))
            for i in st.todo(1):
                st.write_shard(i, {artifact: pl.DataFrame(rows, schema=SCHEMAS[artifact])})
            st.finish()
    return Path(d)


def _gen_index(path) -> int:
    """Which generator a fake artifact belongs to: evaluate/gen_<k>/..."""
    return int(next(p for p in Path(path).parts if p.startswith("gen_")).split("_")[1])


def modules(work: WorkLog) -> dict[str, types.ModuleType]:
    """Fake rlrf.sample / rlrf.encode / rlrf.rerank_train / rlrf.score / rlrf.llm modules."""

    def sample_stage(recipe, out_dir, generator, round, *, splits=None, n=None, max_users=None, batch_size=None,
                     force=False, shard=None, source=None):
        # every generator with the first evaluated round's seeds, offered that round's sample and check to take from,
        # in decode batches of evaluate.batch_size
        assert round == min(recipe.evaluate.rounds) and runs.stage_dir(recipe, "sample", round) in source
        assert batch_size == recipe.evaluate.batch_size
        k = _gen_index(out_dir)
        work.temperatures[k] = recipe.sample.temperature
        rows = [{"run": recipe.run, "round": round, "split": s, "user_id": u, "sample_idx": i,
                 "prompt": "p", "text": f"likes comedy and drama round {k} user {u}", "n_tokens": 7 + k,
                 "finish_reason": "eos", "n_history_trimmed": 0, "generator": generator, "generator_hash": str(k),
                 "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 10 * u + i}
                for u, s in USERS.items() for i in range(n)]
        return _write(out_dir, "sample", {"generator": generator, "round": round, "n": n, "max_users": max_users},
                      [], "profiles", rows, work)

    def encode_stage(recipe, profiles_dir, out_dir, *, force=False):
        rows = [{"user_id": u, "sample_idx": 0, "split": s, "text_hash": f"h{u}"} for u, s in USERS.items()]
        return _write(out_dir, "encode", {"encode": "fake"}, [profiles_dir], "user_texts", rows, work)

    def train_stage(recipe, out_dir, knowledge_dir, *, backbone=None, knowledge=None, seeds=None, history=None,
                    force=False, progress=True):
        assert history == recipe.evaluate.history  # the evaluation rerankers get evaluate.history
        k = None if knowledge_dir is None else _gen_index(knowledge_dir)
        out_dir = Path(out_dir)
        # map@5 = 0.30 (+0.05 with knowledge, +0.02 per round) (+0.10 for PRM) + 0.01 * seed
        m = 0.30 + (0 if k is None else 0.05 + 0.02 * k) + (0.10 if backbone == "prm" else 0.0)
        per_seed = {str(s): {"test": {"map@5": m + 0.01 * s, "ndcg@5": m + 0.1 + 0.01 * s, "map@3": m, "ndcg@3": m,
                                      "map@7": m, "ndcg@7": m}, "valid": {"map@5": m}} for s in seeds}
        rows = [{"user_id": 4, "list_id": 1, "split": "test", "seed": s, "scores": [0.5], "labels": [1]}
                for s in seeds]
        with Stage(out_dir, "train-reranker", {"b": backbone, "k": knowledge, "seeds": seeds},
                   inputs=[knowledge_dir] if knowledge_dir else [], quiet=True) as st:
            if not st.done:
                work.append(("train-reranker", str(out_dir)))
                write_json(out_dir / "metrics.json", {"seeds": seeds, "per_seed": per_seed, "n_lists": {"test": 2}})
                for i in st.todo(1):
                    st.write_shard(i, {"predictions": pl.DataFrame(rows, schema=SCHEMAS["predictions"])})
                st.finish()
        return out_dir

    def score_stage(recipe, profiles_dir, encode_dir, reranker_dir, out_dir, *, force=False, splits=None):
        k = _gen_index(profiles_dir)
        rows = [{"run": recipe.run, "round": 0, "split": s, "user_id": u, "sample_idx": 0,
                 "reward": 0.40 + 0.01 * u + 0.10 * k, "n_lists": 2, "empty_text": False} for u, s in USERS.items()
                if splits is None or s in splits]
        return _write(out_dir, "score", {"score": "fake"}, [profiles_dir, encode_dir, reranker_dir], "scores", rows,
                      work)

    class Tok:
        pad_token_id = eos_token_id = 0
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2 + zlib.crc32(w.encode()) % 8 for w in text.split()]}

    class Uniform(torch.nn.Module):
        """Every next token equally likely among 10: perplexity exactly 10."""

        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))

    def load_generator(name, dtype="auto"):
        work.loads.append(name)
        return Uniform(), Tok()

    def weights_hash(path):
        """A generator's 'weights' are the text of weights.txt in its directory."""
        f = Path(path) / "weights.txt"
        return f.read_text() if f.is_file() else "w0"

    import importlib

    out = {}
    for name, fns in (("rlrf.sample", [sample_stage]), ("rlrf.encode", [encode_stage]), ("rlrf.rerank_train", [train_stage]),
                      ("rlrf.score", [score_stage]), ("rlrf.llm", [load_generator, weights_hash])):
        out[name] = types.ModuleType(name)
        # the rest of the real module stays (the trainer modules import rlrf.llm's constants when runs.STAGES is read)
        out[name].__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items() if not k.startswith("__")})
        for fn in fns:
            setattr(out[name], fn.__name__, fn)
    return out


def make_run(runs_dir: Path):
    """A run with a finished prepare (items, interactions), round 1's dpo and the reward reranker."""
    r = recipe(runs_dir)
    items = [{"item_id": 1, "raw_item_id": "1", "title": "Toy Story (1995)", "year": 1995,
              "genres": ["Animation", "Comedy"], "attribute_id": 1, "text": "Toy Story"}]
    inter = [{"user_id": u, "item_id": 1, "rating": 4.0, "timestamp": 0, "label": 1, "position": 0,
              "in_history": u != 5} for u in USERS]  # user 5's profile names Comedy, but not from its history
    with Stage(runs.prepare_dir(r), "prepare", {"synthetic": True}, quiet=True) as st:
        for i in st.todo(1):
            st.write_shard(i, {"items": pl.DataFrame(items, schema=SCHEMAS["items"]),
                               "interactions": pl.DataFrame(inter, schema=SCHEMAS["interactions"])})
        st.finish()
    _finished(runs.stage_dir(r, "dpo", 1), "dpo")
    _finished(runs.reranker_dir(r, 1), "train-reranker")
    return r


if __name__ == "__main__":
    runs_dir, log = sys.argv[1], sys.argv[2]
    sys.modules.update(modules(WorkLog(log)))
    from rlrf.evaluate import evaluate_stage

    evaluate_stage(recipe(Path(runs_dir)), recipe_path="recipes/tiny.yaml")
