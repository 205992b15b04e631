"""Greedy tokens from the LM head's bfloat16 screen (native_overrides/greedy_head.py) against argmax definitions
computed by torch: float64 logits where the top two are further apart than float32 rounding, torch.argmax's
first-index rule for ties and NaN, and Transformers' generate() end to end."""
import pytest
import torch
import torch.nn.functional as F

from hfbridge.native_overrides import greedy_head
from hfbridge.native_overrides.head_projection import HeadProjection


def cpu_has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


def float64_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden.double() @ weight.double().T).argmax(dim=-1)


def test_the_screen_runs_wherever_the_cpu_has_bfloat16_dot_products():
    head = HeadProjection(torch.randn(640, 64))
    assert (head.greedy_head is not None) == cpu_has_avx512_bf16()


def near_ties(rows: int, vocab: int, hidden_size: int, gap: float, seed: int):
    """A head whose logits crowd within bfloat16's error of each other (every weight row is one base row plus a
    perturbation of relative size `gap`), so the screen can rule out almost nothing, yet float32 tells them
    apart: hidden [rows, H], weight [vocab, H]."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(hidden_size, generator=gen)
    weight = base + gap * torch.randn(vocab, hidden_size, generator=gen)
    hidden = base + 0.3 * torch.randn(rows, hidden_size, generator=gen)
    return hidden * 4.0, weight


@pytest.mark.parametrize("rows", [1, 14, 15, 64])
def test_near_ties_give_the_float64_argmax(rows):
    hidden, weight = near_ties(rows, vocab=4000, hidden_size=128, gap=2e-3, seed=rows)
    logits = hidden.double() @ weight.double().T
    top2 = logits.topk(2, dim=-1).values
    margin = 1e-5 * (hidden.double().abs() @ weight.double().abs().T).max(dim=-1).values  # far above float32 error
    decided = (top2[:, 0] - top2[:, 1]) > margin
    assert decided.sum() >= rows * 0.8  # the test is about rows float32 can decide
    with torch.inference_mode():
        got = HeadProjection(weight).greedy(hidden)
    assert torch.equal(got[decided], logits.argmax(dim=-1)[decided])


def test_bfloat16_rounding_that_reverses_the_order_still_gives_the_float64_argmax():
    """Rounding to bfloat16 (a step of e = 2^-7 just above 1) turned against the true order: token 40's weights all
    round down (1 + 0.49 e -> 1), half of token 0's round up (1 + 0.51 e -> 1 + e). In bfloat16 token 0 leads by
    32 e; in float64 token 40 leads by about 15 e. A bound too small (4x is enough) rules token 40 out, and it is
    not in token 0's panel of 32 columns, which is recomputed in any case."""
    e, size = 2.0**-7, 64
    weight = torch.zeros(500, size)
    weight[0] = 1.0
    weight[0, : size // 2] = 1 + 0.51 * e
    weight[40] = 1 + 0.49 * e
    hidden = torch.ones(3, size)
    with torch.inference_mode():
        head = HeadProjection(weight)
        got = head.greedy(hidden)
        screened = head.greedy_head(hidden) if head.greedy_head is not None else got
    assert got.tolist() == [40, 40, 40] == float64_argmax(hidden, weight).tolist()
    assert screened.tolist() == [40, 40, 40]  # from the screen itself, not the full head


@pytest.mark.parametrize("vocab", [49152, 1000, 33])  # a multiple of the panels' 32 columns, and two that are not
def test_random_heads_give_the_float64_argmax(vocab):
    gen = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, 96, generator=gen) * 0.05
    hidden = torch.randn(64, 96, generator=gen) * 20
    with torch.inference_mode():
        got = HeadProjection(weight).greedy(hidden)
    assert torch.equal(got, float64_argmax(hidden, weight))


@pytest.mark.parametrize("duplicate_first", [True, False])
def test_a_tie_goes_to_the_first_index(duplicate_first):
    """Two equal weight rows give equal logits: torch.argmax's rule takes the first of them."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2000, 64, generator=gen)
    hidden = 3 * weight[1500:1501].clone()  # token 1500 wins by far
    copy = 200 if duplicate_first else 1800
    weight[copy] = weight[1500]
    with torch.inference_mode():
        got = HeadProjection(weight).greedy(hidden)
    assert got.tolist() == [min(copy, 1500)]
    assert torch.equal(got, F.linear(hidden, weight).argmax(dim=-1))


def test_rows_with_nan_or_inf_take_the_full_head():
    """Where the bound cannot hold the row is computed in full: torch.argmax's answer on the logits (a NaN counts
    as the largest value, the first one wins)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(700, 32, generator=gen)
    hidden = torch.randn(4, 32, generator=gen)
    hidden[1, 5] = float("nan")
    hidden[2, 7] = float("inf")
    with torch.inference_mode():
        got = HeadProjection(weight).greedy(hidden)
    assert torch.equal(got, F.linear(hidden, weight).argmax(dim=-1))
    assert got[1] == 0  # every logit of the NaN row is NaN
    assert torch.equal(got[[0, 3]], float64_argmax(hidden[[0, 3]], weight))


def test_a_head_the_screen_cannot_bound_is_computed_in_full():
    """A weight that is not finite in bfloat16 (3.4e38 rounds up to infinity there) gets no screen; an odd hidden
    size none either (the dot product takes pairs). Both still give torch.argmax's answer."""
    gen = torch.Generator().manual_seed(5)
    huge = torch.randn(300, 16, generator=gen)
    huge[7, 3] = 3.4e38
    odd = torch.randn(300, 15, generator=gen)
    for weight in (huge, odd):
        hidden = torch.randn(3, weight.shape[1], generator=gen) * 1e-3
        head = HeadProjection(weight)
        assert head.greedy_head is None
        with torch.inference_mode():
            assert torch.equal(head.greedy(hidden), F.linear(hidden, weight).argmax(dim=-1))


def test_greedy_engine_steps_take_the_screen_and_equal_generate(tiny_llama, monkeypatch):
    """The engine's greedy steps come from the screen (counted), and the tokens are Transformers' generate()'s."""
    from transformers import GenerationConfig

    from hfbridge import LLM, SamplingParams

    model, folder = tiny_llama
    calls = []
    screen = greedy_head.GreedyHead.__call__
    monkeypatch.setattr(greedy_head.GreedyHead, "__call__", lambda self, h: calls.append(h.shape[0]) or screen(self, h))
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 1, 9, 12, 10]]
    llm = LLM(model=folder, skip_tokenizer_init=True, enforce_eager=True, dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    expected_available = cpu_has_avx512_bf16()
    assert (len(calls) > 0) == expected_available
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert list(out.outputs[0].token_ids) == reference[0, len(prompt):].tolist()


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the screen runs where the CPU has AVX512-BF16")
def test_mismatched_hidden_states_are_refused_and_the_default_dtype_does_not_matter():
    weight = torch.randn(640, 64)
    head = HeadProjection(weight)
    with pytest.raises(ValueError, match=r"\[N, 64\] float32"):
        head.greedy_head(torch.randn(3, 32))  # would read past each row
    with pytest.raises(ValueError, match="float32"):
        head.greedy_head(torch.randn(3, 64, dtype=torch.float64))
    hidden = torch.randn(5, 64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the screen's scratch must stay float32 all the same
    try:
        tokens = head.greedy(hidden)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(tokens, float64_argmax(hidden, weight))


def test_row_norms_bound_the_exact_norms_across_chunk_edges():
    """Each row's float32 norm is at least the exact one (the screen's bound relies on it) and within 2^-19 of it,
    for rows on both sides of the chunk boundaries."""
    weight = torch.randn(9001, 37, generator=torch.Generator().manual_seed(8)) * 3
    exact = torch.linalg.vector_norm(weight.double(), dim=1)
    norms = greedy_head._row_norms(weight)
    assert norms.dtype == torch.float32 and norms.shape == (9001,)
    assert bool((norms.double() >= exact).all())
    assert bool((norms.double() <= exact * (1 + 2**-19)).all())
