"""docs/coverage_vision.md says what hfbridge does with every flagged image-text-to-text class of the installed
Transformers (benchmarks/coverage_vision.py): its refusals are the ones a fresh check gives, its `equal` rows are the
families tests/test_vision.py holds equal to Transformers, and no row is a bug."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("coverage_vision_harness", ROOT / "benchmarks" / "coverage_vision.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["coverage_vision_harness"] = harness
_spec.loader.exec_module(harness)


def test_the_table_is_what_a_fresh_check_says():
    from test_vision import SERVED
    from tiny_vlms import TOKEN_ID_FAMILIES

    # and the classes checked with token-id prompts (test_vision.py; "LlavaForConditionalGeneration (Pixtral)" is
    # LLaVA with another vision tower)
    SERVED = sorted({*SERVED, *(name.split(" (")[0] for name in TOKEN_ID_FAMILIES)})
    committed = harness.parse_table((ROOT / "docs" / "coverage_vision.md").read_text())
    flagged = harness.flagged_vision_architectures()
    assert set(committed) == set(flagged)
    assert not [a for a, (verdict, _) in committed.items() if verdict in ("mismatch", "error")]
    assert sorted(a for a, (verdict, _) in committed.items() if verdict in ("equal", "near_tie")) == sorted(SERVED)
    for arch, (verdict, reason) in committed.items():
        if arch not in SERVED:
            fresh = harness.run_vision(arch, flagged[arch])
            assert (fresh.verdict, fresh.reason) == (verdict, reason), (
                f"docs/coverage_vision.md is stale for {arch}: regenerate it with "
                "`python benchmarks/coverage_vision.py`")
