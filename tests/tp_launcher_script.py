"""Run under torchrun by tests/test_tensor_parallel.py and tests/test_pipeline_parallel.py (`--nproc-per-node 2`)
and tests/test_multinode_torchrun.py (two nodes): every rank builds the same engine
(distributed_executor_backend="external_launcher", the sizes in HFBRIDGE_TEST_PARALLEL, tp=2 by default) and writes
its outputs to rank<RANK>.json.

    script.py FOLDER PROMPTS_JSON OUT_DIR [MAX_TOKENS (default 8)]"""
import json
import os
import sys

from hfbridge import LLM, SamplingParams

folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 8
sizes = json.loads(os.environ.get("HFBRIDGE_TEST_PARALLEL", '{"tensor_parallel_size": 2}'))  # tp=2 unless told
llm = LLM(model=folder, max_model_len=64, block_size=4, distributed_executor_backend="external_launcher", **sizes)
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
results = [
    {"ids": o.outputs[0].token_ids,
     "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
    for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
]
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(results, f)
