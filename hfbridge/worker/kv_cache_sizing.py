"""How many KV-cache blocks the memory budget buys, and the cache tensors themselves."""
from __future__ import annotations

import logging
import os

import torch

from hfbridge.config import CacheConfig, SchedulerConfig
from hfbridge.worker.layer_probe import LayerSpec

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 4 << 30


def bytes_per_block(layers: dict[int, LayerSpec], block_size: int) -> int:
    return sum(2 * block_size * s.num_kv_heads * s.head_dim * s.dtype.itemsize for s in layers.values())


def kv_memory_budget(cache_config: CacheConfig, device: torch.device) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        # Activation peak of the forwards run so far (probe) beyond what is allocated now.
        headroom = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        return int(total * cache_config.gpu_memory_utilization) - used_by_others - headroom
    if cache_config.kv_cache_memory_bytes is not None:
        return cache_config.kv_cache_memory_bytes
    return min(_DEFAULT_CPU_KV_BYTES, _available_ram() // 2)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def determine_num_blocks(
    layers: dict[int, LayerSpec], cache_config: CacheConfig, scheduler_config: SchedulerConfig, device: torch.device
) -> int:
    block_size = cache_config.block_size
    max_len = scheduler_config.max_model_len
    if cache_config.num_gpu_blocks_override is not None:
        num_blocks = cache_config.num_gpu_blocks_override
    else:
        budget = kv_memory_budget(cache_config, device)
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
    read only slots they wrote."""
    return {
        idx: torch.empty((2, num_blocks, block_size, s.num_kv_heads, s.head_dim), dtype=s.dtype, device=device)
        for idx, s in layers.items()
        if s.is_causal
    }
