"""SLL-specific facts (the conformance suite covers the generic layer promises): the published
epsilon variant is not 1-Lipschitz while ours is and its bound catches the variant; the bound
stays at 1 for random weights and q and covers the Jacobian at many points (the suite checks a
"convolution" at one point only); the Jacobian is symmetric with eigenvalues in [1 - 2u^2, 1];
q really enters the conv T; dead channels and bad baked tensors are handled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from certify.errors import NotLipschitzError
from certify.layers.sll import (
    BakedSLL,
    BakedSLLDense,
    SLLConv2d,
    SLLLinear,
    sll_conv_scale,
    sll_dense_forward,
)

SLACK = 1 + 1e-9


def _jacobian(fn, x0: torch.Tensor) -> torch.Tensor:
    shape = x0.shape[1:]
    return torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x0.flatten())


def _max_jacobian_norm(fn, shape, points: int, seed: int, spread: float = 1.0) -> float:
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x0 = torch.randn((1, *shape), generator=gen, dtype=torch.float64) * spread
        best = max(best, float(torch.linalg.matrix_norm(_jacobian(fn, x0), ord=2)))
    return best


def _epsilon_variant_inverse_t(weight: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """T^-1 of the first public SLL code: T_ii = sum_j |W^T W|_ij |q_j| / (|q_i| + eps)."""
    qa = q.abs()
    return 1 / ((weight @ weight.T).abs() * qa[None, :] / (qa[:, None] + eps)).sum(dim=1)


def test_the_epsilon_variant_is_not_1_lipschitz_ours_is_and_our_bound_catches_it():
    # one inner channel, |q| = eps: the variant halves T, so J = I - 4 w w^T / ||w||^2 (norm 3)
    weight = torch.tensor([[0.6, -0.8]], dtype=torch.float64)  # W^T, (inner=1, features=2)
    bias = torch.tensor([0.0], dtype=torch.float64)
    q, eps = torch.tensor([1e-6], dtype=torch.float64), 1e-6
    scale_eps = _epsilon_variant_inverse_t(weight, q, eps)
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # W^T x0 = 1.4 > 0: the ReLU passes
    variant = float(torch.linalg.matrix_norm(_jacobian(lambda v: sll_dense_forward(v, weight, bias, scale_eps), x0),
                                             ord=2))
    assert variant == pytest.approx(3.0, rel=1e-9)

    ours = SLLLinear(2, 2, inner=1).double().eval()
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.zero_()
        ours.log_q.fill_(math.log(1e-6))  # the same q
    exact = float(torch.linalg.matrix_norm(_jacobian(ours, x0), ord=2))
    assert exact == pytest.approx(1.0, rel=1e-12)  # J = I - 2 w w^T: a reflection
    assert exact <= ours.lipschitz_bound() * SLACK and ours.lipschitz_bound() <= 1 + 1e-6

    # the same tensors with the variant's T^-1, baked: our bound is computed from the T^-1
    # applied, so it certifies 3, not 1
    baked = BakedSLLDense(2, 1).double()
    baked.weight, baked.bias, baked.scale = weight.clone(), bias.clone(), scale_eps.clone()
    assert baked.lipschitz_bound() >= variant / SLACK
    assert baked.lipschitz_bound() == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("channels,inner,k,size", [(4, 4, 3, (5, 5)), (3, 7, 3, (4, 6)), (5, 2, 5, (7, 7)),
                                                   (6, 6, 1, (3, 3))])
def test_conv_bound_is_one_for_random_weights_and_q_and_covers_the_jacobian(channels, inner, k, size):
    gen = torch.Generator().manual_seed(channels * 100 + inner * 10 + k)
    layer = SLLConv2d(channels, channels, k, inner_channels=inner).double().eval()
    for trial in range(3):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 10**trial)
            layer.bias.copy_(torch.randn(inner, generator=gen))
            layer.log_q.copy_(torch.randn(inner, generator=gen) * 3)
        bound = layer.lipschitz_bound(size)
        assert bound <= 1 + 1e-6
        exact = _max_jacobian_norm(layer, (channels, *size), points=4, seed=trial, spread=3.0)
        assert exact <= bound * SLACK


def test_dense_bound_is_one_for_random_weights_and_q_and_covers_the_jacobian():
    gen = torch.Generator().manual_seed(0)
    for features, inner in ((6, 6), (6, 3), (4, 9)):
        layer = SLLLinear(features, features, inner=inner).double().eval()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(inner, features, generator=gen) * 5)
            layer.bias.copy_(torch.randn(inner, generator=gen))
            layer.log_q.copy_(torch.randn(inner, generator=gen) * 3)
        bound = layer.lipschitz_bound()
        assert bound <= 1 + 1e-6
        assert _max_jacobian_norm(layer, (features,), points=20, seed=1, spread=3.0) <= bound * SLACK


def test_jacobian_is_symmetric_with_eigenvalues_in_the_derived_interval():
    """J = I - 2 A^T D A, A = T^-1/2 W^T: symmetric, eigenvalues in [1 - 2||A||^2, 1]."""
    layer = SLLConv2d(3, 3, 3, inner_channels=4).double().eval()
    with torch.no_grad():
        a = layer.weight * layer.scale().sqrt().view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    conv = lambda v: F.conv2d(v.view(1, 3, 4, 4), a, padding=1).flatten()  # noqa: E731
    a_norm = float(torch.linalg.matrix_norm(_jacobian(conv, torch.zeros(1, 48, dtype=torch.float64)), ord=2))
    for _ in range(5):
        jac = _jacobian(layer, torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64))
        assert torch.allclose(jac, jac.T, atol=1e-12)
        eig = torch.linalg.eigvalsh(jac)
        assert eig.max() <= 1 + 1e-12 and eig.min() >= 1 - 2 * a_norm**2 - 1e-12


def test_conv_t_uses_q_and_matches_the_dense_operators_gram_matrix():
    """T_ii = sum_j |W^T W|_ij q_j / q_i of the conv as one matrix, at an interior pixel (the
    current reference code computes the conv T with q cancelling out; ours does not)."""
    gen = torch.Generator().manual_seed(2)
    channels, inner, k, n = 2, 3, 3, 9
    weight = torch.randn(inner, channels, k, k, generator=gen, dtype=torch.float64)
    log_q = torch.randn(inner, generator=gen, dtype=torch.float64)
    conv = lambda v: F.conv2d(v.view(1, channels, n, n), weight, padding=k // 2).flatten()  # noqa: E731
    wt = torch.autograd.functional.jacobian(conv, torch.zeros(channels * n * n, dtype=torch.float64))
    gram = (wt @ wt.T).abs().view(inner, n, n, inner, n * n)  # |W^T W| over (inner channel, pixel)
    q = log_q.exp()
    t = (gram[:, n // 2, n // 2] * q.view(1, -1, 1)).sum(dim=(1, 2)) / q
    assert torch.allclose(sll_conv_scale(weight, log_q), 1 / t, rtol=1e-12)
    assert not torch.allclose(sll_conv_scale(weight, log_q), sll_conv_scale(weight, torch.zeros(inner)))


def test_a_dead_inner_channel_gives_no_nan():
    layer = SLLConv2d(3, 3, 3, inner_channels=4)
    with torch.no_grad():
        layer.weight[2] = 0
        layer.bias.fill_(1.0)  # the dead channel's ReLU is active: its T^-1 still must not blow up
    assert layer.scale()[2] == 0
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters()) and torch.isfinite(x.grad).all()
    assert layer.lipschitz_bound((5, 5)) <= 1 + 1e-6
    dense = SLLLinear(4, 4)
    with torch.no_grad():
        dense.weight.zero_()  # every channel dead: the identity
    x = torch.randn(3, 4)
    assert torch.equal(dense(x), x) and dense.lipschitz_bound() == 1.0


def test_baked_tensors_that_break_the_derivation_are_refused():
    baked = SLLConv2d(3, 3, 3).bake()
    baked.scale[0] = -baked.scale[0]  # a negative T^-1 entry: J is no longer I minus a PSD matrix
    with pytest.raises(NotLipschitzError, match="negative"):
        baked.lipschitz_bound((4, 4))
    baked.scale[0] = float("nan")
    with pytest.raises(NotLipschitzError, match="non-finite"):
        baked.lipschitz_bound((4, 4))
    dense = SLLLinear(4, 4).bake()
    dense.scale[1] = float("inf")
    with pytest.raises(NotLipschitzError):
        dense.lipschitz_bound()
    assert isinstance(baked, BakedSLL)
