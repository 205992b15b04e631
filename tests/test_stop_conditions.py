"""Stop strings, stop token ids, EOS, min_tokens and max_tokens, checked against the unstopped greedy
continuation of the same prompt (the model is deterministic, so the stop must land exactly where expected)."""
import pytest

from hfbridge import LLM, SamplingParams

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=64)


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy 20 tokens with nothing stopping them."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    return out


def greedy(llm, **kwargs):
    params = dict(temperature=0, max_tokens=20, ignore_eos=True)
    params.update(kwargs)
    return llm.generate(PROMPT, SamplingParams(**params))[0].outputs[0]


def first_new_token(ids: list[int], start: int) -> int:
    """Index of the first token at or after `start` that did not occur before it."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


def test_max_tokens_is_length(llm, reference):
    out = greedy(llm, max_tokens=5)
    assert out.token_ids == reference.token_ids[:5] and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_id_stops_and_is_reported(llm, reference):
    ids = reference.token_ids
    i = first_new_token(ids, 3)
    out = greedy(llm, stop_token_ids=[ids[i]])
    assert out.token_ids == ids[: i + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[i])
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(ids[:i], skip_special_tokens=True)  # the stop token's text is not output


def test_min_tokens_delays_a_stop_token(llm, reference):
    ids = reference.token_ids
    i = first_new_token(ids, 1)
    out = greedy(llm, stop_token_ids=[ids[i]], min_tokens=i + 2)
    assert len(out.token_ids) > i + 1 or out.finish_reason == "length"


def test_stop_string_truncates_text(llm, reference):
    text = reference.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    out = greedy(llm, stop=[stop])
    assert (out.text, out.finish_reason, out.stop_reason) == (text[:cut], "stop", stop)
    out = greedy(llm, stop=[stop], include_stop_str_in_output=True)
    assert out.text == text[: cut + len(stop)]
    assert len(out.token_ids) < len(reference.token_ids)


def test_earliest_of_several_stop_strings_wins(llm, reference):
    text = reference.text
    early, late = text[4:6], text[-3:]
    out = greedy(llm, stop=[late, early])
    assert out.text == text[: text.find(early)] and out.stop_reason == early


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    out = greedy(llm, ignore_eos=False, logit_bias={eos: 100})
    assert out.token_ids == [eos] and (out.finish_reason, out.stop_reason) == ("stop", None) and out.text == ""
    out = greedy(llm, ignore_eos=True, logit_bias={eos: 100}, max_tokens=3)
    assert out.token_ids == [eos] * 3 and out.finish_reason == "length"
    out = greedy(llm, ignore_eos=False, logit_bias={eos: 100}, min_tokens=3)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]


def test_max_model_len_caps_generation(tiny_llama):
    llm = LLM(model=str(tiny_llama[1]), max_model_len=12)
    prompt = list(range(3, 10))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(prompt) + len(out.token_ids) == 12 and out.finish_reason == "length"  # prompt + output <= limit
