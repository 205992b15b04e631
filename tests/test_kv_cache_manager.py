"""Block accounting and prefix caching, pure Python, no model."""
import pytest

from hfbridge.core.block_pool import BlockPool
from hfbridge.core.kv_cache_manager import KVCacheManager, hash_block
from hfbridge.core.request import Request

BS = 4


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens)


def allocate_prompt(kv: KVCacheManager, request: Request):
    hits, num_hit = kv.get_computed_blocks(request)
    blocks = kv.allocate_slots(request, request.num_tokens - num_hit, hits)
    if blocks is not None:
        kv.record_lookup(request, num_hit)
    request.num_computed_tokens = request.num_tokens if blocks is not None else 0
    return blocks, num_hit


def test_allocates_ceil_blocks_and_frees_all():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False)
    request = make_request("a", list(range(10)))  # 10 tokens -> 3 blocks
    blocks, _ = allocate_prompt(kv, request)
    assert len(blocks) == 3 and kv.num_free_blocks == 7
    # decode: token 11 still fits block 3, token 13 needs a fourth block
    for token in (10, 11):
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
    assert len(kv.get_block_ids("a")) == 3
    request.append_output_token(12)
    request.append_output_token(13)
    assert kv.allocate_slots(request, 2) is not None
    assert len(kv.get_block_ids("a")) == 4
    kv.free(request)
    assert kv.num_free_blocks == 10 and kv.get_block_ids("a") == []


def test_allocation_fails_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=3, block_size=BS, enable_caching=False)
    first = make_request("a", list(range(8)))
    allocate_prompt(kv, first)
    second = make_request("b", list(range(100, 110)))  # needs 3 blocks, 1 free
    assert kv.allocate_slots(second, 10) is None
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []


def test_prefix_hit_shares_blocks_and_never_covers_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prefix = list(range(12))  # three full blocks
    a = make_request("a", prefix + [50, 51])
    blocks_a, hit_a = allocate_prompt(kv, a)
    assert hit_a == 0
    b = make_request("b", prefix + [60])
    blocks_b, hit_b = allocate_prompt(kv, b)
    assert hit_b == 12
    assert [x.block_id for x in blocks_b[:3]] == [x.block_id for x in blocks_a[:3]]
    assert all(x.ref_cnt == 2 for x in blocks_a[:3])
    # a prompt that is exactly the cached prefix must still compute its last token
    c = make_request("c", prefix)
    _, hit_c = allocate_prompt(kv, c)
    assert hit_c == 8
    assert kv.stats.hit_tokens == 20 and kv.stats.queried_tokens == 14 + 13 + 12


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))  # 2 full blocks + 1
    allocate_prompt(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4  # cached blocks are free (reusable) ...
    b = make_request("b", list(range(9)))
    _, hit = allocate_prompt(kv, b)
    assert hit == 8  # ... and still hit after the owner finished
    kv.free(b)
    # A different prompt needing all 4 blocks evicts the cached ones.
    c = make_request("c", list(range(100, 116)))
    blocks, hit = allocate_prompt(kv, c)
    assert hit == 0 and len(blocks) == 4
    assert kv.pool.num_evictions >= 2 and not kv.pool.cached.keys() - {x.block_hash for x in blocks}
    kv.free(c)
    d = make_request("d", list(range(9)))
    assert allocate_prompt(kv, d)[1] == 0  # evicted: no hit


def test_eviction_takes_least_recently_freed_first():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache_block(block, bytes([i]))
    pool.free_blocks([blocks[2]])
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[3], blocks[1]])
    taken = pool.get_new_blocks(2)
    assert [b.block_id for b in taken] == [2, 0]
    assert pool.get_cached_block(bytes([2])) is None and pool.get_cached_block(bytes([3])) is blocks[3]


def test_touching_a_free_cached_block_removes_it_from_the_free_queue():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(9)))
    allocate_prompt(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)))
    hits, _ = kv.get_computed_blocks(b)
    # 2 hit blocks are free; b needs 1 more block: 3 free - 2 touched = 1 available -> fits
    assert kv.allocate_slots(b, 1, hits) is not None
    assert kv.num_free_blocks == 0


def test_hashes_chain_over_the_whole_prefix():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4]) == h1


def test_double_free_is_an_invariant_violation():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(AssertionError):
        pool.free_blocks([block])


def test_lora_adapter_and_cache_salt_are_part_of_the_block_hash():
    from hfbridge.lora.request import LoRARequest

    kv = KVCacheManager(num_blocks=32, block_size=BS)
    prompt = list(range(12)) + [99]
    sql, chat = LoRARequest("sql", 1, "/adapters/sql"), LoRARequest("chat", 2, "/adapters/chat")

    def hit(request_id, lora=None, salt=None):
        return allocate_prompt(kv, Request(request_id, prompt, cache_salt=salt, lora_request=lora))[1]

    assert hit("sql", sql) == 0
    assert hit("chat", chat) == 0, "another adapter never shares K/V"
    assert hit("base") == 0, "nor does the base model"
    assert hit("salted-sql", sql, salt="s") == 0, "salt and adapter together are a key of their own"
    assert hit("sql-again", sql) == 12 and hit("chat-again", chat) == 12 and hit("base-again") == 12
    assert hit("salted-sql-again", sql, salt="s") == 12
