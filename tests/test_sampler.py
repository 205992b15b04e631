"""The sampler's pieces against Transformers' logits processors (the oracle), its draws against the target
distribution, and per-request seeds."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hfbridge.sample.logprobs import gather_logprobs
from hfbridge.sample.sampler import Sampler, SamplingRow, apply_min_p, apply_penalties, apply_top_k_top_p
from hfbridge.sample.sampling_params import SamplingParams

V = 50


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("k", [1, 3, 17, V])
def test_top_k_equals_transformers(k):
    torch.manual_seed(k)
    logits = torch.randn(4, V)
    ours = apply_top_k_top_p(logits, torch.full((4,), k), torch.ones(4))
    theirs = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(theirs))
    torch.testing.assert_close(ours[finite_mask(ours)], logits[finite_mask(ours)])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    torch.manual_seed(1)
    logits = torch.randn(4, V) * 2
    ours = apply_top_k_top_p(logits, torch.zeros(4, dtype=torch.long), torch.full((4,), p))
    theirs = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(theirs))


def test_top_k_then_top_p_per_row():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    top_k, top_p = torch.tensor([0, 5, 10]), torch.tensor([0.5, 1.0, 0.8])
    ours = apply_top_k_top_p(logits, top_k, top_p)
    for i in range(3):
        ref = logits[i : i + 1].clone()
        if top_k[i] > 0:
            ref = TopKLogitsWarper(int(top_k[i]))(None, ref)
        ref = TopPLogitsWarper(float(top_p[i]))(None, ref)
        assert torch.equal(finite_mask(ours[i : i + 1]), finite_mask(ref))


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_equals_transformers(min_p):
    torch.manual_seed(3)
    logits = torch.randn(4, V) * 3
    ours = apply_min_p(logits, torch.full((4,), min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(theirs))


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    torch.manual_seed(4)
    logits = torch.randn(2, V)
    prompts, outputs = [[1, 2, 3, 3], [10, 11]], [[4, 1], [12, 49, 12]]
    params = SamplingParams(repetition_penalty=1.7)
    ours = apply_penalties(logits.clone(), [SamplingRow(params, p, o) for p, o in zip(prompts, outputs)])
    for i in range(2):
        ids = torch.tensor([prompts[i] + outputs[i]])
        theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], theirs)


def test_presence_and_frequency_penalties_follow_openai_formula_over_output_only():
    torch.manual_seed(5)
    logits = torch.randn(1, V)
    output = [7, 7, 7, 9]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = apply_penalties(logits.clone(), [SamplingRow(params, [3, 3, 8], output)])
    expected = logits.clone()
    counts = torch.bincount(torch.tensor(output), minlength=V).float()
    expected[0] -= 0.25 * counts + 0.5 * (counts > 0).float()
    torch.testing.assert_close(ours, expected)
    assert ours[0, 3] == logits[0, 3] and ours[0, 8] == logits[0, 8]  # prompt tokens untouched


def draw_many(params: SamplingParams, logits_row: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(torch.Generator().manual_seed(seed))
    rows = [SamplingRow(params, [0], [])] * n
    tokens, _ = sampler(logits_row.expand(n, -1).clone(), rows)
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[-1]).float() / n


def test_draws_follow_the_tempered_distribution():
    torch.manual_seed(6)
    logits = torch.randn(8) * 2
    for temperature in (0.5, 1.0, 1.7):
        freq = draw_many(SamplingParams(temperature=temperature), logits, 20000)
        target = torch.softmax(logits / temperature, dim=-1)
        assert (freq - target).abs().max() < 0.015, (temperature, freq, target)


def test_draws_follow_the_truncated_distribution():
    torch.manual_seed(7)
    logits = torch.randn(8) * 2
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    freq = draw_many(params, logits, 20000)
    truncated = apply_top_k_top_p((logits / 0.8)[None], torch.tensor([4]), torch.tensor([0.9]))[0]
    target = torch.softmax(truncated, dim=-1)
    assert (freq[target == 0] == 0).all()
    assert (freq - target).abs().max() < 0.015


def test_greedy_is_argmax_and_ignores_randomness():
    torch.manual_seed(8)
    logits = torch.randn(5, V)
    tokens, _ = Sampler(torch.Generator())(logits, [SamplingRow(SamplingParams(temperature=0), [0], [])] * 5)
    assert tokens == logits.argmax(-1).tolist()


def test_per_request_seed_is_independent_of_the_batch():
    torch.manual_seed(9)
    logits = torch.randn(3, V)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def first_token(batch_logits, position):
        rows = [SamplingRow(SamplingParams(temperature=1.0), [0], [])] * batch_logits.shape[0]
        rows[position] = SamplingRow(seeded, [0], [], torch.Generator().manual_seed(1234))
        return Sampler(torch.Generator().manual_seed(position))(batch_logits, rows)[0][position]

    alone = first_token(logits[1:2], 0)
    assert first_token(logits[[0, 1, 2]], 1) == alone
    assert first_token(logits[[2, 0, 1]], 2) == alone


def test_logit_bias_allowed_ids_and_min_tokens():
    logits = torch.zeros(3, V)
    rows = [
        SamplingRow(SamplingParams(temperature=0, logit_bias={17: 5.0}), [0], []),
        SamplingRow(SamplingParams(temperature=1.0, allowed_token_ids=[3, 4]), [0], [], torch.Generator().manual_seed(0)),
        SamplingRow(SamplingParams(temperature=0, min_tokens=2, logit_bias={2: 9.0}, eos_token_ids=frozenset({2})), [0], [5]),
    ]
    tokens, _ = Sampler(torch.Generator())(logits, rows)
    assert tokens[0] == 17 and tokens[1] in (3, 4) and tokens[2] != 2


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(10)
    logits = torch.randn(2, V)
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0), [0], [])] * 2
    tokens, logprobs = Sampler(torch.Generator())(logits, rows)
    ref = torch.log_softmax(logits, -1)
    for i in range(2):
        entry = logprobs[i]
        assert entry.token_ids[0] == tokens[i]
        assert entry.token_ids[1:] == ref[i].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor(entry.logprobs), ref[i, entry.token_ids])
        assert entry.ranks[0] == int((ref[i] > ref[i, tokens[i]]).sum()) + 1 and entry.ranks[1:] == [1, 2, 3]


def test_gather_logprobs_rank_of_an_unlikely_token():
    logprobs = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), -1)
    (entry,) = gather_logprobs(logprobs, [3], [1])
    assert entry.token_ids == [3, 0] and entry.ranks == [4, 1]
