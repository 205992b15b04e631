"""`hfbridge serve MODEL -tp 2` answers like `-tp 1` (a completion and a streamed chat, read by the official
openai client); killing one worker turns /ready 503 and the server exits by itself, leaving no worker behind."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import openai
import psutil
from server_utils import start_server, stop_server

CHAT = [{"role": "user", "content": "Hello, my name is"}]


def answers(url: str) -> tuple[str, str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True)
    chat = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return completion.choices[0].text, chat


def ready_status(url: str) -> int | None:
    """/ready's status; None once the server stopped listening (it exits soon after a worker dies, so a poll can
    land after the socket closed)."""
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, TimeoutError):  # a server going away may accept and never answer
        return None


def workers_of(pid: int) -> list[psutil.Process]:
    """The server's rank processes: forked by its fork server (whose cmdline they share), or spawned."""
    server = psutil.Process(pid)
    forkserver = [c.pid for c in server.children() if "forkserver" in " ".join(c.cmdline())]
    return [c for c in server.children(recursive=True)
            if c.ppid() in forkserver or ("spawn_main" in " ".join(c.cmdline())
                                          and "resource_tracker" not in " ".join(c.cmdline()))]


def serve_two_ranks_then_kill_one(folder: str, flag: str, kill: int, tmp_path) -> str:
    """`hfbridge serve` with `flag 2` (-tp or -pp) answers like one rank, reports world size 2, then killing worker
    `kill` turns /ready non-200 and the server exits 1 by itself with no worker left.
    Returns the two-rank server's log."""
    process, url = start_server([folder, "--max-model-len", "64"], tmp_path / "one.log")
    try:
        expected = answers(url)
    finally:
        stop_server(process)
    process, url = start_server([folder, "--max-model-len", "64", flag, "2"], tmp_path / "two.log",
                                env={"OMP_NUM_THREADS": "1"})
    try:
        assert answers(url) == expected
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("hfbridge:parallel_world_size{")] == [2.0], metrics
        workers = workers_of(process.pid)
        assert len(workers) == 2
        workers[kill].kill()
        deadline = time.monotonic() + 20
        while process.poll() is None and ready_status(url) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is not None or ready_status(url) in (503, None)
        assert process.wait(timeout=30) == 1  # exits by itself: no hang
        assert not psutil.wait_procs(workers, timeout=15)[1]
    finally:
        if process.poll() is None:
            stop_server(process)
    return (tmp_path / "two.log").read_text()


def test_serve_tp2_answers_like_tp1_and_dies_cleanly_with_a_worker(tiny_llama, tmp_path):
    log = serve_two_ranks_then_kill_one(str(tiny_llama[1]), "-tp", 1, tmp_path)
    assert "tensor-parallel worker" in log and "world size 2" in log


def test_a_worker_killed_under_traffic_stops_the_server(tiny_llama, tmp_path):
    """Streams in flight when a rank dies end with an error, /ready stops answering 200 and the server exits 1 by
    itself with no worker left (before, every later request got a 500 while /ready said 200)."""
    import threading

    process, url = start_server([str(tiny_llama[1]), "--max-model-len", "64", "-tp", "2"], tmp_path / "busy.log",
                                env={"OMP_NUM_THREADS": "1"})
    workers = workers_of(process.pid)
    outcomes: list[str] = []
    started = threading.Event()

    def client() -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        for _ in range(50):
            try:
                for chunk in api.completions.create(model=api.models.list().data[0].id, prompt="Hello", stream=True,
                                                    max_tokens=40, temperature=0, extra_body={"ignore_eos": True}):
                    started.set()
                outcomes.append("done")
            except Exception as e:  # noqa: BLE001 - how each stream ended is what the test reads
                outcomes.append(type(e).__name__)
                if process.poll() is not None or ready_status(url) != 200:
                    return

    try:
        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        assert started.wait(60)
        workers[1].kill()
        assert process.wait(timeout=60) == 1  # exits by itself
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        errors = [o for o in outcomes if o != "done"]
        assert errors and len(errors) <= 3 * 2, outcomes  # each client saw its stream fail, then a closed server
        assert not psutil.wait_procs(workers, timeout=15)[1]
    finally:
        if process.poll() is None:
            stop_server(process)
    log = (tmp_path / "busy.log").read_text()
    assert "The engine stopped" in log
