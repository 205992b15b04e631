"""How many KV-cache blocks the memory budget buys, and the cache tensors themselves."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hfbridge.config import CacheConfig, SchedulerConfig
from hfbridge.worker.layer_probe import LayerSpec

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 4 << 30


def bytes_per_block(layers: dict[int, LayerSpec], block_size: int) -> int:
    return sum(2 * block_size * s.num_kv_heads * s.head_dim * s.dtype.itemsize for s in layers.values())


@dataclass(frozen=True)
class DeviceMemory:
    total: int
    free: int  # as the driver sees it: other processes, the CUDA context and torch's cached pool are not free
    allocated: int  # held by live tensors now (weights, buffers)
    peak_allocated: int  # the highest `allocated` since the peak was reset (during the profiled step)


class DeviceMemoryProbe(Protocol):
    def reset_peak(self) -> None: ...

    def release_cached(self) -> None: ...

    def snapshot(self) -> DeviceMemory: ...


class CudaMemoryProbe:
    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def release_cached(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def snapshot(self) -> DeviceMemory:
        free, total = torch.cuda.mem_get_info(self.device)
        return DeviceMemory(
            total, free, torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        )


def gpu_kv_budget(memory: DeviceMemory, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache: the engine's share of the device (total x utilization), less what is used
    now (weights, context, other processes: total - free), less the activation peak of a full step beyond what
    stays allocated (peak - allocated)."""
    used_now = memory.total - memory.free
    activation_peak = memory.peak_allocated - memory.allocated
    return int(memory.total * gpu_memory_utilization) - used_now - activation_peak


def profiled_gpu_kv_budget(profile_step: Callable[[], None], gpu_memory_utilization: float,
                           probe: DeviceMemoryProbe) -> int:
    """Run the largest step the scheduler can send (profile_step), then size the budget from its peak, so the
    first long prefill cannot run out of memory (vLLM's determine_available_memory)."""
    probe.reset_peak()
    profile_step()
    probe.release_cached()  # the step's freed activations must not count twice (as used and as peak)
    return gpu_kv_budget(probe.snapshot(), gpu_memory_utilization)


def kv_memory_budget(
    cache_config: CacheConfig, device: torch.device, profile_step: Callable[[], None] | None = None,
    probe: DeviceMemoryProbe | None = None,
) -> int:
    if device.type == "cuda":
        return profiled_gpu_kv_budget(
            profile_step or (lambda: None), cache_config.gpu_memory_utilization, probe or CudaMemoryProbe(device)
        )
    if cache_config.kv_cache_memory_bytes is not None:
        return cache_config.kv_cache_memory_bytes
    return min(_DEFAULT_CPU_KV_BYTES, _available_ram() // 2)


def _available_ram() -> int:
    """Memory the system can give without swapping (Linux's MemAvailable; macOS and Windows have no sysconf for it)."""
    import psutil

    return int(psutil.virtual_memory().available)


def determine_num_blocks(
    layers: dict[int, LayerSpec], cache_config: CacheConfig, scheduler_config: SchedulerConfig, device: torch.device,
    profile_step: Callable[[], None] | None = None, probe: DeviceMemoryProbe | None = None,
) -> int:
    """profile_step (GPU only): runs a full max_num_batched_tokens step before the free memory is read."""
    block_size = cache_config.block_size
    max_len = scheduler_config.max_model_len
    if cache_config.num_gpu_blocks_override is not None:
        num_blocks = cache_config.num_gpu_blocks_override
    else:
        budget = kv_memory_budget(cache_config, device, profile_step, probe)
        num_blocks = max(budget, 0) // bytes_per_block(layers, block_size)
        # More blocks than all sequences can hold at once would only keep more cached prefixes.
        useful = scheduler_config.max_num_seqs * -(-max_len // block_size)
        if num_blocks > useful:
            logger.info("KV cache: using %d blocks (enough for max_num_seqs full-length sequences)", useful)
            num_blocks = useful
    if num_blocks * block_size < max_len:
        raise ValueError(
            f"The KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}) but "
            f"max_model_len is {max_len}: raise kv_cache_memory_bytes (CPU) or gpu_memory_utilization (GPU), or "
            f"lower max_model_len to at most {num_blocks * block_size}"
        )
    return num_blocks


def allocate_kv_caches(
    layers: dict[int, LayerSpec], num_blocks: int, block_size: int, device: torch.device
) -> dict[int, torch.Tensor]:
    """Per layer [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V). Left uninitialised: backends
    read only slots they wrote. (On CPU the executor makes the memory resident: page_prefault.py.)"""
    caches = {
        idx: torch.empty((2, num_blocks, block_size, s.num_kv_heads, s.head_dim), dtype=s.dtype, device=device)
        for idx, s in layers.items()
        if s.is_causal
    }
    return caches
