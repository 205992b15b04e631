"""The real SmolLM2-135M (the packaged default model, a tied-head Llama): native greedy ids and top-5 logprobs
equal the Transformers path's and Transformers' generate(), from the GGUF dequantized to float32 safetensors by
Transformers' reader (the GGUF served quantized: test_gguf_serving.py)."""
import pytest
import torch
import transformers
from load_memory import rss_at_load
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


@pytest.mark.slow
def test_one_copy_of_the_projection_weights(smollm2_float32):
    """The panels are the only copy of the projections' and the tied head's weights (the embedding reads its rows
    from the head's panels): loading SmolLM2 in float32 grows the process by its weights and the runtime's share
    (a plain copy beside the panels made it more than twice its weights), and bfloat16 by about half of that."""
    before, after, weights = rss_at_load(str(smollm2_float32), "float32")
    float32 = after - before
    before, after, _ = rss_at_load(str(smollm2_float32), "bfloat16")
    bfloat16 = after - before
    print(f"RSS growth at load: float32 {float32 / 2**20:.0f} MiB, bfloat16 {bfloat16 / 2**20:.0f} MiB, "
          f"float32 weights {weights / 2**20:.0f} MiB")
    assert float32 < 1.4 * weights, (float32, weights)
    assert bfloat16 < 0.65 * float32, (bfloat16, float32)
