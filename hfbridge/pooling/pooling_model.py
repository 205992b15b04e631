"""Wrappers around Transformers models that pool: hfbridge's view of embedding and classification models.

They return the last hidden states of the packed token stream; the Pooler and, for classifiers, the model's
own head turn them into outputs."""
from __future__ import annotations

import inspect

import torch
from torch import nn

# Model types whose learned positions start after the padding index (RoBERTa's convention).
_PADDING_OFFSET_POSITIONS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod", "esm",
}


def base_model_of(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model) or model


class TransformersEmbeddingModel(nn.Module):
    """A base model (or the base of a task model) whose last hidden states are pooled."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = hf_model
        self.base = base_model_of(hf_model)
        text_config = self.base.config.get_text_config()
        self.position_offset = (
            int(text_config.pad_token_id) + 1 if text_config.model_type in _PADDING_OFFSET_POSITIONS else 0
        )
        accepted = inspect.signature(self.base.forward).parameters
        self.uses_token_types = "token_type_ids" in accepted and getattr(text_config, "type_vocab_size", 0) > 0
        self.accepts_use_cache = "use_cache" in accepted

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.get_text_config().hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [1, T] position of each token in its own sequence
        token_type_ids: torch.Tensor | None = None,  # [1, T] segment ids of sentence pairs
    ) -> torch.Tensor:  # [T, H]
        kwargs = {}
        if self.uses_token_types:
            # Always explicit: the model's default buffer is only max_position_embeddings long, shorter than a
            # packed step can be.
            kwargs["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        if self.accepts_use_cache:
            kwargs["use_cache"] = False
        out = self.base(input_ids=input_ids, position_ids=positions + self.position_offset, **kwargs)
        return out[0][0]


def _bert_head(model, base, pooled):  # the base model's pooler (dense + tanh on the first token), then linear
    return model.classifier(model.dropout(base.pooler(pooled[:, None])))


def _prediction_head(model, base, pooled):  # ModernBERT: prediction head, dropout, linear
    return model.classifier(model.drop(model.head(pooled)))


def _sequence_head(model, base, pooled):  # RoBERTa family: a head that reads the first token of a sequence
    return model.classifier(pooled[:, None]).reshape(len(pooled), -1)


def _score_head(model, base, pooled):  # decoder LMs: a linear score on the (last-token) pooled state
    return model.score(pooled)


# Transformers' sequence-classification heads, recognised by their parts (checked in order). Each takes the
# pooled hidden states [N, H] and returns logits [N, num_labels] through the model's own modules.
CLASSIFICATION_HEADS = (
    (lambda m, base: getattr(base, "pooler", None) is not None and isinstance(getattr(m, "classifier", None), nn.Linear),
     _bert_head),
    (lambda m, base: hasattr(m, "head") and isinstance(getattr(m, "classifier", None), nn.Linear), _prediction_head),
    (lambda m, base: isinstance(getattr(m, "classifier", None), nn.Module), _sequence_head),
    (lambda m, base: isinstance(getattr(m, "score", None), nn.Linear), _score_head),
)


class TransformersForSequenceClassification(TransformersEmbeddingModel):
    """A `...ForSequenceClassification` model: packed base model, then its own head on pooled states."""

    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        for matches, head in CLASSIFICATION_HEADS:
            if matches(hf_model, self.base):
                self._head = head
                break
        else:
            raise ValueError(f"hfbridge does not know how to run the classification head of {type(hf_model).__name__}")

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, num_labels]
        return self._head(self.model, self.base, pooled)
