"""The torch reference backend over a paged cache equals Transformers' own attention (sdpa, and Gemma2's
eager attention for softcap) computed on plain unpaged tensors."""
import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    sdpa_mask,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions
from hfbridge.attention_backends import torch_backend
from hfbridge.attention_backends.torch_backend import TorchReferenceBackend

D = 16


class FakeAttention(nn.Module):
    def __init__(self, num_heads, num_kv_heads, is_causal=True):
        super().__init__()
        self.num_key_value_groups = num_heads // num_kv_heads
        self.is_causal = is_causal
        self.eval()


def transformers_attention(q, k, v, layer: LayerOptions) -> torch.Tensor:
    """One sequence: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D], through Transformers' functions."""
    module = FakeAttention(q.shape[1], k.shape[1], layer.is_causal)
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, T, D]
    T = q.shape[0]
    mask = None
    if layer.sliding_window is not None and not layer.is_causal:
        # Transformers' bidirectional window is inclusive of `config.sliding_window`; modules pass that + 1
        mask = sdpa_mask(
            batch_size=1, q_length=T, kv_length=T, allow_is_causal_skip=False,
            mask_function=sliding_window_bidirectional_mask_function(layer.sliding_window - 1),
        )
    elif layer.sliding_window is not None:
        mask = sdpa_mask(
            batch_size=1, q_length=T, kv_length=T, mask_function=sliding_window_causal_mask_function(layer.sliding_window),
            allow_is_causal_skip=False,
        )
    if layer.softcap is not None:
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        out, _ = eager_attention_forward(module, q4, k4, v4, additive, scaling=layer.scaling, softcap=layer.softcap)
    else:
        out, _ = sdpa_attention_forward(module, q4, k4, v4, mask, scaling=layer.scaling, is_causal=layer.is_causal and mask is None)
    return out[0]


def paged_run(layer, q, k, v, kv_cache, tables, block_size, computed, new):
    """One backend step where request b computes its tokens computed[b]:computed[b]+new[b]."""
    rows = [torch.arange(c, c + n) for c, n in zip(computed, new)]
    if kv_cache is None:
        slots = [-1] * sum(new)
    else:
        slots = [tables[b][p // block_size] * block_size + p % block_size for b, r in enumerate(rows) for p in r.tolist()]
    meta = AttentionMetadata.build(
        slot_mapping=slots, query_lens=list(new), seq_lens=[c + n for c, n in zip(computed, new)], block_tables=tables
    )
    take = lambda x: torch.cat([x[b][r] for b, r in enumerate(rows)])  # noqa: E731
    return TorchReferenceBackend().forward(take(q), take(k), take(v), kv_cache, meta, layer)

CASES = {
    "causal": dict(),
    "sliding_window": dict(sliding_window=3),
    "softcap": dict(softcap=2.0),
    "window_and_softcap": dict(sliding_window=4, softcap=1.5),
}


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_size", [1, 4])
# The C kernel (D = 16 qualifies) takes prompt tokens of contexts up to KERNEL_CONTEXT_BYTES of K and V: all of
# them (default), none (0: decode tokens only), or those of the two shorter requests (7 tokens' worth at MHA)
@pytest.mark.parametrize("kernel_tokens", [None, 0, 7], ids=["kernel_default", "kernel_decode_only", "kernel_mixed"])
def test_paged_prefill_chunks_and_decode_equal_transformers(heads, case, block_size, kernel_tokens, monkeypatch):
    if kernel_tokens is not None:
        monkeypatch.setattr(torch_backend, "KERNEL_CONTEXT_BYTES", kernel_tokens * 2 * heads[1] * D * 4)
    torch.manual_seed(0)
    num_heads, num_kv_heads = heads
    lengths = [1, 5, 9, 13]
    layer = LayerOptions(0, scaling=0.3, **CASES[case])
    q = [torch.randn(n, num_heads, D) for n in lengths]
    k = [torch.randn(n, num_kv_heads, D) for n in lengths]
    v = [torch.randn(n, num_kv_heads, D) for n in lengths]
    expected = [transformers_attention(q[b], k[b], v[b], layer) for b in range(len(lengths))]

    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous blocks
    tables, i = [], 0
    for n in lengths:
        nb = -(-n // block_size)
        tables.append(perm[i : i + nb])
        i += nb
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, D), float("nan"))  # unwritten slots poison

    # step 1: a first chunk (prefixes ending mid-block); step 2: the rest but the last token; step 3: decode
    first = [max(1, n // 3) if n > 1 else 1 for n in lengths]
    second = [n - f - 1 if n - f > 1 else 0 for n, f in zip(lengths, first)]
    done = [0] * len(lengths)
    outs = [[] for _ in lengths]
    for chunk in (first, second, [n - f - s for n, f, s in zip(lengths, first, second)]):
        active = [b for b, n in enumerate(chunk) if n > 0]
        out = paged_run(
            layer, [q[b] for b in active], [k[b] for b in active], [v[b] for b in active], cache,
            [tables[b] for b in active], block_size, [done[b] for b in active], [chunk[b] for b in active],
        )
        offset = 0
        for b in active:
            outs[b].append(out[offset : offset + chunk[b]])
            offset += chunk[b]
            done[b] += chunk[b]
    for b, n in enumerate(lengths):
        torch.testing.assert_close(torch.cat(outs[b]), expected[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
# whole prompts of one length next to each other (a batch of equal prompts), among other lengths
@pytest.mark.parametrize("lengths", [[3, 7, 1], [5, 5, 5, 2, 5, 5]], ids=["distinct", "equal_runs"])
def test_whole_sequences_without_cache_equal_transformers(heads, sliding_window, is_causal, lengths):
    torch.manual_seed(1)
    layer = LayerOptions(0, scaling=0.25, is_causal=is_causal, sliding_window=sliding_window)
    q = [torch.randn(n, heads[0], D) for n in lengths]
    k = [torch.randn(n, heads[1], D) for n in lengths]
    v = [torch.randn(n, heads[1], D) for n in lengths]
    out = paged_run(layer, q, k, v, None, [[] for _ in lengths], 4, [0] * len(lengths), lengths)
    expected = torch.cat([transformers_attention(q[b], k[b], v[b], layer) for b in range(len(lengths))])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_equal_whole_prompts_with_a_cache_and_a_decode_equal_transformers(heads):
    """A step as a batch of equal prompts makes it: whole prompts of one length, one of another length between
    them, and a request decoding its last token, each against Transformers."""
    torch.manual_seed(3)
    block_size, lengths = 4, [6, 6, 6, 3, 6, 6, 9]
    num_heads, num_kv_heads = heads
    layer = LayerOptions(0, scaling=0.3)
    q = [torch.randn(n, num_heads, D) for n in lengths]
    k = [torch.randn(n, num_kv_heads, D) for n in lengths]
    v = [torch.randn(n, num_kv_heads, D) for n in lengths]
    expected = [transformers_attention(q[b], k[b], v[b], layer) for b in range(len(lengths))]
    tables, next_block = [], 0
    for n in lengths:
        tables.append(list(range(next_block, next_block + -(-n // block_size))))
        next_block += len(tables[-1])
    cache = torch.full((2, next_block, block_size, num_kv_heads, D), float("nan"))
    last = len(lengths) - 1  # its first 8 tokens in a step of its own, then its last token with the prompts
    paged_run(layer, [q[last]], [k[last]], [v[last]], cache, [tables[last]], block_size, [0], [8])
    new = lengths[:-1] + [1]
    out = paged_run(layer, q, k, v, cache, tables, block_size, [0] * last + [8], new)
    offsets = [0]
    for n in new:
        offsets.append(offsets[-1] + n)
    for b in range(last):
        torch.testing.assert_close(out[offsets[b]:offsets[b + 1]], expected[b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[offsets[last]:], expected[last][-1:], rtol=1e-5, atol=1e-5)


def test_bf16_inputs_are_computed_in_float32():
    torch.manual_seed(2)
    layer = LayerOptions(0, scaling=0.25)
    q, k, v = torch.randn(9, 4, D), torch.randn(9, 2, D), torch.randn(9, 2, D)
    cache = torch.zeros((2, 3, 4, 2, D), dtype=torch.bfloat16)
    out = paged_run(layer, [q.bfloat16()], [k.bfloat16()], [v.bfloat16()], cache, [[2, 0, 1]], 4, [0], [9])
    expected = transformers_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), layer)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
