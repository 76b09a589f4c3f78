"""The LiResNet block (certify/layers/residual.py): what the conformance suite does not check.

The block is x + W x + b as ONE convolution (identity at the centre tap), its bound is the
sound norm of that kernel as applied (<= 1 + u, never 1 + 1 taken on trust), a stale
normaliser is caught, and the exact refresh certifies the block at 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.errors import ConfigError
from certify.layers.linear import BakedConv2d
from certify.layers.norms import conv_norm_bound
from certify.layers.residual import LiResNetBlock, identity_filter


def _jacobian_norm(layer, shape) -> float:
    x = torch.zeros((1, *shape), dtype=torch.float64)  # a linear layer: the Jacobian anywhere
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *shape)).flatten(), x.flatten())
    return float(torch.linalg.matrix_norm(jac, ord=2))


@pytest.mark.parametrize("normalize", ["block", "residual"])
def test_the_block_is_x_plus_a_convolution_and_bakes_to_one_convolution(normalize):
    torch.manual_seed(0)
    layer = LiResNetBlock(4, 4, 3, scale=0.7, normalize=normalize)
    with torch.no_grad():
        layer.bias.normal_()
    layer.eval()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    k = layer.kernel().double()
    residual = k - identity_filter(4, 3, k)
    if normalize == "residual":  # K = I + alpha W / sigma
        assert torch.allclose(residual, 0.7 * layer.weight.double() / float(layer.sigma), atol=1e-7)
    else:  # K = (I + alpha W) / sigma
        assert torch.allclose(k, (identity_filter(4, 3, k) + 0.7 * layer.weight.double()) / float(layer.sigma))
    want = x + F.conv2d(x, residual, layer.bias.double(), padding=1)  # y = x + W x + b
    assert torch.allclose(layer(x), want, atol=1e-12)
    baked = layer.bake()
    assert isinstance(baked, BakedConv2d) and baked.kernel_size == (3, 3) and baked.padding == (1, 1)
    assert torch.equal(baked.weight, layer.kernel())  # ONE kernel, the identity folded in
    assert torch.equal(baked(x.float()), layer(x.float()))
    assert baked.lipschitz_bound((5, 6)) == layer.lipschitz_bound((5, 6))


def test_the_bound_is_the_kernel_as_applied_below_one_plus_u_never_one_plus_one():
    torch.manual_seed(1)
    layer = LiResNetBlock(6, 6, 3, scale=1.0, normalize="residual", input_size=8).eval()
    layer.refresh(0)  # sigma from the sound bound: ||W / sigma|| <= 1
    bound, split = layer.lipschitz_bound((8, 8)), layer.residual_bound((8, 8))
    assert split <= 2.0 + 1e-6  # 1 + u with u <= 1
    assert _jacobian_norm(layer, (6, 8, 8)) <= bound <= split * (1 + 1e-9)
    assert bound < split - 0.2  # the identity and a random W/sigma do not add up: well below 1 + u
    with torch.no_grad():
        layer.weight.mul_(10)  # sigma is now stale (10x too small): caught
    assert layer.residual_bound((8, 8)) > 9
    assert _jacobian_norm(layer, (6, 8, 8)) <= layer.lipschitz_bound((8, 8))
    assert layer.lipschitz_bound((8, 8)) > 5


def test_a_stale_normaliser_is_caught_and_the_exact_refresh_certifies_at_one():
    torch.manual_seed(2)
    layer = LiResNetBlock(8, 8, 3, input_size=16)
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    x = torch.randn(4, 8, 16, 16)
    for _ in range(3):  # large steps: sigma (from the last training forward) lags behind W
        layer.train()
        loss = -(layer(x) * torch.randn(4, 8, 16, 16)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    stale = layer.lipschitz_bound((16, 16))
    assert stale == conv_norm_bound(layer.kernel(), (16, 16))
    assert stale > 1.001
    layer.refresh(0)  # eval_norm="bound": sigma = the sound bound of I + alpha W, times 1 + 1e-5
    assert layer.lipschitz_bound((16, 16)) <= 1.0
    assert layer.lipschitz_bound((16, 16)) > 1 - 1e-4
    power = LiResNetBlock(8, 8, 3, input_size=16, eval_norm="power")
    power.refresh(200)
    assert 1.0 <= power.lipschitz_bound((16, 16)) < 1.01  # a lower estimate: slightly above 1


def test_the_sound_bound_is_per_input_size():
    torch.manual_seed(3)
    layer = LiResNetBlock(4, 4, 3, input_size=4).eval()
    layer.refresh(0)
    for size in ((4, 4), (2, 3), (9, 9)):
        assert _jacobian_norm(layer, (4, *size)) <= layer.lipschitz_bound(size)
    with pytest.raises(ConfigError, match="input size"):
        layer.lipschitz_bound(None)


@pytest.mark.parametrize("kwargs,message", [(dict(out_channels=6), "must equal"), (dict(kernel_size=2), "odd"),
                                            (dict(normalize="both"), "normalize"), (dict(scale=0.0), "scale")])
def test_invalid_configurations_are_refused(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ConfigError, match=message):
        LiResNetBlock(**args)
