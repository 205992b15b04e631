"""enforce_eager=False (vLLM's default) torch.compiles, in the background, the native decoder's attention-free regions,
the whole decode step (decode_graph.py) and, where the C kernels of cpu_kernels.py do not serve, the decode attention
that reads the paged cache in place.
Greedy output must be identical with and without enforce_eager, and equal Transformers' own generate(); once
compiled, serving never compiles again (no new graphs while generating).

The rest of the suite runs eagerly (HFBRIDGE_ENFORCE_EAGER=1 in conftest.py: compiling every tiny model would
cost minutes); this file is where the compiled path meets the oracle."""
import pytest
import torch
import torch._dynamo.utils
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from greedy import assert_greedy_match, hf_greedy
from test_native_models import build, prompts
from tiny_models import save_model

from hfbridge import LLM, SamplingParams
from hfbridge.attention_backends import cpu_kernels
from hfbridge.native_overrides.decode_graph import decode_step, warm_up_sizes

MAX_NEW = 8


def _llm(folder, enforce_eager: bool) -> LLM:
    return LLM(model=str(folder), model_impl="native", block_size=4, max_model_len=128, dtype="float32",
               enforce_eager=enforce_eager)


def _check_compiled_equals_eager_and_transformers(model, folder, batch: list[list[int]]) -> None:
    # Several prompts: batched prefill and decode steps (T >= 2) take the compiled regions, decode steps the
    # compiled decode attention.
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=5, ignore_eos=True)

    eager = _llm(folder, enforce_eager=True)
    assert eager.apply_model(lambda m: (m.compiled, m.decode_graph))[0] == (None, None)
    eager_outs = eager.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    del eager

    graphs_before = len(_debug_get_cache_entry_list(decode_step.__code__))
    compiled = _llm(folder, enforce_eager=False)
    compiles = compiled.llm_engine.executor.background_compiles()
    head_dim = compiled.apply_model(lambda m: m.model.layers[0].self_attn.head_dim)[0]
    # regions, decode step, and the decode attention unless the C kernels read the cache
    assert len(compiles) == (2 if cpu_kernels.available(torch.device("cpu"), torch.float32, head_dim) else 3)
    for c in compiles:
        assert c.wait(timeout=900), f"{c.what} did not compile: {c.error}"
    assert torch._dynamo.config.specialize_float is False, "the warm-ups left Dynamo's float setting changed"
    # one graph for a single request, one for batches: none traced on sizes that merely happened to be equal
    assert len(_debug_get_cache_entry_list(decode_step.__code__)) - graphs_before == 2
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    decode_graph = compiled.apply_model(lambda m: m.decode_graph)[0]
    calls = _count_calls(decode_graph)
    compiled_outs = compiled.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "serving compiled a new graph"
    assert calls == [MAX_NEW - 1], "every decode step should run the compiled decode graph"

    for prompt, e, c in zip(batch, eager_outs, compiled_outs):
        e, c = e.outputs[0], c.outputs[0]
        assert c.token_ids == e.token_ids
        for e_step, c_step in zip(e.logprobs, c.logprobs):
            assert set(c_step) == set(e_step)
            for token_id, lp in c_step.items():
                assert lp.logprob == pytest.approx(e_step[token_id].logprob, abs=1e-4)
        tokens, logits = hf_greedy(model, prompt, MAX_NEW, ignore_eos=True)
        assert_greedy_match(c.token_ids, tokens, logits)


def _count_calls(decode_graph) -> list[int]:
    """Counts the decode steps the compiled graph runs, in the returned one-item list."""
    calls, inner = [0], decode_graph.fn

    def counted(*args):
        calls[0] += 1
        return inner(*args)

    decode_graph.fn = counted
    return calls


def test_greedy_is_identical_with_and_without_enforce_eager(tmp_path):
    """One model that takes every compiled piece (Inductor takes minutes a model on a small CPU): Qwen3's q/k RMSNorm,
    rotary, fused qkv and gate_up; tied embeddings, as the packaged default model (Llama family: the same native
    module without the q/k norms); and a head size the C kernels do not take (24), so the compiled decode
    attention runs too. Three KV heads, as SmolLM2 has: a warm-up on 3-block tables traced a graph that assumed the
    two sizes equal, one more to compile and to check on every step."""
    model = build("Qwen3ForCausalLM", seed=3, tie_word_embeddings=True, head_dim=24, num_attention_heads=6,
                  num_key_value_heads=3)
    _check_compiled_equals_eager_and_transformers(model, save_model(model, tmp_path / "qwen3"), prompts())


def test_warm_ups_stay_within_a_short_context(tmp_path):
    """The compile warm-ups trace 17 and 19 tokens; with max_model_len=12 the rotary table has 12 rows, and a
    position past it aborted the process from inside the compiled kernel (an index check in C++). The warm-up
    inputs run eagerly here, where torch's own indexing raises on such a position."""
    model = build("LlamaForCausalLM", seed=5)
    llm = LLM(model=str(save_model(model, tmp_path / "llama")), model_impl="native", max_model_len=12,
              dtype="float32", enforce_eager=True)

    def warm_up_eagerly(m):
        for num_tokens in (17, 19):
            for layer, hidden, residual, positions, rotary, _ in m._warm_up_inputs(num_tokens):
                layer.before_attention(hidden, residual, positions, rotary)
        return m.rotary.cos.shape[0], int(m.rotary.warm_up_positions(19).max())  # the decode graph's batches

    rows, largest = llm.apply_model(warm_up_eagerly)[0]
    assert rows == 12 and largest < rows


@pytest.mark.parametrize("kv_heads,head_dim", [(1, 64), (3, 64), (5, 80), (7, 128), (8, 128), (16, 256)])
def test_decode_warm_up_sizes_equal_no_other_size(kv_heads, head_dim):
    """Each (block-table width, context length) of the decode graph's warm-up: the context needs exactly `width`
    blocks, and no two sizes of the traced step are equal (Dynamo would assume them equal for good)."""
    shape, batches = (2, 29, 13, kv_heads, head_dim), (17, 19, 1)
    pairs = warm_up_sizes(shape, batches)
    assert len(pairs) == 2
    for width, context in pairs:
        assert -(-context // shape[2]) == width
    values = [*shape[1:], 17, 19, *(size for pair in pairs for size in pair)]
    assert len(set(values)) == len(values), values
