"""Which slice of a full checkpoint tensor this rank holds, and reading only that slice."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """This rank keeps `ranges` (start, stop) along `dim` of the full tensor, concatenated in order.

    One range for a plain shard; one per packed piece for fused tensors (gate_up: the rank's part of gate, then
    of up), so the local tensor still chunks into the same pieces."""

    dim: int  # negative: counted from the end (2D Linear weights and 3D expert tensors alike)
    ranges: tuple[tuple[int, int], ...]
    full_shape: tuple[int, ...]

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(stop - start for start, stop in self.ranges)
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The local slice of a tensor already in memory (fused MoE tensors built by a converter)."""
        self._check(tuple(full.shape))
        parts = [full.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)).contiguous()

    def read(self, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Read only the local slice when the loader offers safetensors' `get_slice`, else slice the full tensor."""
        get_slice = getattr(load, "get_slice", None)
        if get_slice is None:
            return self.take(load())
        handle = get_slice()
        shape = tuple(handle.get_shape())
        self._check(shape)
        dim = self.dim % len(shape)
        parts = []
        for start, stop in self.ranges:
            index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(shape)))
            parts.append(handle[index])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _check(self, shape: tuple[int, ...]) -> None:
        if shape != self.full_shape:
            raise ValueError(
                f"Checkpoint tensor has shape {shape} but the unsharded model expects {self.full_shape}; "
                "the config does not match the weights"
            )


def even_ranges(size: int, rank: int, world: int, pieces: int = 1) -> tuple[tuple[int, int], ...]:
    """Rank `rank`'s 1/world of each of `pieces` equal pieces of a dimension of length `size`."""
    piece = size // pieces
    local = piece // world
    return tuple((p * piece + rank * local, p * piece + (rank + 1) * local) for p in range(pieces))
