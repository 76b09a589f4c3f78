"""Property tests of the activations (MaxMin, HH1, HH2), channel pooling (max, Lip) and heads
(orthogonal, LLN): shapes, 1-Lipschitz on random pairs and by Jacobian norms, gradient-norm
preservation, and agreement with the paper's definitions.

Parameters are drawn at random, also outside the ranges the layers clamp them to, because an
optimizer can move them anywhere and the layers must stay 1-Lipschitz for every value.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin, make_activation
from certify.errors import ConfigError, NotLipschitzError
from certify.layers.heads import LLNHead, OrthoHead
from certify.lipschitz import layer_bounds
from certify.layers.pooling import LipChannelPool, MaxChannelPool, make_pooling

SETTINGS = settings(deadline=None, max_examples=10)
TOL = 1 + 1e-6

ACTIVATIONS = {"maxmin": MaxMin, "hh1": HouseholderOrder1, "hh2": HouseholderOrder2}
POOLINGS = {"max": MaxChannelPool, "lip": LipChannelPool}


def _layer(cls, channels: int, seed: int, spread: float = 0.0, dtype=torch.float64):
    """A layer with its angles drawn uniformly in [-spread, 2 pi + spread] (spread > 0 goes past
    every clamp range), or at its own initialisation when spread is 0."""
    layer = cls(channels)
    if spread:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) * (2 * math.pi + 2 * spread) - spread)
    return layer.to(dtype)


def _inputs(seed: int, shape, dtype=torch.float64, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype) * scale


PAIRWISE = [(n, c) for n, c in ACTIVATIONS.items()] + [(n, c) for n, c in POOLINGS.items()]


# ---- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", PAIRWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 8, 5, 4), (3, 8)])
def test_pairwise_layer_shapes(name, cls, dtype, shape):
    layer = cls(8)
    x = torch.randn(shape, dtype=dtype)
    y = layer(x)
    out_channels = 4 if name in POOLINGS else 8
    assert y.shape == (shape[0], out_channels, *shape[2:])
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert layer.lipschitz_bound() == 1.0
    assert layer.output_size((5, 4)) == (5, 4)


@pytest.mark.parametrize("cls", [HouseholderOrder1, HouseholderOrder2, LipChannelPool])
def test_odd_channels_rejected(cls):
    with pytest.raises(ConfigError):
        cls(5)


def test_odd_channels_rejected_at_forward():
    with pytest.raises(ConfigError):
        MaxMin()(torch.randn(1, 3, 2, 2))


def test_factories():
    assert isinstance(make_activation("hh2", 4), HouseholderOrder2)
    assert isinstance(make_pooling("lip", 4), LipChannelPool)
    with pytest.raises(ConfigError):
        make_activation("relu", 4)
    with pytest.raises(ConfigError):
        make_pooling("avg", 4)


# ---- 1-Lipschitz on random pairs -------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 100_000), spread=st.sampled_from([0.0, 3.0, 20.0]),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), near=st.booleans())
@pytest.mark.parametrize("name,cls", PAIRWISE)
def test_pairwise_layers_lipschitz_on_random_pairs(name, cls, seed, spread, scale, near):
    """||f(x) - f(y)|| <= ||x - y|| for far pairs and near pairs (y = x + small step, which tests
    continuity across sector boundaries), per sample."""
    layer = _layer(cls, 16, seed, spread)
    x = _inputs(seed, (64, 16), scale=scale)
    y = x + _inputs(seed + 1, (64, 16), scale=scale * (1e-3 if near else 1.0))
    with torch.no_grad():
        dist_out = (layer(x) - layer(y)).norm(dim=1)
    dist_in = (x - y).norm(dim=1)
    assert (dist_out <= dist_in * TOL).all(), float((dist_out / dist_in).max())


@SETTINGS
@given(seed=st.integers(0, 100_000), spread=st.sampled_from([0.0, 3.0, 20.0]))
@pytest.mark.parametrize("name,cls", PAIRWISE)
def test_pairwise_layers_lipschitz_float32(name, cls, seed, spread):
    layer = _layer(cls, 8, seed, spread, dtype=torch.float32)
    x, y = _inputs(seed, (128, 8, 2, 2), torch.float32), _inputs(seed + 1, (128, 8, 2, 2), torch.float32)
    with torch.no_grad():
        ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1 + 1e-5


# ---- Jacobians: norms and orthogonality -------------------------------------------------------


def _jacobian(layer, x):
    """Jacobian of one sample of shape (C, ...) as an (out, in) matrix."""
    jac = torch.func.jacrev(lambda v: layer(v.unsqueeze(0)).squeeze(0))(x)
    return jac.reshape(-1, x.numel()).detach()


@SETTINGS
@given(seed=st.integers(0, 100_000), spread=st.sampled_from([0.0, 3.0, 20.0]))
@pytest.mark.parametrize("name,cls", list(ACTIVATIONS.items()))
def test_activation_jacobian_is_orthogonal(name, cls, seed, spread):
    """Gradient-norm preservation: almost everywhere the Jacobian is orthogonal (J^T J = I), so
    its spectral norm is exactly 1, the layer bound."""
    layer = _layer(cls, 8, seed, spread)
    x = _inputs(seed, (8, 3, 2))
    jac = _jacobian(layer, x)
    eye = torch.eye(x.numel(), dtype=torch.float64)
    assert torch.allclose(jac.T @ jac, eye, atol=1e-10)
    assert float(torch.linalg.matrix_norm(jac.detach(), ord=2)) <= layer.lipschitz_bound() * TOL


@SETTINGS
@given(seed=st.integers(0, 100_000), spread=st.sampled_from([0.0, 3.0, 20.0]))
@pytest.mark.parametrize("name,cls", list(POOLINGS.items()))
def test_pooling_jacobian_rows_are_orthonormal(name, cls, seed, spread):
    """A distance function has a unit gradient almost everywhere, and each output depends on its
    own pair only: J J^T = I, so the spectral norm is exactly 1."""
    layer = _layer(cls, 8, seed, spread)
    x = _inputs(seed, (8, 3, 2))
    jac = _jacobian(layer, x)
    eye = torch.eye(jac.shape[0], dtype=torch.float64)
    assert torch.allclose(jac @ jac.T, eye, atol=1e-10)
    assert float(torch.linalg.matrix_norm(jac.detach(), ord=2)) <= layer.lipschitz_bound() * TOL


@pytest.mark.parametrize("name,cls", PAIRWISE)
def test_gradients_finite_at_zero_and_on_ties(name, cls):
    """Ties (x = y) and the origin are where sector tests switch; gradients must stay finite."""
    layer = _layer(cls, 4, 0, 1.0)
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, -2.0, 0.0, -2.0]], dtype=torch.float64)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- agreement with the definitions ----------------------------------------------------------


def test_maxmin_values():
    x = torch.tensor([[1.0, -2.0, 3.0, 5.0]])
    assert torch.equal(MaxMin()(x), torch.tensor([[3.0, 5.0, 1.0, -2.0]]))


def test_hh1_at_init_is_maxmin_swapped():
    layer = HouseholderOrder1(6).double()
    x = _inputs(0, (20, 6, 2, 2))
    a, b = MaxMin()(x).chunk(2, dim=1)
    # theta is stored as float32(pi/2), a reflection axis off by ~1e-8 rad
    assert torch.allclose(layer(x), torch.cat([b, a], dim=1), atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 100_000))
def test_hh1_reflects_exactly_one_half_plane(seed):
    """HH1 is the identity where v.z <= 0 and the reflection I - 2vv^T elsewhere."""
    layer = _layer(HouseholderOrder1, 2, seed, 3.0)
    theta = float(layer.theta)
    v = torch.tensor([math.sin(theta / 2), -math.cos(theta / 2)], dtype=torch.float64)
    z = _inputs(seed, (50, 2))
    out = layer(z)
    side = z @ v
    reflected = z - 2 * side[:, None] * v
    expected = torch.where((side > 0)[:, None], reflected, z)
    assert torch.allclose(out, expected, atol=1e-12)


def _cone_signed_distance(z: torch.Tensor, theta: float) -> torch.Tensor:
    """Brute force: distance from each point to the two rays at angles +-theta/2 (projection
    onto a ray clipped at the apex), negative inside the cone |angle| <= theta/2."""
    dists = []
    for sign in (1.0, -1.0):
        u = torch.tensor([math.cos(theta / 2), sign * math.sin(theta / 2)], dtype=z.dtype)
        t = (z @ u).clamp_min(0.0)
        dists.append((z - t[:, None] * u).norm(dim=1))
    d = torch.minimum(*dists)
    inside = torch.atan2(z[:, 1], z[:, 0]).abs() <= theta / 2
    return torch.where(inside, -d, d)


@SETTINGS
@given(seed=st.integers(0, 100_000), theta=st.floats(0.0, math.pi))
def test_lip_pooling_is_the_signed_distance_to_the_cone(seed, theta):
    layer = LipChannelPool(2).double()
    with torch.no_grad():
        layer.theta.fill_(theta)
    z = _inputs(seed, (200, 2))
    assert torch.allclose(layer(z)[:, 0], _cone_signed_distance(z, theta), atol=1e-10)


def test_lip_pooling_special_angles():
    """theta = pi: the cone is the half-plane x >= 0, the signed distance is -x. theta = 0: the
    distance to the positive half-axis (never negative)."""
    z = _inputs(1, (100, 2))
    layer = LipChannelPool(2).double()
    with torch.no_grad():
        layer.theta.fill_(math.pi)
    assert torch.allclose(layer(z)[:, 0], -z[:, 0], atol=1e-12)
    with torch.no_grad():
        layer.theta.fill_(0.0)
    expected = torch.where(z[:, 0] > 0, z[:, 1].abs(), z.norm(dim=1))
    assert torch.allclose(layer(z)[:, 0], expected, atol=1e-12)


def test_lip_pooling_clamps_theta():
    """Outside [0, pi] the angle is clamped, so the layer stays a signed distance to a convex cone."""
    z = _inputs(2, (100, 2))
    layer = LipChannelPool(2).double()
    with torch.no_grad():
        layer.theta.fill_(5.0)
    assert torch.allclose(layer(z)[:, 0], -z[:, 0], atol=1e-12)


def test_max_pool_values():
    x = torch.tensor([[1.0, -2.0, 3.0, -5.0]])
    assert torch.equal(MaxChannelPool()(x), torch.tensor([[3.0, -2.0]]))


@SETTINGS
@given(seed=st.integers(0, 100_000), spread=st.sampled_from([0.0, 20.0]))
def test_hh2_is_continuous_across_its_sector_boundaries(seed, spread):
    """Points just either side of each of the four sector boundaries map to nearby points: the
    four pieces (identity, two reflections, a rotation) agree on the boundaries."""
    layer = _layer(HouseholderOrder2, 2, seed, spread)
    t0 = float(layer.theta0)
    t1 = min(max(float(layer.theta1), 0.0), 2 * math.pi)
    t2 = min(max(float(layer.theta2), 0.0), 2 * math.pi)
    eps = 1e-7
    for boundary in (0.0, t1 / 2, (t1 + t2) / 2, math.pi + t2 / 2):
        ang = torch.tensor([boundary - eps, boundary + eps], dtype=torch.float64) + t0 / 2
        z = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        out = layer(z)
        assert float((out[0] - out[1]).norm()) < 1e-5, boundary


def test_hh2_identity_sector():
    """Points at polar angle just above theta0/2 are in the identity sector (when t1 > 0)."""
    layer = HouseholderOrder2(2).double()
    with torch.no_grad():
        layer.theta0.fill_(0.4)
        layer.theta1.fill_(1.0)
        layer.theta2.fill_(1.0)
    ang = torch.tensor([0.25, 0.4], dtype=torch.float64)  # theta0/2 + [0.05, 0.2] < theta0/2 + t1/2
    z = 3 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    assert torch.allclose(layer(z), z, atol=1e-12)


# ---- heads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("features,classes", [(16, 10), (8, 8), (4, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_shapes(features, classes, dtype):
    for head in (OrthoHead(features, classes, init_iters=5), LLNHead(features, classes)):
        head = head.to(dtype).eval()
        for shape in ((3, features), (3, features, 1, 1)):
            y = head(torch.randn(shape, dtype=dtype))
            assert y.shape == (3, classes) and y.dtype == dtype


@pytest.mark.parametrize("features,classes", [(16, 10), (8, 8), (4, 6)])
def test_ortho_head_bound_and_jacobian(features, classes):
    """Eval-mode orthogonal head: Jacobian spectral norm <= its bound; with equal sizes it is an
    isometry; keeping fewer outputs (classes < features) is a contraction."""
    head = OrthoHead(features, classes, init_iters=30).double().eval()
    x = _inputs(3, (features,))
    jac = _jacobian(head, x)
    norm = float(torch.linalg.matrix_norm(jac, ord=2))
    assert norm <= head.lipschitz_bound() * TOL
    assert 1.0 <= head.lipschitz_bound() <= 1 + 1e-6
    if classes >= features:
        assert torch.allclose(jac.T @ jac, torch.eye(features, dtype=torch.float64), atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 100_000), features=st.integers(2, 12), classes=st.integers(2, 12),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_lln_head_bound_and_rows(seed, features, classes, scale):
    head = LLNHead(features, classes).double()
    with torch.no_grad():
        head.weight.copy_(_inputs(seed, (classes, features)) * scale)
        head.bias.copy_(_inputs(seed + 1, (classes,)))
    w = head.normalized_weight()
    assert torch.allclose(w.norm(dim=1), torch.ones(classes, dtype=torch.float64), atol=1e-12)
    jac = _jacobian(head, _inputs(seed + 2, (features,)))
    assert torch.allclose(jac, w, atol=1e-12)  # a linear layer: its Jacobian is its weight
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= head.lipschitz_bound()
    x, y = _inputs(seed + 3, (32, features)), _inputs(seed + 4, (32, features))
    with torch.no_grad():
        ratio = (head(x) - head(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert float(ratio.max()) <= head.lipschitz_bound()
    dist = head.pairwise_row_distances()
    ref = torch.cdist(w.detach(), w.detach())
    assert torch.allclose(dist, ref, atol=1e-7)
    assert (dist >= ref - 1e-15).all()
    assert torch.allclose(dist.square(), (2 - 2 * w @ w.T).detach().clamp_min(0), atol=1e-7)


def test_lln_pairwise_distances_of_nearly_equal_rows():
    """Rows that nearly coincide: sqrt(2 - 2 w_y.w_j) would round to 0 (an infinite pairwise
    radius); the exact difference keeps the tiny positive distance."""
    head = LLNHead(3, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-9, 0.0]], dtype=torch.float64))
    d = float(head.pairwise_row_distances()[0, 1])
    assert d == pytest.approx(1e-9, rel=1e-6)


def test_layer_without_bound_is_refused():
    with pytest.raises(NotLipschitzError):
        layer_bounds([("relu", torch.nn.ReLU())], (4, 4))
