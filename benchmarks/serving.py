"""Served throughput on loopback: a bounded concurrent load of streamed completions against `hfbridge serve`.

    python benchmarks/serving.py                      # starts `hfbridge serve` (default model) on a free port
    python benchmarks/serving.py --model ./my-model   # ... on another model
    python benchmarks/serving.py --url http://127.0.0.1:8000 --num-requests 64 --concurrency 16

Every request streams (so time to first token is measured where the client sees it) with ignore_eos, so each
produces exactly --max-tokens tokens. Prints one table: requests/s, output tokens/s, TTFT and latency, one row per
--concurrency value (all against one server), and the seconds from starting the server to its first ready answer.

The peer, and vLLM's own client for both (what benchmarks/compare.py runs):

    VLLM_VENV/bin/python benchmarks/serving.py --engine vllm --model FOLDER --client vllm-bench --concurrency 16 64
    python benchmarks/serving.py --model FOLDER --client vllm-bench --vllm-python VLLM_VENV/bin/python

--engine vllm starts `vllm serve` under vLLM-CPU's best thread settings (benchmarks/peer_vllm.py) and times its
/health, where hfbridge's is /ready. --client vllm-bench measures with `vllm bench serve --backend openai
--dataset-name random --ignore-eos` (--input-len tokens in, --max-tokens out, greedy) instead of this file's client,
after untimed warm-up requests (one per stream before the first run, two before each later run).

Each run draws its own prompts (seed = the run's index): a run that repeated an earlier run's prompts would find
them in a server's prefix cache, which hfbridge (16-token blocks) hits and vLLM-CPU (128-token blocks, for
128-token prompts) cannot, and would measure the cache rather than the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp

WORDS = ("the of and to in is was for on that with as by at from his her they this which be had are not but "
         "river mountain city garden library engine window letter winter morning music history language").split()


def make_prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def one_request(session, url, model, prompt, max_tokens, headers) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, tokens


async def run_load(url, model, num_requests, concurrency, prompt_words, max_tokens, api_key, seed=0) -> dict:
    rng = random.Random(seed)
    prompts = [make_prompt(rng, prompt_words) for _ in range(num_requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one_request(session, url, model, prompts[0], 4, headers)  # warm-up

        async def bounded(prompt):
            async with gate:
                return await one_request(session, url, model, prompt, max_tokens, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    latencies = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    return {
        "requests": num_requests, "concurrency": concurrency, "elapsed_s": elapsed,
        "req_per_s": num_requests / elapsed, "output_tok_per_s": tokens / elapsed, "output_tokens": tokens,
        "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "latency_p50_s": statistics.median(latencies),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, model: str | None, port: int, extra: list[str],
                   dtype: str = "float32") -> tuple[list[str], dict, str]:
    """argv, environment and readiness route of the server to start: `hfbridge serve` or `vllm serve`."""
    if engine == "vllm":
        from peer_vllm import vllm_cli_command, vllm_env

        if model is None:
            raise SystemExit("--engine vllm needs --model FOLDER (e.g. hfbridge's cached default model)")
        argv = [*vllm_cli_command(sys.executable), "serve", model, "--dtype", dtype, "--port", str(port),
                "--host", "127.0.0.1", *extra]
        return argv, vllm_env(), "/health"
    argv = [sys.executable, "-m", "hfbridge", "serve", *([model] if model else []), "--port", str(port),
            "--dtype", dtype, "--log-level", "warning", *extra]
    return argv, {**os.environ, "TOKENIZERS_PARALLELISM": "false"}, "/ready"


def start_server(model: str | None, extra: list[str], engine: str = "hfbridge",
                 timeout_s: float = 900, dtype: str = "float32") -> tuple[subprocess.Popen, str, float]:
    """Start the server; return it, its URL and the seconds from process start to the first 200 on ready_route."""
    port = free_port()
    argv, env, ready_route = server_command(engine, model, port, extra, dtype)
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, start_new_session=True)  # its own group: stop_server ends it all
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"{engine} serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + ready_route, timeout=2):
                return process, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.1)
    stop_server(process)
    raise SystemExit(f"{engine} serve did not become ready in {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM's EngineCore too), SIGKILL if it outlives a minute."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the group may outlive its leader for a moment (engine children shutting down)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_vllm_bench(python: str, url: str, model: str, tokenizer: str, num_prompts: int, concurrency: int,
                   input_len: int, output_len: int, warmups: int = 2, seed: int = 0) -> dict:
    """`vllm bench serve` against any OpenAI server (after `warmups` untimed requests); its saved JSON, in this
    file's keys."""
    from peer_vllm import vllm_cli_command

    with tempfile.TemporaryDirectory() as folder:
        argv = [*vllm_cli_command(python), "bench", "serve", "--backend", "openai", "--base-url", url,
                "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
                "--dataset-name", "random", "--random-input-len", str(input_len),
                "--random-output-len", str(output_len), "--ignore-eos", "--temperature", "0",
                "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--seed", str(seed),
                "--num-warmups", str(warmups),
                "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
                "--save-result", "--result-dir", folder, "--result-filename", "result.json"]
        # the client only sends requests: no thread binding, one thread, so it takes little from the server
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(folder, "result.json")) as f:
            saved = json.load(f)
    return {
        "requests": saved["completed"], "concurrency": concurrency, "elapsed_s": saved["duration"],
        "req_per_s": saved["request_throughput"], "output_tok_per_s": saved["output_throughput"],
        "output_tokens": saved["total_output_tokens"], "ttft_p50_s": saved["median_ttft_ms"] / 1000,
        "ttft_p99_s": saved["p99_ttft_ms"] / 1000, "latency_p50_s": saved["median_e2el_ms"] / 1000,
        "failed": saved.get("failed", num_prompts - saved["completed"]),
    }


def served_model(url: str, api_key: str | None) -> str:
    request = urllib.request.Request(url + "/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request) as response:
        return json.load(response)["data"][0]["id"]


def default_vllm_python() -> str | None:
    """$VLLM_PYTHON, else this interpreter if it has vLLM."""
    import importlib.util

    if os.environ.get("VLLM_PYTHON"):
        return os.environ["VLLM_PYTHON"]
    return sys.executable if importlib.util.find_spec("vllm") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server; default: start one")
    parser.add_argument("--engine", choices=["hfbridge", "vllm"], default="hfbridge", help="the server to start")
    parser.add_argument("--model", help="model for the server this script starts (default: the bundled one)")
    parser.add_argument("--served-model-name", help="name the started server answers to (passed to it)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8], help="one run per value, same server")
    parser.add_argument("--prompt-words", type=int, default=64, help="builtin client: words per prompt")
    parser.add_argument("--input-len", type=int, default=128, help="vllm-bench client: random prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--client", choices=["builtin", "vllm-bench"], default="builtin")
    parser.add_argument("--vllm-python", default=default_vllm_python(),
                        help="a Python with vLLM, for --client vllm-bench [default: $VLLM_PYTHON, or this one]")
    parser.add_argument("--tokenizer", help="vllm-bench client: tokenizer folder [default: --model]")
    parser.add_argument("--api-key", default=os.environ.get("HFBRIDGE_API_KEY"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--dtype", default="float32", help="the started server's --dtype (both engines)")
    args, server_args = parser.parse_known_args()
    if args.client == "vllm-bench" and not args.vllm_python:
        parser.error("--client vllm-bench needs --vllm-python (a Python with vLLM) or $VLLM_PYTHON")
    if args.served_model_name:
        server_args += ["--served-model-name", args.served_model_name]
    process, ready_s = None, None
    url = args.url
    compile_s = None
    if url is None:
        process, url, ready_s = start_server(args.model, server_args, args.engine, dtype=args.dtype)
    try:
        if args.engine == "hfbridge":
            compile_s = wait_until_compiled(url, args.api_key)
        runs = measure(args, url)
    finally:
        if process is not None:
            stop_server(process)
    if args.json:
        print(json.dumps({"engine": args.engine, "client": args.client, "ready_s": ready_s,
                          "compile_after_ready_s": compile_s, "runs": runs}))
        return
    if ready_s is not None:
        print(f"{args.engine} serve: ready after {ready_s:.1f} s")
    print(f"{'requests':>9} {'conc.':>6} {'time s':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'lat. p50':>9}")
    for result in runs:
        print(f"{result['requests']:>9} {result['concurrency']:>6} {result['elapsed_s']:>8.2f} "
              f"{result['req_per_s']:>7.2f} {result['output_tok_per_s']:>10.1f} {result['ttft_p50_s']:>9.3f} "
              f"{result['ttft_p99_s']:>9.3f} {result['latency_p50_s']:>9.3f}")


def wait_until_compiled(url: str, api_key: str | None, timeout_s: float = 900) -> float:
    """Seconds until hfbridge's background torch.compile is warm (its /metrics gauge hfbridge:compiling reads 0),
    so the runs measure the compiled server; the server answers eagerly meanwhile."""
    start = time.perf_counter()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.perf_counter() - start < timeout_s:
        with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=5) as reply:
            gauge = [line for line in reply.read().decode().splitlines() if line.startswith("hfbridge:compiling")]
        if not gauge or float(gauge[0].split()[-1]) == 0:
            return time.perf_counter() - start
        time.sleep(0.5)
    raise SystemExit(f"hfbridge serve still compiling after {timeout_s:.0f} s")


def measure(args, url: str) -> list[dict]:
    """One run per --concurrency value against the server at `url`, with the chosen client."""
    model = served_model(url, args.api_key)
    runs = []
    for i, concurrency in enumerate(args.concurrency):
        if args.client == "vllm-bench":
            # a fresh server's first batches are slow (first-touch memory, kernels picked per shape): the first
            # run warms up with one request per concurrent stream, later runs on the same server with two
            warmups = concurrency if i == 0 else 2
            runs.append(run_vllm_bench(args.vllm_python, url, model, args.tokenizer or args.model or model,
                                       args.num_requests, concurrency, args.input_len, args.max_tokens, warmups,
                                       seed=i))
        else:
            runs.append(asyncio.run(run_load(url, model, args.num_requests, concurrency, args.prompt_words,
                                             args.max_tokens, args.api_key, seed=i)))
    return runs


if __name__ == "__main__":
    main()
