"""Which cache blocks each request holds; prefix-cache lookups over hashes of full blocks."""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from hfbridge.core.block_pool import BlockPool, KVCacheBlock
from hfbridge.core.request import Request


def first_parent_hash(request: Request) -> bytes | None:
    """The parent hash of a request's first block, from what changes its K/V besides the tokens: its cache_salt
    and its LoRA adapter. No block of another salt or adapter (or of none) can equal it; None for neither."""
    keys = []
    if request.cache_salt is not None:
        keys.append(b"cache_salt\0" + request.cache_salt.encode("utf-8", "surrogatepass"))
    lora = request.lora_request
    if lora is not None:
        keys.append(f"lora\0{lora.lora_int_id}\0{lora.lora_name}\0{lora.lora_path}".encode("utf-8", "surrogatepass"))
    if not keys:
        return None
    return hashlib.sha256(b"".join(len(key).to_bytes(8, "little") + key for key in keys)).digest()  # unambiguous


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained: a block's hash covers every token from the start of the sequence to its end."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already in the prefix cache
        # Blocks registered in the prefix cache since the step began: their K/V is written by that step, so
        # they are dropped from the cache if it fails (see drop_step_cached_blocks).
        self.step_cached_blocks: list[KVCacheBlock] = []
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks from the start of a (fresh or preempted) request.

        The last token is never a hit: its logits must be computed. Requests asking for prompt logprobs skip
        the cache, since logits of cached positions are not recomputed.
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        self._update_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count a prefix-cache lookup once, when its request is admitted (a request that must wait for blocks
        looks up again on every step)."""
        if self.enable_caching and not request.wants_prompt_logprobs:
            self.stats.queried_tokens += request.num_tokens
            self.stats.hit_tokens += num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens; None (nothing changed) when too few blocks are free."""
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Hit blocks nobody holds sit in the free queue: touching them takes them out of it.
        num_free_after_hits = self.pool.num_free_blocks - sum(b.ref_cnt == 0 for b in new_computed_blocks)
        if num_new_blocks > num_free_after_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(list(new_computed_blocks))
        blocks.extend(new_computed_blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return blocks

    def begin_step(self) -> None:
        """The previous step succeeded: the blocks it registered hold their K/V for good."""
        self.step_cached_blocks.clear()

    def drop_step_cached_blocks(self) -> None:
        """The step failed: the blocks it registered may hold no K/V; no later request may hit them."""
        for block in self.step_cached_blocks:
            self.pool.uncache_block(block)
        self.step_cached_blocks.clear()

    def uncache_step_blocks(self, request: Request) -> None:
        """A request scheduled this step is taken back before the step runs: the blocks it registered will
        not be written, so no later request may hit them."""
        held = {id(b) for b in self.req_to_blocks.get(request.request_id, ())}
        for block in [b for b in self.step_cached_blocks if id(b) in held]:
            self.pool.uncache_block(block)
            self.step_cached_blocks.remove(block)

    def free(self, request: Request) -> None:
        """Release a finished, aborted or preempted request's blocks; its tail blocks are evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.pool.free_blocks(list(reversed(blocks)))
        self.num_cached_blocks.pop(request.request_id, None)

    def _update_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while len(hashes) < request.num_tokens // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else first_parent_hash(request)
            images = request.mm_inputs
            if images is not None and i * bs <= images.first_position < (i + 1) * bs:
                # the block of the first image placeholder covers every image of the request; later blocks
                # chain from it
                parent = hashlib.sha256((parent or b"") + images.group_hash).digest()
            hashes.append(hash_block(parent, request.all_token_ids[i * bs : (i + 1) * bs]))

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Register blocks that are full once this step's tokens are written (attention writes K/V before it
        reads, so a request scheduled later in the same step may already hit them)."""
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        for i in range(start, num_full):
            if self.pool.cache_block(blocks[i], request.block_hashes[i]):
                self.step_cached_blocks.append(blocks[i])
        self.num_cached_blocks[request.request_id] = num_full
