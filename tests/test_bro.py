"""Block reflector orthogonal (BRO) layers (certify/layers/bro.py): what the conformance suite does
not check by itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.errors import ConfigError
from certify.layers.bro import BROConv2d, BROLinear, block_reflector
from certify.layers.cayley import BakedFFTConv, fft_rounding


def _jacobian_norm(fn, shape) -> float:
    x0 = torch.zeros((1, *shape), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x0.flatten(), vectorize=True)
    return float(torch.linalg.matrix_norm(jac, ord=2))


def test_block_reflector_is_a_hermitian_unitary_with_rank_m_reflected():
    """Paper eq. 3: W = I - 2 V (V^H V)^-1 V^H is -I on range(V), I on its complement."""
    torch.manual_seed(0)
    v = torch.randn(7, 6, 3, dtype=torch.complex128)  # 7 frequencies, c = 6, m = 3
    w = block_reflector(v, eps=0.0)
    eye = torch.eye(6, dtype=w.dtype)
    assert (w - w.mH).abs().max() < 1e-12
    assert (w @ w - eye).abs().max() < 1e-12
    eig = torch.linalg.eigvalsh(w)
    assert torch.allclose(eig[:, :3], -torch.ones(7, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(eig[:, 3:], torch.ones(7, 3, dtype=torch.float64), atol=1e-12)


def test_regularised_reflector_is_slightly_contractive_never_expansive():
    torch.manual_seed(1)
    v = torch.randn(5, 6, 3, dtype=torch.complex128)
    eig = torch.linalg.eigvalsh(block_reflector(v, eps=1e-2))
    assert eig.min() > -1 and eig.max() <= 1 + 1e-12
    assert eig.min() < -0.9  # still a reflection, 1 - 2 s^2 / (s^2 + eps d)
    # V = 0 (a dead frequency) gives the identity, not a singular solve
    zero = block_reflector(torch.zeros(6, 3, dtype=torch.float64), eps=1e-5)
    assert torch.equal(zero, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("cin,cout,k,stride,size", [(4, 4, 3, 1, (5, 5)), (3, 6, 3, 1, (4, 6)), (2, 8, 3, 2, (4, 4))])
def test_applied_matrices_are_unitary_and_the_layer_orthogonal_on_circular_inputs(cin, cout, k, stride, size):
    torch.manual_seed(2)
    layer = BROConv2d(cin, cout, k, bias=False, stride=stride, eps=0.0).eval()
    q = layer.plan(size)[0].to(torch.complex128)  # the float32 matrices the eval forward applies
    assert (q.mH @ q - torch.eye(q.shape[-1], dtype=q.dtype)).abs().max() < 1e-6
    x = torch.randn(5, cin, *size, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    ratio = y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert (ratio - 1).abs().max() < 1e-5


@pytest.mark.parametrize("options,size", [({}, (6, 6)), ({"padding": "zero"}, (5, 5)), ({"stride": 2}, (4, 4)),
                                          ({"rank": 1, "eps": 0.0}, (3, 5))])
def test_bound_is_sound_and_tight(options, size):
    torch.manual_seed(3)
    layer = BROConv2d(4, 4, 3, **options).eval()
    shape = (4, *size)
    exact = _jacobian_norm(layer, shape)
    bound = layer.lipschitz_bound(size)
    assert exact <= bound * (1 + 1e-9)
    assert bound <= 1 + 1e-4
    if options.get("padding") != "zero":  # a compression of an orthogonal map can be below 1
        h, w = layer.output_size(size)
        assert bound - exact < 1e-6 + fft_rounding((h, w))


def test_zero_padding_is_the_circular_layer_on_the_padded_grid_cropped():
    """The authors' LipConvnet BRO: pad k // 2 zeros, circular BRO on the larger grid, crop."""
    torch.manual_seed(4)
    zero = BROConv2d(3, 3, 3, padding="zero", bias=False).eval()
    circ = BROConv2d(3, 3, 3, bias=False).eval()
    circ.load_state_dict(zero.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        want = circ(F.pad(x, (1, 1, 1, 1)))[:, :, 1:-1, 1:-1]
        got = zero(x)
    assert torch.allclose(got, want, atol=1e-12)
    assert (got.flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) * (1 + 1e-6)).all()
    baked = zero.bake(input_size=(5, 5))
    assert isinstance(baked, BakedFFTConv) and baked.config()["pad"] == 1
    assert torch.equal(baked(x.float()), zero(x.float()))


def test_baked_layer_refuses_another_map_size():
    torch.manual_seed(5)
    baked = BROConv2d(4, 4, 3, input_size=(4, 6)).bake()
    baked(torch.randn(1, 4, 4, 6))
    with pytest.raises(ConfigError, match="4, 6"):
        baked(torch.randn(1, 4, 6, 4))
    with pytest.raises(ConfigError):
        baked.lipschitz_bound((6, 6))


def test_rank_and_configuration_are_checked():
    assert BROConv2d(6, 6, 3).rank == 3  # the authors' ratio 0.5
    assert BROConv2d(2, 6, 3, stride=2).rank == 4  # c = max(2 * 4, 6) = 8
    with pytest.raises(ConfigError, match="-I"):
        BROConv2d(4, 4, 3, rank=4)  # full rank: the reflector is -I whatever V is
    with pytest.raises(ConfigError):
        BROConv2d(1, 1, 3)
    with pytest.raises(ConfigError):
        BROConv2d(4, 4, 3, padding="reflect")
    with pytest.raises(ConfigError):
        BROConv2d(4, 4, 3, eps=-1e-3)
    with pytest.raises(ConfigError, match="-I"):
        BROLinear(5, 5, rank=5)


def test_training_and_evaluation_apply_the_same_matrices():
    torch.manual_seed(6)
    layer = BROConv2d(4, 6, 3)
    x = torch.randn(3, 4, 5, 5)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-5)
    y_train.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_dense_bro_is_a_symmetric_orthogonal_reflector():
    torch.manual_seed(7)
    layer = BROLinear(6, 6, bias=False, rank=2, eps=0.0).eval()
    w = layer.plan()[0].double()
    assert (w - w.T).abs().max() < 1e-6 and (w @ w - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-6
    assert torch.linalg.eigvalsh(w)[:2].add(1).abs().max() < 1e-6  # rank 2 reflected
    narrow = BROLinear(7, 4).eval()
    assert _jacobian_norm(narrow, (7,)) <= narrow.lipschitz_bound() * (1 + 1e-9) < 1 + 1e-6
    x = torch.randn(3, 7)
    assert torch.equal(narrow.bake()(x), narrow(x))
