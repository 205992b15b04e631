"""Attention backends on one layer call, side by side: correctness against the torch reference and median
timings (CUDA events) of the Triton kernels, the torch reference and flash-attn (when installed).

    python benchmarks/attention_kernels.py                       # H100: Llama-8B-like shapes, ~1-2 minutes
    python benchmarks/attention_kernels.py --device cpu --tiny   # smoke test on Triton's CPU interpreter

Each case is one forward (cache write + attention) over a batch of (cached prefix, new tokens) requests whose
blocks are scattered at random through the cache; unused cache slots hold NaN, so a kernel reading outside a
context shows up as an error. flash-attn's paged API needs blocks of 256 tokens: it runs on a 256-token-block
copy of the same cache ("flash_attn@256"), and on the --block-size cache through hfbridge's flash backend,
which uses flash-attn where it can and the Triton kernels elsewhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

Requests = tuple[tuple[int, int], ...]  # (num_cached, num_new) per request


@dataclass(frozen=True)
class Case:
    name: str
    requests: Requests

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for _, n in self.requests)


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [Case("decode b3", ((40, 1), (7, 1), (90, 1))), Case("prefill 2x20", ((0, 20), (0, 20))),
                Case("mixed", ((33, 12), (50, 1)))]
    return [
        Case("decode b64 ctx1k", ((1023, 1),) * 64),
        Case("decode b64 ctx4k", ((4095, 1),) * 64),
        Case("decode b4 ctx32k", ((32767, 1),) * 4),  # few requests: the split over the context matters
        Case("prefill 4x1k", ((0, 1024),) * 4),
        Case("prefill 2k after 6k prefix", ((6144, 2048),)),
        Case("mixed 512+3k prefix, 32 dec@2k", ((3072, 512),) + ((2047, 1),) * 32),
    ]


def build_step(case: Case, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, seed: int):
    """Same logical context for any block size (the seed fixes it): (cache, metadata)."""
    from hfbridge.attention_backends.metadata import AttentionMetadata
    from hfbridge.attention_backends.torch_backend import write_kv

    data_gen = torch.Generator(device).manual_seed(seed)  # the context's values: independent of the layout
    layout_gen = torch.Generator().manual_seed(seed)
    blocks = [-(-(c + n) // block_size) for c, n in case.requests]
    num_blocks = sum(blocks) + 1
    order = torch.randperm(num_blocks, generator=layout_gen).tolist()
    tables, prefix_slots, new_slots, taken = [], [], [], 0
    for n, (cached, new) in zip(blocks, case.requests):
        table = order[taken : taken + n]
        taken += n
        tables.append(table)
        slots = [table[p // block_size] * block_size + p % block_size for p in range(cached + new)]
        prefix_slots += slots[:cached]
        new_slots += slots[cached:]
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    if prefix_slots:
        prefix = torch.randn((2, len(prefix_slots), num_kv_heads, head_dim), generator=data_gen, device=device,
                             dtype=dtype)
        write_kv(cache, prefix[0], prefix[1], torch.tensor(prefix_slots, device=device))
    metadata = AttentionMetadata.build(
        slot_mapping=new_slots, query_lens=[n for _, n in case.requests],
        seq_lens=[c + n for c, n in case.requests], block_tables=tables, device=device,
    )
    return cache, metadata


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of fn() in ms: CUDA events on the GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def throughput(case: Case, ms: float, num_heads: int, num_kv_heads: int, head_dim: int, itemsize: int) -> str:
    """Decode: KV bytes read per second; otherwise attention FLOP/s (causal: each query sees its prefix)."""
    if case.is_decode:
        kv_bytes = sum(c + n for c, n in case.requests) * 2 * num_kv_heads * head_dim * itemsize
        return f"{kv_bytes / ms / 1e6:8.1f} GB/s"
    pairs = sum(n * c + n * (n + 1) / 2 for c, n in case.requests)
    return f"{4 * pairs * num_heads * head_dim / ms / 1e9:8.1f} TFLOP/s"


def backends(device: torch.device, args) -> dict[str, tuple[object, int]]:
    """name -> (backend, block size of the cache it runs on)."""
    from hfbridge.attention_backends.registry import unavailable_reason
    from hfbridge.attention_backends.torch_backend import TorchReferenceBackend
    from hfbridge.attention_backends.triton_backend import TritonAttentionBackend

    found = {"triton": (TritonAttentionBackend(), args.block_size),
             "triton 1 split": (TritonAttentionBackend(decode_num_splits=1), args.block_size),
             "torch": (TorchReferenceBackend(), args.block_size)}
    reason = unavailable_reason("flash_attn", device)
    if reason is None:
        from hfbridge.attention_backends.flash_attn_backend import FlashAttnBackend

        found["flash_attn"] = (FlashAttnBackend(), args.block_size)
        found["flash_attn@256"] = (FlashAttnBackend(), 256)
    else:
        print(f"flash_attn skipped: {reason}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few iterations (CPU interpreter smoke test)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sliding-window", type=int, default=None)
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--skip-reference", action="store_true", help="check against the reference but don't time it")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before hfbridge's kernels are imported
    if args.tiny:
        args.num_heads, args.num_kv_heads, args.head_dim, args.iters, args.warmup = 4, 2, 64, 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --tiny for the interpreter smoke test")
    from hfbridge.attention_backends.metadata import LayerOptions
    from hfbridge.attention_backends.torch_backend import TorchReferenceBackend

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    layer = LayerOptions(0, args.head_dim**-0.5, args.sliding_window, args.softcap)
    shape = (args.num_heads, args.num_kv_heads, args.head_dim)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}, "
          f"{args.dtype}, heads {shape[0]}/{shape[1]}, head dim {shape[2]}, block {args.block_size}, "
          f"median of {args.iters}")
    candidates = backends(device, args)
    print(f"{'case':34} {'backend':15} {'ms':>9} {'throughput':>16} {'max err':>9}  ok")
    failures = 0
    for i, case in enumerate(cases(args.tiny)):
        gen = torch.Generator(device).manual_seed(1000 + i)
        num_tokens = sum(n for _, n in case.requests)
        q = torch.randn((num_tokens, args.num_heads, args.head_dim), generator=gen, device=device, dtype=dtype)
        k, v = torch.randn((2, num_tokens, args.num_kv_heads, args.head_dim), generator=gen, device=device,
                           dtype=dtype)
        steps = {bs: build_step(case, bs, *shape[1:], dtype, device, seed=i) for _, bs in candidates.values()}
        cache, metadata = steps[args.block_size]
        expected = TorchReferenceBackend().forward(q, k, v, cache.clone(), metadata, layer).float()
        for name, (backend, block_size) in candidates.items():
            if name == "triton 1 split" and not case.is_decode:
                continue
            cache, metadata = steps[block_size]
            err = (backend.forward(q, k, v, cache, metadata, layer).float() - expected).abs().max().item()
            ok = err <= tol  # NaN fails
            failures += not ok
            if name == "torch" and args.skip_reference:
                continue
            ms = time_ms(lambda: backend.forward(q, k, v, cache, metadata, layer), device, args.iters, args.warmup)
            rate = throughput(case, ms, *shape, dtype.itemsize)
            print(f"{case.name:34} {name:15} {ms:9.3f} {rate:>16} {err:9.2e}  {'ok' if ok else 'FAIL'}", flush=True)
        del steps, cache, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("all backends match the reference" if not failures else f"{failures} result(s) off the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
