"""CPU KV caches are resident when allocated (page_prefault.py). The oracle is the kernel's own answer, page by
page, to mincore(2): whether each page of the tensor is in memory. Linux only (mincore's meaning for anonymous
memory is Linux's)."""
import ctypes
import mmap
import sys

import pytest
import torch

from hfbridge.worker import page_prefault
from hfbridge.worker.kv_cache_sizing import allocate_kv_caches
from hfbridge.worker.layer_probe import LayerSpec

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) on anonymous memory: Linux")


def resident_fraction(t: torch.Tensor) -> float:
    """The share of the tensor's whole pages that are in memory now."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    pages = (end - start) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def test_prefault_makes_fresh_memory_resident():
    t = torch.empty(256 * MiB // 4)  # far above malloc's mmap threshold: a fresh mapping, no page touched yet
    page_prefault.prefault([t], num_threads=2)
    assert resident_fraction(t) == 1.0


def test_kv_caches_on_cpu_are_resident_once_allocated():
    layers = {i: LayerSpec(num_kv_heads=4, head_dim=64, dtype=torch.float32, is_causal=True) for i in range(4)}
    caches = allocate_kv_caches(layers, num_blocks=2048, block_size=16, device=torch.device("cpu"))
    assert [c.numel() * c.element_size() for c in caches.values()] == [64 * MiB] * 4
    assert [resident_fraction(c) for c in caches.values()] == [1.0] * 4


def test_without_madvise_the_tensor_is_zero_filled(monkeypatch):
    # An older kernel (or another OS) refuses MADV_POPULATE_WRITE: the memory is written instead, which faults it in.
    monkeypatch.setattr(page_prefault, "_populate", lambda start, length: False)
    t = torch.full((64 * MiB // 4,), 7.0)
    page_prefault.prefault([t], num_threads=2)
    assert torch.equal(t, torch.zeros_like(t))
