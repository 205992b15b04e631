"""What a request carries about its images, from input processing to the runner."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageItem:
    content_hash: bytes  # sha256 of the image's mode, size and pixels (and the processor options): the cache key
    pixel_inputs: dict[str, torch.Tensor]  # the processor's output for this image alone (pixel_values, sizes...)


@dataclass(frozen=True)
class MultiModalInputs:
    """A request's images, in prompt order, and where their embeddings go.

    positions [P] (ascending) are the prompt positions of the image placeholder tokens; the encoder's rows for the
    images, concatenated in order, fill them one to one (Transformers' own masked_scatter order)."""

    images: tuple[ImageItem, ...]
    positions: np.ndarray  # [P] int64

    @property
    def group_hash(self) -> bytes:
        """One key for every image of the request, in order: part of the hash of the block holding the first
        placeholder, so the same text with other images never shares K/V past that block."""
        digest = hashlib.sha256(b"images")
        for item in self.images:
            digest.update(item.content_hash)
        return digest.digest()

    @property
    def first_position(self) -> int:
        return int(self.positions[0])

    def rows_in(self, start: int, end: int) -> tuple[int, int]:
        """[lo, hi): the placeholder rows whose positions fall in the token range [start, end)."""
        return int(np.searchsorted(self.positions, start)), int(np.searchsorted(self.positions, end))

    def covers(self, start: int, end: int) -> bool:
        """Whether the token range [start, end) holds any placeholder."""
        lo, hi = self.rows_in(start, end)
        return hi > lo
