"""Convex potential layers (certify/layers/cpl.py): what the conformance suite does not check.

The paper's equation on a tiny case, a stale or too small h caught by the bound (not trusted),
the after-epoch refresh certifying at exactly 1, the stored h driving evaluation, the power
iteration's buffer following the input size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.errors import ConfigError, NotLipschitzError
from certify.layers.cpl import EPSILON, CPLConv2d, CPLLinear, circular_conv, circular_grid
from certify.layers.norms import conv_norm_bound, linear_norm_bound


def _jacobian_norm(fn, shape, points=4, seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x.flatten())
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    return best


def test_dense_forward_is_the_papers_equation():
    torch.manual_seed(0)
    layer = CPLLinear(5, 5, inner=7).eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    w, b, step = layer.weight.double(), layer.bias.double(), float(2.0 / layer.h)  # 2/h as the forward rounds it
    want = x - step * torch.relu(x @ w.T + b) @ w  # z = x - (2/h) W^T relu(W x + b)
    assert torch.allclose(layer(x), want, atol=1e-12)


def test_conv_forward_is_the_papers_equation_with_the_adjoint_convolution():
    torch.manual_seed(0)
    layer = CPLConv2d(3, 3, 3, inner_channels=4).eval()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    w = layer.weight.double()
    conv = lambda v: F.conv2d(v, w, padding=1)  # noqa: E731
    res = torch.relu(conv(x) + layer.bias.double().view(1, -1, 1, 1))
    # W^T by autograd: the exact adjoint of the zero-padded convolution
    v = x.clone().requires_grad_(True)
    (adj,) = torch.autograd.grad(conv(v), v, grad_outputs=res)
    assert torch.allclose(layer(x), x - float(2.0 / layer.h) * adj, atol=1e-12)


def test_a_stale_or_too_small_h_is_caught_by_the_bound_not_trusted():
    torch.manual_seed(1)
    layer = CPLConv2d(4, 4, 3, input_size=5).eval()
    layer.refresh(20)
    assert layer.lipschitz_bound((5, 5)) == 1.0
    assert _jacobian_norm(layer, (4, 5, 5)) <= 1.0 + 1e-9
    with torch.no_grad():
        layer.h /= 2  # as if the power iteration had under-estimated ||W||^2 by half
    bound = layer.lipschitz_bound((5, 5))
    u = conv_norm_bound(layer.weight, (5, 5))
    assert bound > 2.5 and bound == pytest.approx(2 * u * u / float(layer.h) - 1, rel=1e-6)
    exact = _jacobian_norm(layer, (4, 5, 5), points=8, seed=3)
    assert 1.0 < exact <= bound  # the layer really is no longer 1-Lipschitz, and the bound covers it
    # the same for the dense layer and for the baked forms
    dense = CPLLinear(6, 6).eval()
    dense.refresh(20)
    assert dense.lipschitz_bound() == 1.0
    with torch.no_grad():
        dense.h /= 2
    assert dense.lipschitz_bound() > 2.5
    assert _jacobian_norm(dense, (6,), points=8) <= dense.lipschitz_bound()
    assert layer.bake().lipschitz_bound((5, 5)) == bound and dense.bake().lipschitz_bound() == dense.lipschitz_bound()


def test_a_non_positive_h_is_refused():
    layer = CPLLinear(4, 4).eval()
    for bad in (0.0, -1.0, float("nan")):
        with torch.no_grad():
            layer.h.fill_(bad)
        with pytest.raises(NotLipschitzError):
            layer.lipschitz_bound()


def test_refresh_stores_h_from_the_sound_bound_or_from_the_power_estimate():
    torch.manual_seed(2)
    exact = CPLConv2d(8, 8, 3, input_size=16)
    exact.refresh(0)  # eval_norm="bound": h = u^2 + eps on the tracked size
    u = conv_norm_bound(exact.weight, (16, 16))
    assert float(exact.h) == pytest.approx(u * u + EPSILON, rel=1e-6)
    assert exact.lipschitz_bound((16, 16)) == 1.0
    power = CPLConv2d(8, 8, 3, input_size=16, eval_norm="power")
    power.refresh(300)
    assert float(power.h) <= u * u * (1 + 1e-6) + EPSILON  # a lower estimate, from below
    assert 1.0 <= power.lipschitz_bound((16, 16)) < 1.01
    dense = CPLLinear(6, 6, inner=9)
    dense.refresh(0)
    assert float(dense.h) == pytest.approx(linear_norm_bound(dense.weight) ** 2 + EPSILON, rel=1e-6)


def test_training_forwards_store_h_and_the_evaluation_forward_uses_it():
    torch.manual_seed(3)
    layer = CPLConv2d(4, 4, 3, input_size=6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 4, 6, 6)
    layer.train()
    layer(x).square().sum().backward()
    opt.step()
    h_train = layer.h.clone()
    layer(x)  # the next training forward sees the new weights
    assert not torch.equal(layer.h, h_train)
    layer.eval()
    h_eval = layer.h.clone()
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(layer.h, h_eval)  # evaluation never moves h
    baked = layer.bake()
    assert torch.equal(baked(x), y) and torch.equal(baked.h, h_eval)


def test_power_iteration_runs_on_the_circular_embedding_the_bound_uses():
    torch.manual_seed(4)
    layer = CPLConv2d(3, 3, 3, input_size=(5, 7))
    assert tuple(layer.u.shape[-2:]) == circular_grid((5, 7), 3) == (6, 8)
    layer.refresh(500, exact=False)
    sigma = float(circular_conv(layer.u, layer.weight.detach()).norm())
    assert sigma == pytest.approx(conv_norm_bound(layer.weight, (5, 7)), rel=1e-4)


def test_the_power_buffer_follows_the_input_size_unless_the_size_is_fixed():
    torch.manual_seed(5)
    free = CPLConv2d(4, 4, 3).train()
    free(torch.randn(2, 4, 3, 5))
    assert free.tracked_size() == (3, 5)
    assert "u" not in free.state_dict()  # sized by the data, not saved: any checkpoint fits
    again = CPLConv2d(4, 4, 3)
    again.load_state_dict(free.state_dict(), strict=True)
    fixed = CPLConv2d(4, 4, 3, input_size=4).train()
    assert "u" in fixed.state_dict()
    with pytest.raises(ConfigError, match="built for"):
        fixed(torch.randn(2, 4, 5, 5))
    fixed.eval()(torch.randn(2, 4, 5, 5))  # evaluation on another size is fine: the bound is per size


def test_training_under_bfloat16_autocast_keeps_a_float32_h():
    torch.manual_seed(6)
    layer = CPLConv2d(4, 4, 3, input_size=4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 4, 4, 4))
    assert layer.h.dtype == torch.float32
    sigma2 = float(circular_conv(layer.u, layer.weight.detach()).norm()) ** 2
    assert float(layer.h) == pytest.approx(sigma2 + EPSILON, rel=1e-6)


@pytest.mark.parametrize("args,message", [((4, 6), "must equal"), ((4, 4, 2), "odd kernel")])
def test_invalid_configurations_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        CPLConv2d(*args)
    with pytest.raises(ConfigError, match="must equal"):
        CPLLinear(4, 6)
    with pytest.raises(ConfigError, match="eval_norm"):
        CPLLinear(4, 4, eval_norm="guess")
