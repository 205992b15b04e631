"""parallel/state.py's collectives over a real two-rank gloo world (two spawned processes)."""
from __future__ import annotations

import queue

import torch
import torch.multiprocessing as mp

CALLS = 300


def _rank(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    from parallel.state import get_tp_group, init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, 2, 2, f"file://{store}", torch.device("cpu"))
    tp = get_tp_group()
    held, sums = 0, []
    for i in range(CALLS):
        t = torch.full((4096,), float(rank + i))
        tp.all_reduce(t)
        held += t._use_count() > 1  # a reference besides this Python tensor's own: gloo's worker still has it
        sums.append(t[0].item())
    results.put((rank, held, sums))
    dist.destroy_process_group()


def test_a_collective_returns_after_gloo_let_go_of_its_tensors(tmp_path):
    """Gloo's worker thread drops its references to a collective's tensors after waking the caller; a rank that
    exits in that window aborts in interpreter teardown (SIGABRT from a destructor taking the GIL). Without the
    wait for the release, a fifth of these calls returned with the worker still holding the tensor."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / "store")
    ranks = [ctx.Process(target=_rank, args=(r, store, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        got = sorted(results.get(timeout=120) for _ in ranks)
    except queue.Empty:
        got = None
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got is not None, "a rank did not report"
    for rank, held, sums in got:
        assert held == 0, f"rank {rank}: {held} of {CALLS} all-reduces returned with gloo still holding the tensor"
        assert sums == [float(0 + i) + float(1 + i) for i in range(CALLS)]  # the reduction itself
    assert all(p.exitcode == 0 for p in ranks)
