"""Served throughput on loopback: a bounded concurrent load of streamed completions against `hfbridge serve`.

    python benchmarks/serving.py                      # starts `hfbridge serve` (default model) on a free port
    python benchmarks/serving.py --model ./my-model   # ... on another model
    python benchmarks/serving.py --url http://127.0.0.1:8000 --num-requests 64 --concurrency 16

Every request streams (so time to first token is measured where the client sees it) with ignore_eos, so each
produces exactly --max-tokens tokens. Prints one table: requests/s, output tokens/s, TTFT and latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
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


async def run_load(url, model, num_requests, concurrency, prompt_words, max_tokens, api_key) -> dict:
    rng = random.Random(0)
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


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "hfbridge", "serve", *([model] if model else []), "--port", str(port),
            "--log-level", "warning", *extra]
    process = subprocess.Popen(args, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"hfbridge serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("hfbridge serve did not become ready in 10 minutes")


def served_model(url: str, api_key: str | None) -> str:
    request = urllib.request.Request(url + "/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request) as response:
        return json.load(response)["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server; default: start one")
    parser.add_argument("--model", help="model for the server this script starts (default: the bundled one)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=os.environ.get("HFBRIDGE_API_KEY"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args, server_args = parser.parse_known_args()
    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.model, server_args)
    try:
        result = asyncio.run(run_load(url, served_model(url, args.api_key), args.num_requests, args.concurrency,
                                      args.prompt_words, args.max_tokens, args.api_key))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'requests':>9} {'conc.':>6} {'time s':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'lat. p50':>9}")
    print(f"{result['requests']:>9} {result['concurrency']:>6} {result['elapsed_s']:>8.2f} {result['req_per_s']:>7.2f} "
          f"{result['output_tok_per_s']:>10.1f} {result['ttft_p50_s']:>9.3f} {result['ttft_p99_s']:>9.3f} "
          f"{result['latency_p50_s']:>9.3f}")


if __name__ == "__main__":
    main()
