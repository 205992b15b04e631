"""The Triton backend equals the torch reference backend (the oracle), run by Triton's CPU interpreter.

Every case draws fresh random inputs, poisons the output and every unused cache slot with NaN (an element a
kernel forgets to write, or a key it reads outside the context, fails the comparison), runs both backends on
copies of one cache, and compares outputs within dtype tolerance and caches exactly.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates hfbridge's kernels (read at decoration time)

import importlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hfbridge.attention_backends import triton_kernels  # noqa: E402
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions  # noqa: E402
from hfbridge.attention_backends.torch_backend import TorchReferenceBackend  # noqa: E402
from hfbridge.attention_backends.torch_backend import write_kv as reference_write_kv  # noqa: E402
from hfbridge.attention_backends.triton_backend import TritonAttentionBackend  # noqa: E402

if not triton_kernels.INTERPRETED:  # another module imported the kernels before the variable was set
    importlib.reload(triton_kernels)

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}  # rtol, atol

# Batches: (num_cached, num_new) per request. Prefixes end mid-block for every block size used.
MIXED = ((0, 19), (21, 12), (37, 1), (5, 1), (70, 1))  # fresh prefill, prefill after a prefix, three decodes
DECODES = ((100, 1), (3, 1), (47, 1), (1, 1))
PREFILLS = ((0, 17), (48, 16), (33, 9))
ENCODER = ((0, 13), (0, 20), (0, 1))


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    requests: tuple[tuple[int, int], ...] = MIXED
    sliding_window: int | None = None
    softcap: float | None = None
    is_causal: bool = True
    use_cache: bool = True
    decode_splits: int = 1
    share_first_block: bool = False  # request 1 reads its prefix from a block request 0 writes in this step

    def __str__(self) -> str:
        parts = [str(self.dtype).removeprefix("torch."), f"h{self.num_heads}/{self.num_kv_heads}",
                 f"d{self.head_dim}", f"bs{self.block_size}", f"req{len(self.requests)}", f"s{self.decode_splits}"]
        parts += [f"win{self.sliding_window}"] if self.sliding_window else []
        parts += [f"cap{self.softcap}"] if self.softcap else []
        parts += [] if self.is_causal else ["noncausal"]
        parts += [] if self.use_cache else ["nocache"]
        parts += ["shared"] if self.share_first_block else []
        return "-".join(parts)


def _main_grid() -> list[Case]:
    """Every head dim x (MHA, GQA, MQA) on a mixed batch, each in one dtype, chosen so that every pair of dtype,
    head dim and head layout meets (a pairwise cover of the 3 x 5 x 3 product: 15 cases, not 45); block size and
    decode splits rotate through the grid the same way."""
    dtypes, head_dims = (torch.float32, torch.float16, torch.bfloat16), (64, 80, 96, 128, 256)
    heads, block_sizes, splits = ((4, 4), (6, 2), (8, 1)), (16, 32, 64), (1, 2, 4)
    cases = []
    for (j, head_dim), (k, (h, hkv)) in itertools.product(enumerate(head_dims), enumerate(heads)):
        cases.append(Case(dtypes[(j + k) % 3], h, hkv, head_dim, block_sizes[(j + 2 * k) % 3],
                          decode_splits=splits[(2 * j + k) % 3]))
    return cases


def _feature_grid() -> list[Case]:
    base = Case(torch.float32, 4, 2, 64, 16, decode_splits=2)
    features = [
        dict(sliding_window=8),
        dict(sliding_window=1),  # a query sees only itself
        dict(softcap=5.0),
        dict(sliding_window=6, softcap=2.0, block_size=32),
        dict(is_causal=False),
        dict(is_causal=False, sliding_window=5),
        dict(is_causal=False, use_cache=False, requests=ENCODER),
        dict(use_cache=False, requests=ENCODER, sliding_window=7),
        dict(is_causal=False, use_cache=False, requests=ENCODER, sliding_window=2),  # two-sided (ModernBERT)
    ]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return [replace(base, dtype=dtype, **f) for f, dtype in itertools.product(features, dtypes)]


def _batch_grid() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases += [
            Case(dtype, 4, 2, 64, 16, requests=DECODES, decode_splits=1),
            Case(dtype, 4, 2, 64, 16, requests=DECODES, decode_splits=8),  # more splits than key tiles
            Case(dtype, 8, 2, 128, 32, requests=DECODES, decode_splits=4, sliding_window=40),
            Case(dtype, 4, 1, 64, 16, requests=PREFILLS),
            Case(dtype, 4, 2, 64, 128, requests=MIXED, decode_splits=2),
            Case(dtype, 4, 2, 64, 16, requests=((0, 20), (16, 5), (9, 1)), share_first_block=True),
        ]
    return cases


def _poisoned_inputs(case: Case, gen: torch.Generator):
    """Random q/k/v laid out as the "vllm" entry passes them ([T, H, D] views of [H, T, D]), a NaN cache whose
    cached prefixes hold random K/V, and the step's metadata."""
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    blocks_needed = [-(-(c + n) // bs) for c, n in case.requests]
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay NaN
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, taken = [], [], 0
    for i, n in enumerate(blocks_needed):
        tables.append(order[taken : taken + n])
        taken += n
    if case.share_first_block:  # request 1's first (prefix) block is the one request 0 fills now
        tables[1][0] = tables[0][0]
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=case.dtype)
    flat = cache.view(2, -1, hkv, d)
    for r, (table, (cached, new)) in enumerate(zip(tables, case.requests)):
        positions = [table[p // bs] * bs + p % bs for p in range(cached + new)]
        if not (case.share_first_block and r == 1):
            flat[:, positions[:cached]] = torch.randn(2, cached, hkv, d, generator=gen).to(case.dtype)
        slots += positions[cached:]
    num_tokens = len(slots)
    q, k, v = (torch.randn(h, num_tokens, d, generator=gen).to(case.dtype).transpose(0, 1)
               for h in (case.num_heads, hkv, hkv))
    metadata = AttentionMetadata.build(
        slot_mapping=slots, query_lens=[n for _, n in case.requests], seq_lens=[c + n for c, n in case.requests],
        block_tables=tables,
    )
    return q, k, v, (cache if case.use_cache else None), metadata


def _run_case(case: Case) -> float:
    """Max abs error of the Triton backend against the reference on fresh inputs; asserts within tolerance."""
    assert case.use_cache or all(c == 0 for c, _ in case.requests)
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    q, k, v, cache, metadata = _poisoned_inputs(case, gen)
    layer = LayerOptions(0, case.head_dim**-0.5, case.sliding_window, case.softcap, case.is_causal)
    ref_cache = None if cache is None else cache.clone()
    expected = TorchReferenceBackend().forward(q, k, v, ref_cache, metadata, layer)
    out = torch.full(q.shape, float("nan"), dtype=case.dtype)
    got = TritonAttentionBackend(case.decode_splits).forward(q, k, v, cache, metadata, layer, out=out)
    assert got is out
    rtol, atol = TOLERANCE[case.dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)
    if cache is not None:
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)
    return (got.float() - expected.float()).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("case", _main_grid(), ids=str)
def test_matches_reference_grid(case, record_property):
    record_property("max_abs_err", _run_case(case))


@pytest.mark.parametrize("case", _feature_grid() + _batch_grid(), ids=str)
def test_matches_reference_features(case, record_property):
    record_property("max_abs_err", _run_case(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim", [(2, 80), (1, 128), (3, 64)])
def test_write_kv_kernel_equals_reference(dtype, num_kv_heads, head_dim):
    """Exact copy into the slots named, -1 skipped, nothing else touched (the NaN poison survives)."""
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, cache = 11, torch.full((2, 5, 16, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    slots = torch.randperm(5 * 16, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    k, v = (torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen).to(dtype).transpose(0, 1)
            for _ in range(2))
    expected = cache.clone()
    reference_write_kv(expected, k, v, slots)
    triton_kernels.write_kv(cache, k, v, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
    num_written = 2 * (num_tokens - 2) * num_kv_heads * head_dim  # K and V of the 9 tokens with a slot
    assert cache.isnan().sum() == cache.numel() - num_written


def test_decode_num_splits_heuristic():
    assert triton_kernels.decode_num_splits(64, 8, 4096, torch.device("cpu")) == 1  # no GPU: one split


E2E_SCRIPT = """
import json, sys
from hfbridge import LLM, SamplingParams
folder, backend, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# A small token budget forces chunked prefill: steps mix prefill chunks after a cached prefix with decodes.
llm = LLM(model=folder, model_impl="transformers", dtype="float32", block_size=16, max_model_len=128,
          max_num_seqs=4, max_num_batched_tokens=24, enable_chunked_prefill=True, attention_backend=backend)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10))
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def _reference(folder, prompts: list[list[int]]) -> list[list[int]]:
    """The torch backend's tokens, in this process (no Triton involved)."""
    from hfbridge import LLM, SamplingParams

    llm = LLM(model=str(folder), model_impl="transformers", dtype="float32", block_size=16, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=24, enable_chunked_prefill=True, attention_backend="torch")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _generate(folder, backend: str, prompts: list[list[int]]) -> list[list[int]]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", E2E_SCRIPT, str(folder), backend, json.dumps(prompts)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM"])  # Gemma2: sliding window + softcap
def test_greedy_tokens_equal_torch_backend(arch, tmp_path):
    """A tiny model generates the same greedy tokens on the interpreted Triton kernels as on the reference. The
    Triton run is a fresh process, so the interpreter setting does not depend on test order."""
    from tiny_models import build_tokenizer, make_tiny_model

    _, folder = make_tiny_model(arch, tmp_path / arch)
    tok = build_tokenizer()
    texts = ["Hello", "Once upon a time there was a little robot who loved to read books and",
             "The capital of France is Paris. The capital of Italy is"]
    prompts = [tok(t).input_ids for t in texts]
    assert max(map(len, prompts)) > 16  # prompts span several cache blocks
    assert _generate(folder, "triton", prompts) == _reference(folder, prompts)
