"""`hfbridge serve MODEL -pp 2` answers like `-pp 1` (a completion and a streamed chat, read by the official openai
client); killing the first stage's worker (not the one that returns logits: the last stage is left blocked on
its hand-off) turns /ready 503 and the server exits by itself, leaving no worker behind."""
from __future__ import annotations

import urllib.error

from test_tensor_parallel_server import ready_status, serve_two_ranks_then_kill_one


def ready_or_gone(url: str) -> int | None:
    """/ready's status; None once the server stopped listening (it exits soon after a worker dies)."""
    try:
        return ready_status(url)
    except urllib.error.URLError:
        return None


def test_serve_pp2_answers_like_pp1_and_dies_cleanly_with_a_stage(tiny_llama, tmp_path):
    log = serve_two_ranks_then_kill_one(str(tiny_llama[1]), "-pp", 0, tmp_path, ready=ready_or_gone)  # stage 0
    assert "worker 0 exited" in log and "pp=2" in log
