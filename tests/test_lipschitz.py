"""certify.lipschitz: Normalize, layer_bounds/product, upper_bound and empirical_lower_bound.

The empirical lower bound meets the upper bound where the network preserves norms: a single SOC
with equal channels, and stacks of SOC + MaxMin without channel padding or dropping (stride-2
SOCs with c_out = 4 c_in included). A whole LipConvnet at initialisation is different: its first
SOC embeds 3 channels into ``width`` and its pooling and head keep only part of each orthogonal
output, so its Jacobian norm sits well below 1/min(std) (see test_models.py); there only
``lower <= upper`` is a property.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.layers.activations import MaxMin
from certify.errors import NotLipschitzError
from certify.layers.normalize import Normalize
from certify.lipschitz import LayerBound, empirical_lower_bound, layer_bounds, product, upper_bound
from certify.layers.soc import SOC


class Chain(nn.Module):
    """A sequential model that reports the product of its layers' bounds, like LipConvNet."""

    def __init__(self, layers: list[nn.Module], size: tuple[int, int]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.size = size

    def forward(self, x):
        return self.layers(x)

    def lipschitz_bound(self):
        bounds, _ = layer_bounds([(str(i), m) for i, m in enumerate(self.layers)], self.size)
        return product(bounds)


def _soc(seed, *args, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SOC(*args, **kwargs)


def test_normalize_bound_is_one_over_min_std():
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 0.2))
    assert norm.lipschitz_bound() == pytest.approx(5.0, rel=1e-7)
    jac = torch.func.jacrev(norm)(torch.rand(1, 3, 2, 2)).reshape(12, 12)
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= norm.lipschitz_bound() * (1 + 1e-6)
    assert float(torch.linalg.matrix_norm(jac, ord=2)) == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("mean,std", [((0.5,), (0.0,)), ((0.5, 0.5), (0.2,)), ((0.5,), (-1.0,))])
def test_normalize_rejects_bad_std(mean, std):
    with pytest.raises(ValueError):
        Normalize(mean, std)


def test_layer_bounds_thread_the_size():
    layers = [("a", _soc(0, 2, 8, 3, stride=2, init_iters=5)), ("b", MaxMin()),
              ("c", _soc(1, 8, 8, 3, init_iters=5))]
    bounds, size = layer_bounds(layers, (8, 6))
    assert [b.input_size for b in bounds] == [(8, 6), (4, 3), (4, 3)]
    assert size == (4, 3)
    assert [b.kind for b in bounds] == ["SOC", "MaxMin", "SOC"]
    assert product(bounds) == pytest.approx(bounds[0].bound * bounds[2].bound, rel=1e-15)


def test_product_is_never_below_one_factor():
    bounds = [LayerBound("x", "X", None, 1.0 + 1e-12)] * 30
    assert product(bounds) >= 1.0


def test_upper_bound_refuses_unknown_models():
    with pytest.raises(NotLipschitzError):
        upper_bound(nn.Linear(3, 3))


def test_empirical_lower_bound_of_a_known_linear_map():
    """A diagonal map with largest entry 3: the lower bound approaches 3 and never exceeds it."""

    class Diag(nn.Module):
        def forward(self, x):
            return x * torch.tensor([0.5, 3.0, 1.0, 2.9]).view(1, 4, 1, 1)

    model = Diag()
    inputs = torch.rand(2, 4, 3, 3)
    lb = empirical_lower_bound(model, inputs, iters=80)
    assert 3.0 * (1 - 1e-3) <= lb <= 3.0 * (1 + 1e-6)
    assert empirical_lower_bound(model, inputs, iters=1) <= lb


def test_empirical_lower_bound_restores_training_mode():
    layer = _soc(0, 2, 2, 3, init_iters=5).train()
    u = layer.u1.clone()
    empirical_lower_bound(layer, torch.rand(1, 2, 4, 4), iters=2)
    assert layer.training
    assert torch.equal(u, layer.u1)  # evaluated in eval mode: no power-iteration update


def test_empirical_lower_bound_is_seeded():
    layer = _soc(0, 4, 4, 3, init_iters=5)
    x = torch.rand(1, 4, 5, 5)
    assert empirical_lower_bound(layer, x, iters=2, seed=3) == empirical_lower_bound(layer, x, iters=2, seed=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_single_soc_lower_bound_meets_upper_bound(seed):
    """An orthogonal layer (equal channels, bias irrelevant to the Jacobian): lower ~= upper ~= 1."""
    layer = _soc(seed, 4, 4, 3, init_iters=30).double().eval()
    lower = empirical_lower_bound(layer, torch.rand(2, 4, 6, 6, dtype=torch.float64), iters=3)
    upper = layer.lipschitz_bound((6, 6))
    assert lower <= upper
    assert upper - lower < 1e-3 * upper


def test_float32_secant_noise_stays_small():
    """In float32 the secant slopes (step 1e-3) carry rounding noise of about eps ||f(x)|| / h,
    measured up to ~1e-4 relative on a single SOC, so a float32 "lower bound" can exceed the
    exact-arithmetic upper bound by that much; the tight comparisons above run in float64."""
    layer = _soc(0, 4, 4, 3, init_iters=30).eval()
    lower = empirical_lower_bound(layer, torch.rand(2, 4, 6, 6), iters=3)
    assert abs(lower - layer.lipschitz_bound((6, 6))) < 1e-3


def test_soc_maxmin_stack_lower_bound_meets_upper_bound():
    """SOC + MaxMin layers whose Jacobians are all orthogonal (no channel padding, MaxMin
    permutes, stride 2 with 4x channels), behind a normalisation: lower ~= upper ~= 1/min(std)."""
    size = (8, 8)
    layers = [Normalize((0.4, 0.5), (0.3, 0.25)),
              _soc(0, 2, 2, 3, init_iters=30), MaxMin(),
              _soc(1, 2, 8, 3, stride=2, init_iters=30), MaxMin(),
              _soc(2, 8, 8, 3, init_iters=30), MaxMin(),
              _soc(3, 8, 32, 1, stride=2, init_iters=30)]
    model = Chain(layers, size).double().eval()
    upper = upper_bound(model)
    assert upper == pytest.approx(4.0, rel=1e-4) and upper >= 4.0 * (1 - 1e-7)
    # J^T J = diag(1/std^2) everywhere, so power iteration converges at the rate (0.25/0.3)^2 per
    # step; a small secant step (float64 allows it) keeps chords off MaxMin's kinks.
    lower = empirical_lower_bound(model, torch.rand(1, 2, *size, dtype=torch.float64), iters=30, step=1e-6)
    assert lower <= upper
    assert upper - lower < 1e-3 * upper
    x, y = torch.rand(8, 2, *size, dtype=torch.float64), torch.rand(8, 2, *size, dtype=torch.float64)
    with torch.no_grad():
        ratio = (model(x) - model(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= upper


def test_embedding_then_dropping_channels_leaves_a_gap():
    """The converse, which explains the full-network gap: an embedding (2 channels padded to 8)
    followed by a SOC that keeps 2 of its 8 outputs is a compression of an orthogonal map; each
    factor has norm 1 but the product's norm is well below it (measured about 0.9)."""
    model = Chain([_soc(0, 2, 8, 3, init_iters=30), _soc(1, 8, 2, 3, init_iters=30)], (4, 4)).eval()
    lower = empirical_lower_bound(model, torch.rand(2, 2, 4, 4), iters=30)
    upper = upper_bound(model)
    assert upper == pytest.approx(1.0, abs=1e-6)
    assert lower < 0.99 * upper
