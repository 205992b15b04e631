"""Run by tests/test_pipeline_parallel.py under `torchrun --nproc-per-node 2`: every rank builds the same engine
(pipeline_parallel_size=2, distributed_executor_backend="external_launcher") and writes its outputs to
rank<RANK>.json."""
import json
import os
import sys

from hfbridge import LLM, SamplingParams

folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
llm = LLM(model=folder, max_model_len=64, block_size=4, pipeline_parallel_size=2,
          distributed_executor_backend="external_launcher")
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
results = [
    {"ids": o.outputs[0].token_ids,
     "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
    for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
]
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(results, f)
