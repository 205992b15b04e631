"""Make a CPU tensor's memory resident before the first step writes it: the KV cache's pages, up front.

torch.empty of a multi-GiB cache only reserves address space; each 4 KiB page is then faulted in (and zeroed by the
kernel) by the first write to it. The engine's free-block queue hands out least recently used blocks first, so a
fresh server writes into never-touched blocks for its first `num_blocks` allocations: a page fault for every 4 KiB
of K and V, inside write_kv, on one thread while the other waits at the step's next barrier. vLLM zero-fills its
caches when it allocates them (torch.zeros) and serves from resident memory; this does the same, cheaper.

Prefaulting raises a fresh server's throughput by a few percent and costs a fraction of a second to seconds for the
default cache (madvise MADV_POPULATE_WRITE, Linux 5.14+, which faults pages in without writing them; zero_() is the
fallback; figures: docs/kernel-measurements.md). That is start-up time a server need not wait for: `BackgroundPrefault`
runs the madvise calls on a thread while the engine serves. MADV_POPULATE_WRITE never changes what a page holds (a
page already written is left as it is), so rows the first steps write meanwhile stay intact.

Measured on the same machine, alternating builds, the bundled SmolLM2-135M: `LLM(...)` took 6.9-8.4 s with the
prefault in line and 3.9-4.3 s with it on the thread; `hfbridge serve` was ready after 7.4-8.8 s and 3.9-4.5 s."""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import threading

import torch

logger = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14
_CHUNK_BYTES = 64 << 20  # one madvise call: `stop` is honoured between calls


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call (Windows)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _populate(start: int, length: int) -> bool:
    """Fault in the pages of [start, start + length), whole pages around it, without writing them."""
    madvise = _madvise()
    return madvise is not None and madvise(start, length, MADV_POPULATE_WRITE) == 0


def _chunks(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(page-aligned start, length): the pages the bytes of contiguous CPU `tensors` touch, in pieces of at most
    _CHUNK_BYTES."""
    page = mmap.PAGESIZE
    chunks = []
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        assert t.is_contiguous(), "prefault needs contiguous tensors"
        first = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
        chunks += [(start, min(_CHUNK_BYTES, end - start)) for start in range(first, end, _CHUNK_BYTES)]
    return chunks


class BackgroundPrefault:
    """Makes the memory of freshly allocated, contiguous CPU `tensors` resident on a thread of its own, started at
    once: the caller goes on (a server gets ready) while the pages fault in. madvise never writes the contents, so
    the tensors may be in use meanwhile. Where madvise cannot serve (found on the first chunk, before any use) the
    tensors are zero-filled instead, here and now.

    The thread holds addresses, not the tensors: the tensors' memory is freed by whoever owns them (it must not be
    freed on this thread, which may run while the interpreter exits; torch lets go of the GIL there, and a thread
    that takes it back then aborts the process). Once memory is unmapped madvise fails and the thread ends; a range
    mapped anew in between only gets its pages faulted in, its contents unchanged. `stop`, or the end of the main
    thread (the process exiting), ends it after the chunk in hand (64 MiB: tens of ms)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self._chunks = _chunks(tensors)
        self._stopping = threading.Event()
        # Not a daemon: one that comes back from madvise while the interpreter finalizes aborts the process. An
        # exiting process waits for the chunk in hand instead.
        self._thread = threading.Thread(target=self._run, name="hfbridge-kv-prefault")
        if self._chunks and not _populate(*self._chunks[0]):  # an older kernel or another OS
            logger.debug("madvise(MADV_POPULATE_WRITE) is unavailable; zero-filling %d tensors", len(tensors))
            for t in tensors:
                t.zero_()  # writing the memory faults it in too
            self._chunks = []
        self._thread.start()

    def _run(self) -> None:
        for start, length in self._chunks[1:]:
            if self._stopping.is_set() or not threading.main_thread().is_alive() or not _populate(start, length):
                return

    def stop(self) -> None:
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every page is resident (or the thread was stopped); True when the thread has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
