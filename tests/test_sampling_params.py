"""SamplingParams: vLLM's defaults, normalisation and error messages."""
import pytest

from hfbridge import SamplingParams
from hfbridge.errors import ValidationError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.skip_special_tokens


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[5, 5, 6], logprobs=True, seed=-1, top_k=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6] and p.logprobs == 1 and p.seed is None and p.top_k == 0
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=0.001).temperature == 0.01
    assert SamplingParams(logit_bias={"7": 300, 8: -500}).logit_bias == {7: 100.0, 8: -100.0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be at least 1, got 0."),
        (dict(n=2, temperature=0), "n must be 1 when using greedy sampling, got 2."),
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5."),
        (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3."),
        (dict(repetition_penalty=0), "repetition_penalty must be greater than zero, got 0."),
        (dict(temperature=-1), "temperature must be in [0, 2], got -1."),
        (dict(temperature=2.5), "temperature must be in [0, 2], got 2.5."),
        (dict(top_p=0), "top_p must be in (0, 1], got 0."),
        (dict(top_k=-5), "top_k must be 0 (disable), or at least 1, got -5."),
        (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5."),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
        (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0, got -1."),
        (dict(max_tokens=4, min_tokens=5), "min_tokens must be less than or equal to max_tokens=4, got 5."),
        (dict(logprobs=-2), "logprobs must be non-negative or -1, got -2."),
        (dict(stop=["ok", ""]), "stop cannot contain an empty string."),
        (dict(stop="x", detokenize=False), "stop strings are only supported when detokenize is True"),
        (dict(allowed_token_ids=[]), "allowed_token_ids is not None and empty!"),
        (dict(logit_bias={"a": 1}), "logit_bias contains key(s) that cannot be converted to integer token IDs"),
        (dict(n=3, best_of=2), "best_of must be greater than or equal to n, got n=3 and best_of=2."),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.parameter in str(info.value)


def test_vocabulary_checks():
    with pytest.raises(ValidationError, match=r"token_id\(s\) \[100\] in stop_token_ids contain out-of-vocab"):
        SamplingParams(stop_token_ids=[1, 100]).verify_for_vocab(50, 20)
    with pytest.raises(ValidationError, match="Requested sample logprobs of 21, which is greater than max allowed: 20"):
        SamplingParams(logprobs=21).verify_for_vocab(50, 20)
    SamplingParams(logprobs=-1).verify_for_vocab(50, -1)  # uncapped server


def test_stop_token_ids_and_eos():
    p = SamplingParams(stop_token_ids=[9], eos_token_ids=frozenset({2}))
    assert p.all_stop_token_ids == {2, 9}
    p = SamplingParams(stop_token_ids=[9], ignore_eos=True, eos_token_ids=frozenset({2}))
    assert p.all_stop_token_ids == {9}
