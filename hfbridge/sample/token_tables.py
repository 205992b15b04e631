"""A request's token tables -- allowed_token_ids, logit_bias, bad words and min_tokens' stop ids -- as arrays, built
once when the request is added and shared by its n samples (never copied per sample). The sampler applies a table
to all the rows that share it in one pass, with tensor ops: no Python loop over tokens, none over rows but to read
their last few output tokens for the bad words.

Arrays are numpy's: the multi-process executors pickle each step's requests to their workers, and a numpy array
pickles as its bytes (a torch tensor would go through shared-memory handles). torch.from_numpy wraps them for free."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hfbridge.errors import ValidationError
from hfbridge.sample.bad_words import check_bad_words
from hfbridge.sample.sampling_params import SamplingParams


@dataclass(frozen=True, eq=False)
class BadWordsOfLength:
    """The bad words whose prefix (all their tokens but the last) has `prefixes.shape[1]` tokens."""

    prefixes: np.ndarray  # [W, P] int64
    last_ids: np.ndarray  # [W] int64: masked when the output ends with the word's prefix


@dataclass(frozen=True, eq=False)
class TokenTables:
    allowed_ids: np.ndarray | None  # [A] int64: every other token is masked
    banned_ids: np.ndarray | None  # [B] int64: one-token bad words, masked at every step
    bad_words: tuple[BadWordsOfLength, ...]  # longer bad words, grouped by prefix length
    stop_ids: np.ndarray | None  # [S] int64: masked while a sample has fewer than min_tokens output tokens
    min_tokens: int
    bias_ids: np.ndarray | None  # [K] int64
    bias_values: np.ndarray | None  # [K] float32

    @classmethod
    def build(cls, params: SamplingParams, vocab_size: int | None = None) -> TokenTables:
        """The tables of `params` (see tables_of). Refuses (ValidationError) a request whose tables leave no
        token at its first step: allowed_token_ids all banned by bad_words, or all stop tokens under min_tokens."""
        words = params.bad_words_token_ids or []
        check_bad_words(words, vocab_size)
        stop_ids = sorted(params.min_tokens_stop_ids) if params.min_tokens > 0 else []
        banned = sorted({word[0] for word in words if len(word) == 1})
        by_length: dict[int, list[list[int]]] = {}
        for word in words:
            if len(word) > 1:
                by_length.setdefault(len(word) - 1, []).append(word)
        allowed = None if params.allowed_token_ids is None else sorted(set(params.allowed_token_ids))
        if allowed is not None and set(allowed) <= set(banned) | set(stop_ids):
            raise ValidationError(
                f"allowed_token_ids {allowed[:16]} leaves no token to sample: bad_words ban {banned[:16]} and "
                f"min_tokens={params.min_tokens} masks the stop and EOS tokens {stop_ids[:16]} until then. Allow "
                "another token, or lower min_tokens.", parameter="allowed_token_ids", value=allowed[:16],
            )
        bias = params.logit_bias or {}
        return cls(
            allowed_ids=_ids(allowed),
            banned_ids=_ids(banned),
            bad_words=tuple(BadWordsOfLength(np.array([w[:-1] for w in group], dtype=np.int64),
                                             np.array([w[-1] for w in group], dtype=np.int64))
                            for _, group in sorted(by_length.items())),
            stop_ids=_ids(stop_ids),
            min_tokens=params.min_tokens,
            bias_ids=_ids(list(bias)),
            bias_values=np.array(list(bias.values()), dtype=np.float32) if bias else None,
        )

    def changes_logits(self, num_output_tokens: int) -> bool:
        """Whether apply() would touch a row with this many output tokens."""
        return (self.allowed_ids is not None or self.banned_ids is not None or bool(self.bad_words)
                or self.bias_ids is not None or (self.stop_ids is not None and num_output_tokens < self.min_tokens))

    def apply(self, logits: torch.Tensor, rows: list[int], outputs: list[list[int]]) -> None:
        """logits [N, V], in place, in vLLM's order (allowed ids, bad words, min_tokens, logit_bias); rows: the
        logits rows of the samples sharing these tables, outputs[i]: row rows[i]'s output token ids."""
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        index = None if contiguous else torch.tensor(rows, device=logits.device)
        sub = logits[rows[0] : rows[0] + len(rows)] if contiguous else logits[index]  # [R, V]: a view, or a copy
        device = logits.device
        if self.allowed_ids is not None:
            blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=device)
            blocked[_tensor(self.allowed_ids, device)] = False
            sub.masked_fill_(blocked, float("-inf"))
        if self.banned_ids is not None:
            sub[:, _tensor(self.banned_ids, device)] = float("-inf")
        if self.bad_words:
            self._mask_bad_words(sub, outputs)
        if self.stop_ids is not None:
            young = [i for i, output in enumerate(outputs) if len(output) < self.min_tokens]
            if young:
                sub[torch.tensor(young, device=device)[:, None], _tensor(self.stop_ids, device)] = float("-inf")
        if self.bias_ids is not None:
            sub[:, _tensor(self.bias_ids, device)] += _tensor(self.bias_values, device)
        if index is not None:
            logits[index] = sub

    def _mask_bad_words(self, sub: torch.Tensor, outputs: list[list[int]]) -> None:
        """Masks a word's last token in the rows whose output ends with the word's other tokens."""
        longest = self.bad_words[-1].prefixes.shape[1]
        # [R, P] the last `longest` output tokens of each row, left-padded with -1 (no token id matches it)
        tails = torch.tensor([[-1] * (longest - len(t)) + t for t in (o[-longest:] for o in outputs)],
                             dtype=torch.long, device=sub.device)
        for words in self.bad_words:
            prefixes = _tensor(words.prefixes, sub.device)  # [W, P]
            matches = (tails[:, None, longest - prefixes.shape[1]:] == prefixes[None]).all(-1)  # [R, W]
            row_ids, word_ids = matches.nonzero(as_tuple=True)
            sub[row_ids, _tensor(words.last_ids, sub.device)[word_ids]] = float("-inf")


def tables_of(params: SamplingParams, vocab_size: int | None = None) -> TokenTables | None:
    """The tables of `params`, built on first use and kept on them (None when it has none). The engine builds them
    when a request is added, before its samples are copied, so the samples share one."""
    if params.token_tables is None:
        if not (params.allowed_token_ids is not None or params.logit_bias or params.bad_words_token_ids
                or params.min_tokens > 0):
            return None
        params.token_tables = TokenTables.build(params, vocab_size)
    return params.token_tables


def _ids(ids: list[int]) -> np.ndarray | None:
    return np.array(ids, dtype=np.int64) if ids else None


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)
