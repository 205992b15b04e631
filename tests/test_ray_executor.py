"""distributed_executor_backend="ray" (issue 11): on a local Ray cluster started here, tp=2 gives the tokens
Transformers' generate() gives and the top-5 logprobs of tp=1; remote-code models travel to the actors; a dead
actor is reported at once (check_health, the next step); `hfbridge serve --distributed-executor-backend ray` joins
an existing cluster through RAY_ADDRESS, answers like the offline engine, and exits when an actor dies; a local
cluster started from a loader thread outlives the thread. Without Ray, the backend name says which extra to
install. ~60 s on 2 cores (~90 s when contended): ray.init ~6 s, each tp=2 engine ~5-10 s, the server ~20 s."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from greedy import assert_greedy_match, hf_greedy
from server_utils import start_server, stop_server
from test_cli import captured, run as cli_run  # noqa: F401 - captured is a fixture
from test_custom_model import write_remote_code_model
from test_tensor_parallel import GREEDY, MAX_NEW, TEXTS, assert_same_outputs, run
from test_tensor_parallel_server import CHAT, answers, ready_status
from tiny_models import build_tokenizer, make_tiny_model

from hfbridge import LLM, SamplingParams
from hfbridge.worker.mp_executor import WorkerDiedError


def test_without_ray_the_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    with pytest.raises(ValueError, match=r"needs Ray: pip install 'hfbridge\[ray\]'"):
        LLM(model="unused", tensor_parallel_size=2, distributed_executor_backend="ray")


@pytest.mark.parametrize("backend", ["ray", "mp", "external_launcher", "uni"])
def test_serve_passes_the_backend_flag_through(captured, backend):
    """vLLM's `--distributed-executor-backend` reaches EngineArgs (it once was dropped as an ignored flag)."""
    result = cli_run(["serve", "/models/x", "-tp", "2", "--distributed-executor-backend", backend])
    assert result.exit_code == 0, result.output
    assert captured["engine_args"].distributed_executor_backend == backend


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"Ray cannot be imported ({e}); install it with pip install 'hfbridge[ray]'")
    # 4 logical CPUs: two tp=2 engines (this process's and the server's) at 1 CPU per actor.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not psutil.wait_procs(started, timeout=15)[1], "Ray left processes behind"


@pytest.fixture(scope="module")
def prompts():
    tok = build_tokenizer()
    return [tok(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def llama(ray_cluster, tmp_path_factory, prompts):
    model, folder = make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("ray_llama"))
    _, reference = run(folder, prompts, model_impl="transformers")  # tp=1, the same modules as the shards
    llm, outputs = run(folder, prompts, tensor_parallel_size=2, distributed_executor_backend="ray")
    yield model, folder, reference, llm, outputs
    llm.llm_engine.shutdown()


def test_ray_tp2_equals_transformers_and_tp1(llama, prompts):
    model, _, reference, llm, outputs = llama
    assert_same_outputs(outputs, reference)
    for prompt, out in zip(prompts, outputs):
        tokens, logits = hf_greedy(model, prompt, MAX_NEW, ignore_eos=True)
        assert_greedy_match(out.outputs[0].token_ids, tokens, logits)
    # Two actors, each holding half of q_proj's rows (Llama's plan: colwise).
    full = model.model.layers[0].self_attn.q_proj.weight.shape
    shapes = llm.apply_model(lambda m: tuple(m.model.model.layers[0].self_attn.q_proj.weight.shape))
    assert shapes == [(full[0] // 2, full[1])] * 2


def test_remote_code_model_over_ray(ray_cluster, tmp_path, prompts):
    """The remote-code classes exist only in this process: they reach the actors by value."""
    write_remote_code_model(tmp_path / "my_model")
    _, reference = run(tmp_path / "my_model", prompts, trust_remote_code=True)
    llm, outputs = run(tmp_path / "my_model", prompts, trust_remote_code=True, tensor_parallel_size=2,
                       distributed_executor_backend="ray")
    try:
        assert_same_outputs(outputs, reference)
    finally:
        llm.llm_engine.shutdown()


def test_serve_on_an_existing_cluster_answers_and_exits_with_a_dead_actor(ray_cluster, llama, tmp_path):
    """The server process joins this test's cluster (RAY_ADDRESS), like a user's `ray start --head` cluster."""
    ray, folder, llm = ray_cluster, str(llama[1]), llama[3]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    expected = (llm.generate("The capital of France is", greedy, use_tqdm=False)[0].outputs[0].text,
                llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text)
    address = ray.get_runtime_context().gcs_address
    process, url = start_server(
        [folder, "--max-model-len", "64", "-tp", "2", "--distributed-executor-backend", "ray"], tmp_path / "ray.log",
        env={"OMP_NUM_THREADS": "1", "RAY_ADDRESS": address},
    )
    try:
        assert answers(url) == expected
        pids = _actor_pids(exclude=llama[3].llm_engine.executor.worker_pids())
        assert len(pids) == 2
        psutil.Process(pids[1]).kill()
        deadline = time.monotonic() + 30
        while process.poll() is None and ready_status(url) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is not None or ready_status(url) in (503, None)
        assert process.wait(timeout=30) == 1  # exits by itself: no hang
        assert not psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]
    finally:
        if process.poll() is None:
            stop_server(process)
    assert "tensor-parallel worker" in (tmp_path / "ray.log").read_text()


def _actor_pids(exclude: list[int]) -> list[int]:
    """The server's RankWorker actors: every one on the cluster but this process's (found by process title)."""
    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if "RankWorker" in " ".join(p.info["cmdline"] or []) and p.pid not in exclude)


def test_a_dead_actor_is_reported_at_once(llama, prompts):
    """Runs last on the shared engine: kill rank 1; check_health and the next step raise WorkerDiedError."""
    llm = llama[3]
    executor = llm.llm_engine.executor
    pids = executor.worker_pids()
    executor.check_health()  # alive: no error
    psutil.Process(pids[1]).kill()
    deadline = time.monotonic() + 20
    with pytest.raises(WorkerDiedError, match=r"tensor-parallel worker 1"):
        while time.monotonic() < deadline:
            executor.check_health()
            time.sleep(0.1)
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker 1"):  # the engine's EngineStepError
        llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)
    assert not psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]


RAY_FROM_A_THREAD = """
import threading
from hfbridge.worker.ray_executor import import_ray, init_ray

ray = import_ray()
loader = threading.Thread(target=init_ray, args=(ray,))  # as the server's model loader thread does
loader.start()
loader.join()  # the thread that asked for the local cluster is gone

@ray.remote(num_cpus=1)
def one():
    return 1

print("answer", ray.get(one.remote(), timeout=60))
"""


def test_a_local_cluster_started_from_a_thread_outlives_it():
    """`hfbridge serve` builds the engine in a loader thread; a local Ray cluster started there (no RAY_ADDRESS)
    must keep working after that thread ends (Ray ties its processes to the starting thread's life)."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'hfbridge[ray]'")
    session = tempfile.mkdtemp(prefix="hfr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:  # RAY_TMPDIR: a session of its own, so ray.init() cannot find this module's cluster
        result = subprocess.run([sys.executable, "-c", RAY_FROM_A_THREAD], capture_output=True, text=True,
                                env={**env, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": session}, timeout=120)
        left = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
        assert not psutil.wait_procs(left, timeout=15)[1], "the local cluster outlived its process"
    finally:
        shutil.rmtree(session, ignore_errors=True)
    assert result.returncode == 0 and "answer 1" in result.stdout, result.stderr[-3000:]
