"""`hfbridge check MODEL`: exit status and the key lines for a supported model, an unflagged one (Bloom), a remote-code
one without --trust-remote-code, and a tp plan with a style hfbridge does not support. The oracles are
Transformers' own class flags and plans (read from the installed Transformers, not restated here)."""
import json
import subprocess
import sys

import pytest
import transformers
from click.testing import CliRunner
from test_custom_model import write_remote_code_model
from tiny_models import COMMON, make_tiny_model, save_model

from hfbridge.entrypoints.cli import cli


def run_check(*args: str):
    result = CliRunner().invoke(cli, ["check", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("check") / "llama")[1]


def test_llama_runs_natively_under_auto(llama_folder):
    code, out = run_check(str(llama_folder))
    assert code == 0, out
    assert "native (hfbridge registers its own implementation of this architecture)" in out
    assert "compatibility   ok (native)" in out


def test_supported_model_can_run(llama_folder):
    code, out = run_check(str(llama_folder), "--model-impl", "transformers", "--probe")
    assert code == 0, out
    assert "Transformers (LlamaForCausalLM sets _supports_attention_backend)" in out
    assert "compatibility   ok (probe: max logit difference" in out
    assert "generate (tasks: generate)" in out
    # Llama's tp plan (colwise/rowwise) is fully within the supported styles; its pp plan names its modules.
    styles = set(transformers.LlamaConfig().base_model_tp_plan.values())
    assert styles <= {"colwise", "rowwise"} and "all styles supported" in out
    assert "pp plan" in out and "embed_tokens" in out
    config = transformers.LlamaConfig(**COMMON)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # float32
    assert f"{per_token} bytes per token" in out
    assert "verdict" in out and out.rstrip().endswith("can run")


def test_unflagged_architecture_cannot_run(tmp_path):
    assert not transformers.BloomForCausalLM._supports_attention_backend
    config = transformers.BloomConfig(vocab_size=COMMON["vocab_size"], hidden_size=64, n_layer=2, n_head=4)
    folder = save_model(transformers.BloomForCausalLM(config), tmp_path / "bloom")
    code, out = run_check(str(folder))
    assert code == 1
    assert "BloomForCausalLM does not set `_supports_attention_backend = True`" in out
    assert out.rstrip().endswith("cannot run")


def test_remote_code_needs_the_flag(tmp_path):
    write_remote_code_model(tmp_path / "custom")
    code, out = run_check(str(tmp_path / "custom"))
    assert code == 1 and "trust_remote_code=True (--trust-remote-code)" in out
    code, out = run_check(str(tmp_path / "custom"), "--trust-remote-code")
    assert code == 0, out
    assert "remote code (MyModel from the model's auto_map; hfbridge adds the LM head)" in out


def test_unsupported_tp_style_is_named(llama_folder):
    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.mlp": "packed_rowwise"}
    code, out = run_check(str(llama_folder), "--hf-overrides", json.dumps({"base_model_tp_plan": plan}))
    assert code == 0, out  # runs on one device; sharding it is what is not supported
    assert "packed_rowwise (not supported: fused rowwise expert tensors are not built)" in out
    assert "colwise (supported)" in out and "tensor_parallel_size > 1 refused: packed_rowwise" in out


def test_python_dash_m_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hfbridge", "check", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "cannot run" in proc.stdout
