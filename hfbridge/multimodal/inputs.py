"""What a request carries about its images, from input processing to the runner."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageItem:
    content_hash: bytes  # sha256 of the image's mode, size and pixels: the encoder cache's key
    pixel_inputs: dict[str, torch.Tensor]  # the processor's output for this image alone (pixel_values, sizes...)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the runner keeps per-request tables by it
class MultiModalInputs:
    """A request's images, in prompt order, and where their embeddings go.

    positions [P] (ascending) are the prompt positions of the image placeholder tokens; the encoder's rows for the
    images, concatenated in order, fill them one to one (Transformers' own masked_scatter order)."""

    images: tuple[ImageItem, ...]
    positions: np.ndarray  # [P] int64
    # (first, end) positions of each image's placeholder run, for families whose image tokens attend to each other
    # both ways (Gemma 3): a prefill chunk never ends inside one. Empty for causal families.
    bidirectional_blocks: tuple[tuple[int, int], ...] = ()

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

    def block_cut(self, start: int, end: int) -> tuple[int, int] | None:
        """The bidirectional block that a chunk [start, end) would end inside, or None."""
        for first, block_end in self.bidirectional_blocks:
            if first < end < block_end:
                return first, block_end
        return None


def placeholder_runs(positions: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive positions: [3, 4, 5, 9, 10] -> ((3, 6), (9, 11))."""
    if not positions.size:
        return ()
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return tuple((int(run[0]), int(run[-1]) + 1) for run in np.split(positions, breaks))
