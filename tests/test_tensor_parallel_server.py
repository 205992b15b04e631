"""`hfbridge serve MODEL -tp 2` answers like `-tp 1` (a completion and a streamed chat, read by the official
openai client); killing one worker turns /ready 503 and the server exits by itself, leaving no worker behind."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
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


def ready_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def workers_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]


def test_serve_tp2_answers_like_tp1_and_dies_cleanly_with_a_worker(tiny_llama, tmp_path):
    folder = str(tiny_llama[1])
    process, url = start_server([folder, "--max-model-len", "64"], tmp_path / "tp1.log")
    try:
        expected = answers(url)
    finally:
        stop_server(process)
    process, url = start_server([folder, "--max-model-len", "64", "-tp", "2"], tmp_path / "tp2.log",
                                env={"OMP_NUM_THREADS": "1"})
    try:
        assert answers(url) == expected
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("hfbridge:parallel_world_size{")] == [2.0], metrics
        workers = workers_of(process.pid)
        assert len(workers) == 2
        workers[1].kill()
        deadline = time.monotonic() + 20
        while process.poll() is None and ready_status(url) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is not None or ready_status(url) == 503
        assert process.wait(timeout=30) == 1  # exits by itself: no hang
        assert not psutil.wait_procs(workers, timeout=15)[1]
    finally:
        if process.poll() is None:
            stop_server(process)
        log = (tmp_path / "tp2.log").read_text()
    assert "tensor-parallel worker" in log and "world size 2" in log
