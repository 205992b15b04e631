"""Image coverage: every Transformers image-text-to-text class that sets `_supports_attention_backend`, and whether
hfbridge serves its images. One verdict per class, written to docs/coverage_vision.md.

    python benchmarks/coverage_vision.py                      # every class, rewrites docs/coverage_vision.md
    python benchmarks/coverage_vision.py LlavaForConditionalGeneration   # some classes, table to stdout

Verdicts: equal / near_tie (the family's tiny random model with its processor, from tests/tiny_vlms.py: prompts
with one and two images and a text-only prompt in one batch through hfbridge, against Transformers' own greedy
generate() with the same processor outputs; near_tie: the first difference is at a top-2 logit gap under 1e-4),
images_refused (hfbridge refuses the model's images, for the reason shown: the check `hfbridge check MODEL`
reports, on the family's default config; its text-only prompts are as docs/coverage.md says), mismatch and error
(bugs), hf_unbuildable (Transformers cannot build the family's default config)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny families and their processors (tests/tiny_vlms.py)
# The causal-LM harness, by path: its file name is also the name of the `coverage` package
_spec = importlib.util.spec_from_file_location("coverage_harness", ROOT / "benchmarks" / "coverage.py")
harness = sys.modules.get("coverage_harness") or importlib.util.module_from_spec(_spec)
if "coverage_harness" not in sys.modules:
    sys.modules["coverage_harness"] = harness  # dataclasses look their module up while the class is built
    _spec.loader.exec_module(harness)
Result, compare, parse_table = harness.Result, harness.compare, harness.parse_table

DOC = ROOT / "docs" / "coverage_vision.md"
MAX_NEW = 8


def flagged_vision_architectures() -> dict[str, str]:
    """class name -> model_type, for the image-text-to-text classes that set the flag."""
    found = {}
    for model_type, names in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        for name in names if isinstance(names, (list, tuple)) else (names,):
            try:
                cls = getattr(transformers, name, None)
                flagged = isinstance(cls, type) and getattr(cls, "_supports_attention_backend", False)
            except ImportError:  # a class whose module needs a package this machine lacks
                continue
            if flagged:
                found[name] = model_type
    return found


def run_vision(arch: str, model_type: str) -> Result:
    from tiny_vlms import FAMILIES, TOKEN_ID_FAMILIES

    from hfbridge.multimodal.processor import image_refusal

    start = time.perf_counter()
    runner = _run_token_ids if arch in TOKEN_ID_FAMILIES else _run_family if arch in FAMILIES else None
    if runner is not None:
        try:
            verdict, reason = runner(arch)
        except Exception as exc:  # noqa: BLE001 - a bug, reported as such
            verdict, reason = "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return Result(arch, verdict, reason, time.perf_counter() - start)
    try:
        config = CONFIG_MAPPING[model_type]()
        config.architectures = [arch]
    except Exception as exc:  # noqa: BLE001 - Transformers' own config fails to build
        return Result(arch, "hf_unbuildable", f"{type(exc).__name__}: {str(exc)[:200]}", time.perf_counter() - start)
    reason = image_refusal(config)
    if reason is None:  # a family checked in tests/test_vision.py must have its tiny builder here
        return Result(arch, "error", "served, but tests/tiny_vlms.py has no tiny model of it", 0.0)
    return Result(arch, "images_refused", reason, time.perf_counter() - start)


def _run_family(arch: str) -> tuple[str, str]:
    from tiny_vlms import draw_image, make_tiny_vlm

    with tempfile.TemporaryDirectory() as folder:
        model, processor, image, path = make_tiny_vlm(arch, Path(folder) / "model")
        a, b = draw_image(1), draw_image(2, (64, 30))
        cases = [(f"Describe {image} briefly", [a]), ("Once upon a time", None),
                 (f"Compare {image} with {image}", [a, b])]
        expected = []
        for text, images in cases:
            inputs = processor(text=text, images=images, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            expected.append((out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [s[0] for s in out.logits]))
        prompts = [{"prompt": t, "multi_modal_data": {"image": i}} if i else t for t, i in cases]
        return _verdict(path, prompts, expected)


def _run_token_ids(arch: str) -> tuple[str, str]:
    """Families whose processor needs torchvision: prompts as token ids with the placeholders expanded
    (tests/tiny_vlms.py TOKEN_ID_FAMILIES)."""
    from tiny_vlms import TOKEN_ID_FAMILIES, draw_image, token_id_case

    make, prompt_of = TOKEN_ID_FAMILIES[arch]
    with tempfile.TemporaryDirectory() as folder:
        model, image_processor, tokenizer, path = make(Path(folder) / "model")
        a, b = draw_image(1, (60, 44)), draw_image(2, (40, 70))
        cases = [token_id_case(model, image_processor, tokenizer, prompt_of, parts, MAX_NEW)
                 for parts in (["Look at ", a, " and say"], ["Once upon a time"], ["Compare ", a, " with ", b])]
        return _verdict(path, [c[0] for c in cases], [c[1] for c in cases])


def _verdict(path: Path, prompts: list, expected: list) -> tuple[str, str]:
    """The prompts through hfbridge in one batch against Transformers' (tokens, logits); the worst comparison."""
    from hfbridge import LLM, SamplingParams

    outs = LLM(model=str(path), dtype="float32").generate(
        prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    verdicts = [compare(list(o.outputs[0].token_ids), tokens, logits) for o, (tokens, logits) in zip(outs, expected)]
    bad = [v for v in verdicts if v[0] == "mismatch"]
    ties = [v for v in verdicts if v[0] == "near_tie"]
    return bad[0] if bad else ties[0] if ties else ("equal", "")


def render(results: list[Result]) -> str:
    counts = {v: sum(r.verdict == v for r in results)
              for v in ("equal", "near_tie", "images_refused", "mismatch", "error", "hf_unbuildable")}
    lines = [
        "# Image coverage",
        "",
        f"Generated by `python benchmarks/coverage_vision.py` with Transformers {transformers.__version__}: every "
        "image-text-to-text class that sets `_supports_attention_backend`. `equal`: the family's tiny random model "
        "with its own processor (tests/tiny_vlms.py) gives Transformers' greedy tokens through hfbridge, with one "
        "and two images and a text-only prompt in one batch. `images_refused`: hfbridge refuses the model's images "
        "with the reason shown (`hfbridge check MODEL` says the same; its text-only prompts are as docs/coverage.md "
        "says). Families whose processor "
        "needs torchvision (every one with a video processor) cannot be checked on this machine, which has none; "
        "Qwen2-VL, Qwen2.5-VL and SmolVLM are checked with token-id prompts whose placeholders are expanded as "
        "their processor does.",
        "",
        "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(results)})",
        "",
        "| architecture | verdict | reason | seconds |",
        "|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.arch):
        lines.append(f"| {r.arch} | {r.verdict} | {r.reason.replace('|', '/')} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="*", help="classes to run (default: all flagged; writes the doc)")
    args = parser.parse_args(argv)
    flagged = flagged_vision_architectures()
    results = []
    for arch in args.archs or sorted(flagged):
        result = run_vision(arch, flagged[arch])
        print(f"{arch:50s} {result.verdict:15s} {result.seconds:5.1f}s {result.reason[:120]}", file=sys.stderr)
        results.append(result)
    table = render(results)
    if args.archs:
        print(table)
    else:
        DOC.write_text(table)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
