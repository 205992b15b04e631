"""The native decoders' oneDNN-packed projections against the definition y = x @ W^T + b (float64 reference)."""
import pytest
import torch

from hfbridge.native_overrides import packed_linear
from hfbridge.native_overrides.packed_linear import PackedLinear, WeightPacks


def _reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.weight.double().T
    return (y + layer.bias.double() if layer.bias is not None else y).float()


@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_projection_matches_the_definition(tokens, bias):
    torch.manual_seed(tokens)
    layer = PackedLinear(96, 200, bias=bias)
    WeightPacks(layer).refresh()
    assert layer.packed is not None  # CPU float32 with oneDNN: the packed path is the one under test
    x = torch.randn(tokens, 96)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, _reference(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("in_features, out_features", [(96, 203), (576, 64), (40, 50)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_or_two_rows_match_the_definition(tokens, in_features, out_features, bias):
    """One or two rows take small_gemm.c (inputs a multiple of 16 wide; a last tile of fewer rows than the tile
    holds), the rest oneDNN; the same values either way."""
    assert packed_linear._small_gemm() is not None, "small_gemm.c did not build"
    torch.manual_seed(tokens + in_features)
    layer = PackedLinear(in_features, out_features, bias=bias)
    WeightPacks(layer).refresh()
    x = torch.randn(tokens, in_features)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, _reference(layer, x), rtol=1e-5, atol=1e-4)


def test_a_weight_changed_in_place_is_packed_again():
    """apply_model may edit a projection in place: the next refresh must lay the new weight out."""
    layer = PackedLinear(32, 48, bias=False)
    packs = WeightPacks(layer)
    packs.refresh()
    with torch.no_grad():
        layer.weight.mul_(-2)
    packs.refresh()
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-4)


def test_compiled_call_matches_eager():
    """Inside torch.compile the packed call stays one opaque op, for any token count with one graph."""
    layer = PackedLinear(64, 80, bias=True)
    WeightPacks(layer).refresh()
    compiled = torch.compile(lambda m, x: torch.nn.functional.silu(m(x)) * 2, dynamic=True)
    with torch.inference_mode():
        for tokens in (17, 19, 33, 1, 2):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(compiled(layer, x), torch.nn.functional.silu(_reference(layer, x)) * 2,
                                       rtol=1e-5, atol=1e-4)
