"""A batch gives the same greedy tokens as its requests run one at a time, also when a tiny token budget
forces chunked prefill, a tiny KV cache forces preemption, and shared prefixes come from the prefix cache; on the native
and the Transformers model paths alike."""
import pytest
from greedy import assert_greedy_match, hf_greedy
from tiny_models import build_tokenizer

from hfbridge import LLM, SamplingParams

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    tok = build_tokenizer()
    texts = [
        "Hello, my name is",
        "The capital of France is Paris. The capital of Italy is",
        "Once upon a time there was a little robot who loved to read",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10",
        "A quick brown fox jumps",
        "Serving language models needs a paged key-value cache and a",
    ]
    return [tok(t).input_ids for t in texts]


@pytest.fixture(scope="module", params=["native", "transformers"])
def model_impl(request):
    return request.param


@pytest.fixture(scope="module")
def alone(tiny_llama, prompts, model_impl):
    """Each prompt on its own, default engine settings."""
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, model_impl=model_impl)
    assert llm.apply_model(lambda m: type(m).__name__) == [
        "LlamaForCausalLM" if model_impl == "native" else "TransformersForCausalLM"
    ]
    return [llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def _under_tp(model_impl: str, tp: int) -> str:
    """The native models have no tensor-parallel layers: at tp > 1 the native case runs `auto`, which falls back to
    the Transformers path (model_impl="native" would be refused)."""
    return "auto" if tp > 1 and model_impl == "native" else model_impl


def generate_batch(folder, prompts, model_impl, **engine_kwargs):
    llm = LLM(model=str(folder), max_model_len=64, model_impl=model_impl, **engine_kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_alone_equals_transformers(tiny_llama, prompts, alone):
    model = tiny_llama[0]
    for p, ours in zip(prompts, alone):
        tokens, logits = hf_greedy(model, p, MAX_NEW, ignore_eos=True)
        assert_greedy_match(ours, tokens, logits)


def test_batch_equals_alone(tiny_llama, prompts, alone, model_impl):
    _, batch = generate_batch(tiny_llama[1], prompts, model_impl)
    assert batch == alone


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_tiny_budget_and_cache_force_chunking_and_preemption(tiny_llama, prompts, alone, model_impl, tp):
    model_impl = _under_tp(model_impl, tp)
    llm, batch = generate_batch(
        tiny_llama[1], prompts, model_impl,
        block_size=4, num_gpu_blocks_override=16, max_num_batched_tokens=8, max_num_seqs=4, tensor_parallel_size=tp,
    )
    engine = llm.llm_engine
    assert batch == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache_manager.num_free_blocks == 16  # nothing leaked


def test_chunked_prefill_alone_equals_unchunked(tiny_llama, prompts, alone, model_impl):
    _, batch = generate_batch(tiny_llama[1], prompts, model_impl, block_size=4, max_num_batched_tokens=5)
    assert batch == alone


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_shared_prefix_served_from_cache(tiny_llama, prompts, alone, model_impl, tp):
    model_impl = _under_tp(model_impl, tp)
    prefix = build_tokenizer()("Serving language models needs a paged key-value cache and a scheduler.").input_ids
    shared = [prefix + p for p in prompts]
    expected = generate_batch(tiny_llama[1], shared, model_impl, enable_prefix_caching=False)[1]  # one process

    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4, num_gpu_blocks_override=64,
              model_impl=model_impl, tensor_parallel_size=tp)
    engine = llm.llm_engine
    first = llm.generate({"prompt_token_ids": shared[0]}, GREEDY, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in shared[1:]], GREEDY, use_tqdm=False)
    results = [o.outputs[0].token_ids for o in first + rest]
    assert results == expected
    full_prefix_blocks = len(prefix) // 4
    assert all(o.num_cached_tokens >= 4 * full_prefix_blocks for o in rest)
    assert engine.kv_cache_manager.stats.hit_tokens >= 4 * full_prefix_blocks * len(rest)
    assert engine.kv_cache_manager.num_free_blocks == 64  # blocks freed (still cached, reusable)
