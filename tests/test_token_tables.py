"""A request's token tables (allowed_token_ids, bad_words, min_tokens, logit_bias) built once and applied to all its
samples' rows at once (issue 38). Oracle: Transformers' own logits processors, one row at a time
(PrefixConstrainedLogitsProcessor, NoBadWordsLogitsProcessor, MinNewTokensLengthLogitsProcessor,
SequenceBiasLogitsProcessor), in vLLM's order; and vLLM's documented caps and messages."""
import pickle

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from hfbridge.errors import ValidationError
from hfbridge.sample.bad_words import tokenize_bad_words
from hfbridge.sample.sampler import Sampler, SamplingRow
from hfbridge.sample.sampling_params import SamplingParams
from hfbridge.sample.token_tables import TokenTables, tables_of

V = 64
EOS = 2
ALLOWED = [2, 5, 7, 9, 11, 13, 17, 20, 21, 30, 40, 63]
BAD_WORDS = [[9], [5, 7], [11, 13, 17], [20, 21]]  # vLLM's tokenized form: the last token of each is banned
BIAS = {7: 2.5, 13: -1.0, 20: 4.0, 63: 0.5}


def transformers_row(logits: torch.Tensor, output: list[int], params: SamplingParams) -> torch.Tensor:
    """One row through Transformers' processors; input_ids = the output tokens (vLLM matches bad words there)."""
    ids = torch.tensor([output], dtype=torch.long) if output else torch.zeros((1, 0), dtype=torch.long)
    scores = logits[None].clone()
    if params.allowed_token_ids is not None:
        allowed = list(params.allowed_token_ids)
        scores = PrefixConstrainedLogitsProcessor(lambda batch_id, sent: allowed, num_beams=1)(ids, scores)
    if params.bad_words_token_ids:
        scores = NoBadWordsLogitsProcessor(params.bad_words_token_ids, eos_token_id=None)(ids, scores)
    if params.min_tokens:
        stop_ids = sorted(params.min_tokens_stop_ids)
        scores = MinNewTokensLengthLogitsProcessor(0, params.min_tokens, stop_ids)(ids, scores)
    if params.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias.items()])(ids, scores)
    return scores[0]


def request_params() -> SamplingParams:
    params = SamplingParams(temperature=1.0, n=6, allowed_token_ids=ALLOWED, logit_bias=BIAS, min_tokens=3,
                            stop_token_ids=[40], eos_token_ids=frozenset({EOS}))
    params.bad_words_token_ids = BAD_WORDS
    return params


# output histories: empty, shorter than min_tokens, ending with a bad word's prefix, or with several
OUTPUTS = [[], [5], [1, 5], [3, 11, 13], [20, 5], [11, 13, 20]]


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_tables_equal_transformers_processors_row_by_row(layout):
    torch.manual_seed(0)
    params = request_params()
    tables_of(params)
    samples = [params.for_sample(i) for i in range(len(OUTPUTS))]
    other = SamplingParams(temperature=1.0, logit_bias={1: 3.0})  # another request's rows in between
    rows = [SamplingRow(s, [0], out) for s, out in zip(samples, OUTPUTS)]
    if layout == "interleaved":
        rows = [r for row in rows for r in (row, SamplingRow(other, [0], [4]))]
    logits = torch.randn(len(rows), V)
    processed = Sampler._process(logits.clone(), rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(processed[i], transformers_row(logits[i], row.output_token_ids, row.params))


def test_samples_share_the_request_tables_and_table_dicts():
    params = request_params()
    tables = tables_of(params)
    samples = [params.for_sample(i) for i in range(4)]
    assert all(tables_of(s) is tables for s in samples)  # built once, never per sample
    assert all(s.logit_bias is params.logit_bias and s.allowed_token_ids is params.allowed_token_ids for s in samples)
    assert SamplingParams(temperature=1.0, n=3, seed=7).for_sample(2).seed == 9
    # Pickled to multi-process workers each step: plain arrays, no tensors.
    assert pickle.loads(pickle.dumps(tables)).allowed_ids.tolist() == sorted(ALLOWED)


def test_greedy_rows_with_tables_leave_the_fast_path_only_while_they_act():
    from hfbridge.sample.sampler import argmax_only

    only_min = SamplingParams(temperature=0, min_tokens=2, eos_token_ids=frozenset({EOS}))
    assert not argmax_only(SamplingRow(only_min, [0], [])) and argmax_only(SamplingRow(only_min, [0], [4, 4]))
    assert argmax_only(SamplingRow(SamplingParams(temperature=0), [0], []))


@pytest.mark.parametrize("name, make, limit, message", [
    ("logit_bias", lambda k: {i: 1.0 for i in range(k)}, 1024, "Too many logit bias tokens: 1025. The max size is 1024."),
    ("allowed_token_ids", lambda k: [1] * k, 1024, "Too many allowed token IDs: 1025. The max size is 1024."),
    ("bad_words", lambda k: [f"w{i}" for i in range(k)], 128, "Too many bad words: 129. The max number is 128."),
])
def test_tables_are_capped_like_vllm(name, make, limit, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        SamplingParams(**{name: make(limit + 1)})
    SamplingParams(**{name: make(limit)})


def test_tokenized_bad_words_are_capped_after_tokenization():
    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    # A word whose leading-space form is a different token sequence of the same length counts twice (vLLM's rule).
    twice = [w for w in ("Hello", "capital", "robot", "books", "quick", "small")
             if len(tokenize_bad_words([w], tokenizer, len(tokenizer))) == 2]
    assert twice, "the tiny tokenizer should give some word a leading-space variant"
    with pytest.raises(ValidationError, match=r"Too many bad words: 200\. The max number is 128\."):
        tokenize_bad_words([twice[0]] * 100, tokenizer, len(tokenizer))
    with pytest.raises(ValidationError, match="Too many total bad word tokens"):
        tokenize_bad_words(["a" * 3000], tokenizer, len(tokenizer))


@pytest.mark.parametrize("kwargs", [
    dict(allowed_token_ids=[EOS], min_tokens=2),  # the only allowed token is masked until min_tokens
    dict(allowed_token_ids=[EOS, 40], min_tokens=1, stop_token_ids=[40]),
])
def test_allowed_ids_that_min_tokens_masks_are_refused_up_front(kwargs):
    params = SamplingParams(temperature=0, eos_token_ids=frozenset({EOS}), **kwargs)
    with pytest.raises(ValidationError, match="leaves no token to sample") as info:
        TokenTables.build(params)
    assert info.value.parameter == "allowed_token_ids"


def test_allowed_ids_that_bad_words_ban_are_refused_up_front():
    params = SamplingParams(temperature=0, allowed_token_ids=[9, 21])
    params.bad_words_token_ids = [[9], [21]]
    with pytest.raises(ValidationError, match="leaves no token to sample"):
        TokenTables.build(params)
    params.bad_words_token_ids = [[9], [20, 21]]  # 21 is banned only after 20: allowed at the first step
    assert TokenTables.build(params) is not None


def test_an_n_request_shares_one_table_and_its_tokens_follow_it(tiny_llama):
    from hfbridge import LLM

    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4)
    engine = llm.llm_engine
    added = []
    real_add = engine.scheduler.add_request
    engine.scheduler.add_request = lambda request: added.append(request) or real_add(request)
    params = SamplingParams(n=16, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True,
                            allowed_token_ids=[5, 6, 7, 8], logit_bias={5: -100, 6: 5.0})
    [out] = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)
    samples = [r.sampling_params for r in added]
    assert len(samples) == 16 and len({id(s.token_tables) for s in samples}) == 1
    assert len({id(s.logit_bias) for s in samples}) == 1  # no per-sample copy of the tables
    tokens = {t for completion in out.outputs for t in completion.token_ids}
    assert tokens <= {6, 7, 8} and 6 in tokens  # 5 is allowed but biased out; +5 makes 6 likely
