"""The structured-outputs mask (hfbridge/csrc/token_bitmask.c) against xgrammar's own apply_token_bitmask_inplace
(the oracle): random bitmasks, vocabularies that are and are not multiples of 32, a subset of rows, and a head
wider than the grammar's vocabulary."""
import pytest
import torch
import xgrammar as xgr

from hfbridge.sample import sampler


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_mask_equals_xgrammar(vocab):
    assert sampler._bitmask_library() is not None, "token_bitmask.c did not build: the kernel is the one under test"
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator)
    words = (vocab + 31) // 32
    bits = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    bits[0] = -1  # all allowed: nothing masked
    bits[1, ::2] = 0  # long runs masked
    rows = [4, 1, 2]
    ours = logits.clone()
    sampler.apply_grammar_bitmask(ours, rows, bits)
    expected = logits.clone()
    full = torch.full((6, words), -1, dtype=torch.int32)
    full[rows] = bits
    xgr.apply_token_bitmask_inplace(expected, full, indices=rows)
    assert torch.equal(ours, expected)


def test_tokens_past_the_grammars_vocabulary_are_masked():
    logits = torch.zeros(2, 70)
    bits = torch.full((1, 2), -1, dtype=torch.int32)  # the grammar knows 64 tokens, allows them all
    sampler.apply_grammar_bitmask(logits, [1], bits)
    assert torch.isneginf(logits[1, 64:]).all() and not torch.isinf(logits[1, :64]).any()
    assert not torch.isinf(logits[0]).any()


def test_fallback_without_the_kernel_agrees(monkeypatch):
    logits = torch.randn(3, 100)
    bits = torch.randint(-2**31, 2**31 - 1, (2, 4), dtype=torch.int32)
    with_kernel = logits.clone()
    sampler.apply_grammar_bitmask(with_kernel, [0, 2], bits)
    monkeypatch.setattr(sampler, "_bitmask_library", lambda: None)
    without = logits.clone()
    sampler.apply_grammar_bitmask(without, [0, 2], bits)
    assert torch.equal(with_kernel, without)
