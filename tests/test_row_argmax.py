"""Greedy tokens through hfbridge/csrc/row_argmax.c against torch.argmax itself (the oracle): the first index of
the largest value, ties, -inf rows and NaN included, at every vector width the kernel is built for."""
import pytest
import torch

from hfbridge.sample import argmax_cpu


def _hard_rows(n: int) -> torch.Tensor:
    """Rows that trip an argmax: ties between lanes and the tail, all -inf, +inf, NaN first / last / in the tail."""
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(12, n, generator=g)
    rows[1] = rows[1].round()  # many ties
    rows[2].fill_(float("-inf"))
    rows[3, n // 2] = rows[3, -1] = rows[3].max() + 1  # the same maximum twice: the first must win
    rows[4, -1] = float("inf")
    rows[5, 0] = rows[5, -1] = float("inf")
    rows[6, -1] = float("nan")
    rows[7, 0] = float("nan")
    rows[8, n // 3] = float("nan")
    rows[8, n // 2] = float("inf")
    rows[9].fill_(3.0)  # every element ties
    rows[10, 1::2] = float("nan")
    rows[11] = rows[11].abs().neg() - 1e30  # all very negative
    return rows


@pytest.mark.parametrize("n", [1, 5, 16, 17, 31, 49152, 49157])
def test_row_argmax_equals_torch_argmax(n):
    logits = _hard_rows(n)
    assert argmax_cpu._library() is not None, "row_argmax.c did not build: the kernel is the one under test"
    assert torch.equal(argmax_cpu.row_argmax(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_every_vector_width_equals_torch_argmax(vector_bytes):
    lib = argmax_cpu._library(vector_bytes)
    assert lib is not None, "row_argmax.c did not build"
    for n in (1, 3, 4, 8, 9, 16, 33, 1000):
        logits = _hard_rows(n)
        assert torch.equal(argmax_cpu.run_row_argmax(lib, logits), logits.argmax(dim=-1))


def test_strided_and_empty_inputs():
    logits = _hard_rows(64)
    assert torch.equal(argmax_cpu.row_argmax(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))
    assert argmax_cpu.row_argmax(logits[:0]).shape == (0,)
