"""The C kernels built for another target than the machine's best, and not built at all: a whole native generate
equals Transformers' generate() with the kernels at the AVX2 level (HFBRIDGE_KERNEL_MARCH=x86-64-v3: 256-bit
vectors, no AVX-512, so no bfloat16 greedy screen) and with no C compiler (the torch paths); every kernel is built
before the engine takes requests. Each runs in a fresh process, since a process loads its kernels once."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
from greedy import hf_greedy
from tiny_models import build_tokenizer, make_tiny_model
from pathlib import Path
from hfbridge import LLM, SamplingParams
from hfbridge.attention_backends import cpu_kernels
from hfbridge.native_overrides import greedy_head

model, folder = make_tiny_model("LlamaForCausalLM", Path({folder!r}))
prompts = [build_tokenizer()(t).input_ids for t in ("Hello, my name is", "A quick brown fox jumps over")]
llm = LLM(model=str(folder), model_impl="native", block_size=4, max_model_len=64, dtype="float32")
kernels = Path({cache!r}) / "kernels"
built_at_start = sorted(p.name for p in kernels.glob("*.so")) if kernels.is_dir() else []
outs = llm.generate([{{"prompt_token_ids": p}} for p in prompts],
                    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps({{
    "ours": [o.outputs[0].token_ids for o in outs],
    "theirs": [hf_greedy(model, p, 12, ignore_eos=True)[0] for p in prompts],
    "decode_kernels": cpu_kernels.available(torch.device("cpu"), torch.float32, 16),
    "greedy_screen": greedy_head._library() is not None,
    "built_at_start": built_at_start,
    "built_in_the_end": sorted(p.name for p in kernels.glob("*.so")) if kernels.is_dir() else [],
}}))
"""


def run(tmp_path: Path, **env) -> dict:
    script = SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "model"),
                           cache=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HFBRIDGE_CACHE_DIR": str(tmp_path / "cache"), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64-v3 is an x86 target")
def test_avx2_level_build_generates_like_transformers(tmp_path):
    found = run(tmp_path, HFBRIDGE_KERNEL_MARCH="x86-64-v3")
    assert found["ours"] == found["theirs"]
    assert found["decode_kernels"] and not found["greedy_screen"]  # built, at 256 bits, without AVX512-BF16
    # every kernel is built before the engine is ready, none on the first request
    assert found["built_at_start"] == found["built_in_the_end"]
    assert {name.split("_")[0] for name in found["built_at_start"]} >= {"panel", "paged", "row", "token"}


def test_no_c_compiler_generates_like_transformers(tmp_path):
    found = run(tmp_path, CC=str(tmp_path / "no-such-compiler"))
    assert found["ours"] == found["theirs"]
    assert not found["decode_kernels"] and not found["greedy_screen"]
    assert not list((tmp_path / "cache").glob("kernels/*.so"))
