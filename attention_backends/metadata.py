"""Per-step attention metadata: what every backend needs to find a token's place in the paged cache."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One frozen record per model step; all requests of the step are packed into one token stream.

    B = number of requests in the step, T = number of tokens scheduled in the step.
    """

    slot_mapping: torch.Tensor  # [T] int64; slot of token t in the cache, -1 = do not store
    query_start_loc: torch.Tensor  # [B+1] int32; tokens of request b are query_start_loc[b]:query_start_loc[b+1]
    seq_lens: torch.Tensor  # [B] int32; context length of request b after this step (cached prefix + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32; physical block ids of request b, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies of query_start_loc / seq_lens: Python loops in the reference backend read them without a sync.
    query_start_loc_cpu: tuple[int, ...] = ()
    seq_lens_cpu: tuple[int, ...] = ()
    # (request b, first position, end position) of each image whose tokens attend to each other both ways (Gemma 3),
    # for the images this step's queries fall in; a query in such a span also sees the span's later keys. Only the
    # torch backend computes it; the others refuse a step that has any.
    bidirectional_spans: tuple[tuple[int, int, int], ...] = ()
    # Values every layer of the step derives alike (e.g. the decode gather's slot indices): built once per step.
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def num_requests(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @classmethod
    def build(
        cls,
        *,
        slot_mapping: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        device: torch.device | str = "cpu",
        bidirectional_spans: tuple[tuple[int, int, int], ...] = (),
    ) -> AttentionMetadata:
        """Build from Python lists (the model runner's and the tests' entry point)."""
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        max_blocks = max((len(t) for t in block_tables), default=0) or 1
        table = torch.zeros((len(block_tables), max_blocks), dtype=torch.int32)
        for i, blocks in enumerate(block_tables):
            if blocks:
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=tuple(qsl),
            seq_lens_cpu=tuple(seq_lens),
            bidirectional_spans=tuple(bidirectional_spans),
        )


@dataclass(frozen=True)
class LayerOptions:
    """What one attention layer asks of the backend, read from Transformers' call."""

    layer_idx: int | None  # None only for encoder layers, which keep no cache
    scaling: float
    # A query at position p sees keys k with p - k < sliding_window; non-causal layers also need k - p < sliding_window
    # (the value modules pass to the attention function, as flash-attn's window_size=(w - 1, w - 1 or 0) reads it).
    sliding_window: int | None = None
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), after scaling
    is_causal: bool = True
    # Attention sinks (GPT-OSS's `s_aux`): [H] one learned logit per query head that joins every softmax's
    # denominator and carries no value: out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink)).
    sinks: torch.Tensor | None = None

    @property
    def plain_causal(self) -> bool:
        """Causal attention with no window, softcap or sinks: what SDPA's is_causal and the decode kernels compute."""
        return self.is_causal and self.sliding_window is None and self.softcap is None and self.sinks is None
