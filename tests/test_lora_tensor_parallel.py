"""LoRA under tensor parallelism (issue 33): tp=2 (mp, gloo on CPU) gives the tokens of PEFT's own model for a batch
mixing adapters and base rows: colwise modules keep their rows of B, rowwise modules their columns of A (the shrink
summed over the ranks). Adapters load on every rank; a bad one is refused and the ranks keep serving. One tp=2
engine: two spawned workers (~10 s on a contended 2-core box)."""
from __future__ import annotations

import pytest
from greedy import assert_greedy_match, hf_greedy
from lora_adapters import peft_model, standard_adapters
from tiny_models import build_tokenizer

from hfbridge import LLM, LoRARequest, SamplingParams

MAX_NEW = 8
TEXTS = ["Hello, my name is", "The capital of France is", "Once upon a time there was", "A quick brown fox"]


@pytest.mark.slow
def test_tp2_mixed_adapters_equal_peft(tiny_llama, tmp_path):
    base, folder = tiny_llama
    adapters = standard_adapters(base, tmp_path)
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    tok = build_tokenizer()
    prompts = [tok(t).input_ids for t in TEXTS]
    names = ["all", None, "qv", "all"]
    llm = LLM(str(folder), tensor_parallel_size=2, distributed_executor_backend="mp", enable_lora=True,
              max_loras=2, max_lora_rank=8, max_model_len=64, block_size=4)
    try:
        with pytest.raises(ValueError, match="LoRA adapter 'missing'.*no such folder"):
            missing = LoRARequest("missing", 9, str(tmp_path / "x"))
            llm.generate(["Hi"], SamplingParams(max_tokens=1), lora_request=missing, use_tqdm=False)
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            lora_request=[None if n is None else requests[n] for n in names], use_tqdm=False)
        for prompt, name, out in zip(prompts, names, outs):
            oracle = base if name is None else peft_model(base, requests[name].lora_path)
            theirs, logits = hf_greedy(oracle, prompt, MAX_NEW, ignore_eos=True)
            assert_greedy_match(out.outputs[0].token_ids, theirs, logits)
    finally:
        llm.llm_engine.shutdown()
