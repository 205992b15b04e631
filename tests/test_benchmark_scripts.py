"""The benchmark scripts parse their flags (they never run as timed tests): `--help` of each exits 0 and names
the side-by-side options the README documents."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,flags", [
    ("compare.py", ("--vllm-python", "--quick", "--rounds", "--out", "--concurrency")),
    ("throughput.py", ("--engine", "--model", "--json", "--write-model", "--shape")),
    ("serving.py", ("--engine", "--client", "--vllm-python", "--concurrency")),
    ("structured.py", ("--vllm-python", "--num-requests", "--max-tokens", "--json")),
    ("hardening.py", ("--n", "--scenarios", "--server-args")),
    ("lora.py", ("--peer", "--vllm-python", "--num-prompts", "--num-adapters", "--rank")),
    ("multimodal.py", ("--vllm-python", "--num-requests", "--max-tokens", "--model-dir", "--json")),
])
def test_help(script, flags):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout, (script, flag)
