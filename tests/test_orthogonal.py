"""Orthogonal dense layers (certify/layers/orthogonal.py): what the conformance suite does not check.

The certificate is the float64 norm of the matrix the forward applies, not 1: below 1 for
unconverged Björck steps and for CHORD's epsilon, and above 1 wherever the applied matrix is;
the evaluation matrix is cached per weight version and never stale."""

from __future__ import annotations

import pytest
import torch

from certify.errors import ConfigError, NotLipschitzError
from certify.layers.linear import BakedLinear
from certify.layers.norms import linear_norm_bound
from certify.layers.orthogonal import BjorckLinear, CholeskyLinear


def _norm64(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m.double(), ord=2))


def test_bjorck_steps_are_the_papers_iteration_and_converge_to_orthogonal():
    torch.manual_seed(0)
    layer = BjorckLinear(6, 4, iters=3)
    with torch.no_grad():
        layer.weight.normal_()
    w = layer.weight.detach().double()
    w = w / min(w.norm(), (w.abs().sum(0).max() * w.abs().sum(1).max()).sqrt())
    for _ in range(3):
        w = 1.5 * w - 0.5 * w @ w.T @ w
    assert torch.allclose(layer.eval().eval_matrix().double(), w, atol=1e-6)
    layer.iters = 40
    s = torch.linalg.svdvals(layer.eval_matrix().double())
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


def test_the_certificate_is_the_norm_of_the_matrix_applied_not_one():
    torch.manual_seed(1)
    layer = BjorckLinear(8, 8, iters=1).eval()
    with torch.no_grad():
        layer.weight.normal_()  # far from orthogonal: one step leaves singular values well below 1
    m = layer.eval_matrix()
    assert layer.lipschitz_bound() == linear_norm_bound(m)
    assert _norm64(m) <= layer.lipschitz_bound() < 0.99
    # whatever the applied matrix is, the bound follows it: a matrix above 1 is certified above 1
    layer._cache = (layer._cache[0], m * 1.5)
    assert layer.lipschitz_bound() >= 1.5 * _norm64(m)
    baked = layer.bake()
    assert isinstance(baked, BakedLinear) and torch.equal(baked.weight, m * 1.5)


def test_chord_is_l_inverse_x_with_singular_values_just_below_one():
    torch.manual_seed(2)
    layer = CholeskyLinear(7, 5).eval()
    with torch.no_grad():
        layer.weight.normal_()
    x = layer.weight.detach().double()
    s = x @ x.T
    eps = 1e-3 * float(s.diagonal().mean())
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(s + eps * torch.eye(5, dtype=s.dtype)), x, upper=False)
    m = layer.eval_matrix()
    assert torch.allclose(m.double(), w, atol=1e-5)
    # W W^T = I - eps (L^T L)^-1: singular values sqrt(1 - eps / (lambda + eps)), lambda those of X X^T
    lam = torch.linalg.eigvalsh(s)
    want = (1 - eps / (lam + eps)).sqrt()
    assert torch.allclose(torch.linalg.svdvals(w).flip(0), want, atol=1e-10)
    assert _norm64(m) <= layer.lipschitz_bound() < 1.0


def test_chord_handles_wide_outputs_and_refuses_a_zero_weight():
    torch.manual_seed(3)
    tall = CholeskyLinear(3, 8).eval()  # X X^T has rank 3: eps makes it positive definite
    assert tall.lipschitz_bound() <= 1.0 + 1e-6
    with torch.no_grad():
        tall.weight.zero_()
    with pytest.raises(NotLipschitzError):
        tall.lipschitz_bound()


@pytest.mark.parametrize("cls", [BjorckLinear, CholeskyLinear])
def test_the_evaluation_matrix_follows_every_weight_change(cls):
    torch.manual_seed(4)
    layer = cls(6, 6).eval()
    x = torch.randn(3, 6)
    first = layer.eval_matrix()
    assert layer.eval_matrix() is first  # computed once per weight version
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    after_step = layer.eval_matrix()
    assert not torch.equal(after_step, first)
    other = cls(6, 6)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.eval_matrix(), other.eval()._matrix(other.weight).detach())
    with torch.no_grad():
        assert torch.equal(layer(x), layer.bake()(x))


def test_invalid_configurations_are_refused():
    with pytest.raises(ConfigError):
        BjorckLinear(4, 4, iters=-1)
    with pytest.raises(ConfigError):
        CholeskyLinear(4, 4, eps_scale=0.0)
    with pytest.raises(ConfigError):
        CholeskyLinear(0, 4)
