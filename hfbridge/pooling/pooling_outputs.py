"""What pooling returns, with vLLM's names: PoolingRequestOutput and its typed views."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class PoolingOutput:
    data: torch.Tensor


class PoolingRequestOutput(Generic[T]):
    def __init__(
        self,
        request_id: str,
        outputs: T,
        prompt_token_ids: list[int],
        finished: bool = True,
        num_cached_tokens: int = 0,
        prompt: str | None = None,
    ):
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens
        self.prompt = prompt
        self.error = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, finished={self.finished})"
        )

    @classmethod
    def from_base(cls, base: PoolingRequestOutput[PoolingOutput]):
        return cls(base.request_id, cls._convert(base.outputs), base.prompt_token_ids, base.finished,
                   base.num_cached_tokens, base.prompt)

    @staticmethod
    def _convert(output: PoolingOutput):
        return output


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def _convert(output: PoolingOutput) -> EmbeddingOutput:
        if output.data.dim() != 1:
            raise ValueError("pooled_data should be a 1-D embedding vector")
        return EmbeddingOutput(output.data.tolist())


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def _convert(output: PoolingOutput) -> ClassificationOutput:
        if output.data.dim() != 1:
            raise ValueError("pooled_data should be a 1-D probability vector")
        return ClassificationOutput(output.data.tolist())


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def _convert(output: PoolingOutput) -> ScoringOutput:
        if output.data.numel() != 1:
            raise ValueError("pooled_data should contain a single scalar score")
        return ScoringOutput(float(output.data.reshape(())))
