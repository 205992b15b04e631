"""The offline API with vLLM's names: prompt forms, per-prompt params, order, chat, n > 1, seeds."""
import pytest
from tiny_models import build_tokenizer

from hfbridge import LLM, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=64)


def test_every_prompt_form_gives_the_same_tokens(llm):
    text = "The capital of France is"
    ids = build_tokenizer()(text).input_ids
    forms = [text, {"prompt": text}, {"prompt_token_ids": ids}, ids]
    results = [llm.generate(form, GREEDY, use_tqdm=False) for form in forms]
    assert all(len(r) == 1 and isinstance(r[0], RequestOutput) for r in results)
    assert len({tuple(r[0].outputs[0].token_ids) for r in results}) == 1
    assert results[0][0].prompt == text and results[0][0].prompt_token_ids == ids
    assert results[2][0].prompt is None


def test_results_come_back_in_input_order_with_params_per_prompt(llm):
    prompts = ["Hello", "A quick brown fox jumps over the lazy dog", "Numbers: 1 2 3"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 1, 4)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 1, 4]
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    alone = [llm.generate(p, q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_mismatched_params_list(llm):
    with pytest.raises(ValueError, match=r"The lengths of prompts \(2\) and params \(1\) must be the same."):
        llm.generate(["a", "b"], [GREEDY])


def test_text_is_the_decoded_tokens(llm):
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


def test_chat_renders_the_template_and_generates(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    via_chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    via_generate = llm.generate({"prompt": rendered, "prompt_token_ids": llm.get_tokenizer()(rendered).input_ids}, GREEDY)[0]
    assert via_chat.prompt == rendered
    assert via_chat.outputs[0].token_ids == via_generate.outputs[0].token_ids
    # a batch of conversations, and a template given per call
    outs = llm.chat([messages, messages], GREEDY, use_tqdm=False, chat_template="{{ messages[0]['content'] }}")
    assert [o.prompt for o in outs] == ["What is the capital of France?"] * 2


def test_chat_without_template_says_what_to_do(tmp_path, tiny_llama):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(tiny_llama[1], folder)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    llm = LLM(model=str(folder), max_model_len=64)
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        llm.chat([{"role": "user", "content": "hi"}])


def test_n_samples_seeded_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate("Hello", params, use_tqdm=False)[0]
    second = llm.generate(["Numbers: 1 2 3", "Hello"], params, use_tqdm=False)[1]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert len(set(samples)) == 3
    assert samples == [tuple(c.token_ids) for c in second.outputs]


def test_unseeded_sampling_follows_the_engine_seed(tiny_llama):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [LLM(model=str(tiny_llama[1]), max_model_len=64, seed=s).generate("Hello", params)[0] for s in (3, 3, 4)]
    tokens = [r.outputs[0].token_ids for r in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_apply_model_and_tokenizer(llm):
    assert llm.apply_model(lambda m: type(m).__name__) == ["LlamaForCausalLM"]  # model_impl="auto": native
    assert llm.get_tokenizer().eos_token == "<|im_end|>"


def test_default_sampling_params_come_from_generation_config(tmp_path, tiny_llama):
    import json
    import shutil

    folder = tmp_path / "with_defaults"
    shutil.copytree(tiny_llama[1], folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(temperature=0.3, top_k=7, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    params = LLM(model=str(folder), max_model_len=64).get_default_sampling_params()
    assert (params.temperature, params.top_k) == (0.3, 7)
    vllm_defaults = LLM(model=str(folder), max_model_len=64, generation_config="vllm").get_default_sampling_params()
    assert (vllm_defaults.temperature, vllm_defaults.top_k) == (1.0, 0)


def test_engine_arguments_are_checked(tiny_llama):
    folder = str(tiny_llama[1])
    with pytest.raises(TypeError, match="unexpected engine argument.*not_an_arg"):
        LLM(model=folder, not_an_arg=1)
    with pytest.raises(ValueError, match=r"max_model_len=1000 is larger than the model's context length 256"):
        LLM(model=folder, max_model_len=1000)
    with pytest.raises(ValueError, match="dtype='float8'"):
        LLM(model=folder, dtype="float8")
    # model_impl='native' for an architecture without a native class: tests/test_native_selection.py
    with pytest.raises(ValueError, match="model_impl='vllm' is not supported"):
        LLM(model=folder, model_impl="vllm")
    with pytest.raises(ValueError, match="block_size=12 must be a power of two"):
        LLM(model=folder, block_size=12)


def test_vllm_only_arguments_are_accepted_with_a_warning(tiny_llama, caplog):
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, cpu_offload_gb=0, swap_space=4)
    assert llm.llm_engine is not None
    assert "cpu_offload_gb" in caplog.text and "swap_space" in caplog.text


def test_prompt_longer_than_the_context_is_refused(llm):
    with pytest.raises(ValueError, match=r"The decoder prompt \(length 70\) is longer than the maximum model length of 64"):
        llm.generate({"prompt_token_ids": [5] * 70}, GREEDY)
    with pytest.raises(ValueError, match="cannot be empty"):
        llm.generate({"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate({"prompt_token_ids": [5, 10_000]}, GREEDY)


def test_cpu_kv_cache_is_sized_from_the_memory_budget(tiny_llama):
    from hfbridge.worker.kv_cache_sizing import bytes_per_block
    from hfbridge.worker.layer_probe import probe_attention_layers

    folder = str(tiny_llama[1])
    llm = LLM(model=folder, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    engine = llm.llm_engine
    layers = llm.apply_model(lambda m: probe_attention_layers(m, engine.config.device))[0]
    per_block = bytes_per_block(layers, engine.config.cache_config.block_size)
    # tiny Llama: 2 layers x K and V x 16 tokens x 2 KV heads x 16 dims x 4 bytes
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    assert engine.kv_cache_manager.pool.num_blocks == (1 << 20) // per_block
    with pytest.raises(ValueError, match=r"The KV cache holds 32 tokens \(2 blocks of 16\) but max_model_len is 64"):
        LLM(model=folder, max_model_len=64, kv_cache_memory_bytes=2 * per_block)


def test_vllm_cpu_kvcache_space_sets_the_budget_in_gib(tiny_llama, monkeypatch):
    """vLLM-CPU's VLLM_CPU_KVCACHE_SPACE: whole GiB of KV cache; kv_cache_memory_bytes wins; a bad value is refused
    naming the variable."""
    from hfbridge.engine.engine_args import EngineArgs

    folder = str(tiny_llama[1])
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert EngineArgs(model=folder).create_engine_config().cache_config.kv_cache_memory_bytes == 3 * 1024 ** 3
    explicit = EngineArgs(model=folder, kv_cache_memory_bytes=1 << 20).create_engine_config()
    assert explicit.cache_config.kv_cache_memory_bytes == 1 << 20
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    assert EngineArgs(model=folder).create_engine_config().cache_config.kv_cache_memory_bytes is None
    for bad in ("0", "0.5", "-1", "4G"):
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", bad)
        with pytest.raises(ValueError, match=r"VLLM_CPU_KVCACHE_SPACE=.* must be a whole number of GiB"):
            LLM(model=folder)
