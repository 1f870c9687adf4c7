"""Sampling backends with one output: N completions per prompt, each seeded on its own.

`HFBackend` (transformers, tuned for CPU) and `VLLMBackend` (vLLM's offline LLM.generate, for GPU
nodes) take tokenised prompts and one base seed per prompt; sample j of a prompt is drawn with seed
`base + j` (vLLM's own rule for SamplingParams(n=N, seed=base)). A completion depends only on its
prompt, its seed and the model: not on which other prompts share its batch.

Why the HF path is a hand-written loop rather than `model.generate(num_return_sequences=N)`:
  - each row samples with its own torch.Generator (one uniform draw per step, inverse CDF over the
    nucleus), so batch composition, resume and --shard slices cannot change a user's text;
  - the prompt is prefilled once and its KV cache repeated N times, instead of N prefills (the
    prompt is ~500 tokens and the profile ~100, so this is most of the work saved);
  - each prompt is prefilled alone (no padding, causal SDPA's fast path), and the decode attention runs
    over the prompt budget (`pad_to`) whatever the batch, so a row's arithmetic, not only its random
    draws, is the same in any batch (tests/test_llm.py checks texts alone == in batches of 2 == of 5); in fp32,
    whose matmuls round a row by its row count on some CPUs, a decode step runs at a count that does not
    (`row_padding`);
  - a sample that ends leaves the model's batch at once (`HFBackend.leave`): the projections and the LM head run
    over the live rows only, while the attention keeps each prompt's slots until its last sample ends;
  - bf16 weights on CPUs with AVX512-bf16/AMX; `threads` (1 wins when other jobs share the cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlrf import shared_prefix
from rlrf.llm import SAFE_TOKENIZER, load_generator, pick_dtype, resolve_model
from rlrf.threads import torch_threads


@dataclass(frozen=True)
class Sampling:
    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    min_p: float = 0.0  # tokens below min_p x the likeliest token's probability are never drawn (0 = off)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # without the stop token
    finish_reason: str  # eos | length
    stop_id: int | None = None  # the end-of-sequence token it stopped on (finish_reason eos)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------- sampling step


def sample_next(logits: torch.Tensor, generators: list[torch.Generator], temperature: float,
                top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """One token per row from fp32 logits [R, V]; row r uses only generators[r] (one draw per call).

    min_p > 0 (Nguyen et al., 2024, "min-p sampling") first drops the tokens whose probability at this temperature
    is below min_p x the row's likeliest one and renormalises the rest: the cut scales with the model's confidence, so
    a high temperature spreads the mass over the plausible tokens without reaching the tail that a fixed top_p keeps
    where the distribution is flat.

    Nucleus sampling by inverse CDF: the nucleus is the smallest set of most likely tokens whose mass
    reaches top_p; draw u ~ U(0,1) from the row's generator and pick the nucleus token (in sorted order)
    where the cumulative mass first exceeds u * nucleus mass. Every step of it is row-wise, so a row's
    token never depends on the other rows.
    """
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(torch.float32)
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0)
        probs = probs / probs.sum(-1, keepdim=True)
    # the nucleus usually sits in the top few hundred tokens: one topk, no full-vocabulary sort
    top, idx = probs.topk(min(256, probs.shape[-1]), dim=-1, sorted=True)
    csum = top.cumsum(-1)
    out = idx.gather(-1, _nucleus_pick(top, csum, u, top_p).unsqueeze(-1)).squeeze(-1)
    wide = (csum[:, -1] < top_p).nonzero().flatten()
    if len(wide):  # a flat distribution: sort those rows in full (rare with a trained model)
        full, full_idx = probs[wide].sort(dim=-1, descending=True, stable=True)
        pos = _nucleus_pick(full, full.cumsum(-1), u[wide], top_p)
        out[wide] = full_idx.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
    return out


def _nucleus_pick(sorted_p: torch.Tensor, csum: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    keep = (csum - sorted_p) < top_p  # a token stays if the mass before it is still short of top_p
    n_keep = keep.sum(-1).clamp(min=1)
    mass = csum.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
    pos = torch.searchsorted(csum, (u * mass).unsqueeze(-1), right=True).squeeze(-1)
    return torch.minimum(pos, n_keep - 1)


# ----------------------------------------------------------------------------- hf backend


class HFBackend:
    """transformers model, own decode loop: shared prefill, per-row seeded sampling."""

    name = "hf"
    # what leaves the decode batch (the texts are the same whichever): "rows", a sample as soon as it ends (its prompt
    # once all its samples have); "prompts", a prompt once all its samples have ended (the sampler before 2026-12-06,
    # benchmarks/sample_leave.py's baseline); "" the static batch that decodes every row to the longest sample
    # (benchmarks/evaluate_sampling.py's baseline). Without the shared prefix every row decodes to the longest sample
    leave = "rows"

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 64, threads: int = 0,
                 pad_to: int = 0):
        self._attach(*load_generator(model, dtype), batch_size, threads, pad_to)
        if self.shared_prefix:
            shared_prefix.install(self.model)

    @classmethod
    def wrap(cls, model, tokenizer, batch_size: int = 64, threads: int = 0, pad_to: int = 0) -> "HFBackend":
        """A backend over a model already in memory (a trainer's policy, LoRA and all). Its attention stays as
        it is: sample inside `shared_prefix.generation(model)`, which switches it for the call and back."""
        self = cls.__new__(cls)
        self._attach(model, tokenizer, batch_size, threads, pad_to)
        return self

    def _attach(self, model, tokenizer, batch_size: int, threads: int, pad_to: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.threads = threads
        self.pad_to = pad_to  # the prompt budget: see shared_prefix.PrefixKV.pack
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({e for e in eos + [self.tokenizer.eos_token_id] if e is not None})
        self.pad_id = self.tokenizer.pad_token_id
        self.shared_prefix = shared_prefix.supports(self.model)
        self._row_pads: dict[int, list[int] | None] = {}  # row_padding by thread count

    def _row_padding(self) -> list[int] | None:
        """row_padding for this model at the current thread count, measured once per count."""
        threads = torch.get_num_threads()
        if threads not in self._row_pads:
            self._row_pads[threads] = row_padding(self.model)
        return self._row_pads[threads]

    @staticmethod
    def tokenizer_for(model_dir):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, **SAFE_TOKENIZER)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], sp: Sampling,
                 progress: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
        """N completions per tokenised prompt. `progress(prompts_done, tokens)` after each batch."""
        with torch_threads(self.threads):
            return self._generate(prompts, seeds, sp, progress)

    def _generate(self, prompts, seeds, sp, progress):
        per_batch = max(1, self.batch_size // sp.n)
        # longest first: similar lengths share a batch (little padding), and a too-large batch fails early
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[list[Completion] | None] = [None] * len(prompts)
        for b in range(0, len(order), per_batch):
            ids = order[b:b + per_batch]
            comps = self._batch([prompts[i] for i in ids], [seeds[i] for i in ids], sp)
            for j, i in enumerate(ids):
                out[i] = comps[j * sp.n:(j + 1) * sp.n]
            if progress:
                progress(len(ids), sum(c.n_tokens for c in comps))
        return out  # type: ignore[return-value]

    def _batch(self, prompts: list[list[int]], seeds: list[int], sp: Sampling) -> list[Completion]:
        model, dev = self.model, self.model.device
        B, L, n = len(prompts), max(len(p) for p in prompts), sp.n
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, L - len(p):] = torch.tensor(p)
            attn[r, L - len(p):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        next_pos = pos[:, -1:].repeat_interleave(n, 0) + 1
        R = B * n

        if self.shared_prefix:
            kv = shared_prefix.PrefixKV(n, sp.max_new_tokens)
            with kv.active():
                logits = torch.cat([model(input_ids=torch.tensor([p], device=dev), use_cache=False,
                                          logits_to_keep=1).logits[:, -1].float() for p in prompts])
            kv.pack([len(p) for p in prompts], self.pad_to)

            pad = self._row_padding()

            def forward(tok, step, positions):
                kv.step = step
                rows = tok.shape[0]
                kv.pad = pad[rows] - rows if pad is not None and rows < len(pad) else 0
                if kv.pad:  # copies of the last row, dropped again below: only the row count matters
                    tok = torch.cat([tok, tok[-1:].expand(kv.pad, -1)])
                    positions = torch.cat([positions, positions[-1:].expand(kv.pad, -1)])
                with kv.active():
                    return model(input_ids=tok, position_ids=positions, use_cache=False).logits[:rows, -1].float()
        else:
            # any other architecture: transformers' own cache, prefilled once and repeated n times
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()
            cache.batch_repeat_interleave(n)
            mask = [attn.repeat_interleave(n, 0)]

            def forward(tok, step, positions):
                mask[0] = torch.cat([mask[0], torch.ones((R, 1), dtype=attn.dtype, device=dev)], dim=1)
                return model(input_ids=tok, attention_mask=mask[0], position_ids=positions, past_key_values=cache,
                             use_cache=True).logits[:, -1].float()

        logits = logits.repeat_interleave(n, 0)
        gens = [torch.Generator().manual_seed(s + j) for s in seeds for j in range(n)]
        eos = torch.tensor(self.eos_ids)
        tokens = torch.full((R, sp.max_new_tokens), self.pad_id, dtype=torch.long)
        done = torch.zeros(R, dtype=torch.bool)
        length = torch.full((R,), sp.max_new_tokens, dtype=torch.long)
        stop = torch.full((R,), -1, dtype=torch.long)
        # the rows still decoded (n per prompt at first); the rest of this loop's tensors are over them. With the
        # shared prefix and leave="rows" a row that ends leaves the model's batch at once: the projections and the LM
        # head, most of a decode step, run over the live rows only, and its prompt's slots stay in the attention's
        # layout (kv.rows maps the live rows onto them) until the prompt's last row ends.
        live = torch.arange(R)
        leave = self.leave if self.shared_prefix else ""
        for step in range(sp.max_new_tokens):
            logits = logits.cpu()
            if step < sp.min_new_tokens:
                logits[:, eos] = float("-inf")
            nxt = sample_next(logits, gens, sp.temperature, sp.top_p, sp.min_p)
            was = done[live]
            nxt = torch.where(was, torch.full_like(nxt, self.pad_id), nxt)
            tokens[live, step] = nxt
            hit = torch.isin(nxt, eos) & ~was
            length[live[hit]] = step
            stop[live[hit]] = nxt[hit]
            done[live[hit]] = True
            if bool(done.all()) or step == sp.max_new_tokens - 1:
                break
            if leave and bool(hit.any()):  # only a step where samples ended changes what leaves
                if leave == "rows":  # the samples that ended leave the model's batch
                    live, nxt, next_pos, gens = _rows_kept(~hit, live, nxt, next_pos, gens)
                # a prompt whose n samples have all ended leaves the attention's layout once a quarter of the
                # prompts there have (kv.keep copies the layout: not at every step)
                ended = done.view(B, n)[kv.prompts].all(1)
                if int(ended.sum()) * 4 >= len(ended):
                    if leave == "prompts":  # and its rows the model's batch
                        live, nxt, next_pos, gens = _rows_kept((~ended).repeat_interleave(n), live, nxt, next_pos,
                                                               gens)
                    kv.keep(~ended)
                kv.rows = kv.slots_of(live)
            logits = forward(nxt[:, None].to(dev), step, next_pos)
            next_pos = next_pos + 1

        comps = []
        for r in range(R):
            ids = tokens[r, :length[r]].tolist()
            comps.append(Completion(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                    token_ids=ids, finish_reason="eos" if done[r] else "length",
                                    stop_id=int(stop[r]) if done[r] else None))
        return comps


def row_padding(model, rows: int = 128) -> list[int] | None:
    """The row count to run a decode step's matmuls at for each count of live rows below `rows` (pad[m] >= m), so
    that a row's floats do not depend on how many rows share its step; None where no padding is needed.

    On some CPUs an fp32 matmul rounds a row differently with the number of rows beside it (MKL's small-M kernels:
    on an AMD EPYC, every M below 12 that is not a multiple of 4 differs from M = 256, every other M agrees). A
    sample whose prompt's other samples ended, or whose batch is the stage's last, would then draw another text
    than the same user sampled in another batch, and resume, --shard slices and the check's reuse of the round's
    profiles would mix two draws. Measured here, once, on random matrices of each of the model's linear shapes
    (the LM head's output width capped at 4096) at the current thread count: a count is safe when all its rows
    equal the first rows at `rows`; pad[m] is the smallest safe count >= m (counts from `rows` up are taken as
    safe: every count the demo's 128-row decode batches can reach is measured; 0.7 s). Only fp32 on a CPU is
    measured: bf16 rows did not depend on their neighbours (tests/test_llm.py), and
    padding there would change texts sampled before."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return None
    shapes = sorted({(m.in_features, min(m.out_features, 4096)) for m in model.modules()
                     if isinstance(m, torch.nn.Linear)})
    gen = torch.Generator().manual_seed(0)
    safe = [True] * (rows + 1)
    with torch.inference_mode():
        for k, n in shapes:
            w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
            ref = torch.nn.functional.linear(x, w)
            for m in range(1, rows):
                safe[m] = safe[m] and torch.equal(torch.nn.functional.linear(x[:m], w), ref[:m])
    pad, up = list(range(rows + 1)), rows
    for m in range(rows, 0, -1):
        up = m if safe[m] else up
        pad[m] = up
    return None if pad == list(range(rows + 1)) else pad


def _rows_kept(stay: torch.Tensor, live, nxt, next_pos, gens):
    """The decode loop's per-row state with only the `stay` rows."""
    return (live[stay], nxt[stay], next_pos[stay.to(next_pos.device)],
            [gen for gen, k in zip(gens, stay.tolist()) if k])


# ----------------------------------------------------------------------------- vllm backend


class VLLMBackend:
    """vLLM's offline engine (GPU nodes, tensor parallel). Imported only when chosen."""

    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", tensor_parallel_size: int = 1):
        try:
            import vllm
        except ImportError:
            raise ImportError("sample.backend=vllm needs vLLM on a GPU machine: pip install 'rlrf[vllm]' "
                              "(or use sample.backend=hf)") from None
        from transformers import AutoTokenizer

        self._vllm = vllm
        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **SAFE_TOKENIZER)
        vdtype = "auto" if dtype == "auto" else str(pick_dtype(dtype)).replace("torch.", "")
        self.llm = vllm.LLM(model=str(path), dtype=vdtype, tensor_parallel_size=tensor_parallel_size,
                            trust_remote_code=False)

    def generate(self, prompts: list[list[int]], seeds: list[int], sp: Sampling,
                 progress: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
        v = self._vllm
        params = [v.SamplingParams(n=sp.n, seed=s, temperature=sp.temperature, top_p=sp.top_p, min_p=sp.min_p,
                                   max_tokens=sp.max_new_tokens, min_tokens=sp.min_new_tokens) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for o in outs:
            comps = sorted(o.outputs, key=lambda c: c.index)
            result.append([Completion(text=c.text.strip(), token_ids=_strip_eos(list(c.token_ids), c.finish_reason,
                                                                                  self.tokenizer),
                                      finish_reason="eos" if c.finish_reason == "stop" else "length")
                           for c in comps])
        if progress:
            progress(len(prompts), sum(c.n_tokens for r in result for c in r))
        return result


def _strip_eos(ids: list[int], finish_reason: str, tok) -> list[int]:
    # vLLM keeps the stop token in token_ids; the hf path does not count it, so neither do we
    if finish_reason == "stop" and ids and ids[-1] == tok.eos_token_id:
        return ids[:-1]
    return ids




def open_backend(backend: str, model: str, dtype: str = "auto", batch_size: int = 64, threads: int = 0,
                 pad_to: int = 0):
    """The sample stage's backend (BACKENDS): hf (CPU or one GPU) or vllm."""
    if backend not in BACKENDS:
        raise ValueError(f"sample.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](model, dtype, batch_size, threads, pad_to)


# sample.backend -> opener(model, dtype, batch_size, threads, pad_to)
BACKENDS = {
    "hf": HFBackend,
    "vllm": lambda model, dtype, batch_size, threads, pad_to: VLLMBackend(model, dtype),
}

