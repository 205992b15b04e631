"""What loading a model adds to a process's memory, measured in a fresh process (the memory tests' one probe)."""
import json
import subprocess
import sys

SCRIPT = """
import json, sys, psutil
from hfbridge import LLM
before = psutil.Process().memory_info().rss
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=256, num_gpu_blocks_override=16)
after = psutil.Process().memory_info().rss
weights = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))[0]
print(json.dumps([before, after, weights]))
"""


def rss_at_load(model: str, dtype: str = "float32") -> tuple[int, int, int]:
    """(RSS once torch and hfbridge's LLM are imported, RSS after LLM() loaded `model` with a tiny KV cache, the
    bytes of its parameters), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, model, dtype], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, weights = json.loads(done.stdout.strip().splitlines()[-1])
    return before, after, weights
