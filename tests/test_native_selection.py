"""model_impl: "auto" picks a native class for the Llama family and Transformers for the rest, and falls back to
Transformers (one info line saying why) when the config uses a feature the native code lacks; "native" refuses it."""
import logging

import pytest
from test_native_models import build
from tiny_models import make_tiny_model, save_model

from hfbridge import LLM


def impl_name(folder, model_impl="auto") -> str:
    llm = LLM(model=str(folder), model_impl=model_impl, max_model_len=64, dtype="float32", skip_tokenizer_init=True)
    return llm.apply_model(lambda m: type(m).__name__)[0]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_auto_picks_native_for_the_llama_family(arch, tmp_path):
    folder = save_model(build(arch), tmp_path / arch, tokenizer=False)
    assert impl_name(folder) == arch
    assert impl_name(folder, "native") == arch
    assert impl_name(folder, "transformers") == "TransformersForCausalLM"


def test_auto_picks_transformers_for_other_architectures(tmp_path):
    _, folder = make_tiny_model("Gemma2ForCausalLM", tmp_path / "gemma2")
    assert impl_name(folder) == "TransformersForCausalLM"
    with pytest.raises(ValueError, match="no native implementation is registered"):
        impl_name(folder, "native")


UNSUPPORTED = {
    "dynamic_rope": (
        dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "rope_type='dynamic'"
    ),
    "gelu_mlp": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_feature_falls_back_under_auto_and_is_refused_under_native(case, tmp_path, caplog):
    overrides, reason = UNSUPPORTED[case]
    folder = save_model(build("LlamaForCausalLM", **overrides), tmp_path / case, tokenizer=False)
    with caplog.at_level(logging.INFO, logger="hfbridge.model.model_resolver"):
        assert impl_name(folder) == "TransformersForCausalLM"
    lines = [r.getMessage() for r in caplog.records if r.name == "hfbridge.model.model_resolver"]
    assert len(lines) == 1 and reason in lines[0] and "Transformers" in lines[0]
    with pytest.raises(ValueError, match=reason.replace("'", ".").replace("(", r"\(")) as error:
        impl_name(folder, "native")
    assert "model_impl='transformers'" in str(error.value)


def test_tensor_parallel_falls_back(tmp_path):
    """TP does not exist yet; the resolver's seam for it already says native cannot split layers."""
    from hfbridge.model.model_resolver import resolve_model_class

    folder = save_model(build("LlamaForCausalLM"), tmp_path / "tp", tokenizer=False)
    config = LLM(model=str(folder), max_model_len=64, skip_tokenizer_init=True).llm_engine.config.model_config
    assert resolve_model_class(config).impl == "native"
    assert resolve_model_class(config, tensor_parallel_size=2).impl == "transformers"
