"""bad_words, with vLLM's semantics: each word is tokenized as it stands and with a leading space (the same
word at the start of a text and inside it are different tokens), and the last token of a word is masked
whenever the tokens generated so far end with the word's other tokens (token_tables.py applies them)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hfbridge.errors import ValidationError
from hfbridge.sample.sampling_params import MAX_BAD_WORDS_TOTAL_TOKENS, MAX_NUM_BAD_WORDS, check_table_size


def tokenize_bad_words(bad_words: Sequence[str], tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """Token ids of each bad word: `word.lstrip()` always; `" " + word.lstrip()` too when the space makes a
    different first token and the same number of tokens (vLLM's rule for a prefix-space variant). Slow for long
    lists: the server runs it on its tokenizer thread, never on the engine's."""
    check_table_size("bad_words", len(bad_words))  # each word gives at least one sequence: refused before the work
    out: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain and spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    out = [ids for ids in out if ids]
    check_bad_words(out, vocab_size)
    return out


def check_bad_words(words: list[list[int]], vocab_size: int | None) -> None:
    """vLLM's caps on tokenized bad words (sequences and their total tokens), and their ids within the vocabulary."""
    if len(words) > MAX_NUM_BAD_WORDS:
        raise ValidationError(f"Too many bad words: {len(words)}. The max number is {MAX_NUM_BAD_WORDS}.",
                              parameter="bad_words", value=len(words))
    total = sum(len(w) for w in words)
    if total > MAX_BAD_WORDS_TOTAL_TOKENS:
        raise ValidationError(f"Too many total bad word tokens: {total}. The max is {MAX_BAD_WORDS_TOTAL_TOKENS}.",
                              parameter="bad_words", value=total)
    invalid = [t for w in words for t in w if vocab_size is not None and not 0 <= t < vocab_size]
    if invalid:
        raise ValidationError(
            f"The model vocabulary size is {vocab_size}, but the following tokens were specified as bad: "
            f"{invalid[:16]}. All token id values should be integers satisfying: 0 <= token_id <= {vocab_size - 1}.",
            parameter="bad_words", value=invalid[:16],
        )
