"""The real SmolLM2-135M (the packaged default model, a tied-head Llama): native greedy ids and top-5 logprobs
equal the Transformers path's and Transformers' generate(), from the GGUF dequantized to float32 safetensors by
Transformers' reader (the GGUF served quantized: test_gguf_serving.py)."""
import pytest
import torch
import transformers
from test_native_models import check_against_transformers

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_float32):
    folder = str(smollm2_float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = transformers.AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids
    return model, folder, prompt


def test_smollm2_native_equals_transformers(smollm2):
    model, folder, prompt = smollm2
    assert model.config.tie_word_embeddings
    names = check_against_transformers(model, folder, [prompt], max_num_seqs=1)
    assert names == {"native": "LlamaForCausalLM", "transformers": "TransformersForCausalLM"}
