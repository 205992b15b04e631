"""A worker's adapters: an LRU of `max_cpu_loras` loaded adapters, `max_loras` slots the layers compute with, and
the step's row groups.

Every rank of a tensor-parallel engine runs one, fed the same adapters and the same steps, so all agree on slots.
An adapter evicted from the LRU is read again from its folder when a request needs it (the request carries it)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from hfbridge.config import LoRAConfig
from hfbridge.lora.layers import LoRAGroup, LoRALayer, LoRAStepState
from hfbridge.lora.peft_folder import LoRAAdapter, LoRAAdapterError, read_peft_folder
from hfbridge.lora.request import LoRARequest
from hfbridge.lora.targets import install_lora_layers

# (adapter, first row, end row) of each request of a step that runs under an adapter, in step order
LoRARows = list[tuple[LoRARequest, int, int]]


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device):
        self.config, self.device = config, device
        self.state = LoRAStepState()
        self.layers: list[LoRALayer] = install_lora_layers(model, self.state, config, dtype, device)
        self.targets = {name: (layer, j) for layer in self.layers for j, name in enumerate(layer.names)}
        self.loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id per slot

    def add_adapter(self, request: LoRARequest) -> bool:
        """Read, check and keep an adapter (evicting the least recently used past max_cpu_loras); False when it
        was loaded already. Raises LoRAAdapterError (a ValueError) naming the adapter and the problem."""
        known = self.loaded.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_name != request.lora_name or known.request.lora_path != request.lora_path:
                raise LoRAAdapterError(
                    f"LoRA adapter {request.lora_name!r}: lora_int_id {request.lora_int_id} is already the id of "
                    f"adapter {known.request.lora_name!r} ({known.request.lora_path}); give each adapter its own id")
            self.loaded.move_to_end(request.lora_int_id)
            return False
        adapter = read_peft_folder(request, self.config.max_lora_rank)
        self._check_fits(adapter)
        while len(self.loaded) >= self.config.max_cpu_loras:
            self.remove_adapter(next(iter(self.loaded)))
        self.loaded[request.lora_int_id] = adapter
        return True

    def remove_adapter(self, lora_int_id: int) -> bool:
        if self.loaded.pop(lora_int_id, None) is None:
            return False
        if lora_int_id in self.slots:
            slot = self.slots.index(lora_int_id)
            self.slots[slot] = None
            for layer in self.layers:
                layer.clear_slot(slot)
        return True

    def adapter_ids(self) -> list[int]:
        return list(self.loaded)

    @contextlib.contextmanager
    def step(self, rows: LoRARows) -> Iterator[None]:
        """The step's adapters in slots and their row groups set for the layers, for the forward inside."""
        assert not self.state.groups, "LoRAManager.step does not nest"
        if not rows:
            yield
            return
        slot_of = self._activate([request for request, _, _ in rows])
        groups = _groups(rows, slot_of, self.device)
        self.state.span = span = _span(groups)
        if span is not None:  # each range also counted from the span's start, once per step
            groups = tuple(LoRAGroup(g.slot, g.rows, slice(g.rows.start - span[0], g.rows.stop - span[0]))
                           for g in groups)
        self.state.groups = groups
        try:
            yield
        finally:
            self.state.groups, self.state.span = (), None

    def _activate(self, requests: list[LoRARequest]) -> dict[int, int]:
        wanted = {r.lora_int_id: r for r in requests}
        if len(wanted) > len(self.slots):
            raise RuntimeError(f"a step holds {len(wanted)} adapters, more than max_loras={len(self.slots)} "
                               "(the scheduler admits no more)")
        for lora_int_id in wanted:  # most recently used: not evicted by the reloads below
            if lora_int_id in self.loaded:
                self.loaded.move_to_end(lora_int_id)
        for request in wanted.values():
            if request.lora_int_id not in self.loaded:  # evicted from the LRU since: read its folder again
                self.add_adapter(request)
        free = [s for s, held in enumerate(self.slots) if held not in wanted]
        for lora_int_id in wanted:
            if lora_int_id not in self.slots:
                self._fill(free.pop(0), self.loaded[lora_int_id])
        return {lora_int_id: self.slots.index(lora_int_id) for lora_int_id in wanted}

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for layer in self.layers:
            layer.set_slot(slot, [adapter.weights.get(name) for name in layer.names], adapter.scaling)
        self.slots[slot] = adapter.request.lora_int_id

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        name = adapter.request.lora_name
        for module, (a, b) in adapter.weights.items():
            target = self.targets.get(module)
            if target is None:
                kinds = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
                raise LoRAAdapterError(
                    f"LoRA adapter {name!r} targets {module!r}, which this model does not have as an adaptable "
                    f"projection (the model's projections: {', '.join(kinds)}); was it trained on another model?")
            layer, j = target
            want_in, want_out = layer.in_features, layer.out_sizes[j]
            if a.shape[1] != want_in or b.shape[0] != want_out:
                raise LoRAAdapterError(
                    f"LoRA adapter {name!r} does not fit this base model: {module} takes {want_in} inputs and gives "
                    f"{want_out} outputs, but the adapter's lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                    "was it trained on another base model?")


def _groups(rows: LoRARows, slot_of: dict[int, int], device: torch.device) -> tuple[LoRAGroup, ...]:
    """Row ranges per slot: one slice when a slot's rows are contiguous, else their indices. One pass over the
    step's requests; the layers never loop over rows."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for request, start, end in rows:
        spans = ranges.setdefault(slot_of[request.lora_int_id], [])
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    groups = []
    for slot, spans in ranges.items():
        if len(spans) == 1:
            groups.append(LoRAGroup(slot, slice(*spans[0])))
        else:
            index = torch.cat([torch.arange(start, end) for start, end in spans]).to(device)
            groups.append(LoRAGroup(slot, index))
    return tuple(groups)


def _span(groups: tuple[LoRAGroup, ...]) -> tuple[int, int] | None:
    """[lo, hi) when the groups are row ranges that follow one another (the scheduler orders a step's requests by
    adapter), else None."""
    if not all(isinstance(g.rows, slice) for g in groups):
        return None
    ranges = sorted((g.rows.start, g.rows.stop) for g in groups)
    if any(end != start for (_, end), (start, _) in zip(ranges, ranges[1:])):
        return None
    return ranges[0][0], ranges[-1][1]
