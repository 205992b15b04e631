"""Greedy tokens equal Transformers' generate() for tiny random models of several architectures, with all
prompts in one batch, small blocks so every prompt spans several of them."""
import pytest
from greedy import assert_greedy_match, hf_greedy
from tiny_models import CONFIGS, build_tokenizer, make_tiny_model

from hfbridge import LLM, SamplingParams

MAX_NEW = 16


def prompts() -> list[list[int]]:
    tok = build_tokenizer()
    texts = [
        "Hello",
        "The capital of France is",
        "Once upon a time there was a little robot who loved",  # longer than the 8-token sliding windows
        "Serving language models needs a paged key-value cache and a scheduler. A quick brown fox jumps over",
    ]
    return [tok(t).input_ids for t in texts]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_equals_transformers(arch, tmp_path):
    model, folder = make_tiny_model(arch, tmp_path / arch)
    batch = prompts()
    assert len({len(p) for p in batch}) == len(batch)
    expected = [hf_greedy(model, p, MAX_NEW) for p in batch]

    llm = LLM(model=str(folder), model_impl="transformers", block_size=4, max_model_len=128, dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0, max_tokens=MAX_NEW))

    for out, (tokens, logits) in zip(outs, expected):
        assert_greedy_match(out.outputs[0].token_ids, tokens, logits)
    names = llm.apply_model(lambda m: type(m).__name__ + "/" + type(m.model).__name__)
    assert names == [f"TransformersForCausalLM/{arch}"]
