"""What the Ray backend costs next to mp, at the same tensor_parallel_size, in one run: engine start-up (Ray's own
start apart) and tokens/s of a greedy batch, on a random model of SmolLM2-135M's shape (8 heads / 2 KV heads, so
they split), float32, no EOS. Both backends must produce the same tokens (checked and printed).

    python benchmarks/ray_vs_mp.py                                   # tp=2, 8 prompts x 64 in, 32 out
    python benchmarks/ray_vs_mp.py --num-layers 8 --output-len 16    # a quick look

Not a test. Ray is started here as a local cluster (ray.init); on a real cluster set RAY_ADDRESS."""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from throughput import SMOLLM2_135M, make_prompts
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(backend: str, folder: str, prompts, args) -> dict:
    from hfbridge import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=folder, tensor_parallel_size=args.tp, distributed_executor_backend=backend, dtype="float32",
              skip_tokenizer_init=True,
              max_model_len=args.input_len + args.output_len, kv_cache_memory_bytes=256 << 20)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()  # one stream: each step's round trip to the ranks shows
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    ms_per_token = (time.perf_counter() - start) * 1000 / args.output_len
    llm.llm_engine.shutdown()
    tokens = [o.outputs[0].token_ids for o in outputs]
    return {"startup_s": startup, "tok_s": sum(map(len, tokens)) / elapsed, "ms_tok": ms_per_token, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    import ray

    shape = {**SMOLLM2_135M, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": args.num_layers}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
        prompts = make_prompts(args.num_prompts, args.input_len, shape["vocab_size"])
        results = {"mp": run("mp", folder, prompts, args)}
        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - start
        results["ray"] = run("ray", folder, prompts, args)
        ray.shutdown()
    print(f"tp={args.tp}, {args.num_layers} layers, {args.num_prompts} prompts x {args.input_len} in, "
          f"{args.output_len} out; ray.init (local cluster): {ray_init:.1f} s")
    print(f"{'backend':8} {'start-up s':>10} {'batch tokens/s':>14} {'1 stream ms/token':>17}")
    for name, r in results.items():
        print(f"{name:8} {r['startup_s']:10.1f} {r['tok_s']:14.1f} {r['ms_tok']:17.1f}")
    print("same tokens:", results["mp"]["tokens"] == results["ray"]["tokens"])


if __name__ == "__main__":
    main()
