"""A PEFT LoRA folder read and checked: `adapter_config.json` + `adapter_model.safetensors`.

Everything that can be checked without the model is checked here (the folder, the file, the config's options, the
ranks against max_lora_rank); the manager then checks the modules and shapes against the model it serves.
Every error is a LoRAAdapterError (a ValueError) that names the adapter and the problem."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from hfbridge.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's key: [base_model.model.]<module>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# Options that change what a LoRA computes and are not built: option -> (values that change nothing, reason)
_UNSUPPORTED = {
    "use_dora": ((None, False), "DoRA (use_dora) is not supported"),
    "modules_to_save": ((None, []), "modules_to_save (fully fine-tuned modules saved beside the adapter) is not "
                                    "supported; serve a model with those modules merged"),
    "rank_pattern": ((None, {}), "per-module ranks (rank_pattern) are not supported"),
    "alpha_pattern": ((None, {}), "per-module alphas (alpha_pattern) are not supported"),
    "bias": ((None, "none"), "trained biases (bias != 'none') are not supported"),
    "fan_in_fan_out": ((None, False), "fan_in_fan_out (Conv1D layers) is not supported"),
}


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served; the message names it and says why."""


@dataclass(frozen=True)
class LoRAAdapter:
    request: LoRARequest
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    # module name as in the Transformers model (model.layers.0.self_attn.q_proj) -> (A [r, in], B [out, r]) float32
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_peft_folder(request: LoRARequest, max_lora_rank: int) -> LoRAAdapter:
    def fail(problem: str) -> LoRAAdapterError:
        return LoRAAdapterError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): {problem}")

    folder = request.lora_path
    if not os.path.isdir(folder):
        raise fail("no such folder")
    config = _read_config(os.path.join(folder, CONFIG_FILE), fail)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise fail("adapter_model.bin (a pickle, which can run code when loaded) is not read; save the adapter "
                       "with safe_serialization=True to get adapter_model.safetensors")
        raise fail(f"no {WEIGHTS_FILE} in the folder")
    rank, scaling = _rank_and_scaling(config, max_lora_rank, fail)
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path, device="cpu")
    except Exception as e:  # noqa: BLE001 - whatever the reader says, the file is unreadable
        raise fail(f"{WEIGHTS_FILE} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return LoRAAdapter(request, rank, scaling, _pair_weights(tensors, rank, fail))


def _read_config(path: str, fail) -> dict:
    if not os.path.isfile(path):
        raise fail(f"no {CONFIG_FILE} in the folder (is it a PEFT adapter?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise fail(f"{CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise fail(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise fail(f"peft_type {peft_type!r} is not a LoRA adapter")
    for option, (accepted, reason) in _UNSUPPORTED.items():
        if config.get(option) not in accepted:
            raise fail(f"{reason} ({option}={config.get(option)!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise fail(f"target_modules {targets!r} is not a valid regular expression ({e})") from e
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise fail(f"target_modules must be a list of module names or a regex string, got {targets!r}")
    return config


def _rank_and_scaling(config: dict, max_lora_rank: int, fail) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(f"r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise fail(f"rank r={rank} is above max_lora_rank={max_lora_rank}; start the engine with "
                   f"max_lora_rank >= {rank} (--max-lora-rank)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise fail(f"lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _pair_weights(tensors: dict[str, torch.Tensor], rank: int, fail) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise fail(f"tensor {key!r} is not a LoRA A/B weight (embedding adapters, DoRA magnitudes and saved "
                       "modules are not supported)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise fail(f"module {module!r} has lora_{next(iter(pair))} but not its other half")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise fail(f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                       f"[r, in] and [out, r] with r={rank}")
        weights[module] = (a.float(), b.float())
    return weights
