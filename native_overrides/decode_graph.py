"""Pure decode steps of a native decoder as one compiled graph (enforce_eager=False).

In a decode step every request brings exactly one new token, and every layer runs the same code with no Python
decision in between: the attention-free region before attention, the KV write, the paged decode attention
(the C kernels of cpu_kernels.py where they serve, else paged_decode.py's formulation; both read the cache in
place), the region after. Compiled whole, the step is one
Dynamo call where the per-layer path makes three per layer (each tens of microseconds of guards and bytecode:
milliseconds a step), and single-token steps, which the per-layer regions leave eager, get fused elementwise code
too.

The KV write is a custom op that mutates the cache (one C call on CPU): written as a plain index_copy_ on a graph
input, Inductor copies the whole cache every step (hundreds of times slower: docs/kernel-measurements.md).

Two graphs: one request (torch.compile specialises size 1) and B >= 2 requests; the context length is symbolic in
both, and so are the cache's block count and block size. Steps with prompt tokens, models with sliding-window
layers, and attention backends other than the torch one take the per-layer path."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hfbridge.attention_backends import cpu_kernels
from hfbridge.attention_backends.forward_context import get_forward_context
from hfbridge.attention_backends.paged_decode import paged_decode_attention
from hfbridge.attention_backends.torch_backend import padded_slots, write_kv
from hfbridge.compilation import COMPILE_OPTIONS, BackgroundCompile, constant_floats, graph_op


# Block-table widths for the warm-up to choose two from: primes, none a size the step has otherwise
WARM_UP_WIDTHS = (3, 5, 7, 11, 23, 31, 37, 41, 43, 47)


def warm_up_sizes(cache_shape: tuple[int, ...], batches: tuple[int, ...]) -> list[tuple[int, int]]:
    """Two (block-table width, context length) pairs for the decode graph's warm-up, on a cache of cache_shape
    [2, N, block size, Hkv, D]: each size equal to no other size of the step (not even each other's)."""
    taken, pairs = {*cache_shape, *batches}, []
    block = cache_shape[2]
    for width in WARM_UP_WIDTHS:
        if width in taken:
            continue
        context = next(c for c in range(block * (width - 1) + 1, block * width + 1) if c not in taken | {width})
        pairs.append((width, context))
        taken |= {width, context}
        if len(pairs) == 2:
            return pairs
    raise AssertionError("unreachable: WARM_UP_WIDTHS holds more widths than a step has sizes")


# kv_cache [2, N, bs, Hkv, D] written in place at slot_mapping [T] with key / value [T, Hkv, D].
write_kv_op = graph_op(
    "hfbridge::write_kv", "(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()", write_kv,
    lambda kv_cache, key, value, slot_mapping: None)


def decode_step(
    model: nn.Module,  # the DecoderModel: embed_tokens, layers, norm
    input_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    rotary: nn.Module,
    kv_caches: list[torch.Tensor],  # per layer [2, N, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [B] where each new token's K/V goes
    lens: torch.Tensor,  # [B] context lengths, the new token included
    slots: torch.Tensor | None,  # [B, L] every request's context slots, padded (see padded_slots)
    block_tables: torch.Tensor | None,  # [B, W] int32, instead of slots: the CPU kernels read the cache
) -> torch.Tensor:  # [B, hidden]
    hidden, residual = model.embed_tokens(input_ids), None
    for layer, kv_cache in zip(model.layers, kv_caches):
        q, k, v, residual = layer.before_attention(hidden, residual, positions, rotary)
        write_kv_op(kv_cache, k, v, slot_mapping)
        attn = layer.self_attn  # module attributes: constants of the graph
        if block_tables is not None:
            out = cpu_kernels.paged_decode_cpu(q, kv_cache, block_tables, lens, attn.options.scaling)
        else:
            out = paged_decode_attention(q, kv_cache, slots, lens, attn.options.scaling, num_heads=attn.num_heads,
                                         num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim)
        hidden, residual = layer.after_attention(out.to(q.dtype), residual)
    return model.norm(hidden, residual)[0]


class DecodeGraph(BackgroundCompile):
    def __init__(self, model: nn.Module, rotary: nn.Module):
        super().__init__("the decode step", self._warm_up)
        self.model, self.rotary = model, rotary
        self.fn: Callable[..., torch.Tensor] | None = None  # set on the compile thread (Inductor's import: ~1 s)
        # The CPU kernels where they run (the cache has the weights' dtype; the caller leaves sliding windows out),
        # else the compiled formulation of paged_decode.py.
        weight, attn = model.norm.weight, model.layers[0].self_attn
        self.cpu_kernels = cpu_kernels.available(weight.device, weight.dtype, attn.head_dim)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """input_ids / positions [T] -> hidden [T, hidden] when this step is a decode step the graph serves, else
        None (the caller takes the per-layer path)."""
        if not self.ready.is_set():
            return None
        ctx = get_forward_context()
        md, num_layers = ctx.metadata, len(self.model.layers)
        # Every request one token; contexts of 2+ tokens (a one-token prompt's first step also has one query token,
        # but a context of 1 would need a graph of its own).
        if (md.max_query_len != 1 or md.num_tokens != md.num_requests or md.max_seq_len < 2
                or getattr(ctx.backend, "name", None) != "torch" or len(ctx.kv_caches) != num_layers):
            return None
        kv_caches = [ctx.kv_caches[i] for i in range(num_layers)]
        if self.cpu_kernels:
            return self.fn(self.model, input_ids, positions, self.rotary, kv_caches, md.slot_mapping, md.seq_lens,
                           None, md.block_tables)
        lens = md.seq_lens.long()
        slots = padded_slots(md.block_tables, lens, md.max_seq_len, kv_caches[0].shape[2])
        return self.fn(self.model, input_ids, positions, self.rotary, kv_caches, md.slot_mapping, lens,
                       slots.view(md.num_requests, md.max_seq_len), None)

    def _warm_up(self) -> None:
        # One request and two batch sizes, two context lengths each; odd primes everywhere (sizes equal at trace
        # time would be assumed equal forever, "duck sizing", and the graph traced so would be one more to compile
        # and to check first on every step), the cache too: 29 blocks of 13 slots; block tables of two widths that
        # equal no other size of the step (SmolLM2's 3 KV heads matched a 3-block table).
        self.fn = torch.compile(decode_step, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
        weight, attn = self.model.norm.weight, self.model.layers[0].self_attn
        shape = (2, 29, 13, attn.num_kv_heads, attn.head_dim)
        sizes = warm_up_sizes(shape, batches=(17, 19, 1))
        # like the real caches: allocated outside inference mode (the mode a tensor was made in is guarded)
        caches = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.model.layers]
        with torch.inference_mode(), constant_floats():
            for batch, (width, context) in ((17, sizes[0]), (19, sizes[1]), (1, sizes[0]), (1, sizes[1])):
                if self.should_stop():
                    return
                ids = torch.zeros(batch, dtype=torch.long, device=weight.device)
                positions = self.rotary.warm_up_positions(batch)  # also the slots written
                if self.cpu_kernels:  # block tables of `width` blocks, all block 0
                    tables = torch.zeros(batch, width, dtype=torch.int32, device=weight.device)
                    lens = torch.full((batch,), context, dtype=torch.int32, device=weight.device)
                    self.fn(self.model, ids, positions, self.rotary, caches, positions.clone(), lens, None, tables)
                else:
                    slots = torch.zeros(batch, context, dtype=torch.long, device=weight.device)
                    lens = torch.full((batch,), context, dtype=torch.long, device=weight.device)
                    self.fn(self.model, ids, positions, self.rotary, caches, positions.clone(), lens, slots, None)
