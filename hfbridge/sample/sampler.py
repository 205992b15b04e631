"""Logits -> tokens, in vLLM's order: the grammar's bitmask (structured outputs), allowed ids, bad words,
min_tokens, logit_bias, penalties; then greedy rows take the argmax, random rows apply temperature, min_p, top-k,
top-p and draw with their own generator. A row whose every token is masked gets no token (None), never a draw
from NaN probabilities.

Logprobs are those of the raw model distribution (vLLM's default `raw_logprobs`), before any of the above."""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from hfbridge.native_build import declare, load_library
from hfbridge.sample.argmax_cpu import build_kernel as build_argmax_kernel, row_argmax
from hfbridge.sample.token_tables import TokenTables, tables_of
from hfbridge.sample.sampling_params import SamplingParams
from hfbridge.sample.logprobs import SampledLogprobs, gather_logprobs


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    grammar_bits: torch.Tensor | None = None  # [ceil(V / 32)] int32: the tokens its grammar allows next


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty (Transformers' rule) over prompt + output; presence/frequency (OpenAI's) over output."""
    vocab_size = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            seen = seen[seen < vocab_size].to(logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            counts = torch.bincount(torch.tensor(row.output_token_ids), minlength=vocab_size)[:vocab_size]
            counts = counts.to(logits.device, logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's. min_p [N]."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_k [N] (0 = off), top_p [N] (1 = off). Ties with the k-th logit are kept."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
    kth = sorted_logits.gather(1, (vocab_size - k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False  # the top token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_grammar_bitmask(logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
    """Masks, in place, the tokens that rows' grammars forbid (and any past the grammar's vocabulary):
    bits [len(rows), ceil(V / 32)] int32. On CPU float32 through csrc/token_bitmask.c; elsewhere xgrammar's kernel."""
    lib = _bitmask_library() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is not None and logits.is_contiguous():
        bits = bits.contiguous()
        index = torch.tensor(rows, dtype=torch.int64)
        # One thread: the pass is memory-bound and short, and a second thread waits on a busy core more often than
        # it saves (figures: docs/kernel-measurements.md).
        lib.apply_token_bitmask(logits.data_ptr(), index.data_ptr(), bits.data_ptr(), len(rows), logits.shape[1],
                                bits.shape[1], 1)
        return
    import xgrammar as xgr  # its CPU and CUDA kernels; imported only once a constrained row exists

    index = torch.tensor(rows, device=logits.device)
    sub = logits[index]
    xgr.apply_token_bitmask_inplace(sub, bits.to(logits.device))
    sub[:, bits.shape[-1] * 32 :] = float("-inf")  # logits past the grammar's vocabulary (a padded head)
    logits[index] = sub


@functools.cache
def _bitmask_library() -> ctypes.CDLL | None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return declare(load_library("token_bitmask.c"),
                   {"apply_token_bitmask": ([ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None)})


def _changes_logits(row: SamplingRow) -> bool:
    """Whether _process would touch this row's logits at all."""
    p = row.params
    tables = tables_of(p)
    return bool(
        row.grammar_bits is not None or (tables is not None and tables.changes_logits(len(row.output_token_ids)))
        or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
    )


def argmax_only(row: SamplingRow) -> bool:
    """Whether the row's token is the argmax of its raw logits and nothing else is asked of them (greedy, no
    logprobs, nothing that changes logits): a model may then give the token without the logits."""
    return row.params.is_greedy and row.params.logprobs is None and not _changes_logits(row)


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # for rows without a seed; seeded from the engine's `seed`

    @staticmethod
    def build_kernels(device: torch.device) -> None:
        """Builds (or loads) the C kernels the sampler runs on CPU (row argmax, grammar bitmask) now, before the
        server says ready, not on the first request."""
        if device.type == "cpu":
            build_argmax_kernel()
            _bitmask_library()

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int | None], list[SampledLogprobs | None]]:
        """logits [N, V] float32, one row per request that samples this step."""
        vocab_size = logits.shape[-1]
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        dead: list[int] = []
        if any(_changes_logits(r) for r in rows):  # else (plain greedy / temperature rows): no copy, no loop
            logits = self._process(logits.clone(), rows)
            dead = torch.isneginf(logits.amax(dim=-1)).nonzero().flatten().tolist()
            if dead:  # drawn from NaN probabilities otherwise; the rows are dropped below
                logits[dead] = 0.0

        tokens = row_argmax(logits)
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            chosen = [rows[i].params for i in random_rows]
            scaled = logits[idx] / torch.tensor([p.temperature for p in chosen], device=logits.device)[:, None]
            if any(p.min_p > 0 for p in chosen):
                scaled = apply_min_p(scaled, torch.tensor([p.min_p for p in chosen], device=logits.device))
            if any(p.top_k > 0 or p.top_p < 1 for p in chosen):
                top_k = torch.tensor([p.top_k for p in chosen], device=logits.device)
                top_p = torch.tensor([p.top_p for p in chosen], device=logits.device, dtype=torch.float32)
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = torch.softmax(scaled, dim=-1)
            tokens[idx] = self._draw(probs, [rows[i].generator for i in random_rows])

        token_list: list[int | None] = tokens.tolist()
        for i in dead:
            token_list[i] = None
        logprobs: list[SampledLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            wanted = [i for i, w in enumerate(want_logprobs) if w and token_list[i] is not None]
            num_top = [vocab_size if rows[i].params.logprobs == -1 else rows[i].params.logprobs for i in wanted]
            gathered = gather_logprobs(raw_logprobs[wanted], [token_list[i] for i in wanted], num_top)
            for i, item in zip(wanted, gathered):
                logprobs[i] = item
        return token_list, logprobs

    @staticmethod
    def _process(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        constrained = [i for i, row in enumerate(rows) if row.grammar_bits is not None]
        if constrained:
            apply_grammar_bitmask(logits, constrained, torch.stack([rows[i].grammar_bits for i in constrained]))
        # One pass per request (its samples share one table), not one per row.
        groups: dict[int, tuple[TokenTables, list[int]]] = {}
        for i, row in enumerate(rows):
            if (tables := tables_of(row.params)) is not None:
                groups.setdefault(id(tables), (tables, []))[1].append(i)
        for tables, indices in groups.values():
            tables.apply(logits, indices, [rows[i].output_token_ids for i in indices])
        return apply_penalties(logits, rows)

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exponential race: argmax(p / q), q ~ Exp(1), equals drawing from p; each row uses its own RNG."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), probs.shape[-1]), device=probs.device).exponential_(
                generator=self.generator
            )
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)
