"""Engine logprobs (one {token_id: Logprob} dict per token, holding the chosen token and the top-k) in
OpenAI's two shapes: the legacy completions lists and chat's `content` entries."""
from __future__ import annotations

import math
from typing import Any

from hfbridge.outputs import Logprob

_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report this instead


def _clamp(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(entries.items(), key=lambda item: (item[1].rank or math.inf, -item[1].logprob))
    return ranked[:k]


class CompletionLogprobs:
    """Builds `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` piece by piece, so text_offset
    runs on across stream chunks."""

    def __init__(self, num_top: int, decode: Any, text_offset: int = 0):
        self.num_top = num_top
        self.decode = decode  # token id -> str, for tokens the engine sent without a decoded string
        self.text_offset = text_offset

    def prompt(self, token_ids: list[int], prompt_logprobs: list[dict[int, Logprob] | None] | None) -> dict:
        entries = list(prompt_logprobs or [])
        entries += [None] * (len(token_ids) - len(entries))
        return self._build(token_ids, entries)

    def sample(self, token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> dict:
        return self._build(token_ids, logprobs)

    def _build(self, token_ids: list[int], entries: list[dict[int, Logprob] | None]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry else None
            text = chosen.decoded_token if chosen and chosen.decoded_token is not None else self.decode(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_clamp(chosen.logprob) if chosen else None)
            if entry is None:
                out["top_logprobs"].append(None)
            else:
                # The top k, plus the chosen token when it ranks below them.
                top = dict(_top(entry, self.num_top))
                if chosen is not None:
                    top.setdefault(token_id, chosen)
                out["top_logprobs"].append(
                    {(lp.decoded_token if lp.decoded_token is not None else self.decode(t)): _clamp(lp.logprob)
                     for t, lp in top.items()}
                )
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(text)
        return out


def merge_completion_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, decode: Any) -> list[dict]:
    """Chat's `logprobs.content` entries: token, logprob, UTF-8 bytes, and the top `num_top` alternatives."""

    def entry(token_id: int, lp: Logprob) -> dict[str, Any]:
        text = lp.decoded_token if lp.decoded_token is not None else decode(token_id)
        return {"token": text, "logprob": _clamp(lp.logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, entries in zip(token_ids, logprobs):
        chosen = entries.get(token_id) or Logprob(_FLOOR)
        item = entry(token_id, chosen)
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(entries, num_top)]
        content.append(item)
    return content


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None, decode: Any) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [
        None if entry is None else {
            str(t): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                     "decoded_token": lp.decoded_token if lp.decoded_token is not None else decode(t)}
            for t, lp in entry.items()
        }
        for entry in entries
    ]
