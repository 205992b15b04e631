"""Scoring text pairs, shared by `LLM.score` and the server's score / rerank routes.

Cross-encoders (one-label classifiers) read each pair as one sequence with segment ids; bi-encoders embed
both sides and compare them by cosine similarity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def score_pairs(data_1: Any, data_2: Any) -> tuple[list[str], list[str]]:
    """vLLM's pairing rules: 1:1, 1:N (the first side is repeated) or N:N."""
    texts_1 = [data_1] if isinstance(data_1, str) else list(data_1)
    texts_2 = [data_2] if isinstance(data_2, str) else list(data_2)
    if not texts_1:
        raise ValueError("At least one text element must be given")
    if not texts_2:
        raise ValueError("At least one text_pair element must be given")
    if len(texts_1) > 1 and len(texts_1) != len(texts_2):
        raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
    if len(texts_1) == 1:
        texts_1 = texts_1 * len(texts_2)
    return texts_1, texts_2


def is_cross_encoder(supported_tasks: tuple[str, ...], hf_config: Any) -> bool:
    """True for classifiers (which must have one label to score); False for embedding models."""
    if "classify" not in supported_tasks:
        return False
    if getattr(hf_config, "num_labels", 1) != 1:
        raise ValueError("Scoring API is only enabled for num_labels == 1.")
    return True


def cross_encoder_prompts(tokenizer: Any, texts_1: list[str], texts_2: list[str]) -> list[dict[str, Any]]:
    """Each pair as one prompt, encoded the way the tokenizer pairs texts (with segment ids where it has them)."""
    prompts = []
    for a, b in zip(texts_1, texts_2):
        encoded = tokenizer(a, b)
        prompts.append({"prompt_token_ids": encoded["input_ids"], "token_type_ids": encoded.get("token_type_ids")})
    return prompts


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


@dataclass(frozen=True)
class ScoringPlan:
    """How one model scores a batch of pairs: the prompts to pool under `task`, and for each pair the indices
    of the pooled outputs that make its score (a cross-encoder's pair i is prompt i; a bi-encoder embeds each
    distinct text once and compares two of them)."""

    task: str  # classify (cross-encoder) | embed (bi-encoder)
    prompts: list[Any]
    pairs: list[tuple[int, int]]

    def scores(self, pooled: list[torch.Tensor]) -> list[float]:
        if self.task == "classify":
            return [float(pooled[i].reshape(-1)[0]) for i, _ in self.pairs]
        return [cosine(pooled[a], pooled[b]) for a, b in self.pairs]


def plan_scoring(data_1: Any, data_2: Any, supported_tasks: tuple[str, ...], hf_config: Any, tokenizer: Any) -> ScoringPlan:
    """The one scoring routine of `LLM.score` and the /score and /rerank routes (ValueError for bad pairs)."""
    texts_1, texts_2 = score_pairs(data_1, data_2)
    if is_cross_encoder(supported_tasks, hf_config):
        prompts = cross_encoder_prompts(tokenizer, texts_1, texts_2)
        return ScoringPlan("classify", prompts, [(i, i) for i in range(len(prompts))])
    unique = list(dict.fromkeys(texts_1 + texts_2))
    index = {text: i for i, text in enumerate(unique)}
    return ScoringPlan("embed", unique, [(index[a], index[b]) for a, b in zip(texts_1, texts_2)])
