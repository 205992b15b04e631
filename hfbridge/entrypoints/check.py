"""`hfbridge check MODEL`: can hfbridge run this model, how, and why not; no weights are loaded.

Prints the implementation that would run (native / Transformers / remote code) and why, the compatibility
verdict, the runner and tasks, the tp/pp plans and their styles, the weights' size and the KV-cache bytes per
token. Exit status 0 when the model can run, 1 when it cannot. `--probe` also runs the tiny random copy of the
architecture through hfbridge's paged attention (the check `LLM(...)` runs at load).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from hfbridge.entrypoints.cli_args import JsonDict

_TASKS = {"generate": ["generate"], "embed": ["embed", "token_embed"], "classify": ["classify", "score"]}


@dataclass
class CheckReport:
    model: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    runnable: bool = True

    def add(self, key: str, value: Any) -> None:
        self.lines.append((key, str(value)))

    def fail(self, key: str, reason: str) -> None:
        self.runnable = False
        self.add(key, reason)

    def render(self) -> str:
        width = max((len(k) for k, _ in self.lines), default=0)
        body = [f"{k:<{width}}  {v}" for k, v in self.lines]
        return "\n".join([f"hfbridge check {self.model}", *body, f"{'verdict':<{width}}  "
                          f"{'can run' if self.runnable else 'cannot run'}"])


def check_model(model: str, trust_remote_code: bool = False, hf_overrides: dict | None = None,
                model_impl: str = "auto", probe: bool = False) -> CheckReport:
    from hfbridge.engine.engine_args import EngineArgs

    report = CheckReport(model)
    try:
        args = EngineArgs(model=model, trust_remote_code=trust_remote_code, hf_overrides=hf_overrides,
                          model_impl=model_impl, device="cpu", skip_tokenizer_init=True)
        engine_config = args.create_engine_config()
        model_config = engine_config.model_config
    except (ValueError, OSError) as exc:
        report.fail("config", " ".join(str(exc).split()))
        return report
    report.add("architectures", ", ".join(model_config.architectures) or "(none recorded)")
    report.add("runner", f"{model_config.runner} (tasks: {', '.join(_tasks(model_config))})")
    _implementation(report, model_config, probe)
    _images(report, engine_config)
    _parallel_plans(report, model_config.hf_config)
    _sizes(report, model_config)
    return report


def _images(report: CheckReport, engine_config) -> None:
    """For a vision-language model: whether its images are served, or why not (its text runs either way)."""
    from hfbridge.multimodal.processor import MultiModalProcessor, is_multimodal

    model_config = engine_config.model_config
    if not is_multimodal(model_config.hf_config):
        return
    if engine_config.multimodal_config is None:
        report.add("images", f"refused: the {model_config.runner} runner takes text only")
        return
    processor = MultiModalProcessor(model_config, engine_config.multimodal_config, engine_config.attention_backend)
    if processor.refusal is not None:
        report.add("images", f"refused: {processor.refusal}")
    else:
        report.add("images", f"served ({type(processor.processor).__name__} places them)")


def _tasks(model_config) -> list[str]:
    return _TASKS["generate" if model_config.runner == "generate" else model_config.convert]


def _implementation(report: CheckReport, model_config, probe: bool) -> None:
    from hfbridge.model.compatibility import UnsupportedModelError, check_compatible
    from hfbridge.model.model_resolver import resolve_model_class

    try:
        model_class = resolve_model_class(model_config)
    except (ValueError, OSError, ImportError) as exc:
        report.fail("implementation", " ".join(str(exc).split()))
        return
    auto_map = getattr(model_config.hf_config, "auto_map", None) or {}
    if model_class.impl == "native":
        why = "native (hfbridge registers its own implementation of this architecture)"
    elif any(k.startswith("AutoModel") for k in auto_map):
        head = "; hfbridge adds the LM head" if model_class.needs_lm_head else ""
        why = f"remote code ({model_class.cls.__name__} from the model's auto_map{head})"
    else:
        why = f"Transformers ({model_class.cls.__name__} sets _supports_attention_backend)"
    report.add("implementation", why)
    if model_class.impl == "native":
        report.add("compatibility", "ok (native)")
        return
    if not probe:
        report.add("compatibility", "ok (static checks; --probe runs a tiny random copy through paged attention)")
        return
    try:
        result = check_compatible(model_class.cls, model_config.hf_config, model_config.runner,
                                  model_class.needs_lm_head)
    except UnsupportedModelError as exc:
        report.fail("compatibility", " ".join(str(exc).split()))
        return
    report.add("compatibility", f"ok (probe: max logit difference {result.max_diff:.2g}{_detail(result)})")


def _detail(result) -> str:
    return f"; {result.detail}" if result.detail else ""


def _plan(config, name: str) -> dict:
    plan = getattr(config, name, None) or {}
    return dict(plan) if isinstance(plan, dict) else {}


def _parallel_plans(report: CheckReport, hf_config) -> None:
    text = hf_config.get_text_config()
    tp = _plan(text, "base_model_tp_plan") or _plan(hf_config, "base_model_tp_plan")
    if tp:
        from hfbridge.parallel.styles import REFUSED, STYLES  # torch: only once a model is being checked

        styles = sorted(set(map(str, tp.values())))
        # The same style table tensor_parallel_size > 1 shards with (hfbridge.parallel.styles).
        unsupported = [s for s in styles if s not in STYLES]
        marks = ", ".join(
            f"{s} ({'supported' if s in STYLES else 'not supported: ' + REFUSED.get(s, 'unknown style')})"
            for s in styles
        )
        verdict = f"tensor_parallel_size > 1 refused: {', '.join(unsupported)}" if unsupported else "all styles supported"
        report.add("tp plan", f"{len(tp)} entries; styles: {marks}; {verdict}")
    else:
        report.add("tp plan", "none (the model defines no base_model_tp_plan)")
    pp = _plan(text, "base_model_pp_plan") or _plan(hf_config, "base_model_pp_plan")
    report.add("pp plan", f"{len(pp)} modules: {', '.join(pp)} (its ModuleList is split across pipeline stages)" if pp
               else 'none (pipeline_parallel_size > 1 needs hf_overrides={"base_model_pp_plan": {...}})')
    report.add("parallelism", "tensor parallel from the tp plan; pipeline parallel from the pp plan")


def _sizes(report: CheckReport, model_config) -> None:
    folder = Path(model_config.model_path)
    files = [folder / model_config.gguf_file] if model_config.gguf_file else [
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    total = sum(p.stat().st_size for p in files if p.is_file())
    report.add("weights", f"{total / 2**20:.1f} MiB in {len(files)} file(s)")
    text = model_config.hf_text_config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if model_config.runner != "generate" or not (layers and kv_heads and head_dim):
        report.add("kv cache", "none" if model_config.runner != "generate" else "unknown from the config")
        return
    per_token = 2 * layers * kv_heads * head_dim * model_config.dtype.itemsize
    report.add("kv cache", f"{per_token} bytes per token ({layers} layers x 2 x {kv_heads} kv heads x {head_dim} "
                           f"x {model_config.dtype.itemsize} bytes, {str(model_config.dtype).removeprefix('torch.')})")


@click.command("check")
@click.argument("model")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code (config.json auto_map).")
@click.option("--hf-overrides", type=JsonDict(), help="JSON merged into the model's config, as for serve.")
@click.option("--model-impl", default="auto", type=click.Choice(["auto", "transformers", "native"]))
@click.option("--probe", is_flag=True, help="Run a tiny random copy of the architecture through paged attention.")
def check_command(model: str, trust_remote_code: bool, hf_overrides: dict | None, model_impl: str, probe: bool):
    """Say whether hfbridge can run MODEL (a folder or Hub id), how, and why not. Loads no weights."""
    report = check_model(model, trust_remote_code, hf_overrides, model_impl, probe)
    click.echo(report.render())
    raise SystemExit(0 if report.runnable else 1)
