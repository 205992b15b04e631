"""What one heavy request costs everyone else (issue 38, points 1-3): the server's memory and the worst gap between
two tokens of another client's stream while it runs.

    python benchmarks/hardening.py                         # starts `hfbridge serve` (the bundled SmolLM2)
    python benchmarks/hardening.py --n 256 --scenarios tables prompt_logprobs
    PYTHONPATH=/tmp/base python benchmarks/hardening.py     # another hfbridge tree (e.g. before a change)

Scenarios (each one heavy request, sent while a probe stream generates):
  issue_tables     n=--n, a logit_bias on every vocabulary token and every id allowed (the issue's 1 MB request)
  tables           n=--n, the largest tables vLLM allows: 1,024 biased tokens and 1,024 allowed ids
  bad_words_many   100,000 bad words (the issue's request)
  bad_words        64 bad words: 128 token sequences with their leading-space forms, vLLM's cap
  prompt_logprobs  n=--n-prompt-logprobs with prompt_logprobs=1 on a --prompt-words prompt

Per scenario: the heavy request's status and seconds, the server's resident memory before it and at its peak
(sampled every 20 ms from /proc), and the probe's worst token gap while the heavy request was in flight (its median
gap alone, before any scenario, is printed first). Numbers move with the machine's load: compare runs made
back to back on one machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import aiohttp
from serving import start_server, stop_server

PROBE_TOKENS = 4096  # the probe outlives every scenario; it is cancelled at the end


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


class RssSampler:
    """The largest resident size of a process since reset(), sampled on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.02):
        self.pid, self.interval_s = pid, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> int:
        self.peak = rss_bytes(self.pid)
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()


def scenario_body(name: str, vocab_size: int, n: int, n_prompt_logprobs: int, prompt_words: int) -> dict:
    common = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 1.0, "ignore_eos": True}
    if name == "issue_tables":
        return {**common, "n": n, "logit_bias": {str(i): 0.5 for i in range(vocab_size)},
                "allowed_token_ids": list(range(vocab_size))}
    if name == "tables":
        return {**common, "n": n, "logit_bias": {str(i): 0.5 for i in range(1024)},
                "allowed_token_ids": list(range(1024, 2048))}
    if name == "bad_words_many":
        return {**common, "bad_words": [f"word{i}" for i in range(100_000)]}
    if name == "bad_words":
        return {**common, "bad_words": [f"word{i}" for i in range(64)]}  # 128 sequences with their space forms
    if name == "prompt_logprobs":
        prompt = " ".join(["river mountain city garden library engine window letter"] * (prompt_words // 8))
        return {**common, "prompt": prompt, "n": n_prompt_logprobs, "prompt_logprobs": 1, "max_tokens": 2}
    raise SystemExit(f"unknown scenario {name!r}")


class Probe:
    """Another client's stream: the time of each token chunk."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        body = {"prompt": "The history of music", "max_tokens": PROBE_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with session.post(url + "/v1/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    self.times.append(time.perf_counter())

    def worst_gap(self, start: float, end: float) -> float:
        inside = [t for t in self.times if start <= t <= end]
        before = [t for t in self.times if t < start][-1:]
        after = [t for t in self.times if t > end][:1]
        points = before + inside + after
        return max((b - a for a, b in zip(points, points[1:])), default=float("nan"))


async def measure(url: str, pid: int, scenarios: list[str], n: int, n_prompt_logprobs: int,
                  prompt_words: int) -> list[dict]:
    sampler = RssSampler(pid)
    rows = []
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url + "/tokenize", json={"prompt": "x", "return_token_strs": False}) as response:
            await response.json()
        async with session.get(url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        vocab_size = await _vocab_size(session, url)
        probe = Probe()
        probe_task = asyncio.create_task(probe.run(session, url))
        while len(probe.times) < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        alone = [b - a for a, b in zip(probe.times, probe.times[1:])]
        print(f"probe alone: median token gap {statistics.median(alone) * 1000:.0f} ms, "
              f"worst {max(alone) * 1000:.0f} ms")
        for name in scenarios:
            body = {**scenario_body(name, vocab_size, n, n_prompt_logprobs, prompt_words), "model": model}
            payload = json.dumps(body).encode()
            before = sampler.reset()
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", data=payload,
                                    headers={"Content-Type": "application/json"}) as response:
                status = response.status
                text = await response.text()
            end = time.perf_counter()
            await asyncio.sleep(1.0)  # a last gap may straddle the end
            row = {"scenario": name, "status": status, "body_mb": len(payload) / 1e6, "seconds": end - start,
                   "rss_before_gb": before / 1e9, "rss_peak_gb": sampler.peak / 1e9,
                   "rss_after_gb": rss_bytes(pid) / 1e9, "probe_worst_gap_s": probe.worst_gap(start, end)}
            if status != 200:
                row["error"] = json.loads(text)["error"]["message"][:120]
            rows.append(row)
            print(json.dumps(row))
        probe_task.cancel()
    sampler.stop()
    return rows


async def _vocab_size(session: aiohttp.ClientSession, url: str) -> int:
    """The vocabulary size, from /detokenize: the largest id it accepts (a binary search, ~17 requests)."""
    low, high = 1, 1 << 20
    while low < high:
        mid = (low + high + 1) // 2
        async with session.post(url + "/detokenize", json={"tokens": [mid - 1]}) as response:
            ok = response.status == 200
        low, high = (mid, high) if ok else (low, mid - 1)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled SmolLM2)")
    parser.add_argument("--n", type=int, default=1024, help="samples of the heavy requests (default 1024)")
    parser.add_argument("--n-prompt-logprobs", type=int, default=64, help="samples of prompt_logprobs (default 64)")
    parser.add_argument("--prompt-words", type=int, default=400, help="words of the prompt_logprobs prompt")
    parser.add_argument("--scenarios", nargs="+",
                        default=["issue_tables", "tables", "bad_words_many", "bad_words", "prompt_logprobs"])
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to `hfbridge serve` (e.g. --max-num-seqs 256)")
    args = parser.parse_args()
    extra = ["--max-request-body-bytes", "16M", "--max-model-len", "2048", *args.server_args]
    process, url, ready_s = start_server(args.model, extra)
    try:
        print(f"server ready in {ready_s:.1f} s")
        asyncio.run(measure(url, process.pid, args.scenarios, args.n, args.n_prompt_logprobs, args.prompt_words))
    finally:
        stop_server(process)


if __name__ == "__main__":
    main()
