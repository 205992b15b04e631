"""Multi-axis rotary positions (M-RoPE: Qwen2-VL's temporal, height and width axes) for a step's packed stream.

A request with images gets its prompt's [3, P] positions from the model's own get_rope_index once; its later
tokens sit at p + delta on all three axes (the rope delta get_rope_index returns), as Transformers' generate()
places them. Text-only requests have the same position on every axis."""
from __future__ import annotations

import weakref

import numpy as np
import torch

from hfbridge.multimodal.inputs import MultiModalInputs


class MRoPE:
    def __init__(self, rope_index):
        self.rope_index = rope_index  # the model's get_rope_index
        # per request's images: (positions [3, P] int64, delta), dropped with the request
        self._tables: weakref.WeakKeyDictionary[MultiModalInputs, tuple[np.ndarray, int]] = weakref.WeakKeyDictionary()

    def step_positions(self, positions: torch.Tensor, scheduled) -> torch.Tensor:
        """positions [1, T] of the step's scheduled requests (in order) -> [3, 1, T]; unchanged for a step without
        images (the model gives 1-D positions to every axis itself)."""
        if all(getattr(item.request, "mm_inputs", None) is None for item in scheduled):
            return positions
        out = positions.expand(3, 1, -1).clone()
        offset = 0
        for item in scheduled:
            images = getattr(item.request, "mm_inputs", None)
            if images is not None:
                table, delta = self._table(item.request.prompt_token_ids, images)
                pos = np.arange(item.start, item.end)
                in_prompt = pos < table.shape[1]
                values = np.where(in_prompt, table[:, np.minimum(pos, table.shape[1] - 1)], pos + delta)
                out[:, 0, offset : offset + len(pos)] = torch.from_numpy(values).to(out.device)
            offset += item.num_new_tokens
        return out

    def _table(self, prompt_ids: list[int], images: MultiModalInputs) -> tuple[np.ndarray, int]:
        table = self._tables.get(images)
        if table is None:
            ids = torch.tensor([prompt_ids])
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[0, torch.from_numpy(images.positions)] = 1  # 1: an image token (Transformers' mm_token_type_ids)
            grid = torch.cat([image.pixel_inputs["image_grid_thw"] for image in images.images])
            positions, delta = self.rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
            table = self._tables[images] = (positions[:, 0].cpu().numpy(), int(delta.reshape(-1)[0]))
        return table
