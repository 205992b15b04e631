"""The background torch.compile as users meet it (enforce_eager=False, vLLM's default): a script ends right after its
last line with its own exit status, whatever the compile is doing; a request pauses the compile instead of waiting
on it for the GIL. The server's start-stop with these defaults is test_default_model.py's quick-start test."""
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hfbridge.compilation import IDLE_RESUME_S, BackgroundCompile

SCRIPT = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(level=logging.INFO)
    from hfbridge import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], model_impl="native", max_model_len=128, enforce_eager=False)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    compiling = [c.what for c in llm.llm_engine.executor.background_compiles() if not c.done.is_set()]
    print("LAST LINE", time.time(), len(out[0].outputs[0].token_ids), compiling, flush=True)
    sys.exit(3)
""")


@pytest.mark.slow
def test_a_script_exits_right_after_its_last_line_mid_compile(tiny_llama, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "HFBRIDGE_ENFORCE_EAGER"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # a cold cache: the compile is surely running
    process = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama[1])], capture_output=True, text=True,
                             env=env, timeout=300)
    ended = time.time()
    last = [line for line in process.stdout.splitlines() if line.startswith("LAST LINE")]
    assert last, process.stdout + process.stderr
    _, _, printed, num_tokens, still_compiling = last[0].split(" ", 4)
    assert num_tokens == "4"
    assert still_compiling != "[]", "the compile ended before the script did: this test proves nothing"
    assert process.returncode == 3, process.stderr[-3000:]  # the script's own status, not an abort (134)
    assert "terminate called" not in process.stderr
    assert "Abandoned the compile" in process.stderr
    assert ended - float(printed) < 20, f"the exit took {ended - float(printed):.1f} s after the last line"


def test_a_step_pauses_the_compile_until_the_engine_is_idle():
    """The warm-up here is plain Python work, counted: while steps hold it, it makes no progress; IDLE_RESUME_S
    after the last step it goes on by itself."""
    progress = [0]
    done = threading.Event()

    def warm_up():
        while not done.is_set():
            progress[0] += 1
            sum(range(100))

    compile = BackgroundCompile("a counter", warm_up)
    compile.start()
    try:
        time.sleep(0.2)
        assert progress[0] > 0
        held_until = time.monotonic() + 1.0
        while time.monotonic() < held_until:  # steps arriving every 50 ms for a second
            compile.hold_for_step()
            time.sleep(0.05)
            before = progress[0]
            time.sleep(0.05)
            assert progress[0] == before, "the compile ran while a step held it"
        time.sleep(IDLE_RESUME_S + 0.3)
        before = progress[0]
        time.sleep(0.1)
        assert progress[0] > before, "the compile did not go on once the steps stopped"
        assert compile.paused_s == 0.0 or compile.paused_s > 0.9
    finally:
        done.set()
        assert compile.abandon(timeout=10)


def _trace_a_little() -> int:
    return sum(range(100))


def test_abandon_ends_a_compile_mid_call_and_leaves_the_thread_clean():
    entered = threading.Event()
    deadline = time.monotonic() + 60  # only so that a broken abandon cannot keep the test process alive

    def warm_up():
        entered.set()
        while time.monotonic() < deadline:  # a graph that would not finish compiling: Python calls, like Inductor
            _trace_a_little()

    compile = BackgroundCompile("an endless graph", warm_up)
    compile.start()
    assert entered.wait(10)
    started = time.monotonic()
    assert compile.abandon(timeout=10)
    assert time.monotonic() - started < 5
    assert compile.done.is_set() and not compile.ready.is_set() and compile.error is None
