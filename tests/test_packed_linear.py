"""The native decoders' packed projections (hfbridge/csrc/panel_gemm.c) against the definition y = x @ W^T + b
(float64 reference)."""
import pytest
import torch

from hfbridge.native_overrides import packed_linear
from hfbridge.native_overrides.packed_linear import GateUpLinear, PackedLinear, WeightPacks


def _pack(layer: PackedLinear) -> WeightPacks:
    """Lay the layer out (its plain weight is released then), keeping a copy of the weight for _reference."""
    layer.reference_weight = layer.weight.detach().clone()
    packs = WeightPacks(layer)
    packs.refresh()
    return packs


def _reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(layer, "reference_weight", layer.weight)
    y = x.double() @ weight.double().T
    return (y + layer.bias.double() if layer.bias is not None else y).float()


def _silu_mul_reference(layer: GateUpLinear, x: torch.Tensor) -> torch.Tensor:
    """Transformers' LlamaMLP before down_proj: act_fn(gate_proj(x)) * up_proj(x), SiLU by its definition, in float64."""
    gate, up = _reference(layer, x).double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).float()


@pytest.mark.parametrize("tokens", [1, 2, 3, 13, 14, 15, 29, 64, 300, 400])
@pytest.mark.parametrize("in_features, out_features", [(96, 200), (576, 64), (40, 50), (7, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_projection_matches_the_definition(tokens, in_features, out_features, bias):
    """The build for this machine: row counts that take every micro-kernel height (1 to 14 with AVX-512, 1 to 6
    with AVX2), blocks of unequal height, and two row bands (400 > 384); widths with a short last panel and inputs
    of any width."""
    torch.manual_seed(tokens + in_features)
    layer = PackedLinear(in_features, out_features, bias=bias)
    _pack(layer)
    assert layer.packed is not None, "panel_gemm.c did not build: the packed path is the one under test"
    x = torch.randn(tokens, in_features)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, _reference(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_every_vector_width_matches_the_definition(vector_bytes):
    """The kernel as built for 4-, 8- and 16-float vectors (SSE / NEON, AVX2, AVX-512: panels of 8, 16 and 32
    columns, blocks of up to 6 or 14 rows), whatever this machine's own width is: each build must compute x @ W^T + b.
    A wider vector than the machine's runs split in register pairs: slow, but the same arithmetic."""
    lib = packed_linear._panel_gemm(vector_bytes)
    assert lib is not None, "panel_gemm.c did not build"
    columns = lib.panel_columns()
    assert columns == 2 * vector_bytes // 4
    torch.manual_seed(vector_bytes)
    layer = PackedLinear(40, 2 * columns + 3, bias=True)  # a last panel of 3 columns
    packed = packed_linear.lay_out(layer.weight, columns)
    for tokens in (1, 5, 6, 7, 13, 14, 15, 64, 400):
        x = torch.randn(tokens, 40)
        got = packed_linear.run_panel_gemm(lib, x, packed, layer.bias.detach(), layer.out_features)
        torch.testing.assert_close(got, _reference(layer, x), rtol=1e-5, atol=1e-4)


def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    """Batch invariance: the output row of a token does not depend on how many rows share the call, nor where."""
    torch.manual_seed(0)
    layer = PackedLinear(576, 200, bias=True)
    _pack(layer)
    x = torch.randn(400, 576)
    with torch.inference_mode():
        everything, middle, reversed_rows = layer(x), layer(x[3:70]), layer(x.flip(0))
        for i in (0, 5, 13, 14, 69, 383, 384, 399):
            alone = layer(x[i:i + 1])[0]
            assert torch.equal(everything[i], alone) and torch.equal(reversed_rows[399 - i], alone)
            if 3 <= i < 70:
                assert torch.equal(middle[i - 3], alone)


@pytest.mark.parametrize("cls", [PackedLinear, GateUpLinear])
def test_without_a_compiler_the_projection_is_plain_torch(monkeypatch, cls):
    """F.linear, and for the gate_up projection F.linear then SiLU-and-mul."""
    monkeypatch.setattr(packed_linear, "_panel_gemm", lambda: None)
    layer = cls(64, 48, bias=True)
    _pack(layer)
    assert layer.packed is None
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    if cls is GateUpLinear:
        gate, up = expected.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("cls", [PackedLinear, GateUpLinear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_panels_are_the_only_copy_and_give_the_weight_back(cls, dtype):
    """Once laid out, the plain weight is released (a meta stand-in of the same shape and dtype); plain_weights()
    reads back the very same values (a last panel of 3 columns), and releases them again after."""
    torch.manual_seed(2)
    layer = cls(40, 2 * 19 if cls is GateUpLinear else 35, bias=True).to(dtype)
    packs = _pack(layer)
    assert layer.packed is not None and layer.weight.is_meta
    assert (layer.weight.shape, layer.weight.dtype) == (layer.reference_weight.shape, dtype)
    with packs.plain_weights():
        assert torch.equal(layer.weight, layer.reference_weight)
        assert torch.equal(layer.state_dict()["weight"], layer.reference_weight)
    assert layer.weight.is_meta


def test_a_weight_changed_in_place_is_packed_again():
    """apply_model may edit a projection in place, with the plain weights given back: when it ends, the new weight
    is laid out."""
    layer = PackedLinear(32, 48, bias=False)
    packs = _pack(layer)
    with packs.plain_weights():
        with torch.no_grad():
            layer.weight.mul_(-2)
    layer.reference_weight.mul_(-2)
    assert layer.weight.is_meta
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-4)


def test_a_replaced_weight_is_packed_again():
    """... and so is a weight replaced by another tensor (a new Parameter, not an in-place edit)."""
    layer = GateUpLinear(32, 2 * 20, bias=True)
    packs = _pack(layer)
    new = torch.randn(40, 32)
    with packs.plain_weights():
        layer.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    layer.reference_weight = new
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _silu_mul_reference(layer, x), rtol=1e-5, atol=1e-4)


def test_a_gate_up_bias_changed_in_place_is_packed_again():
    """The fused gate_up keeps its bias in the panels' column order: an in-place edit of the bias alone (apply_model)
    must reach that copy too."""
    torch.manual_seed(5)
    layer = GateUpLinear(32, 2 * 40, bias=True)
    packs = _pack(layer)
    with packs.plain_weights():
        with torch.no_grad():
            layer.bias.add_(3.0)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _silu_mul_reference(layer, x), rtol=1e-5, atol=1e-4)


def test_compiled_call_matches_eager():
    """Inside torch.compile the packed call stays one opaque op, for any token count with one graph."""
    layer = PackedLinear(64, 80, bias=True)
    _pack(layer)
    compiled = torch.compile(lambda m, x: torch.nn.functional.silu(m(x)) * 2, dynamic=True)
    with torch.inference_mode():
        for tokens in (17, 19, 33, 1, 2):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(compiled(layer, x), torch.nn.functional.silu(_reference(layer, x)) * 2,
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 3, 14, 15, 64, 400])
@pytest.mark.parametrize("in_features, half", [(576, 1536), (40, 23), (7, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_with_silu_mul_matches_the_definition(tokens, in_features, half, bias):
    """The fused gate_up projection + SiLU-and-mul (panel_gemm_silu_mul): SmolLM2's MLP shape, and halves that are
    not a multiple of the vector width (a zero-padded last panel). Gates span +-20, where SiLU saturates both ways."""
    torch.manual_seed(tokens + half)
    layer = GateUpLinear(in_features, 2 * half, bias=bias)
    _pack(layer)
    assert layer.packed is not None, "panel_gemm.c did not build: the packed path is the one under test"
    x = torch.randn(tokens, in_features) * 20 / in_features**0.5
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (tokens, half)
    torch.testing.assert_close(got, _silu_mul_reference(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_gate_up_with_silu_mul_at_every_vector_width(vector_bytes):
    lib = packed_linear._panel_gemm(vector_bytes)
    assert lib is not None, "panel_gemm.c did not build"
    lanes = lib.panel_columns() // 2
    torch.manual_seed(vector_bytes)
    layer = GateUpLinear(40, 2 * (2 * lanes + 3), bias=True)  # a last panel of 3 outputs
    packed = packed_linear.lay_out(packed_linear.interleave_gate_up(layer.weight, lanes), 2 * lanes)
    packed_bias = packed_linear.interleave_gate_up(layer.bias, lanes)
    for tokens in (1, 6, 7, 14, 15, 64):
        x = torch.randn(tokens, 40)
        got = packed_linear.run_panel_gemm(lib, x, packed, packed_bias, 2 * lanes + 3, silu_mul=True)
        torch.testing.assert_close(got, _silu_mul_reference(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x,out_features,message", [
    (torch.randn(4, 24, dtype=torch.float64), 40, "float32"),
    (torch.randn(4, 16), 40, "do not match x's width"),
    (torch.randn(24), 40, r"x \[T, in\]"),
    (torch.randn(4, 24), 10_000, "exceeds"),
    (torch.randn(4, 24).bfloat16(), 40, "dtype torch.bfloat16"),  # float32 panels
])
def test_kernel_inputs_that_do_not_fit_the_panels_are_refused(x, out_features, message):
    lib = packed_linear._panel_gemm()
    assert lib is not None, "panel_gemm.c did not build: the kernel is the one under test"
    packed = packed_linear.pack_weight(torch.randn(40, 24))
    with pytest.raises(ValueError, match=message):
        packed_linear.run_panel_gemm(lib, x, packed, None, out_features)


@pytest.mark.parametrize("vector_bytes", [None, 16, 32, 64])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_bfloat16_panels_match_the_definition(vector_bytes, silu_mul):
    """Bfloat16 weights and activations (a bfloat16 model): the definition in float64 on the same bfloat16 values,
    within one bfloat16 rounding of the result, at 1, 7, 64 and 2048 rows and odd sizes; the build for this machine
    (None) and for every vector width."""
    lib = packed_linear._panel_gemm(vector_bytes)
    assert lib is not None, "panel_gemm.c did not build"
    lanes = lib.panel_columns() // 2
    torch.manual_seed(11)
    cls = GateUpLinear if silu_mul else PackedLinear
    layer = cls(333, 2 * 289 if silu_mul else 577, bias=True).bfloat16()
    if silu_mul:
        packed = packed_linear.lay_out(packed_linear.interleave_gate_up(layer.weight, lanes), 2 * lanes)
        bias = packed_linear.interleave_gate_up(layer.bias, lanes)
    else:
        packed, bias = packed_linear.lay_out(layer.weight, 2 * lanes), layer.bias.detach()
    assert packed.dtype == torch.bfloat16
    for tokens in (1, 7, 64, 2048):
        x = torch.randn(tokens, 333).bfloat16()
        out_features = layer.out_features // 2 if silu_mul else layer.out_features
        got = packed_linear.run_panel_gemm(lib, x, packed, bias, out_features, silu_mul=silu_mul)
        want = _silu_mul_reference(layer, x) if silu_mul else _reference(layer, x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want.double(), rtol=2**-8, atol=1e-3)


def test_bfloat16_layer_packs_and_runs_the_kernel():
    layer = PackedLinear(64, 40, bias=False).bfloat16()
    _pack(layer)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16
    x = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(layer(x).double(), _reference(layer, x).double(), rtol=2**-8, atol=1e-3)
