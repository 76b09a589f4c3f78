"""Cayley orthogonal convolutions and dense layers (certify/layers/cayley.py), and the FFT machinery
they share with BRO: what the conformance suite does not check by itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.errors import ConfigError, ExportError
from certify.layers.cayley import BakedFFTConv, CayleyConv2d, CayleyLinear, fft_rounding, kernel_spectrum
from certify.layers.linear import BakedConv2d


def _jacobian_norm(fn, shape) -> float:
    x0 = torch.zeros((1, *shape), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x0.flatten(), vectorize=True)
    return float(torch.linalg.matrix_norm(jac, ord=2))


def _circular_matrix(weight: torch.Tensor, size) -> torch.Tensor:
    """The dense matrix of the circular cross-correlation by a centred odd filter (conv2d on a
    circularly padded map), columns indexed like flatten(1) of (C, h, w) maps."""
    c, k = weight.shape[1], weight.shape[-1]
    eye = torch.eye(c * size[0] * size[1], dtype=weight.dtype).view(-1, c, *size)
    p = k // 2
    cols = F.conv2d(F.pad(eye, (p, p, p, p), mode="circular"), weight)
    return cols.flatten(1).T


def test_kernel_spectrum_is_the_circular_correlation():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    spec = kernel_spectrum(w, (5, 6))  # (F, 3, 2)
    xf = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(5 * 4, 2, 4)
    y = torch.fft.irfft2((spec @ xf).reshape(5, 4, 3, 4).permute(3, 2, 0, 1), s=(5, 6))
    want = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w)
    assert torch.allclose(y, want, atol=1e-12)
    # a filter larger than the map wraps around (the torus), rather than being cropped
    spec1 = kernel_spectrum(w, (1, 1))
    assert torch.allclose(spec1[0].real, w.sum(dim=(2, 3)), atol=1e-12)


def test_the_layer_is_the_papers_cayley_transform_of_the_circular_convolution():
    """Q = (I - A)(I + A)^-1 with A = s (C - C^T), C the dense circular correlation (paper eq. 2)."""
    torch.manual_seed(1)
    layer = CayleyConv2d(3, 3, 3, bias=False).double().train()
    size = (4, 5)
    s = float(layer.alpha.detach() / layer.weight.detach().norm())
    c = _circular_matrix(layer.weight.detach() * s, size)
    a = c - c.T
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    q = (eye - a) @ torch.linalg.inv(eye + a)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y.flatten(1), x.flatten(1) @ q.T, atol=1e-10)


@pytest.mark.parametrize("cin,cout,k,stride,size", [(4, 4, 3, 1, (5, 5)), (3, 5, 3, 1, (4, 4)), (2, 8, 3, 2, (4, 6)),
                                                    (4, 4, 5, 1, (6, 5))])
def test_applied_matrices_are_unitary_and_the_layer_orthogonal_on_circular_inputs(cin, cout, k, stride, size):
    torch.manual_seed(2)
    layer = CayleyConv2d(cin, cout, k, bias=False, stride=stride).eval()
    q = layer.plan(size)[0].to(torch.complex128)  # the float32 matrices the eval forward applies
    gram = q.mH @ q  # out >= in s^2 here: orthonormal columns
    assert (gram - torch.eye(q.shape[-1], dtype=gram.dtype)).abs().max() < 1e-6
    x = torch.randn(5, cin, *size, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    ratio = y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert (ratio - 1).abs().max() < 1e-5


def test_fewer_output_channels_keep_the_rows_of_an_orthogonal_map():
    torch.manual_seed(3)
    layer = CayleyConv2d(6, 4, 3).eval()
    q = layer.plan((5, 5))[0].to(torch.complex128)
    assert (q @ q.mH - torch.eye(4, dtype=q.dtype)).abs().max() < 1e-6
    assert layer.lipschitz_bound((5, 5)) < 1 + 1e-4


@pytest.mark.parametrize("cin,cout,k,stride,size", [(4, 4, 3, 1, (8, 8)), (3, 6, 3, 1, (5, 7)), (2, 8, 3, 2, (6, 6)),
                                                    (5, 5, 1, 1, (3, 3)), (4, 4, 3, 1, (1, 1))])
def test_bound_is_sound_and_tight(cin, cout, k, stride, size):
    torch.manual_seed(4)
    layer = CayleyConv2d(cin, cout, k, stride=stride).eval()
    exact = _jacobian_norm(layer, (cin, *size))
    bound = layer.lipschitz_bound(size)
    assert exact <= bound * (1 + 1e-9)
    assert bound <= 1 + 1e-4
    # the FFT rounding allowance is the only slack beyond the float32 matrices' own norm
    grid = layer.output_size(size)
    assert bound - exact < 1e-6 + (fft_rounding(grid) if k > 1 else 0.0)


def test_the_fft_rounding_allowance_covers_the_measured_float32_error():
    torch.manual_seed(5)
    layer = CayleyConv2d(8, 8, 3, bias=False).eval()
    x = torch.randn(8, 8, 32, 32)
    with torch.no_grad():
        err = (layer(x).double() - layer(x.double())).flatten(1).norm(dim=1) / x.double().flatten(1).norm(dim=1)
    rho = fft_rounding((32, 32))
    assert rho < 1e-4  # "1 + small"
    assert float(err.max()) < rho / 10  # measured about 2e-7 against rho = 4.2e-5


def test_the_bound_follows_the_weights_and_the_baked_tensors():
    torch.manual_seed(6)
    layer = CayleyConv2d(4, 4, 3, input_size=5).eval()
    before = layer(torch.ones(1, 4, 5, 5))
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(0.1)  # an in-place update, as an optimiser step
    assert not torch.allclose(layer(torch.ones(1, 4, 5, 5)), before)  # the eval plan was rebuilt
    baked = layer.bake()
    assert baked.lipschitz_bound((5, 5)) < 1 + 1e-4
    with torch.no_grad():
        baked.q_real.mul_(1.01)
        baked.q_imag.mul_(1.01)
    assert baked.lipschitz_bound((5, 5)) >= 1.01 * (1 - 1e-6)  # computed from the stored matrices


def test_baked_layer_holds_one_map_size_and_refuses_others():
    pytest.importorskip("onnxruntime")
    from certify.onnx_graph import layer_model

    torch.manual_seed(7)
    layer = CayleyConv2d(4, 4, 3)
    layer.train()(torch.randn(2, 4, 6, 6))  # the size a forward saw is the one baked
    baked = layer.bake()
    assert isinstance(baked, BakedFFTConv) and baked.config()["input_size"] == [6, 6]
    with pytest.raises(ConfigError, match="6, 6"):
        baked(torch.randn(1, 4, 5, 5))
    with pytest.raises(ConfigError):
        baked.lipschitz_bound((8, 8))
    with pytest.raises(ExportError):
        layer_model(baked, (4, 5, 5))
    assert layer.bake(input_size=(5, 5)).config()["input_size"] == [5, 5]
    with pytest.raises(ConfigError, match="input_size"):
        CayleyConv2d(4, 4, 3).bake()  # no size known: refused rather than guessed
    # the size survives a state-dict round trip (a checkpoint bakes for the size it was trained on)
    again = CayleyConv2d(4, 4, 3)
    again.load_state_dict(layer.state_dict())
    assert again.bake().config()["input_size"] == [6, 6]


def test_a_1x1_cayley_layer_is_one_size_free_matrix():
    torch.manual_seed(8)
    layer = CayleyConv2d(3, 5, 1, stride=2).eval()
    baked = layer.bake()
    assert isinstance(baked, BakedConv2d)
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(baked(x), layer(x))
    assert layer.lipschitz_bound(None) == layer.lipschitz_bound((8, 8)) < 1 + 1e-6


def test_training_and_evaluation_apply_the_same_matrices():
    torch.manual_seed(9)
    layer = CayleyConv2d(4, 6, 3)
    x = torch.randn(3, 4, 5, 5)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-5)
    y_train.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(layer.alpha.grad)


def test_configuration_is_checked():
    with pytest.raises(ConfigError):
        CayleyConv2d(4, 4, 3, stride=3)
    with pytest.raises(ConfigError):
        CayleyConv2d(0, 4, 3)
    with pytest.raises(ConfigError, match="divisible"):
        CayleyConv2d(2, 8, 3, stride=2)(torch.randn(1, 2, 5, 4))
    with pytest.raises(ConfigError, match="input size"):
        CayleyConv2d(4, 4, 3).lipschitz_bound(None)


def test_dense_cayley_is_orthogonal_and_bounded_as_applied():
    torch.manual_seed(10)
    square = CayleyLinear(6, 6, bias=False).eval()
    q = square.plan()[0].double()
    assert (q.T @ q - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-6
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(square(x).norm(dim=1), x.norm(dim=1), rtol=1e-6)
    wide = CayleyLinear(7, 4).eval()
    assert _jacobian_norm(wide, (7,)) <= wide.lipschitz_bound() * (1 + 1e-9)
    assert wide.lipschitz_bound() < 1 + 1e-6
    x7 = torch.randn(3, 7)
    assert torch.equal(wide.bake()(x7), wide(x7))
