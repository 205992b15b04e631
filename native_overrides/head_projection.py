"""The LM head: the one projection as wide as the vocabulary ([V, H], e.g. 49152 x 576), run for every sampled
row of every step. On the CPU in float32 and bfloat16 it runs on a packed copy of its weight (packed_linear.py: about twice as
fast as F.linear for one row); results equal F.linear's up to float32 summation order.
Anything else (GPU, float16, no C compiler) calls F.linear. `greedy` gives the argmax tokens alone, through
greedy_head.py's screen where it applies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hfbridge.native_overrides.greedy_head import GreedyHead
from hfbridge.native_overrides.packed_linear import pack_weight, packed_linear
from hfbridge.sample.argmax_cpu import row_argmax


class HeadProjection:
    """hidden [N, H] -> logits [N, V] for weight [V, H]. Not a module: the packed copy is a cache of the weight
    (rebuilt if the weight changes in place, e.g. through apply_model), never a parameter or state. The head is
    not a PackedLinear because a tied head's weight is the embedding's."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.version = weight._version
        self.packed = pack_weight(weight)
        self.greedy_head = GreedyHead.build(weight, self.packed)

    def is_current(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight._version == self.version

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and hidden.dtype == self.packed.dtype and hidden.shape[0] > 0:
            return packed_linear(hidden, self.packed, None, self.weight.shape[0])
        return F.linear(hidden, self.weight)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> [N] int64: each row's first largest logit, the token row_argmax takes from
        self(hidden)."""
        if self.greedy_head is None or hidden.dtype != torch.float32 or hidden.shape[0] == 0:
            return row_argmax(self(hidden).float())
        tokens = self.greedy_head(hidden)
        missed = (tokens < 0).nonzero()[:, 0]
        if missed.numel():  # rows the screen's bound cannot serve: in full
            tokens[missed] = row_argmax(self(hidden[missed]).float())
        return tokens
