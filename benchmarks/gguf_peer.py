"""A GGUF file served by hfbridge (quantized: hfbridge.quantization) and by llama.cpp (llama-cpp-python), the peer a
CPU user with a GGUF file picks: same file, same prompt tokens, same thread count, alternating engines.

    python benchmarks/gguf_peer.py                          # the bundled SmolLM2-135M-Instruct Q4_1, 3 rounds
    python benchmarks/gguf_peer.py --model file.gguf --rounds 1 --batch 16

llama.cpp runs from --llama-python (default ../.llama-cpp-venv, built by shared/tools/llama_cpp_venv.sh). Each
(round, engine) is a fresh process that loads the file, warms up, then measures:
  single stream   ms per new token of one request, --prompt-len prompt + --new-tokens new (greedy, no EOS stop),
                  the prefill included, as a user waiting for one answer sees it;
  prompt          prompt processing tokens/s of one --long-prompt-len prompt (its first token's time);
  batch           output tokens/s of --batch such requests: hfbridge batches them continuously, llama.cpp's
                  Python API runs one sequence at a time, so it serves them one after another;
  load            seconds from the constructor's call to a loaded model; RSS after the load (MiB).
hfbridge runs with its defaults (the background torch.compile on: the timings start once it is warm).
The best figure of the rounds is shown (the machine may be shared)."""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # (not gguf.py: on the path of every script here it would shadow `gguf`)
DEFAULT_LLAMA_PYTHON = HERE.parent.parent / ".llama-cpp-venv" / "bin" / "python"


def prompts(vocab: int, length: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def run_hfbridge(args) -> dict:
    from throughput import wait_for_background_compiles

    from hfbridge import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, max_model_len=args.long_prompt_len + 64)
    load_s, rss = time.perf_counter() - start, rss_mib()
    compile_s = wait_for_background_compiles(llm)
    vocab = llm.llm_engine.model_config.hf_text_config.vocab_size

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return time.perf_counter() - start

    generate(prompts(vocab, args.prompt_len, 2, seed=99), 8)  # warm-up
    single = generate(prompts(vocab, args.prompt_len, 1, seed=1), args.new_tokens)
    long = generate(prompts(vocab, args.long_prompt_len, 1, seed=2), 1)
    batch = generate(prompts(vocab, args.prompt_len, args.batch, seed=3), args.new_tokens)
    return figures(load_s, rss, single, long, batch, args) | {"compile_s": compile_s}


def run_llama(args) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.long_prompt_len + 64, n_batch=512, verbose=False)
    load_s, rss = time.perf_counter() - start, rss_mib()
    vocab = llm.n_vocab()

    def one(prompt: list[int], new_tokens: int) -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(new_tokens - 1):  # the first new token comes from the prompt's logits
            llm.eval([llm.sample(top_k=1)])
        llm.sample(top_k=1)

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        start = time.perf_counter()
        for prompt in batch:  # one sequence at a time: the Python API's way
            one(prompt, new_tokens)
        return time.perf_counter() - start

    generate(prompts(vocab, args.prompt_len, 2, seed=99), 8)  # warm-up
    single = generate(prompts(vocab, args.prompt_len, 1, seed=1), args.new_tokens)
    long = generate(prompts(vocab, args.long_prompt_len, 1, seed=2), 1)
    batch = generate(prompts(vocab, args.prompt_len, args.batch, seed=3), args.new_tokens)
    return figures(load_s, rss, single, long, batch, args)


def figures(load_s: float, rss: float, single: float, long: float, batch: float, args) -> dict:
    return {"load_s": load_s, "rss_mib": rss, "single_ms_per_token": single * 1000 / args.new_tokens,
            "prompt_tok_per_s": args.long_prompt_len / long,
            "batch_tok_per_s": args.batch * args.new_tokens / batch}


ROWS = [("single stream, ms/token", "single_ms_per_token", min),
        ("prompt processing, tokens/s", "prompt_tok_per_s", max),
        ("batch, output tokens/s", "batch_tok_per_s", max), ("load, s", "load_s", min),
        ("RSS after load, MiB", "rss_mib", min)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file [default: the bundled SmolLM2-135M-Instruct Q4_1]")
    parser.add_argument("--llama-python", default=str(DEFAULT_LLAMA_PYTHON))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--engine", choices=["hfbridge", "llama.cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine is not None:
        run = run_hfbridge if args.engine == "hfbridge" else run_llama
        print(json.dumps(run(args)), flush=True)
        return
    if args.model is None:
        from hfbridge.model.default_model import default_model_path

        args.model = default_model_path()
    engines = {"hfbridge": sys.executable}
    if Path(args.llama_python).exists():
        engines["llama.cpp"] = args.llama_python
    else:
        print(f"no llama.cpp at {args.llama_python} (shared/tools/llama_cpp_venv.sh builds it): hfbridge alone")
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    for round_no in range(1, args.rounds + 1):
        for engine, python in engines.items():
            argv = [python, __file__, "--engine", engine, "--model", args.model, "--threads", str(args.threads),
                    "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                    "--long-prompt-len", str(args.long_prompt_len), "--batch", str(args.batch)]
            env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
            if done.returncode != 0:
                print(f"round {round_no} {engine} failed:\n{done.stderr[-3000:]}")
                continue
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_no} {engine}: {results[engine][-1]}", flush=True)
    print(f"\n{Path(args.model).name}, {args.threads} threads, best of {args.rounds} rounds "
          f"(prompt {args.prompt_len} + {args.new_tokens} new tokens; batch {args.batch})\n")
    print("| figure | " + " | ".join(engines) + (" | hfbridge / llama.cpp |" if len(engines) == 2 else " |"))
    print("|---" * (len(engines) + 1 + (len(engines) == 2)) + "|")
    for label, key, best in ROWS:
        values = [best(r[key] for r in results[e]) if results[e] else None for e in engines]
        cells = ["failed" if v is None else f"{v:.1f}" for v in values]
        ratio = [f"{values[0] / values[1]:.2f}x"] if len(values) == 2 and None not in values else []
        print("| " + " | ".join([label, *cells, *ratio]) + " |")


if __name__ == "__main__":
    main()
