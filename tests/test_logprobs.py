"""Sample and prompt logprobs equal log-softmax of Transformers' own logits."""
import pytest
import torch
from greedy import hf_greedy
from tiny_models import build_tokenizer

from hfbridge import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4)


def test_sample_logprobs_equal_transformers(llm, tiny_llama):
    prompt = build_tokenizer()("The capital of France is").input_ids
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, logprobs=4, ignore_eos=True))
    completion = out[0].outputs[0]
    tokens, logits = hf_greedy(tiny_llama[0], prompt, 6, ignore_eos=True)
    assert completion.token_ids == tokens
    total = 0.0
    for step, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        ref = torch.log_softmax(logits[step].float(), -1)
        top = ref.topk(4)
        assert set(entry) == {token, *top.indices.tolist()}
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[token_id].item(), abs=1e-4)
            assert lp.rank == int((ref > ref[token_id]).sum()) + 1
            assert lp.decoded_token == llm.get_tokenizer().decode([token_id])
        total += ref[token].item()
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_prompt_logprobs_equal_transformers_forward_also_when_chunked(tiny_llama):
    prompt = build_tokenizer()("Once upon a time there was a little robot who loved to read books.").input_ids
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama[0](torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4, max_num_batched_tokens=5)
    out = llm.generate([{"prompt_token_ids": prompt}] * 2, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        target = prompt[position]
        row = ref[position - 1]
        assert set(entry) == {target, *row.topk(2).indices.tolist()}
        assert entry[target].logprob == pytest.approx(row[target].item(), abs=1e-4)
        assert entry[target].rank == int((row > row[target]).sum()) + 1


def test_logprobs_above_the_cap_are_refused(llm):
    with pytest.raises(ValueError, match="greater than max allowed: 20"):
        llm.generate("hi", SamplingParams(logprobs=21))
