"""`hfbridge serve MODEL -pp 2` answers like `-pp 1` (a completion and a streamed chat, read by the official openai
client); killing the first stage's worker (not the one that returns logits: the last stage is left blocked on
its hand-off) turns /ready 503 and the server exits by itself, leaving no worker behind."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import psutil
from server_utils import start_server, stop_server
from test_tensor_parallel_server import answers, ready_status, workers_of


def ready_or_gone(url: str) -> int | None:
    """/ready's status; None once the server stopped listening (it exits soon after a worker dies)."""
    try:
        return ready_status(url)
    except urllib.error.URLError:
        return None


def test_serve_pp2_answers_like_pp1_and_dies_cleanly_with_a_stage(tiny_llama, tmp_path):
    folder = str(tiny_llama[1])
    process, url = start_server([folder, "--max-model-len", "64"], tmp_path / "pp1.log")
    try:
        expected = answers(url)
    finally:
        stop_server(process)
    process, url = start_server([folder, "--max-model-len", "64", "-pp", "2"], tmp_path / "pp2.log",
                                env={"OMP_NUM_THREADS": "1"})
    try:
        assert answers(url) == expected
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("hfbridge:parallel_world_size{")] == [2.0], metrics
        workers = workers_of(process.pid)
        assert len(workers) == 2
        workers[0].kill()  # stage 0
        deadline = time.monotonic() + 20
        while process.poll() is None and ready_or_gone(url) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is not None or ready_or_gone(url) in (503, None)
        assert process.wait(timeout=30) == 1  # exits by itself: no hang
        assert not psutil.wait_procs(workers, timeout=15)[1]
    finally:
        if process.poll() is None:
            stop_server(process)
        log = (tmp_path / "pp2.log").read_text()
    assert "worker 0 exited" in log and "pp=2" in log
