"""The LM head: the one projection as wide as the vocabulary ([V, H], e.g. 49152 x 576), run for every sampled
row of every step. On the CPU in float32 and bfloat16 it runs on a packed copy of its weight (packed_linear.py: about twice as
fast as F.linear for one row); results equal F.linear's up to float32 summation order.
Anything else (GPU, float16, no C compiler) calls F.linear. `greedy` gives the argmax tokens alone, through
greedy_head.py's screen where it applies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hfbridge.native_overrides.greedy_head import GreedyHead
from hfbridge.native_overrides.packed_linear import pack_weight, packed_linear, unlay
from hfbridge.sample.argmax_cpu import row_argmax


class HeadProjection:
    """hidden [N, H] -> logits [N, V] for weight [V, H]. Not a module: its panels are laid out from the model's
    head weight (the embedding's, when tied), which the model then releases (NativeCausalLM.plain_weights reads it
    back). The head is not a PackedLinear because a tied head's weight is the embedding's."""

    def __init__(self, weight: torch.Tensor):
        self.vocab = weight.shape[0]
        self.packed = pack_weight(weight)
        self.greedy_head = GreedyHead.build(weight, self.packed)
        # packed: the panels are the head's weight (the model may release its plain copy); else F.linear's
        self.weight = weight if self.packed is None else None
        self.track(weight)

    def track(self, weight: torch.Tensor) -> None:
        """Take `weight` (the one built from, or the same values read back from the panels) as the head's own."""
        self.source = (id(weight), weight._version)

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether `weight` is still the one this head was built from, unchanged."""
        return (id(weight), weight._version) == self.source

    def plain_weight(self) -> torch.Tensor:
        """The weight [V, H], read back from the panels (or the plain weight itself where there are none)."""
        return unlay(self.packed, self.vocab) if self.packed is not None else self.weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(hidden, self.weight)
        if hidden.shape[0] == 0:
            return hidden.new_empty(0, self.vocab)
        return packed_linear(hidden.to(self.packed.dtype), self.packed, None, self.vocab).to(hidden.dtype)

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
