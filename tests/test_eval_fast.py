"""The fast evaluation path: Chebyshev/Taylor error bounds, cached SOC plans, same logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.errors import ConfigError
from certify.layers.expm import (
    chebyshev_apply,
    chebyshev_coefficients,
    chebyshev_error,
    chebyshev_to_monomial,
    choose_terms,
    matrix_products,
    paterson_stockmeyer,
    taylor_error,
)
from certify.lipschitz import empirical_lower_bound
from certify.models import create_model
from certify.layers.soc import SOC, dense_conv_matrix, dense_pays_off
from certify.layers import set_eval_mode


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


class _CountMatmuls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@settings(max_examples=25, deadline=None)
@given(norm=st.floats(0.05, 3.0), terms=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_paterson_stockmeyer_matches_clenshaw_with_fewer_products(norm, terms, seed):
    """The dense plan's polynomial (monomial form, Paterson-Stockmeyer) is the Chebyshev one, and
    it uses the number of matrix products the cost model counts."""
    s = _random_skew(20, 1.0, seed)
    coeffs = chebyshev_coefficients(norm, terms)
    ref = chebyshev_apply(torch.eye(20, dtype=torch.float64), lambda v: s @ v, coeffs)
    with _CountMatmuls() as counter:
        got = paterson_stockmeyer(s, chebyshev_to_monomial(coeffs))
    assert (got - ref).abs().max() < 1e-12
    assert counter.count == matrix_products(terms - 1)
    if terms - 1 >= 5:
        assert counter.count < terms - 2  # fewer than Clenshaw's terms - 1 products


@pytest.mark.parametrize("k,size", [(1, (3, 3)), (3, (1, 1)), (3, (2, 2)), (3, (3, 5)), (5, (4, 4))])
def test_dense_conv_matrix_is_the_zero_padded_convolution(k, size):
    torch.manual_seed(0)
    w = torch.randn(5, 5, k, k, dtype=torch.float64)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, w, padding=k // 2).flatten(1)
    assert torch.allclose(y, x.flatten(1) @ dense_conv_matrix(w, size).T, atol=1e-12)


def test_dense_pays_off_only_on_small_maps_and_enough_images():
    dims = lambda c, hw: (c * hw, c * hw)  # noqa: E731
    assert not dense_pays_off((2, 2), 64, 3, 10, 0, dims(64, 4))
    assert dense_pays_off((2, 2), 64, 3, 10, 10**6, dims(64, 4))
    # per image, a dense 16x16 (or 8x8 with few terms) operator costs more than the convolutions
    assert not dense_pays_off((16, 16), 8, 3, 10, 10**12, dims(8, 256))
    assert not dense_pays_off((8, 8), 16, 3, 4, 10**12, dims(16, 64))
    # the build is amortised: more images are needed for a larger operator
    small = min(i for i in (2**j for j in range(40)) if dense_pays_off((2, 2), 64, 3, 10, i, dims(64, 4)))
    large = min(i for i in (2**j for j in range(40)) if dense_pays_off((2, 2), 256, 3, 10, i, dims(256, 4)))
    assert small < large


@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (4, 16, 2), (16, 4, 1), (8, 12, 2)])
def test_dense_plan_gives_same_outputs_and_bounds_its_exact_norm(cin, cout, stride):
    """A SOC layer materialised as one dense matrix: same outputs as the Taylor path (channel
    padding and slicing folded in), and its bound is at least the exact norm of that matrix."""
    torch.manual_seed(1)
    ref = SOC(cin, cout, 3, stride=stride, eval_mode="taylor").eval()
    dense = SOC(cin, cout, 3, stride=stride, eval_mode="fast").eval()
    dense.load_state_dict(ref.state_dict())
    set_eval_mode(dense, "fast", images=10**9)
    size = (2 * stride, 2 * stride)
    x = torch.randn(6, cin, *size)
    with torch.no_grad():
        y_ref, y = ref(x), dense(x)
    assert dense._plan.kind == "dense"
    assert (y - y_ref).abs().max() < 1e-5
    exact = float(torch.linalg.matrix_norm(dense._plan.tensor.double(), ord=2))
    bound = dense.lipschitz_bound(size)
    assert exact <= bound < exact * (1 + 1e-6)
    assert abs(bound - ref.lipschitz_bound(size)) < 1e-5
    set_eval_mode(dense, "fast", dense_max=0)  # the limit turns materialisation off
    with torch.no_grad():
        dense(x)
    assert dense._plan.kind == "chebyshev"


def test_dense_plans_in_a_model_keep_logits_bound_and_gradients():
    ref, fast = _pair("x")
    set_eval_mode(fast, "fast", images=10**9)
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    y = fast(x)
    kinds = {m._plan.kind for m in fast.modules() if isinstance(m, SOC)}
    assert "dense" in kinds and "chebyshev" in kinds  # small maps dense, the 32x32 one not
    with torch.no_grad():
        assert (y - ref(x)).abs().max() < 1e-5
    bound = fast.lipschitz_bound()
    assert abs(bound - ref.lipschitz_bound()) / bound < 1e-5
    assert bound >= empirical_lower_bound(fast, x.detach()[:2], iters=8)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_set_eval_mode_rejects_bad_dense_options():
    _, fast = _pair("x")
    with pytest.raises(ConfigError, match="images"):
        set_eval_mode(fast, "fast", images=-1)
    with pytest.raises(ConfigError, match="dense_max"):
        set_eval_mode(fast, "fast", dense_max=-5)


def test_certify_cli_materialises_dense_layers_when_they_pay_off(tmp_path, monkeypatch):
    """`lipcert certify --eval fast` weighs the dense operators' build against the number of
    images: none for a few images or with --dense-max 0, some for many; accuracies unchanged."""
    import json

    from click.testing import CliRunner

    import certify.layers.soc as soc
    from certify.checkpoint import save
    from certify.cli import cli

    built = []
    real = soc.dense_conv_matrix
    monkeypatch.setattr(soc, "dense_conv_matrix", lambda w, size: built.append(size) or real(w, size))
    torch.manual_seed(0)
    model = create_model("lipconvnet5", width=4)
    path = save(tmp_path / "m.safetensors", model, dataset="synthetic", synthetic_size=3000, data_seed=0)
    runs = {}
    for name, extra in {"few": ["--limit", "20"], "off": ["--dense-max", "0"], "many": []}.items():
        built.clear()
        res = CliRunner().invoke(cli, ["certify", str(path), "--split", "all", "--eval", "fast", "--format",
                                       "json", "--device", "cpu", "--batch-size", "500", *extra])
        assert res.exit_code == 0, res.output
        runs[name] = (json.loads(res.stdout), list(built))
    assert runs["few"][1] == [] and runs["off"][1] == []
    assert runs["many"][1]  # at least one layer on a small map became dense
    off, many = runs["off"][0], runs["many"][0]
    assert many["config"]["dense_max"] == 8192 and off["config"]["dense_max"] == 0
    assert off["clean_accuracy"] == many["clean_accuracy"]
    b_off, b_many = (r["certificate"]["lipschitz_upper_bound"] for r in (off, many))
    assert abs(b_off - b_many) / b_off < 1e-5


def test_clenshaw_with_the_doubled_filter_is_bitwise_the_same():
    """The fast path convolves with 2S instead of doubling each product: exact in floating point."""
    torch.manual_seed(0)
    s = torch.randn(8, 8, 3, 3) / 10
    x = torch.randn(4, 8, 6, 6)
    coeffs = chebyshev_coefficients(1.3, 9)
    conv = lambda f: (lambda v: torch.nn.functional.conv2d(v, f, padding=1))  # noqa: E731
    plain = chebyshev_apply(x, conv(s), coeffs)
    doubled = chebyshev_apply(x, conv(s), coeffs, conv(2 * s))
    assert torch.equal(plain, doubled)
