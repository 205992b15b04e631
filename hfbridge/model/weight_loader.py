"""Stream checkpoint tensors into a model built on the meta device, one parameter at a time.

Checkpoint names are mapped to the model's through Transformers' own conversion table (renamings, fused MoE
experts, base-model prefixes), so a checkpoint loads here exactly as `from_pretrained` would load it.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LazyTensor = Callable[[], torch.Tensor]


def checkpoint_files(folder: str) -> list[Path]:
    root = Path(folder)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [root / name for name in sorted(set(weight_map.values()))]
        if (root / single).is_file():
            return [root / single]
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"No safetensors or .bin weights found in {folder}")
    return files


def iter_checkpoint(folder: str) -> Iterator[tuple[str, LazyTensor]]:
    files = checkpoint_files(folder)
    for path in tqdm(files, desc="Loading weights", unit="file", disable=len(files) < 2):
        if path.suffix == ".safetensors":
            # No `with`: fused tensors (MoE experts) are read after their file's turn, so each loader keeps
            # its (memory-mapped) file open until it is dropped.
            f = safe_open(str(path), framework="pt", device="cpu")
            for name in f.keys():
                yield name, _SafetensorsTensor(f, name)
        else:  # pickled checkpoints only through the weights-only unpickler
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, (lambda t=tensor: t)


class _SafetensorsTensor:
    """A lazy checkpoint tensor: called, the whole tensor; `get_slice()`, a handle that reads only the indexed
    part (tensor-parallel ranks read just their shard)."""

    def __init__(self, f, name: str):
        self.f, self.name = f, name

    def __call__(self) -> torch.Tensor:
        return self.f.get_tensor(self.name)

    def get_slice(self):
        return self.f.get_slice(self.name)


def _read(load: LazyTensor, current: torch.Tensor) -> torch.Tensor:
    """The whole tensor, or only this rank's shard when the parameter carries a ShardSpec (tensor parallel)."""
    spec = getattr(current, "shard_spec", None)
    return load() if spec is None else spec.read(load)


def _conversions(model: torch.nn.Module) -> list:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # older Transformers: checkpoint names are the model's names
        return []
    return get_model_conversion_mapping(model)


def load_weights(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, LazyTensor]],
    device: torch.device,
    base_model_prefix: str = "",
    conversion_source: torch.nn.Module | None = None,
) -> set[str]:
    """Load every tensor `weights` yields into `model`; returns the model names that were loaded."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = _conversions(conversion_source if conversion_source is not None else model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    targets = dict(model.state_dict(keep_vars=True))
    pending: dict[str, list] = {}  # fused target name -> its pieces (name, pattern, loader)
    loaded: set[str] = set()
    unexpected = []
    for name, load in weights:
        target, pattern = rename_source_key(name, renamings, converters, base_model_prefix or None, targets)
        if target not in targets and name in targets:
            target, pattern = name, None
        if target not in targets:
            unexpected.append(name)
        elif pattern is not None:
            pending.setdefault(target, []).append((name, pattern, load))
        else:
            _assign(model, target, _read(load, targets[target]), targets[target], device)
            loaded.add(target)
    for first_target, pieces in pending.items():
        # Fused pieces stack in expert order: checkpoints list names as strings ("experts.10" before "experts.2").
        pieces.sort(key=lambda piece: _natural_key(piece[0]))
        converter = copy.deepcopy(by_pattern[pieces[0][1]])
        for name, pattern, load in pieces:
            converter.add_tensor(first_target, name, pattern, load)
        for target, tensor in converter.convert(first_target, model=model, config=getattr(model, "config", None)).items():
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            spec = getattr(targets[target], "shard_spec", None)
            tensor = tensor if spec is None else spec.take(tensor)  # fused tensors exist whole only after converting
            _assign(model, target, tensor, targets[target], device)
            loaded.add(target)
    if unexpected:
        logger.info("Ignored %d checkpoint tensors the model has no place for: %s", len(unexpected), unexpected[:8])
    return loaded


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor, current: torch.Tensor, device: torch.device) -> None:
    if tuple(tensor.shape) != tuple(current.shape):
        raise ValueError(
            f"Checkpoint tensor {name} has shape {tuple(tensor.shape)} but the model expects {tuple(current.shape)}; "
            "the config does not match the weights"
        )
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    tensor = tensor.to(device=device, dtype=current.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def missing_parameters(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device after loading (tied ones count once, as loaded)."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    return names + [n for n, b in model.named_buffers() if b.is_meta]
