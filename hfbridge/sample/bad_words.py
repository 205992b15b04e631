"""bad_words, with vLLM's semantics: each word is tokenized as it stands and with a leading space (the same
word at the start of a text and inside it are different tokens), and the last token of a word is masked
whenever the tokens generated so far end with the word's other tokens."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hfbridge.errors import ValidationError


def tokenize_bad_words(bad_words: Sequence[str], tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """Token ids of each bad word: `word.lstrip()` always; `" " + word.lstrip()` too when the space makes a
    different first token and the same number of tokens (vLLM's rule for a prefix-space variant)."""
    out: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain and spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    invalid = [t for ids in out for t in ids if not 0 <= t < vocab_size]
    if invalid:
        raise ValidationError(
            f"The model vocabulary size is {vocab_size}, but the following tokens were specified as bad: "
            f"{invalid}. All token id values should be integers satisfying: 0 <= token_id <= {vocab_size - 1}.",
            parameter="bad_words", value=list(bad_words),
        )
    return [ids for ids in out if ids]


def apply_bad_words(logits: torch.Tensor, bad_words_token_ids: list[list[int]], output_token_ids: list[int]) -> None:
    """logits [V] of one row, in place: mask the last token of every bad word whose prefix the output ends with."""
    for word in bad_words_token_ids:
        prefix = word[:-1]
        if len(prefix) > len(output_token_ids):
            continue
        if not prefix or output_token_ids[-len(prefix):] == prefix:
            logits[word[-1]] = float("-inf")
