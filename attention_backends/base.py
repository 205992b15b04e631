"""The interface every attention backend implements."""
from __future__ import annotations

from typing import Protocol

import torch

from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, block_size, Hkv, D], None = no cache (encoders)
        metadata: AttentionMetadata,
        layer: LayerOptions,
    ) -> torch.Tensor:  # [T, H, D]
        """Store the new K/V in the cache (through slot_mapping), then attend every query to its context."""
        ...
