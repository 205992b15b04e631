"""Where one engine step's time goes, for a prefill step and a decode step: wall time split into the scheduler,
input packing, the model forward, sampling and output processing (wrappers with perf_counter around each), and
the forward's top operators (torch.profiler).

    python benchmarks/profile_step.py                     # the bundled SmolLM2-135M, float32, 64 requests
    python benchmarks/profile_step.py --enforce-eager     # without torch.compile
    python benchmarks/profile_step.py --model PATH --batch 16 --input-len 128

The decode figure is the mean over `--decode-steps` steps of `--batch` requests whose context is the prompt plus
the tokens generated so far. Not a test: it prints a breakdown.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PhaseTimer:
    """Accumulates wall seconds per named phase, by wrapping methods of live objects."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, method: str, phase: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(obj, method, timed)


def instrument(engine) -> PhaseTimer:
    timer = PhaseTimer()
    runner = engine.executor.runner
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "prepare_inputs", "pack inputs")
    timer.wrap(runner, "model", "forward (incl. attention)")
    timer.wrap(runner, "sampler", "sample")
    timer.wrap(engine.output_processor, "process", "outputs + detokenize")
    timer.wrap(engine, "step", "step")
    return timer


def report(title: str, timer: PhaseTimer, steps: int) -> None:
    total = timer.seconds["step"]
    print(f"\n### {title}: {total / steps * 1000:.1f} ms per step ({steps} steps)\n")
    print("| phase | ms per step | share |\n|---|---|---|")
    parts = [k for k in timer.seconds if k != "step"]
    for name in parts:
        print(f"| {name} | {timer.seconds[name] / steps * 1000:.2f} | {timer.seconds[name] / total:.0%} |")
    rest = total - sum(timer.seconds[k] for k in parts)
    print(f"| rest of the step (Python glue) | {rest / steps * 1000:.2f} | {rest / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--ops", type=int, default=12, help="top operators to list (0: no torch.profiler)")
    args = parser.parse_args()

    import torch
    from torch.profiler import profile

    from hfbridge import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * args.input_len), enforce_eager=args.enforce_eager)
    for compiling in llm.llm_engine.executor.background_compiles():  # measure the compiled model, not the
        compiling.wait()  # eager one that serves meanwhile
    engine = llm.llm_engine
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.batch)]
    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p[::-1]} for p in prompts], warm, use_tqdm=False)  # no prefix-cache hits later

    timer = instrument(engine)
    params = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    ops = profile() if args.ops else contextlib.nullcontext()
    prefill_steps = 0
    with ops as prefill_prof:
        while engine.scheduler.num_waiting:  # prefill: every prompt in one step (or a few, per the token budget)
            engine.step()
            prefill_steps += 1
    report(f"prefill, {args.batch} x {args.input_len} tokens", timer, prefill_steps)
    if args.ops:
        print(prefill_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))

    timer.seconds.clear()
    with (profile() if args.ops else contextlib.nullcontext()) as decode_prof:
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    report(f"decode, {args.batch} requests, context {args.input_len}+", timer, steps)
    if args.ops:
        print(decode_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, enforce_eager={args.enforce_eager}")


if __name__ == "__main__":
    main()
