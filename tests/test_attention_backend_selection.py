"""Choosing the attention backend: `auto`, explicit names, $HFBRIDGE_ATTENTION_BACKEND, and clear refusals."""
import logging

import pytest
import torch

from hfbridge.attention_backends.registry import ENV_VAR, auto_backend_name, get_attention_backend, unavailable_reason
from hfbridge.attention_backends.torch_backend import TorchReferenceBackend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_auto_on_cpu_is_the_torch_reference_even_with_the_interpreter(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert auto_backend_name(CPU) == "torch"
    with caplog.at_level(logging.INFO, logger="hfbridge.attention_backends.registry"):
        backend = get_attention_backend("auto", CPU)
    assert isinstance(backend, TorchReferenceBackend)
    assert [r.getMessage() for r in caplog.records] == ["Attention backend: torch"]


def test_flash_attn_is_refused_on_cpu_with_the_reason():
    reason = unavailable_reason("flash_attn", CPU)
    assert reason is not None and "needs CUDA" in reason
    with pytest.raises(ValueError, match="attention_backend='flash_attn' cannot be used: .*needs CUDA") as err:
        get_attention_backend("flash_attn", CPU)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert "flash_attn is not installed (pip install hfbridge[flash])" in str(err.value)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton needs a CUDA device .*TRITON_INTERPRET=1"):
        get_attention_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason("triton", CPU) is None
    assert get_attention_backend("triton", CPU).name == "triton"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention backend 'sdpa'.*'auto', 'torch', 'triton', 'flash_attn'"):
        get_attention_backend("sdpa", CPU)


def test_environment_variable_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "flash_attn")
    with pytest.raises(ValueError, match=rf"'flash_attn' \(from \${ENV_VAR}\) cannot be used"):
        get_attention_backend(None, CPU)
    with pytest.raises(ValueError, match="from"):
        get_attention_backend("auto", CPU)
    assert get_attention_backend("torch", CPU).name == "torch"  # an explicit choice wins
    monkeypatch.setenv(ENV_VAR, "torch")
    assert get_attention_backend(None, CPU).name == "torch"


def test_llm_refuses_flash_attn_on_cpu(tiny_llama):
    from hfbridge import LLM

    _, folder = tiny_llama
    with pytest.raises(ValueError, match="flash_attn.*needs CUDA"):
        LLM(model=str(folder), model_impl="transformers", dtype="float32", max_model_len=64,
            attention_backend="flash_attn")
