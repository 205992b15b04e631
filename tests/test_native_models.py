"""The native Llama-family models give Transformers' tokens and logprobs: greedy ids equal the Transformers path's
and Transformers' own generate(), top-5 logprobs equal log-softmax of Transformers' logits within 1e-4 (float32)."""
import pytest
import torch
import transformers
from greedy import assert_greedy_match, hf_greedy
from tiny_models import COMMON, build_tokenizer, save_model

from hfbridge import LLM, SamplingParams

MAX_NEW = 10
TOP = 5

# name -> (architecture, config overrides); each exercises one family difference
NATIVE_CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=6)),  # shorter than the long prompt
    "qwen2_bias": ("Qwen2ForCausalLM", {}),  # q/k/v bias
    "qwen2_window_layers": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3_qk_norm_tied": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_rope_bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "yarn_rope": ("Qwen3ForCausalLM", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
}


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**COMMON, **overrides})
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # spread biases and norms away from their 0 / 1 init so they matter
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def prompts() -> list[list[int]]:
    tok = build_tokenizer()
    texts = ["Hello", "The capital of France is", "Once upon a time there was a little robot who loved to read"]
    return [tok(t).input_ids for t in texts]


def check_against_transformers(model, folder, batch, impls=("native", "transformers"), **llm_kwargs):
    """Greedy ids and top-5 logprobs of each path against generate(); returns apply_model's class names."""
    expected = [hf_greedy(model, p, MAX_NEW, ignore_eos=True) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=TOP, ignore_eos=True)
    names, ids = {}, {}
    for impl in impls:
        llm = LLM(model=str(folder), model_impl=impl, block_size=4, max_model_len=128, dtype="float32", **llm_kwargs)
        names[impl] = llm.apply_model(lambda m: type(m).__name__)[0]
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        ids[impl] = [o.outputs[0].token_ids for o in outs]
        for out, (tokens, logits) in zip(outs, expected):
            completion = out.outputs[0]
            assert_greedy_match(completion.token_ids, tokens, logits)
            for step, entry in enumerate(completion.logprobs[: len(tokens)]):
                if completion.token_ids[step] != tokens[step]:
                    break  # a documented near tie: the continuations differ from here
                ref = torch.log_softmax(logits[step].float(), -1)
                assert set(ref.topk(TOP).indices.tolist()) <= set(entry)
                for token_id, lp in entry.items():
                    assert lp.logprob == pytest.approx(ref[token_id].item(), abs=1e-4), (impl, step, token_id)
    if len(impls) == 2:
        assert ids["native"] == ids["transformers"]
    return names


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_native_equals_transformers(case, tmp_path):
    arch, overrides = NATIVE_CASES[case]
    model = build(arch, **overrides)
    folder = save_model(model, tmp_path / case)
    if overrides.get("tie_word_embeddings"):
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # the tied head is loaded from the embedding
    batch = prompts()
    assert len(batch[-1]) > 6  # the long prompt outruns the sliding windows
    names = check_against_transformers(model, folder, batch)
    assert names == {"native": arch, "transformers": "TransformersForCausalLM"}


def test_sharded_safetensors_load_natively(tmp_path):
    model = build("Qwen2ForCausalLM", seed=1)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    build_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    names = check_against_transformers(model, folder, prompts()[1:], impls=("native",))
    assert names == {"native": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_bfloat16_native_equals_transformers_bfloat16(tmp_path, arch):
    """A bfloat16 model on the bfloat16 C kernels (projections on bfloat16 panels, decode attention over a
    bfloat16 cache) against Transformers' own bfloat16 generate(). Both round to bfloat16, in different places
    (the kernels sum in float32 and round once): a difference is allowed only where Transformers' top two logits
    are within bfloat16's rounding of each other, after which the continuations part."""
    from hfbridge.attention_backends import cpu_kernels
    from hfbridge.native_overrides.packed_linear import PackedLinear

    model = build(arch, seed=1).to(torch.bfloat16)
    folder = save_model(model, tmp_path / "model")
    llm = LLM(model=str(folder), model_impl="native", dtype="bfloat16", block_size=4, max_model_len=128)
    packed = llm.apply_model(lambda m: [lin.packed.dtype for lin in m.modules() if isinstance(lin, PackedLinear)])[0]
    assert packed and set(packed) == {torch.bfloat16}, "the bfloat16 panels are the path under test"
    assert cpu_kernels.available(torch.device("cpu"), torch.bfloat16, model.config.head_dim)
    batch = prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        theirs, logits = hf_greedy(model, prompt, MAX_NEW, ignore_eos=True)
        ours = out.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                step = logits[i].float()
                assert step[b] - step[a] <= 2**-7 * step.abs().max(), (i, ours, theirs)
                break
        else:
            assert len(ours) == len(theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_rotary_equals_transformers_bit_for_bit(dtype, rope):
    """The native rotary (halves times cos and a signed sin) gives exactly Transformers' apply_rotary_pos_emb with
    its own rotary embedding's cos / sin, for any rope type's scaling."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from hfbridge.native_overrides.layers import RotaryTable

    overrides = {} if rope == "default" else dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))
    config = transformers.LlamaConfig(**{**COMMON, **overrides})
    head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    positions = torch.randint(0, 256, (11,))
    q = torch.randn(11, config.num_attention_heads, head_dim).to(dtype)  # [T, H, D]
    k = torch.randn(11, config.num_key_value_heads, head_dim).to(dtype)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, T, D]
    # Transformers' layout: [B, H, T, D], cos / sin unsqueezed at the head dim
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = RotaryTable(config, head_dim, 256, dtype, "cpu")(q, k, positions)
    assert torch.equal(got_q, want_q[0].transpose(0, 1))
    assert torch.equal(got_k, want_k[0].transpose(0, 1))


@pytest.mark.parametrize("arch,tie", [("Qwen2ForCausalLM", False), ("Qwen3ForCausalLM", True)])
def test_apply_model_sees_and_edits_the_weights_the_panels_hold(tmp_path, arch, tie):
    """The packed projections and the LM head keep one copy of their weights (the panels; the plain parameter is a
    meta stand-in between calls; a tied embedding reads its rows from the head's panels). apply_model still sees the
    checkpoint's values in state_dict (fused qkv_proj / gate_up_proj: Transformers' q, k, v and gate, up stacked),
    and an in-place edit there serves: greedy tokens and logprobs equal Transformers' own generate() on the model
    edited the same way."""
    model = build(arch, seed=4, tie_word_embeddings=tie)
    folder = save_model(model, tmp_path / "model")
    llm = LLM(model=str(folder), model_impl="native", block_size=4, max_model_len=128, dtype="float32")
    native = llm.llm_engine.executor.runner.model
    assert native.model.layers[0].mlp.gate_up_proj.packed is not None, "the packed path is the one under test"
    head = native.model.embed_tokens if tie else native.lm_head
    plain = [lin.weight for lin in native.packs.linears] + [head.weight]
    assert all(w.is_meta for w in plain), "a plain copy was kept beside the panels"
    ours = llm.apply_model(lambda m: {k: v.clone() for k, v in m.state_dict().items()})[0]
    theirs = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for fused, parts in ((f"{attn}.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             (f"{mlp}.gate_up_proj", ("gate_proj", "up_proj"))):
            block = attn if "qkv" in fused else mlp
            assert torch.equal(ours[f"{fused}.weight"], torch.cat([theirs[f"{block}.{p}.weight"] for p in parts]))
        for name in (f"{attn}.o_proj.weight", f"{mlp}.down_proj.weight"):
            assert torch.equal(ours[name], theirs[name])
    for name in ("model.embed_tokens.weight",) if tie else ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(ours[name], theirs[name])

    def edit(m):  # Transformers' names and the native fused ones alike
        layer = m.model.layers[1]
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(-1.5)
            attn = layer.self_attn
            (attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj).weight[:8] *= 3  # query rows
            m.model.embed_tokens.weight[5:50] *= -2  # tied: the head's rows too

    before = [hf_greedy(model, p, MAX_NEW, ignore_eos=True)[0] for p in prompts()]
    llm.apply_model(edit)
    edit(model)
    assert all(w.is_meta for w in [lin.weight for lin in native.packs.linears] + [head.weight])
    assert before != [hf_greedy(model, p, MAX_NEW, ignore_eos=True)[0] for p in prompts()], "the edit must matter"
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=TOP, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    for prompt, out in zip(prompts(), outs):
        tokens, logits = hf_greedy(model, prompt, MAX_NEW, ignore_eos=True)
        assert_greedy_match(out.outputs[0].token_ids, tokens, logits)
        for step, entry in enumerate(out.outputs[0].logprobs[: len(tokens)]):
            if out.outputs[0].token_ids[step] != tokens[step]:
                break
            reference = torch.log_softmax(logits[step].float(), dim=-1)
            for token, lp in entry.items():
                assert lp.logprob == pytest.approx(reference[token].item(), abs=1e-4)
