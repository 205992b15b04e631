"""Hidden states of a finished prompt -> what a pooling task returns.

Sequence tasks pool one vector per request (CLS, LAST, MEAN); token tasks keep every token (ALL) or the
tokens marked with step_tag_id (STEP). Heads and activations then follow the task."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hfbridge.pooling.pooling_params import PoolingParams

Head = Callable[[torch.Tensor], torch.Tensor]  # [N, H] -> [N, num_labels]

SEQUENCE_POOLING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "CLS": lambda hidden: hidden[0],
    "LAST": lambda hidden: hidden[-1],
    "MEAN": lambda hidden: hidden.mean(dim=0),
}


def classification_activation(hf_config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What vLLM applies to classifier logits, following Transformers' loss choice: regression -> identity,
    multi-label -> sigmoid, one label -> sigmoid, otherwise softmax."""
    problem_type = getattr(hf_config, "problem_type", None)
    if problem_type == "regression":
        return lambda x: x
    if problem_type == "multi_label_classification" or getattr(hf_config, "num_labels", 2) < 2:
        return torch.sigmoid
    return lambda x: torch.softmax(x, dim=-1)


class Pooler:
    def __init__(self, pooling_type: str, head: Head | None, activation: Callable[[torch.Tensor], torch.Tensor]):
        self.pooling_type = pooling_type
        self.head = head  # classification models only
        self.activation = activation

    def __call__(
        self, hidden: list[torch.Tensor], token_ids: list[list[int]], params: list[PoolingParams]
    ) -> list[torch.Tensor]:
        """hidden[i] [n_i, H] holds every prompt token of request i; returns one tensor per request:
        [D] for sequence tasks, [n, D] for token tasks."""
        out: list[torch.Tensor | None] = [None] * len(hidden)
        sequence = [i for i, p in enumerate(params) if p.task in ("embed", "classify")]
        if sequence:
            pooled = torch.stack([SEQUENCE_POOLING[self._sequence_type()](hidden[i]) for i in sequence])
            for i, row in zip(sequence, self._finish(pooled, [params[i] for i in sequence])):
                out[i] = row
        for i, p in enumerate(params):
            if p.task in ("token_embed", "token_classify"):
                rows = hidden[i]
                if self.pooling_type == "STEP" or p.step_tag_id is not None:
                    rows = rows[torch.tensor(token_ids[i], device=rows.device) == p.step_tag_id]
                finished = self._finish(rows, [p] * len(rows))
                out[i] = torch.stack(finished) if finished else rows.new_zeros((0, rows.shape[-1]))
                if p.returned_token_ids:
                    out[i] = out[i][:, p.returned_token_ids]
        return out

    def _sequence_type(self) -> str:
        return self.pooling_type if self.pooling_type in SEQUENCE_POOLING else "CLS"

    def _finish(self, rows: torch.Tensor, params: list[PoolingParams]) -> list[torch.Tensor]:
        """rows [N, H] -> one output per row: classifier outputs, or embeddings (truncated, normalised)."""
        if not params:
            return []
        if params[0].task in ("classify", "token_classify"):
            logits = self.head(rows).float()
            activated = self.activation(logits)
            return [a if p.use_activation else raw for a, raw, p in zip(activated, logits, params)]
        result = []
        for row, p in zip(rows.float(), params):
            if p.dimensions is not None:
                row = row[: p.dimensions]
            result.append(F.normalize(row, dim=-1) if p.use_activation else row)
        return result


def build_pooler(model, pooler_config, is_causal: bool) -> Pooler:
    """An open pooling type follows the attention: LAST for causal models, CLS for bidirectional encoders."""
    pooling_type = pooler_config.pooling_type or ("LAST" if is_causal else "CLS")
    head = getattr(model, "classify", None)
    return Pooler(pooling_type, head, classification_activation(model.config))
