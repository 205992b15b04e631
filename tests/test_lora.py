"""LoRA adapters (issue 33) against PEFT's own model under Transformers' greedy generate(): one batch mixing
adapters of different ranks and targets with base-model rows, on the native decoder and the Transformers path
(Llama forced onto it, and Gemma2, which has no native decoder);
the same prompt under two adapters in a row with the prefix cache on; every bad adapter refused with its name and
the reason, the engine serving afterwards."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from greedy import assert_greedy_match, hf_greedy
from lora_adapters import ALL_PROJECTIONS, make_adapter, peft_model, standard_adapters
from tiny_models import COMMON, build_tokenizer, make_tiny_model, save_model

from hfbridge import LLM, LoRARequest, SamplingParams

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
TEXTS = ["Hello, my name is", "The capital of France is", "Once upon a time there was", "A quick brown fox",
         "Numbers: 0 1 2 3"]


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    base, folder = tiny_llama
    adapters = standard_adapters(base, tmp_path_factory.mktemp("adapters"))
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    tok = build_tokenizer()
    return base, folder, requests, [tok(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def oracles(setup):
    base, _, requests, _ = setup
    return {None: base, **{name: peft_model(base, r.lora_path) for name, r in requests.items()}}


def check_against_peft(llm, oracles, requests, prompts, names) -> None:
    loras = [None if n is None else requests[n] for n in names]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, name, out in zip(prompts, names, outs):
        theirs, logits = hf_greedy(oracles[name], prompt, MAX_NEW, ignore_eos=True)
        assert_greedy_match(out.outputs[0].token_ids, theirs, logits)


@pytest.mark.parametrize("model_impl", ["native", "transformers"])
def test_mixed_batch_equals_peft(setup, oracles, model_impl):
    base, folder, requests, prompts = setup
    # Three adapters, two slots: the scheduler holds the third adapter's request until a slot's adapter is done;
    # two loaded adapters at most (max_cpu_loras), so one is read again from its folder.
    llm = LLM(str(folder), enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2, max_model_len=64,
              block_size=4, model_impl=model_impl)
    kind = "NativeCausalLM" if model_impl == "native" else "TransformersForCausalLM"
    assert kind in [c.__name__ for c in type(llm.apply_model(lambda m: m)[0]).__mro__]
    names = ["all", "qv", None, "all", "regex"]
    check_against_peft(llm, oracles, requests, prompts, names)
    # the adapters change the tokens (else the comparison above would prove nothing)
    for name in ("all", "qv", "regex"):
        assert hf_greedy(oracles[name], prompts[0], MAX_NEW, True)[0] != hf_greedy(base, prompts[0], MAX_NEW, True)[0]


def test_transformers_only_architecture_equals_peft(setup, tmp_path):
    """Gemma2 (no native decoder: Transformers' own modules, softcapped logits, sliding windows)."""
    prompts = setup[3][:3]
    base, folder = make_tiny_model("Gemma2ForCausalLM", tmp_path / "gemma2")
    paths = {"all": make_adapter(base, tmp_path / "all", 8, ALL_PROJECTIONS, seed=6),
             "qv": make_adapter(base, tmp_path / "qv", 4, ["q_proj", "v_proj"], seed=7)}
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(paths.items())}
    oracles = {None: base, **{name: peft_model(base, path) for name, path in paths.items()}}
    llm = LLM(str(folder), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64, block_size=4)
    assert type(llm.apply_model(lambda m: m)[0]).__name__ == "TransformersForCausalLM"
    check_against_peft(llm, oracles, requests, prompts, ["all", None, "qv"])


def test_same_prompt_under_two_adapters_never_shares_cached_blocks(setup, oracles):
    _, folder, requests, _ = setup
    tok = build_tokenizer()
    prompt = tok("The capital of France is Paris. The capital of Italy is Rome. Once upon a time").input_ids
    assert len(prompt) > 16
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64, block_size=4)
    stats = llm.llm_engine.kv_cache_manager.stats
    hits = []
    for name in ("all", "qv", "all", None):
        check_against_peft(llm, oracles, requests, [prompt], [name])
        hits.append(stats.hit_tokens)
    assert hits[0] == 0 and hits[1] == 0, "another adapter's K/V must not be hit"
    assert hits[2] >= 16, "the same adapter again hits its own blocks"
    assert hits[3] == hits[2], "the base model hits no adapter's blocks"
    # chat takes lora_request too
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, lora_request=requests["qv"], use_tqdm=False)[0]
    theirs, logits = hf_greedy(oracles["qv"], out.prompt_token_ids, MAX_NEW, ignore_eos=True)
    assert_greedy_match(out.outputs[0].token_ids, theirs, logits)


def _copy_adapter(source, target, edit_config=None, edit_weights=None):
    shutil.copytree(source, target)
    if edit_config is not None:
        config = json.loads((target / "adapter_config.json").read_text())
        edit_config(config)
        (target / "adapter_config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        from safetensors.torch import load_file, save_file

        path = target / "adapter_model.safetensors"
        save_file(edit_weights(load_file(path)), path)
    return target


def test_bad_adapters_are_refused_by_name_and_the_engine_serves_after(setup, oracles, tmp_path):
    base, folder, requests, prompts = setup
    good = requests["qv"].lora_path
    other_base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "hidden_size": 32})).eval()
    save_model(other_base, tmp_path / "other_base", tokenizer=False)
    rank16 = make_adapter(base, tmp_path / "rank16", 16, ["q_proj"], seed=4)

    def rename_to_c_attn(tensors):
        return {k.replace("q_proj", "c_attn"): v for k, v in tensors.items()}

    corrupt = _copy_adapter(good, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    pickled = _copy_adapter(good, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases = {
        "rank16": (rank16, "rank r=16 is above max_lora_rank=8"),
        "missing": (tmp_path / "nowhere", "no such folder"),
        "corrupt": (corrupt, "is not a readable safetensors file"),
        "pickled": (pickled, "adapter_model.bin"),
        "c_attn": (_copy_adapter(good, tmp_path / "c_attn", edit_weights=rename_to_c_attn),
                   "targets 'model.layers.0.self_attn.c_attn', which this model does not have"),
        "other_base": (make_adapter(other_base, tmp_path / "other", 4, ["q_proj"], seed=5),
                       "does not fit this base model: model.layers.0.self_attn.q_proj takes 64 inputs"),
        "saves_modules": (_copy_adapter(good, tmp_path / "saves", lambda c: c.update(modules_to_save=["lm_head"])),
                          "modules_to_save"),
        "dora": (_copy_adapter(good, tmp_path / "dora", lambda c: c.update(use_dora=True)), "DoRA"),
    }
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64, block_size=4)
    for i, (name, (path, reason)) in enumerate(cases.items()):
        bad = LoRARequest(name, 100 + i, str(path))
        with pytest.raises(ValueError, match=f"LoRA adapter '{name}'.*" + reason.replace("(", r"\(")):
            llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, lora_request=bad, use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    check_against_peft(llm, oracles, requests, prompts[:2], ["qv", None])  # still serving, adapters included
    with pytest.raises(ValueError, match="lora_int_id 2 is already the id of adapter 'qv'"):
        llm.generate(["Hi"], GREEDY, lora_request=LoRARequest("impostor", 2, str(rank16)), use_tqdm=False)
    with pytest.raises(ValueError, match=r"lengths of prompts \(2\) and lora_request \(1\)"):
        llm.generate(["Hi", "there"], GREEDY, lora_request=[requests["qv"]], use_tqdm=False)
    plain = LLM(str(folder), max_model_len=64)
    with pytest.raises(ValueError, match="LoRA is not enabled: start the engine with enable_lora=True"):
        plain.generate(["Hi"], GREEDY, lora_request=requests["qv"], use_tqdm=False)
    assert not plain.llm_engine.has_unfinished_requests()


def test_lora_layer_equals_the_per_row_definition(monkeypatch):
    """The layer's grouped compute (one span, or scattered rows) equals y + x A^T B^T * scaling row by row, in
    float64; slot reuse leaves no trace of the previous adapter."""
    from hfbridge.lora import layers
    from hfbridge.lora.layers import LoRAGroup, LoRALayer, LoRAStepState

    torch.manual_seed(0)
    state = LoRAStepState()
    layer = LoRALayer(state, ["q", "k"], 12, [6, 4], num_slots=3, max_rank=4, dtype=torch.float64,
                      device=torch.device("cpu"))
    adapters = {slot: ([(torch.randn(r, 12, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64))
                        for n in (6, 4)], 0.5 * (slot + 1)) for slot, r in ((0, 4), (1, 2), (2, 3))}
    layer.set_slot(2, [(torch.ones(4, 12, dtype=torch.float64), torch.ones(6, 4, dtype=torch.float64)), None], 9.0)
    for slot, (pieces, scaling) in adapters.items():
        layer.set_slot(slot, pieces if slot != 1 else [pieces[0], None], scaling)
    adapters[1] = ([adapters[1][0][0], None], adapters[1][1])
    x, base = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    slot_of_row = [None, None, 0, 0, 2, 1, 1]
    expected = base.clone()
    for row, slot in enumerate(slot_of_row):
        if slot is None:
            continue
        pieces, scaling = adapters[slot]
        for piece, cols in zip(pieces, (slice(0, 6), slice(6, 10))):
            if piece is not None:
                a, b = piece
                expected[row, cols] += (x[row] @ a.T @ b.T) * scaling
    span_groups = (LoRAGroup(0, slice(2, 4), slice(0, 2)), LoRAGroup(2, slice(4, 5), slice(2, 3)),
                   LoRAGroup(1, slice(5, 7), slice(3, 5)))
    scattered = (LoRAGroup(0, torch.tensor([2, 3])), LoRAGroup(2, torch.tensor([4])),
                 LoRAGroup(1, torch.tensor([5, 6])))
    for groups, span, small_span in ((span_groups, (2, 7), 16), (span_groups, (2, 7), 0), (scattered, None, 16),
                                     (span_groups, None, 16)):
        monkeypatch.setattr(layers, "SMALL_SPAN", small_span)  # every slot at once, or one shrink per group
        state.groups, state.span = groups, span
        assert torch.allclose(layer(x, base.clone()), expected, atol=1e-12)
