"""Coverage: every Transformers causal LM that sets `_supports_attention_backend`, tiny and random, greedy through
hfbridge vs Transformers' own generate(); one verdict per architecture.

    python benchmarks/coverage.py                 # full sweep, rewrites docs/coverage.md
    python benchmarks/coverage.py LlamaForCausalLM GPT2LMHeadModel   # some architectures, table to stdout

Verdicts: equal, near_tie (diverges only where Transformers' own top-2 logits are within 1e-4), refused (hfbridge
said why before loading weights), mismatch and error (both bugs), hf_unbuildable (Transformers itself cannot build or
run the tiny config; its error is the reason).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

TIE_TOLERANCE = 1e-4
MAX_NEW = 6
PROMPTS = ([5, 17, 42, 9, 77, 3, 120, 64, 11, 250, 31], [8, 300, 12], [400, 2 + 5, 99, 23, 61, 7, 150])
DOC = Path(__file__).resolve().parent.parent / "docs" / "coverage.md"

# Shape fields shrunk on every config (and its sub-configs) that has them.
SHRINK = {
    "vocab_size": 512, "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64, "embed_dim": 64, "dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128,
    "decoder_ffn_dim": 128, "max_position_embeddings": 256, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "rotary_dim": 8, "sliding_window": 8, "word_embed_proj_dim": 64,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "attention_chunk_size": 8, "layer_types": None,
}
# Per-architecture settings applied after SHRINK (only where a config needs them).
PER_ARCH: dict[str, dict] = {
    "FalconForCausalLM": {"num_kv_heads": 2, "new_decoder_architecture": True, "ffn_hidden_size": 128},
    "MptForCausalLM": {"expansion_ratio": 2},
    "GPTNeoForCausalLM": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    "ReformerModelWithLMHead": {"attn_layers": ["local", "local"], "axial_pos_shape": [16, 16]},
}


@dataclass
class Result:
    arch: str
    verdict: str  # equal | near_tie | refused | mismatch | error | hf_unbuildable
    reason: str = ""
    seconds: float = 0.0


def flagged_architectures() -> list[str]:
    """Causal-LM class names of the installed Transformers that set `_supports_attention_backend`."""
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        for name in value if isinstance(value, (list, tuple)) else (value,):
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and getattr(cls, "_supports_attention_backend", False):
                names.add(name)
    return sorted(names)


def _model_type(arch: str) -> str:
    for model_type, value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if arch in (value if isinstance(value, (list, tuple)) else (value,)):
            return model_type
    raise KeyError(arch)


def _set(config, key, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, TypeError, ValueError):
        pass


def _shrink(config, overrides: dict, plan: dict = SHRINK) -> None:
    from hfbridge.model.compatibility import _layers_to_keep

    layers = config.__dict__.get("num_hidden_layers")
    keep = _layers_to_keep(config.__dict__.get("layer_types")) if isinstance(layers, int) and layers > 2 else None
    if keep is not None and "num_hidden_layers" in {**plan, **overrides}:
        for key, value in list(config.__dict__.items()):  # per-layer lists and tables follow the kept layers
            if isinstance(value, list) and len(value) == layers and key != "architectures":
                _set(config, key, [value[i] for i in keep])
            elif isinstance(value, dict) and key.startswith("per_layer") and all(isinstance(k, int) for k in value):
                _set(config, key, {k: v for k, v in value.items() if k < len(keep)})
    for key, value in {**plan, **overrides}.items():
        if key == "layer_types":
            continue
        if key in config.__dict__ or key in overrides:
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    if "qk_rope_head_dim" in config.__dict__ and "head_dim" in config.__dict__:  # MLA: rotary width is head_dim
        _set(config, "head_dim", config.qk_rope_head_dim)
    for key in ("text_config", "decoder", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict") and sub is not config:
            _shrink(sub, overrides, plan)


# Tried in order until Transformers builds and runs the model: every shape shrunk, then only depth, vocabulary and
# experts (widths stay consistent), then only depth.
MINIMAL = {key: SHRINK[key] for key in (
    "vocab_size", "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_experts", "num_local_experts",
    "n_routed_experts", "num_experts_per_tok", "max_position_embeddings", "sliding_window")}
PLANS = (SHRINK, MINIMAL, {"num_hidden_layers": 2, "vocab_size": 512})


def tiny_config(arch: str, plan: dict = SHRINK):
    config = CONFIG_MAPPING[_model_type(arch)]()
    _shrink(config, PER_ARCH.get(arch, {}), plan)
    data = config.to_dict()
    # Per-layer lists sized for the default depth: let the rebuilt config derive them again.
    for key in ("mlp_layer_types", "block_types", "attention_types_list"):
        if isinstance(data.get(key), list) and key not in PER_ARCH.get(arch, {}):
            data.pop(key)
    data.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False})
    if "is_decoder" in data:  # encoder classes used as decoders
        data["is_decoder"] = True
    data.pop("transformers_version", None)
    return type(config).from_dict(data)


def build_tiny_model(arch: str, folder: Path, plan: dict = SHRINK) -> torch.nn.Module:
    config = tiny_config(arch, plan)
    cls = getattr(transformers, arch)
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(config).parameters())
    if count > 30_000_000:
        raise ValueError(f"the shrunk config still has {count:,} parameters")
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random init can leave some weights at zero or huge: keep logits well separated
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Transformers' greedy generate(), one prompt, EOS ignored (eos_token_id an id no token has: the config's EOS
    id may be generated and does not stop)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt):].tolist(), [s[0].float() for s in out.logits]


def compare(ours: list[int], theirs: list[int], logits: list[torch.Tensor]) -> tuple[str, str]:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        gap = (logits[i][b] - logits[i][a]).item()
        if a in logits[i].topk(2).indices.tolist() and gap < TIE_TOLERANCE:
            return "near_tie", f"token {i}: top-2 gap {gap:.2g}"
        return "mismatch", f"token {i}: ours {a}, Transformers' {b} (gap {gap:.3g}); ours {ours}, theirs {theirs}"
    if len(ours) != len(theirs):
        return "mismatch", f"lengths {len(ours)} vs {len(theirs)}"
    return "equal", ""


def _hfbridge_greedy(folder: Path, extra: dict | None = None) -> list[list[int]]:
    from hfbridge import LLM, SamplingParams

    llm = LLM(
        model=str(folder), model_impl="transformers", dtype="float32", block_size=4, max_model_len=64,
        skip_tokenizer_init=True, trust_remote_code=True, **(extra or {}),
    )
    # ignore_eos alone, as the reference's eos_token_id=-1: EOS may be generated and does not stop. min_tokens
    # would mask EOS (vLLM's semantics), which the reference does not.
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _build_with_some_plan(arch: str, folder: Path):
    errors = []
    for plan in PLANS:
        try:
            model = build_tiny_model(arch, folder, plan)
            return model, [hf_greedy(model, list(p), MAX_NEW) for p in PROMPTS]
        except Exception as exc:  # noqa: BLE001 - the next plan shrinks less
            errors.append(exc)
    raise errors[0]  # Transformers' error on the fully shrunk config


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def run_arch(arch: str) -> Result:
    """Build arch tiny, compare greedy tokens of a batch of prompts of different lengths."""
    from hfbridge.model.compatibility import UnsupportedModelError

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"cov_{arch}_") as tmp:
        folder = Path(tmp)
        try:
            model, expected = _build_with_some_plan(arch, folder)
        except Exception as exc:  # noqa: BLE001 - Transformers' own failure is the reason
            return Result(arch, "hf_unbuildable", _one_line(exc), time.perf_counter() - start)
        try:
            ours = _hfbridge_greedy(folder)
        except UnsupportedModelError as exc:
            return Result(arch, "refused", " ".join(str(exc).split()), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a bug to record, not to stop the sweep
            if os.environ.get("COVERAGE_TRACE"):
                traceback.print_exc()
            return Result(arch, "error", _one_line(exc), time.perf_counter() - start)
        verdicts = [compare(o, t, logits) for o, (t, logits) in zip(ours, expected)]
        if any(v[0] == "mismatch" for v in verdicts):
            verdicts = [_against_forward(model, p, o, v) for p, o, v in zip(PROMPTS, ours, verdicts)]
    worst = max(verdicts, key=lambda v: ("equal", "near_tie", "mismatch").index(v[0]))
    return Result(arch, worst[0], worst[1], time.perf_counter() - start)


def forward_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Greedy by full recomputation with Transformers' own forward (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _against_forward(model, prompt, ours: list[int], verdict: tuple[str, str]) -> tuple[str, str]:
    """A generate() that disagrees with its own model's forward is Transformers' inconsistency, shown as such."""
    if verdict[0] != "mismatch" or forward_greedy(model, list(prompt), MAX_NEW) != ours:
        return verdict
    return "equal", "equals Transformers' forward() without cache; its generate() with cache differs from it"


ENCODER_TOLERANCE = 1e-4  # max |hidden state difference| in float32


def flagged_encoders() -> list[str]:
    """Base-model classes of masked-LM (encoder) model types that set `_supports_attention_backend`."""
    names = set()
    for model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        name = MODEL_MAPPING_NAMES.get(model_type)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and getattr(cls, "_supports_attention_backend", False):
            names.add(name)
    return sorted(names)


def _encoder_model_type(arch: str) -> str:
    return next(t for t in MODEL_FOR_MASKED_LM_MAPPING_NAMES if MODEL_MAPPING_NAMES.get(t) == arch)


def run_encoder(arch: str) -> Result:
    """Token embeddings of the pooling runner (pooling_type ALL, no normalisation) vs the model's own last
    hidden state, three prompts of different lengths in one batch."""
    from hfbridge import LLM
    from hfbridge.config import PoolerConfig
    from hfbridge.model.compatibility import UnsupportedModelError

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"cov_{arch}_") as tmp:
        try:
            config = CONFIG_MAPPING[_encoder_model_type(arch)]()
            _shrink(config, {})
            data = {**config.to_dict(), "pad_token_id": 0}
            data.pop("layer_types", None)
            config = type(config).from_dict(data)
            torch.manual_seed(0)
            model = getattr(transformers, arch)(config).eval()
            model.save_pretrained(tmp)
            with torch.no_grad():
                expected = [model(torch.tensor([p])).last_hidden_state[0].float() for p in PROMPTS]
        except Exception as exc:  # noqa: BLE001
            return Result(arch, "hf_unbuildable", _one_line(exc), time.perf_counter() - start)
        try:
            llm = LLM(model=tmp, runner="pooling", convert="embed", skip_tokenizer_init=True, dtype="float32",
                      model_impl="transformers", trust_remote_code=True,
                      pooler_config=PoolerConfig(pooling_type="ALL", use_activation=False))
            outs = llm.encode([{"prompt_token_ids": list(p)} for p in PROMPTS], pooling_task="token_embed",
                              use_tqdm=False)
        except UnsupportedModelError as exc:
            return Result(arch, "refused", " ".join(str(exc).split()), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            return Result(arch, "error", _one_line(exc), time.perf_counter() - start)
    # relative to the largest hidden value (MobileBERT's NoNorm layers reach the hundreds)
    diff = max(((o.outputs.data.float() - e).abs().max() / e.abs().max().clamp(min=1)).item()
               for o, e in zip(outs, expected))
    verdict = "equal" if diff <= ENCODER_TOLERANCE else "mismatch"
    return Result(arch, verdict, f"max relative hidden-state difference {diff:.2g}", time.perf_counter() - start)


def _rows(results: list[Result]) -> list[str]:
    lines = ["| architecture | verdict | reason | seconds |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.arch):
        lines.append(f"| {r.arch} | {r.verdict} | {r.reason.replace('|', '/')} | {r.seconds:.1f} |")
    return lines


def _totals(results: list[Result]) -> str:
    counts = {v: sum(r.verdict == v for r in results) for v in
              ("equal", "near_tie", "refused", "mismatch", "error", "hf_unbuildable")}
    return "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(results)})"


def render_table(results: list[Result], encoders: list[Result] = ()) -> str:
    lines = [
        "# Architecture coverage",
        "",
        f"Generated by `python benchmarks/coverage.py` with Transformers {transformers.__version__}: every causal-LM "
        "class that sets `_supports_attention_backend`, built tiny with random weights, greedy through hfbridge "
        "(`model_impl=\"transformers\"`, three prompts of different lengths in one batch) vs Transformers' "
        "`generate()` with EOS ignored (it may be generated; nothing stops). `near_tie`: the first difference is "
        "where Transformers' own top-2 logits are within 1e-4. `refused`: hfbridge stops before loading weights and "
        "says why. `hf_unbuildable`: Transformers itself could not build or run the tiny config (its error shown). "
        "Seconds: wall time on a shared 2-core CPU machine. `hfbridge check MODEL` says the same for one model "
        "without loading its weights.",
        "",
        "## Causal LMs (generate runner)",
        "",
        _totals(results),
        "",
        *_rows(results),
    ]
    if encoders:
        lines += [
            "",
            "## Encoders (pooling runner)",
            "",
            "Base models of the masked-LM model types that set the flag: token embeddings (pooling_type ALL, no "
            f"normalisation) vs the model's own last hidden state, within {ENCODER_TOLERANCE:g} of its largest value.",
            "",
            _totals(encoders),
            "",
            *_rows(encoders),
        ]
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> dict[str, tuple[str, str]]:
    """arch -> (verdict, reason) from a rendered table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("architecture", "---"):
            rows[cells[0]] = (cells[1], cells[2].replace("\\|", "|"))
    return rows


def _report(r: Result) -> Result:
    print(f"{r.arch:45s} {r.verdict:15s} {r.seconds:5.1f}s {r.reason[:150]}", file=sys.stderr, flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="*", help="architectures to run (default: all flagged; writes docs/coverage.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    archs = args.archs or flagged_architectures()
    encoders = [a for a in archs if a in flagged_encoders()] if args.archs else flagged_encoders()
    results = [_report(run_arch(a)) for a in archs if a not in encoders]
    encoder_results = [_report(run_encoder(a)) for a in encoders]
    table = render_table(results, encoder_results)
    if args.archs:
        print(table)
    else:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(table)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
