"""The fast evaluation path: Chebyshev/Taylor error bounds, cached SOC plans, same logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.expm import (
    chebyshev_apply,
    chebyshev_coefficients,
    chebyshev_error,
    choose_terms,
    taylor_error,
)
from certify.lipschitz import empirical_lower_bound
from certify.models import create_model
from certify.soc import SOC


def _random_skew(n: int, norm: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = w - w.T
    return a / torch.linalg.matrix_norm(a, ord=2) * norm


@settings(max_examples=25, deadline=None)
@given(norm=st.floats(0.05, 3.0), terms=st.integers(2, 16), seed=st.integers(0, 10_000))
def test_polynomial_error_bounds_hold(norm, terms, seed):
    """Both error bounds dominate the true operator-norm error against matrix_exp."""
    a_mat = _random_skew(24, norm, seed)
    exact = torch.linalg.matrix_exp(a_mat)
    eye = torch.eye(24, dtype=torch.float64)
    bound_a = norm * (1 + 1e-9)
    cheb = chebyshev_apply(eye, lambda v: (a_mat / bound_a) @ v, chebyshev_coefficients(bound_a, terms))
    err_c = float(torch.linalg.matrix_norm(cheb - exact, ord=2))
    assert err_c <= chebyshev_error(bound_a, terms) + 1e-12
    taylor = eye.clone()
    for j in range(terms - 1, 0, -1):
        taylor = eye + a_mat @ taylor / j
    err_t = float(torch.linalg.matrix_norm(taylor - exact, ord=2))
    assert err_t <= taylor_error(bound_a, terms) * (1 + 1e-6) + 1e-12


def test_chebyshev_needs_fewer_terms_than_taylor():
    for a in (0.5, 1.0, 1.8, 3.0):
        assert choose_terms(a, 1e-6, "chebyshev") < choose_terms(a, 1e-6, "taylor")


def _pair(kind: str, **kw):
    torch.manual_seed(3)
    ref = create_model("lipconvnet5", width=4, eval_mode="taylor", **kw).eval()
    fast = create_model("lipconvnet5", width=4, eval_mode="fast", **kw).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("kw", [{}, {"head": "lln", "pooling": "lip"}, {"activation": "hh1"}])
def test_fast_eval_gives_same_logits_and_a_sound_bound(kw):
    ref, fast = _pair("x", **kw)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y_ref, y_fast = ref(x), fast(x)
    assert (y_ref - y_fast).abs().max() < 1e-5
    bound = fast.lipschitz_bound()
    assert abs(bound - ref.lipschitz_bound()) / bound < 1e-5
    assert bound >= empirical_lower_bound(fast, x[:2], iters=8)
    # random pairs never beat the bound
    d = torch.randn_like(x) * 1e-2
    with torch.no_grad():
        ratio = (fast(x + d) - y_fast).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound


def test_plan_is_cached_and_invalidated_by_weight_updates():
    layer = SOC(8, 8, 3, eval_mode="fast").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y1 = layer(x)
    plan = layer._plan
    with torch.no_grad():
        layer(x)
    assert layer._plan is plan  # reused
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer.train()
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        y2 = layer(x)
    assert layer._plan is not plan
    assert not torch.allclose(y1, y2)
    ref = SOC(8, 8, 3, eval_mode="taylor").eval()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (ref(x) - y2).abs().max() < 1e-5 * y2.abs().max()


@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (4, 16, 2), (16, 4, 1), (8, 32, 2)])
def test_fast_soc_is_norm_preserving_where_orthogonal(cin, cout, stride):
    torch.manual_seed(0)
    for k in (1, 3):
        layer = SOC(cin, cout, k, stride=stride, bias=False, eval_mode="fast").eval()
        x = torch.randn(5, cin, 4, 4, dtype=torch.float64)
        layer.double()
        with torch.no_grad():
            y = layer(x)
        ratio = y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
        assert float(ratio.max()) <= layer.lipschitz_bound((4, 4)) + 1e-12
        if cout >= cin * stride * stride:  # an isometry when no output channel is dropped
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6)


def test_fast_eval_supports_input_gradients():
    """Attacks differentiate through the cached plan with respect to the input."""
    _, fast = _pair("x")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert math.isfinite(fast.lipschitz_bound())


def test_certify_cli_fast_eval_matches_taylor(tmp_path):
    """`lipcert certify --eval fast` reports the same accuracies with its own sound bound."""
    import json

    from click.testing import CliRunner

    from certify.checkpoint import save
    from certify.cli import cli

    torch.manual_seed(0)
    model = create_model("lipconvnet5", width=4)
    path = save(tmp_path / "m.safetensors", model, dataset="synthetic", synthetic_size=200, data_seed=0)
    runs = {}
    for mode in ("taylor", "fast"):
        res = CliRunner().invoke(cli, ["certify", str(path), "--split", "all", "--limit", "40",
                                       "--eval", mode, "--format", "json", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        runs[mode] = json.loads(res.stdout)
    t, f = runs["taylor"], runs["fast"]
    bt, bf = t["certificate"]["lipschitz_upper_bound"], f["certificate"]["lipschitz_upper_bound"]
    assert abs(bt - bf) / bt < 1e-5
    assert t["clean_accuracy"] == f["clean_accuracy"]
    assert t["certified_accuracy"] == f["certified_accuracy"]
