"""The native LM head's laid-out CPU GEMMs against the definition logits = hidden @ W^T (float64 reference)."""
import pytest
import torch

from hfbridge.native_overrides.head_projection import HeadProjection


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_head_projection_matches_the_definition(rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(3000, 96, generator=gen)
    hidden = torch.randn(rows, 96, generator=gen)
    expected = (hidden.double() @ weight.double().T).float()
    with torch.inference_mode():
        got = HeadProjection(weight)(hidden)
    assert got.shape == (rows, 3000) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_a_weight_changed_in_place_is_seen():
    """apply_model may edit the head's weight in place: the laid-out copies must not serve stale logits."""
    weight = torch.randn(500, 32)
    head = HeadProjection(weight)
    assert head.is_current(weight)
    weight.mul_(-1)
    assert not head.is_current(weight)
    hidden = torch.randn(2, 32)
    torch.testing.assert_close(HeadProjection(weight)(hidden), (hidden.double() @ weight.double().T).float(),
                               rtol=1e-5, atol=1e-4)
