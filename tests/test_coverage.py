"""The coverage slice CI runs: tiny random models of >= 30 Transformers architectures across families, greedy through
hfbridge vs Transformers' own generate() (benchmarks/coverage.py); none may mismatch or error, and the committed
docs/coverage.md must say what a fresh run says (regenerate it with `python benchmarks/coverage.py`)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("coverage_harness", ROOT / "benchmarks" / "coverage.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["coverage_harness"] = harness  # dataclasses look their module up while the class is built
_spec.loader.exec_module(harness)

SLICE = {
    "dense": ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTJForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM",
              "CodeGenForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
              "GemmaForCausalLM", "CohereForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM",
              "PersimmonForCausalLM", "NemotronForCausalLM", "GlmForCausalLM", "GPTBigCodeForCausalLM"],
    "moe": ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
            "Ernie4_5_MoeForCausalLM", "DeepseekV2ForCausalLM", "GptOssForCausalLM"],
    "sliding window": ["MistralForCausalLM", "Starcoder2ForCausalLM", "Cohere2ForCausalLM", "Gemma3ForCausalLM"],
    "softcap": ["Gemma2ForCausalLM"],
    "encoder as decoder": ["BertLMHeadModel", "ElectraForCausalLM", "RobertaForCausalLM"],
    "refused": ["DiffLlamaForCausalLM", "DogeForCausalLM"],
    # remote code: tests/test_coverage_remote.py and tests/test_custom_model.py (not a Transformers class)
}
ARCHS = [arch for family in SLICE.values() for arch in family]


@pytest.fixture(scope="module")
def committed():
    return harness.parse_table((ROOT / "docs" / "coverage.md").read_text())


def test_slice_is_representative():
    assert len(ARCHS) >= 30 and len(set(ARCHS)) == len(ARCHS)
    assert set(ARCHS) <= set(harness.flagged_architectures())


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_runs_equal_or_is_refused(arch, committed):
    result = harness.run_arch(arch)
    assert result.verdict in ("equal", "near_tie", "refused"), f"{arch}: {result.verdict}: {result.reason}"
    if result.verdict == "refused":  # before weights load, naming what to do
        assert "Not supported with model_impl='transformers'" in result.reason
    row = committed.get(arch)
    assert row is not None and row[0] == result.verdict, (
        f"docs/coverage.md is stale for {arch}: committed {row}, now {result.verdict}; "
        "regenerate it with `python benchmarks/coverage.py`"
    )
    if result.verdict == "refused":
        assert row[1] == result.reason, f"docs/coverage.md is stale for {arch}'s reason"


def test_table_lists_every_flagged_architecture(committed):
    """Every causal LM of the installed Transformers that sets the flag has a row, and no row is a bug."""
    assert set(committed) == set(harness.flagged_architectures()) | set(harness.flagged_encoders())
    assert not [a for a, (verdict, _) in committed.items() if verdict in ("mismatch", "error")]
