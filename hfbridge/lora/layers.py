"""The LoRA part of a projection: `max_loras` slots of stacked A and B, and the grouped shrink/expand.

A projection y = x W^T gets y += (x A^T) B^T for the rows of each adapter (scaling folded into B). The rows of a
step are grouped by slot once per step (LoRAStepState); each layer then runs one shrink and one expand per group
(vLLM's SGMV / BGMV), as torch matmuls: no per-row loop, and no merged weights, so one batch mixes adapters and
rows without one.

A layer may hold several output slices (the native decoders' fused qkv_proj: q, k, v; gate_up_proj: gate, up):
slice j owns ranks [j R, j R + r) of A and its output rows of B (B is block-diagonal), so the fused projection
still takes one shrink and one expand per group.

Tensor parallel (a layer over a sharded module): a colwise module keeps its output rows of B, a rowwise module its
input columns of A, and the shrink is summed over the ranks before the expand ((sum_i x_i A_i^T) B^T = x A^T B^T)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAGroup:
    slot: int
    rows: slice | torch.Tensor  # the step's token rows under this slot's adapter: a range, or their indices [n]
    local: slice | None = None  # rows as a range from the start of the step's span (LoRAStepState.span)


SMALL_SPAN = 16  # rows under adapters up to which one shrink against every slot beats one per group


class LoRAStepState:
    """This step's row groups, shared by every LoRA layer of a model (set by LoRAManager.step)."""

    def __init__(self):
        self.groups: tuple[LoRAGroup, ...] = ()
        self.span: tuple[int, int] | None = None  # [lo, hi) when the groups are ranges that tile it, in order


@dataclass(frozen=True)
class ShardedIO:
    """A sharded module's local part: output row ranges (colwise) or input column ranges (rowwise) of the full
    weight, and for rowwise the group to sum the shrink over."""

    out_ranges: tuple[tuple[int, int], ...] | None = None
    in_ranges: tuple[tuple[int, int], ...] | None = None
    tp: object | None = None  # parallel.state.TPGroup (rowwise): all_reduce


class LoRALayer:
    """The slots of one projection. names: the Transformers module name of each output slice (what PEFT keys
    adapters by); out_sizes: each slice's full output size; in_features: the full input size."""

    def __init__(self, state: LoRAStepState, names: list[str], in_features: int, out_sizes: list[int],
                 num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 sharded: ShardedIO | None = None):
        self.state, self.names, self.sharded = state, names, sharded or ShardedIO()
        self.in_features, self.out_sizes, self.max_rank = in_features, out_sizes, max_rank
        local_in = _local_size(in_features, self.sharded.in_ranges)
        self.out_offsets = [0]
        for size in out_sizes:  # colwise shards have one slice (Transformers' modules are unfused)
            self.out_offsets.append(self.out_offsets[-1] + _local_size(size, self.sharded.out_ranges))
        width = len(names) * max_rank
        self.lora_a = torch.zeros(num_slots, width, local_in, dtype=dtype, device=device)  # [S, n R, in]
        # B transposed: [S, n R, out], so a slot's first w ranks are one contiguous [w, out] block for addmm
        self.lora_b_t = torch.zeros(num_slots, width, self.out_offsets[-1], dtype=dtype, device=device)
        self.widths = [0] * num_slots  # ranks in use per slot (0: the slot's adapter does not touch this layer)
        # per slot, the views the per-group matmuls take (made once: a view costs as much as a small matmul's call)
        self.a_t = [self.lora_a[slot].T for slot in range(num_slots)]  # [in, W]
        self.b_t_used = [self.lora_b_t[slot, :0] for slot in range(num_slots)]  # [w, out]

    def set_slot(self, slot: int, pieces: list[tuple[torch.Tensor, torch.Tensor] | None], scaling: float) -> None:
        """pieces: per output slice, the adapter's (A [r, in], B [out, r]) at full size, or None."""
        self.lora_a[slot].zero_()
        self.lora_b_t[slot].zero_()
        width, r_max = 0, self.max_rank
        for j, piece in enumerate(pieces):
            if piece is None:
                continue
            a, b = piece
            r = a.shape[0]
            self.lora_a[slot, j * r_max : j * r_max + r] = _take(a, self.sharded.in_ranges, dim=1)
            columns = slice(self.out_offsets[j], self.out_offsets[j + 1])
            b_local = _take(b, self.sharded.out_ranges, dim=0) * scaling  # [out_j, r]
            self.lora_b_t[slot, j * r_max : j * r_max + r, columns] = b_local.T
            width = j * r_max + r
        self.widths[slot] = width
        self.b_t_used[slot] = self.lora_b_t[slot, :width]

    def clear_slot(self, slot: int) -> None:
        self.widths[slot] = 0

    @property
    def is_active(self) -> bool:
        return bool(self.state.groups)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [..., in], out [..., out] = the base projection of x: returns out plus each group's adapter delta."""
        groups = self.state.groups
        if not groups:
            return out
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if self.state.span is not None:
            self._one_span(x2, out2, groups, self.state.span)
            return out
        if self.sharded.tp is not None:
            self._rowwise(x2, out2, groups)
            return out
        for group in groups:
            width = self.widths[group.slot]
            if width:
                shrunk = x2[group.rows] @ self.lora_a[group.slot, :width].T  # [n, w]
                _add_rows(out2, group.rows, shrunk, self.lora_b_t[group.slot, :width])
        return out

    def _one_span(self, x2: torch.Tensor, out2: torch.Tensor, groups: tuple[LoRAGroup, ...],
                  span: tuple[int, int]) -> None:
        """The groups tile rows [lo, hi) (the scheduler keeps each adapter's requests together), so every group is
        a range: per group one shrink of its rows and one in-place expand (addmm_), no gather or scatter. A few
        rows under several adapters (decode of a small batch) shrink against every slot at once instead: one
        matmul instead of G, the wasted columns costing less than the calls."""
        lo, hi = span
        num_slots, width = self.lora_a.shape[:2]
        every_slot = len(groups) > 1 and hi - lo <= SMALL_SPAN
        if every_slot:
            shrunk = x2[lo:hi] @ self.lora_a.view(num_slots * width, -1).T  # [hi - lo, S W]
        else:
            shrunk = x2.new_empty(hi - lo, width)  # [hi - lo, W]: each group's rows against its own slot
            for group in groups:
                torch.matmul(x2[group.rows], self.a_t[group.slot], out=shrunk[group.local])
        if self.sharded.tp is not None:  # rowwise: partial sums over the local inputs; every rank enters it
            shrunk = self.sharded.tp.all_reduce(shrunk)
        for group in groups:
            used = self.widths[group.slot]
            if used:
                first = group.slot * width if every_slot else 0
                out2[group.rows].addmm_(shrunk[group.local, first : first + used], self.b_t_used[group.slot])

    def _rowwise(self, x2: torch.Tensor, out2: torch.Tensor, groups: tuple[LoRAGroup, ...]) -> None:
        # Every rank runs the same groups and widths: the all-reduce is entered by all of them.
        shrunk = x2.new_zeros(x2.shape[0], self.lora_a.shape[1])  # [T, n R]
        for group in groups:
            width = self.widths[group.slot]
            if width:
                shrunk[group.rows, :width] = x2[group.rows] @ self.lora_a[group.slot, :width].T
        shrunk = self.sharded.tp.all_reduce(shrunk)
        for group in groups:
            width = self.widths[group.slot]
            if width:
                _add_rows(out2, group.rows, shrunk[group.rows, :width], self.lora_b_t[group.slot, :width])


def _add_rows(out: torch.Tensor, rows: slice | torch.Tensor, shrunk: torch.Tensor, b_t: torch.Tensor) -> None:
    """out[rows] += shrunk @ b_t (the expand): in place on a range of rows, one op; scattered rows (the scheduler
    keeps an adapter's requests together, so rarely) through index_put_."""
    if isinstance(rows, slice):
        out[rows].addmm_(shrunk, b_t)
    else:
        out.index_put_((rows,), shrunk @ b_t, accumulate=True)


def _local_size(size: int, ranges: tuple[tuple[int, int], ...] | None) -> int:
    return size if ranges is None else sum(stop - start for start, stop in ranges)


def _take(t: torch.Tensor, ranges: tuple[tuple[int, int], ...] | None, dim: int) -> torch.Tensor:
    if ranges is None:
        return t
    return torch.cat([t.narrow(dim, start, stop - start) for start, stop in ranges], dim=dim)
