"""`hfbridge serve MODEL -pp 2` answers like `-pp 1` (a completion and a streamed chat, read by the official openai
client); killing the first stage's worker (not the one that returns logits: the last stage is left blocked on
its hand-off) turns /ready 503 and the server exits by itself, leaving no worker behind."""
from __future__ import annotations

from test_tensor_parallel_server import serve_two_ranks_then_kill_one


def test_serve_pp2_answers_like_pp1_and_dies_cleanly_with_a_stage(tiny_llama, tmp_path):
    log = serve_two_ranks_then_kill_one(str(tiny_llama[1]), "-pp", 0, tmp_path)  # stage 0
    assert "worker 0 exited" in log and "pp=2" in log
