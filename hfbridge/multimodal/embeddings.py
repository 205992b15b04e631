"""A step's input embeddings with every request's image rows in place, the vision encoder run once per image."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from hfbridge.multimodal.inputs import MultiModalInputs
from hfbridge.multimodal.mrope import MRoPE


class EncoderCache:
    """Image content hash -> the encoder's rows [N, H], least recently used out first, up to capacity_rows rows.
    A request whose images were evicted between two of its prefill chunks has them encoded again."""

    def __init__(self, capacity_rows: int):
        self.capacity_rows = capacity_rows
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._rows = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self._entries:
            return
        self._entries[key] = value
        self._rows += value.shape[0]
        while self._rows > self.capacity_rows and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._rows -= old.shape[0]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class ImageRows:
    """One request's share of a step: its token range [start, end) sits at `offset` in the packed stream."""

    request_id: str
    inputs: MultiModalInputs
    offset: int
    start: int
    end: int


class ImageEmbedder:
    def __init__(self, model: torch.nn.Module, capacity_rows: int):
        self.model = model  # TransformersForMultimodalLM
        self.cache = EncoderCache(capacity_rows)
        rope_index = model.rope_index()
        self.mrope = MRoPE(rope_index) if rope_index is not None else None  # the M-RoPE families' positions

    def embed(self, input_ids: torch.Tensor, rows: list[ImageRows]) -> tuple[torch.Tensor, dict[str, str]]:
        """input_ids [1, T] -> (inputs_embeds [1, T, H], request id -> why its images could not be placed)."""
        embeds = self.model.embed_tokens(input_ids)
        failed = {}
        for item in rows:
            features = self._features(item.inputs)
            expected = len(item.inputs.positions)
            if features.shape[0] != expected:
                failed[item.request_id] = (
                    f"the prompt has {expected} image placeholder tokens, but its {len(item.inputs.images)} "
                    f"image(s) make {features.shape[0]} embedding rows; send the text with the processor's image "
                    "token (it expands it), or expand each image's placeholders as the processor does")
                continue
            lo, hi = item.inputs.rows_in(item.start, item.end)
            index = torch.from_numpy(item.inputs.positions[lo:hi] - item.start + item.offset).to(embeds.device)
            embeds[0, index] = features[lo:hi].to(embeds.dtype)
        return embeds, failed

    def _features(self, inputs: MultiModalInputs) -> torch.Tensor:  # [P, H]
        parts = []
        for image in inputs.images:
            features = self.cache.get(image.content_hash)
            if features is None:
                features = self.model.encode_image(image.pixel_inputs)
                self.cache.put(image.content_hash, features)
            parts.append(features)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
