"""Pipeline stages from the plan Transformers merged for a built model (`base_model_pp_plan`, `model._pp_plan`).

The plan maps the base model's children, in forward order, to (input names, output names); exactly one of them is
an `nn.ModuleList` (the decoder layers), which is split across the stages. Entries before it (the embedding) live
on the first stage, and on the last too when the embeddings are tied (the LM head reads that weight); entries after
it (the final norm) and the head live on the last stage. Everything a stage does not run becomes a placeholder that
returns its input, so the model's own forward loop runs unchanged and reads no weight for it. Applied on the meta
model, before tensor-parallel sharding and before any weight is read."""
from __future__ import annotations

import ast
import inspect
import logging
import os
import textwrap
from dataclasses import dataclass
from typing import Any

from torch import nn

from hfbridge.parallel.state import PPGroup

logger = logging.getLogger(__name__)

FIX = 'hf_overrides={"base_model_pp_plan": {...}}'
PARTITION_ENV = "HFBRIDGE_PP_LAYER_PARTITION"


class PPPlanError(ValueError):
    """A pipeline plan hfbridge cannot apply; raised before any weight is read."""


def stage_layer_counts(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage: HFBRIDGE_PP_LAYER_PARTITION ("5,4"), else an even split whose remainder goes one layer
    each to the stages before the last, counting back from the second-to-last (vLLM's get_pp_indices: the last
    stage also holds the norm and the head)."""
    text = os.environ.get(PARTITION_ENV)
    if text is not None:
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise PPPlanError(f"{PARTITION_ENV}={text!r} is not a comma-separated list of layer counts") from None
        if len(counts) != num_stages:
            raise PPPlanError(
                f"{PARTITION_ENV}={text!r} names {len(counts)} stages but pipeline_parallel_size={num_stages}"
            )
        if sum(counts) != num_layers or min(counts) < 1:
            raise PPPlanError(
                f"{PARTITION_ENV}={text!r} sums to {sum(counts)} layers but the model has {num_layers}; give each "
                f"of the {num_stages} stages at least one layer, {num_layers} in all"
            )
        return counts
    counts = [num_layers // num_stages] * num_stages
    for i in range(2, num_layers % num_stages + 2):
        counts[-i] += 1
    return counts


def stage_layer_range(num_layers: int, stage: int, num_stages: int) -> tuple[int, int]:
    counts = stage_layer_counts(num_layers, num_stages)
    start = sum(counts[:stage])
    return start, start + counts[stage]


class MissingLayer(nn.Module):
    """A module this stage does not run: returns its first input (the hidden states) untouched, as a 1-tuple when
    the model's forward loop reads `layer(...)[0]` (layers of older Transformers / remote code return tuples)."""

    def __init__(self, return_tuple: bool = False, attention_type: str | None = None):
        super().__init__()
        self.return_tuple = return_tuple
        if attention_type is not None:  # some forward loops pick the mask by `decoder_layer.attention_type`
            self.attention_type = attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()))
        return (first,) if self.return_tuple else first


@dataclass(frozen=True)
class StageSplit:
    layers_path: str  # the ModuleList, relative to the base model
    start: int  # first layer this stage runs
    end: int  # one past its last
    kept: tuple[str, ...]  # plan entries (other than the layers) this stage holds


def pp_plan_of(base_model: nn.Module) -> dict[str, Any]:
    """The base model's plan in forward order: its own `_pp_plan`, else its config's `base_model_pp_plan`."""
    plan = getattr(base_model, "_pp_plan", None)
    if not plan:
        plan = getattr(getattr(base_model, "config", None), "base_model_pp_plan", None)
    return dict(plan or {})


def find_layers(base_model: nn.Module, plan: dict[str, Any]) -> tuple[int, str]:
    """(position in the plan, attribute path) of the one ModuleList the plan names."""
    kinds = {name: type(_submodule(base_model, name)).__name__ for name in plan}
    lists = [(i, name) for i, name in enumerate(plan) if isinstance(_submodule(base_model, name), nn.ModuleList)]
    if len(lists) != 1:
        raise PPPlanError(
            f"The pp plan of {type(base_model).__name__} must name exactly one nn.ModuleList to split across the "
            f"stages; it names {len(lists)}: {kinds}. Fix it with {FIX}"
        )
    return lists[0]


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise PPPlanError(
            f"The pp plan of {type(root).__name__} names {path!r}, which the model does not have; fix it with {FIX}"
        ) from None


def check_pp_plan(base_model: nn.Module, num_layers: int | None, num_stages: int) -> int:
    """Every refusal of split_stages, for the driver to raise before any worker starts; returns the layer count
    split (the config's num_hidden_layers, else the ModuleList's length)."""
    plan = pp_plan_of(base_model)
    if not plan:
        raise PPPlanError(
            f"{type(base_model).__name__} has no base_model_pp_plan, so pipeline_parallel_size={num_stages} cannot "
            f"tell where to split it; give it one with {FIX}, or use pipeline_parallel_size=1"
        )
    _, path = find_layers(base_model, plan)
    num_layers = num_layers or len(base_model.get_submodule(path))
    if num_layers < num_stages and os.environ.get(PARTITION_ENV) is None:
        raise PPPlanError(f"{num_layers} layers cannot fill pipeline_parallel_size={num_stages} stages")
    stage_layer_counts(num_layers, num_stages)
    return num_layers


def split_stages(base_model: nn.Module, heads: list[tuple[nn.Module, str]], num_layers: int | None, pp: PPGroup,
                 tied_embeddings: bool) -> StageSplit:
    """Replace, on the meta model, whatever this stage does not run by a MissingLayer. `heads`: (owner,
    attribute) of the modules applied after the base model (the LM head), kept on the last stage only."""
    num_layers = check_pp_plan(base_model, num_layers, pp.size)
    plan = pp_plan_of(base_model)
    index, path = find_layers(base_model, plan)
    names = list(plan)
    kept = []
    for name in names[:index]:  # the embedding
        if pp.is_first or (pp.is_last and tied_embeddings):
            kept.append(name)
        else:
            _replace(base_model, name, MissingLayer())
    for name in names[index + 1:]:  # the final norm
        if pp.is_last:
            kept.append(name)
        else:
            _replace(base_model, name, MissingLayer())
    if not pp.is_last:
        for owner, attribute in heads:
            setattr(owner, attribute, MissingLayer())
    start, end = stage_layer_range(num_layers, pp.stage, pp.size)
    layers = base_model.get_submodule(path)
    return_tuple = _loop_reads_first_item(type(base_model), path.rpartition(".")[2])
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = MissingLayer(return_tuple, getattr(layers[i], "attention_type", None))
    logger.info("Pipeline stage %d/%d: layers [%d, %d) of %s, and %s", pp.stage, pp.size, start, end, path, kept)
    return StageSplit(path, start, end, tuple(kept))


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _loop_reads_first_item(cls: type, attribute: str) -> bool:
    """Whether the forward loop over `self.<attribute>` indexes each layer's output (`outputs[0]`): the layers
    return tuples there. Transformers 5's layers return the hidden states themselves."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    for loop in (n for n in ast.walk(tree) if isinstance(n, ast.For) and attribute in ast.unparse(n.iter)):
        results = {
            t.id for n in ast.walk(loop) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
            for t in n.targets if isinstance(t, ast.Name)
        }
        for n in ast.walk(loop):
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id in results:
                if isinstance(n.slice, ast.Constant) and n.slice.value == 0:
                    return True
    return False
