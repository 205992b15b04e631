"""CPU KV caches are resident when allocated (page_prefault.py): the kernel's own count of this process's resident
memory (/proc/self/statm) is the oracle, so these run where there is one (Linux)."""
import sys

import pytest
import torch

from hfbridge.worker import page_prefault
from hfbridge.worker.kv_cache_sizing import allocate_kv_caches
from hfbridge.worker.layer_probe import LayerSpec

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page_prefault.mmap.PAGESIZE


def test_prefault_makes_fresh_memory_resident():
    t = torch.empty(256 * MiB // 4)  # far above malloc's mmap threshold: fresh pages, none resident yet
    before = resident_bytes()
    page_prefault.prefault([t], num_threads=2)
    assert resident_bytes() - before >= 250 * MiB


def test_kv_caches_on_cpu_are_resident_once_allocated():
    layers = {i: LayerSpec(num_kv_heads=4, head_dim=64, dtype=torch.float32, is_causal=True) for i in range(4)}
    before = resident_bytes()
    caches = allocate_kv_caches(layers, num_blocks=2048, block_size=16, device=torch.device("cpu"))
    size = sum(c.numel() * c.element_size() for c in caches.values())  # 4 x 64 MiB, each above malloc's mmap threshold
    assert size == 256 * MiB
    assert resident_bytes() - before >= size - 4 * MiB


def test_without_madvise_the_tensor_is_zero_filled(monkeypatch):
    # An older kernel (or another OS) refuses MADV_POPULATE_WRITE: the memory is written instead, which faults it in.
    monkeypatch.setattr(page_prefault, "_populate", lambda start, length: False)
    t = torch.full((64 * MiB // 4,), 7.0)
    page_prefault.prefault([t], num_threads=2)
    assert torch.equal(t, torch.zeros_like(t))
