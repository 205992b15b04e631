"""Attention sinks (GPT-OSS's `s_aux`): the torch reference backend and the Triton kernels (Triton's CPU interpreter)
equal Transformers' own GPT-OSS eager attention, over a paged cache: packed prefill of two requests, then a decode
step each (also with the decode split over the context), with and without a sliding window, with GQA."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates hfbridge's kernels

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward  # noqa: E402

from hfbridge.attention_backends import triton_kernels  # noqa: E402
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions  # noqa: E402
from hfbridge.attention_backends.torch_backend import TorchReferenceBackend  # noqa: E402
from hfbridge.attention_backends.triton_backend import TritonAttentionBackend  # noqa: E402

if not triton_kernels.INTERPRETED:
    importlib.reload(triton_kernels)

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 16, 4
LENGTHS = (7, 13)


class _GptOssAttentionStub(torch.nn.Module):
    """What Transformers' eager function reads off the module: sinks, the GQA group, training."""

    def __init__(self, sinks):
        super().__init__()
        self.sinks = torch.nn.Parameter(sinks)
        self.num_key_value_groups = HEADS // KV_HEADS


def transformers_attention(q, k, v, sinks, window):  # [L, H, D] / [L, Hkv, D] -> [L, H, D]
    length = q.shape[0]
    pos = torch.arange(length)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[:, None] - pos[None, :] < window
    mask = torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]
    out, _ = eager_attention_forward(
        _GptOssAttentionStub(sinks).eval(), q.transpose(0, 1)[None], k.transpose(0, 1)[None],
        v.transpose(0, 1)[None], mask, scaling=DIM**-0.5,
    )
    return out[0]


def paged_attention(backend, qs, ks, vs, layer):
    """Prefill all tokens but the last of each request packed in one step, then one decode step."""
    tables, first = [], 0
    for length in LENGTHS:
        n = -(-length // BLOCK)
        tables.append(list(range(first, first + n)))
        first += n
    cache = torch.zeros(2, first, BLOCK, KV_HEADS, DIM)
    slot = lambda b, p: tables[b][p // BLOCK] * BLOCK + p % BLOCK  # noqa: E731
    outs = [[] for _ in LENGTHS]
    for step in ("prefill", "decode"):
        spans = [range(n - 1) if step == "prefill" else range(n - 1, n) for n in LENGTHS]
        metadata = AttentionMetadata.build(
            slot_mapping=[slot(b, p) for b, span in enumerate(spans) for p in span],
            query_lens=[len(s) for s in spans], seq_lens=[s.stop for s in spans], block_tables=tables,
        )
        cat = lambda xs: torch.cat([x[s.start:s.stop] for x, s in zip(xs, spans)])  # noqa: E731
        out = backend.forward(cat(qs), cat(ks), cat(vs), cache, metadata, layer)
        for b, chunk in enumerate(out.split([len(s) for s in spans])):
            outs[b].append(chunk)
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_match_transformers_gpt_oss_attention(window):
    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(n, HEADS, DIM, generator=gen) for n in LENGTHS]
    ks = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in LENGTHS]
    vs = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in LENGTHS]
    sinks = torch.tensor([2.0, -1.0, 0.5, 4.0])  # large enough to move every output visibly
    layer = LayerOptions(0, DIM**-0.5, sliding_window=window, sinks=sinks)
    expected = [transformers_attention(q, k, v, sinks, window) for q, k, v in zip(qs, ks, vs)]
    without_sinks = [transformers_attention(q, k, v, torch.full((HEADS,), -1e4), window) for q, k, v in zip(qs, ks, vs)]
    assert all((e - w).abs().max() > 0.05 for e, w in zip(expected, without_sinks))  # the sinks matter here

    for backend in (TorchReferenceBackend(), TritonAttentionBackend(), TritonAttentionBackend(decode_num_splits=2)):
        for ours, theirs in zip(paged_attention(backend, qs, ks, vs, layer), expected):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5, msg=f"{backend.name}")
