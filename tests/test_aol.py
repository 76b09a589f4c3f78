"""AOL-specific facts (the conformance suite covers the generic layer promises): the paper's
theorem ||P D|| <= 1 shows in the computed bound, a conv's |P^T P| is the kernel's absolute
autocorrelation, dead channels give no NaN, and the bound does not trust the rescaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.layers import aol
from certify.layers.aol import AOLConv2d, AOLLinear, aol_conv_kernel, aol_matrix
from certify.layers.norms import conv_norm_bound, linear_norm_bound


def _jacobian_norm(fn, shape) -> float:
    x0 = torch.zeros((1, *shape), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x0.flatten())
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.mark.parametrize("out_ch,in_ch,k,size", [(4, 4, 3, (5, 5)), (3, 7, 3, (6, 4)), (8, 2, 5, (7, 7)),
                                                 (5, 5, 1, (3, 3)), (6, 6, 3, (8, 8))])
def test_rescaled_random_kernels_have_norm_at_most_one(out_ch, in_ch, k, size):
    gen = torch.Generator().manual_seed(out_ch * 100 + in_ch * 10 + k)
    for scale in (1e-3, 1.0, 1e3):
        p = torch.randn(out_ch, in_ch, k, k, generator=gen) * scale
        assert conv_norm_bound(aol_conv_kernel(p), size, padding=k // 2) <= 1 + 1e-6


def test_rescaled_random_matrices_have_norm_at_most_one():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((6, 6), (3, 9), (9, 3), (1, 5)):
        p = torch.randn(rows, cols, generator=gen) * 10
        assert linear_norm_bound(aol_matrix(p)) <= 1 + 1e-6


def test_conv_rescaling_is_the_row_sums_of_the_dense_operators_gram_matrix():
    """|P^T P| of the convolution as one matrix, at an input pixel far from the border, has the
    row sums that the autocorrelation gives (paper, Theorem 2): d = those sums^(-1/2)."""
    gen = torch.Generator().manual_seed(1)
    out_ch, in_ch, k, n = 3, 2, 3, 9
    p = torch.randn(out_ch, in_ch, k, k, generator=gen, dtype=torch.float64)
    conv = lambda v: F.conv2d(v.view(1, in_ch, n, n), p, padding=k // 2).flatten()  # noqa: E731
    m = torch.autograd.functional.jacobian(conv, torch.zeros(in_ch * n * n, dtype=torch.float64))
    gram = (m.T @ m).abs().view(in_ch, n, n, in_ch * n * n)
    centre_sums = gram[:, n // 2, n // 2].sum(dim=1)  # one row per input channel, at the centre pixel
    d = aol_conv_kernel(p)[0, :, k // 2, k // 2] / p[0, :, k // 2, k // 2]
    assert torch.allclose(d, centre_sums.rsqrt(), rtol=1e-12)


def test_a_dead_channel_gives_no_nan_and_stays_bounded():
    layer = AOLConv2d(4, 3, 3)
    with torch.no_grad():
        layer.weight[:, 1] = 0  # input channel 1 is read by no filter
        layer.bias.fill_(0.5)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()
    assert torch.equal(layer.kernel()[:, 1], torch.zeros(3, 3, 3))
    assert layer.lipschitz_bound((5, 5)) <= 1 + 1e-6
    with torch.no_grad():
        layer.weight.zero_()  # every channel dead: the layer is its bias
    assert torch.equal(layer(x), torch.full((2, 3, 5, 5), 0.5))
    assert layer.lipschitz_bound((5, 5)) == 0.0
    dense = AOLLinear(4, 2)
    with torch.no_grad():
        dense.weight[:, 0] = 0
    assert torch.isfinite(dense(torch.randn(3, 4))).all() and dense.lipschitz_bound() <= 1 + 1e-6


def test_the_bound_does_not_trust_the_rescaling(monkeypatch):
    """A rescaling bug (d doubled) makes the layer 2-Lipschitz: the bound, computed from the
    kernel actually applied, says so."""
    right = aol.aol_scale
    monkeypatch.setattr(aol, "aol_scale", lambda sums: 2 * right(sums))
    layer = AOLConv2d(3, 3, 3).double().eval()
    exact = _jacobian_norm(layer, (3, 4, 4))
    assert exact > 1.9
    assert layer.lipschitz_bound((4, 4)) >= exact
    dense = AOLLinear(5, 5).double().eval()
    assert dense.lipschitz_bound() >= _jacobian_norm(dense, (5,)) > 1.9
