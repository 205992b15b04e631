"""Which runner a model gets (generate or pooling) and, for pooling, how it pools: vLLM's runner / convert /
task resolution, plus what a Sentence-Transformers folder says about pooling and normalisation."""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hfbridge.config import PoolerConfig

logger = logging.getLogger(__name__)

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")
# Legacy --task values -> (runner, convert); "score" and "reward" depend on the architecture.
_TASKS = {
    "auto": ("auto", "auto"),
    "generate": ("generate", "none"),
    "embed": ("pooling", "embed"),
    "embedding": ("pooling", "embed"),
    "classify": ("pooling", "classify"),
    "score": ("pooling", "auto"),
    "reward": ("pooling", "auto"),
}
# architecture name suffix -> (runner, convert), checked in order
_SUFFIXES = (
    (("ForCausalLM", "ForConditionalGeneration", "ChatModel", "LMHeadModel"), ("generate", "none")),
    (("ForTextEncoding", "EmbeddingModel"), ("pooling", "embed")),
    (("ForSequenceClassification", "ForTokenClassification", "ClassificationModel"), ("pooling", "classify")),
    (("ForRewardModeling", "RewardModel"), ("pooling", "embed")),
    (("Model",), ("pooling", "embed")),
)
_ST_POOLING = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}


@dataclass(frozen=True)
class RunnerChoice:
    runner: str  # generate | pooling
    convert: str  # none | embed | classify
    pooler_config: PoolerConfig | None


def resolve_runner(
    architectures: list[str],
    st: dict[str, Any] | None,  # read_sentence_transformers_config() of the model folder
    hf_config: Any,
    runner: str = "auto",
    convert: str = "auto",
    task: str | None = None,
    pooler_config: PoolerConfig | dict | None = None,
) -> RunnerChoice:
    if task is not None:
        if task not in _TASKS:
            raise ValueError(f"task={task!r} is not supported; use one of {list(_TASKS)} (or runner=/convert=)")
        if task != "auto":
            warnings.warn(
                f"task={task!r} is deprecated: use runner={_TASKS[task][0]!r}"
                + (f", convert={_TASKS[task][1]!r}" if _TASKS[task][1] != "auto" else ""),
                DeprecationWarning, stacklevel=3,
            )
        runner, convert = _TASKS[task]
    if runner not in RUNNERS:
        raise ValueError(f"runner={runner!r} is not one of {list(RUNNERS)}")
    if convert not in CONVERTS:
        raise ValueError(f"convert={convert!r} is not one of {list(CONVERTS)}")
    if convert == "reward":
        convert = "auto"
    arch_runner, arch_convert = _from_architecture(architectures)
    if st is not None and runner == "auto" and convert == "auto":
        arch_runner, arch_convert = "pooling", "embed"
    if convert in ("embed", "classify"):
        runner = "pooling"
    if runner == "auto":
        runner = arch_runner
    if runner == "generate":
        return RunnerChoice("generate", "none", None)
    if convert == "auto":
        convert = arch_convert if arch_convert != "none" else "embed"  # a causal LM pools as an embedder
    return RunnerChoice("pooling", convert, _pooler_config(convert, architectures, hf_config, st, pooler_config))


def _from_architecture(architectures: list[str]) -> tuple[str, str]:
    for arch in architectures:
        for suffixes, choice in _SUFFIXES:
            if arch.endswith(suffixes):
                return choice
    return ("generate", "none")


def read_sentence_transformers_config(folder: str) -> dict[str, Any] | None:
    """Pooling mode, normalisation and max length from a Sentence-Transformers folder, if it is one."""
    root = Path(folder)
    if not (root / "modules.json").is_file():
        return None
    modules = json.loads((root / "modules.json").read_text())
    out: dict[str, Any] = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            pooling_file = root / module.get("path", "") / "config.json"
            if pooling_file.is_file():
                pooling = json.loads(pooling_file.read_text())
                out["pooling_type"] = next((t for k, t in _ST_POOLING.items() if pooling.get(k)), None)
    bert_config = root / "sentence_bert_config.json"
    if bert_config.is_file():
        out["max_seq_length"] = json.loads(bert_config.read_text()).get("max_seq_length")
    return out


def _pooler_config(convert, architectures, hf_config, st, user) -> PoolerConfig:
    """The Sentence-Transformers folder's choices, then the user's pooler_config field by field. A pooling type
    left open is decided once the model is built: CLS for bidirectional encoders, LAST for causal models."""
    text_config = hf_config.get_text_config()
    pooling_type = None
    if getattr(text_config, "classifier_pooling", None) in ("cls", "mean"):  # ModernBERT's head pools as configured
        pooling_type = text_config.classifier_pooling.upper()
    config = PoolerConfig(pooling_type=pooling_type, use_activation=True, task=convert)
    if st is not None:
        config = replace(config, pooling_type=st.get("pooling_type") or pooling_type, use_activation=st["normalize"])
    if user is not None:
        overrides = user if isinstance(user, dict) else {k: v for k, v in vars(user).items() if v is not None}
        if "normalize" in overrides:
            raise ValueError("Parameter `normalize` was removed; use `use_activation` instead.")
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.pooling_type:
        config = replace(config, pooling_type=config.pooling_type.upper())
    return config
