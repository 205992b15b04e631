"""The bundled GGUF (SmolLM2-135M-Instruct, Q4_1 projections, Q8_0 embedding and tied head) served quantized,
against Transformers' own GGUF reader (which dequantizes to float32) and generate(): greedy tokens on chat prompts,
"Paris", and the process's memory against the float32 load of the same weights."""

import pytest
import torch
import transformers
from greedy import assert_greedy_match, hf_greedy
from load_memory import rss_at_load

from hfbridge import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Give me three names for a pet cat.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Name a primary color.",
    "What does a thermometer measure?",
    "Suggest a title for a story about a lost key.",
    "Why is the sky blue?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(smollm2_float32):
    """Transformers' GGUF reader's float32 model (saved as it read it) and tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_float32, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_float32)


def test_served_quantized_agrees_with_transformers_reader(smollm2_gguf, reference):
    """The native model runs on the blocks (no float copy of a projection); its greedy tokens equal Transformers'
    for the first NEW_TOKENS tokens of most prompts. Both compute with the same dequantized values in float32,
    in different summation orders: a prompt may part at a near tie."""
    model, tokenizer = reference
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    references = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    expected = [tokens for tokens, _ in references]

    llm = LLM(model=str(smollm2_gguf), max_model_len=512, dtype="float32")
    kinds = llm.apply_model(lambda m: sorted({type(x).__name__ for x in m.modules()}))[0]
    assert "QuantizedLinear" in kinds and "QuantizedEmbedding" in kinds and "PackedLinear" not in kinds
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    equal = sum(a == b[:len(a)] or a[:len(b)] == b for a, b in zip(ours, expected))
    print(f"agreement: {equal}/{len(prompts)} prompts equal for {NEW_TOKENS} tokens")
    assert equal >= len(prompts) - 2, (equal, ours, expected)
    for tokens, (theirs, logits) in zip(ours, references):  # every prompt's first 8: equal but at a near tie
        assert_greedy_match(list(tokens[:8]), theirs[:8], logits)
    assert "Paris" in outs[0].outputs[0].text


@pytest.mark.slow
def test_quantized_load_takes_well_under_half_the_memory(smollm2_gguf, smollm2_float32):
    """What loading the model adds to the process's RSS, with a small KV cache: the GGUF served quantized against
    the same weights dequantized to float32 (saved by Transformers from its reader) served in float32. The
    interpreter, torch and Transformers (about 250 MiB before LLM() is called, the same in both) are left out:
    since the float32 path keeps one copy of its weights, they are a third of that process."""
    (quantized_before, quantized, _), (float32_before, float32, _) = (
        rss_at_load(str(smollm2_gguf)), rss_at_load(str(smollm2_float32)))
    print(f"RSS after load: quantized {quantized / 2**20:.0f} MiB, float32 {float32 / 2**20:.0f} MiB "
          f"(before LLM(): {quantized_before / 2**20:.0f} and {float32_before / 2**20:.0f} MiB)")
    assert quantized - quantized_before < 0.4 * (float32 - float32_before), (quantized, float32)


def _tiny_llama(hidden: int, tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


Q4_K_M = {"token_embd": "Q4_K", "output": "Q6_K", "blk.0.attn_v": "Q6_K", "blk.1.ffn_down": "Q6_K"}
LEGACY = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
          "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_0"}
# float tensors beside blocks, in the same fused projections: BF16 (which gguf reads as bytes) and F16
FLOATS = {"token_embd": "BF16", "attn_q": "Q8_0", "attn_k": "F16", "attn_v": "BF16", "ffn_up": "F16"}


def _type_of(table: dict[str, str], default: str):
    import gguf

    def type_of(name: str) -> int:
        stem = name.rsplit(".", 1)[0]  # blk.0.attn_v
        key = next((k for k in table if stem == k or stem.endswith("." + k)), None)
        return int(gguf.GGMLQuantizationType[table[key] if key else default])
    return type_of


@pytest.mark.parametrize("case", ["q4_k_m", "legacy_tied", "floats_tied"])
def test_a_converted_tiny_model_matches_transformers_reader(tmp_path, case):
    """A tiny Llama written as GGUF in the test (llama.cpp's layout, each tensor quantized from its definition),
    served quantized on both paths (native and model_impl="transformers"), against Transformers' reader of the same
    file: the same dequantized values in float32, so greedy tokens equal but for near ties."""
    import gguf
    from gguf_files import gguf_name, quantize_any, write_llama_gguf

    if case == "q4_k_m":  # K-quants: rows of whole 256-value super-blocks
        model, types = _tiny_llama(256, tie=False), _type_of(Q4_K_M, "Q4_K")
    elif case == "legacy_tied":
        model, types = _tiny_llama(96, tie=True), _type_of(LEGACY, "Q8_0")
    else:
        model, types = _tiny_llama(96, tie=True), _type_of(FLOATS, "Q4_0")
    path = write_llama_gguf(tmp_path / f"{case}.gguf", model, types, quantize_any)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    prompts = [list(range(3, 40)), [7, 300, 21, 9, 480, 11]]
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    for impl in ("auto", "transformers"):
        llm = LLM(model=str(path), model_impl=impl, max_model_len=128, dtype="float32", skip_tokenizer_init=True)
        # every quantized projection on the blocks (native: fused with any float parts); on the Transformers path
        # a tied head shares the (dequantized) embedding, and a projection stored as F16 / BF16 stays nn.Linear
        float_linears = llm.apply_model(
            lambda m: [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)])[0]
        stored_float = [] if impl != "transformers" else [
            f"model.{n.removesuffix('.weight')}" for n in model.state_dict()
            if n.endswith("_proj.weight") and gguf.GGMLQuantizationType(types(gguf_name(n))).name in ("F16", "BF16")]
        tied_head = ["model.lm_head"] if impl == "transformers" and case != "q4_k_m" else []
        assert sorted(float_linears) == sorted(tied_head + stored_float)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for out, (tokens, logits) in zip(outs, expected):
            assert_greedy_match(list(out.outputs[0].token_ids), tokens, logits)
        del llm


@pytest.mark.parametrize("model_impl", ["native", "transformers"])
def test_lora_adapters_over_quantized_projections_equal_peft(tmp_path, model_impl):
    """PEFT adapters over a GGUF file served quantized: the adapter's delta adds to the blocks' output. Oracle:
    PEFT's model over Transformers' dequantizing reader of the same file."""
    from gguf_files import quantize_any, write_llama_gguf
    from lora_adapters import ALL_PROJECTIONS, make_adapter, peft_model

    from hfbridge import LoRARequest

    path = write_llama_gguf(tmp_path / "tiny.gguf", _tiny_llama(96, tie=True), _type_of(LEGACY, "Q8_0"),
                            quantize_any)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                             dtype=torch.float32).eval()
    adapter = make_adapter(base, tmp_path / "all", 8, ALL_PROJECTIONS, seed=1)
    oracles = {None: base, "all": peft_model(base, adapter)}
    llm = LLM(model=str(path), model_impl=model_impl, enable_lora=True, max_lora_rank=8, max_model_len=128,
              dtype="float32", skip_tokenizer_init=True)
    assert "QuantizedLinear" in llm.apply_model(lambda m: {type(x).__name__ for x in m.modules()})[0]
    prompts, names = [list(range(3, 30)), list(range(40, 52))], ["all", None]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=[LoRARequest("all", 1, str(adapter)), None])
    for prompt, name, out in zip(prompts, names, outs):
        tokens, logits = hf_greedy(oracles[name], prompt, NEW_TOKENS, ignore_eos=True)
        assert_greedy_match(list(out.outputs[0].token_ids), tokens, logits)
    assert hf_greedy(oracles["all"], prompts[0], NEW_TOKENS, True)[0] != hf_greedy(base, prompts[0], NEW_TOKENS,
                                                                                   True)[0]
