"""SOC trained with ``train_terms="auto"``: the training polynomial's degree chosen per layer from
the sound norm bound (issue 17), its fast backward, and its fidelity to the certified function."""

import math

import pytest
import torch

from certify.errors import ConfigError
from certify.layers import soc as soc_mod
from certify.layers.expm import chebyshev_error
from certify.layers.norms import skew_conv_norm_bound
from certify.layers.soc import SOC, _FastPoly, _FastSOC, polynomial_series


def _layer(**kw):
    torch.manual_seed(0)
    return SOC(6, 6, 3, train_terms="auto", **kw)


def test_fast_poly_with_taylor_coefficients_is_the_papers_fast_backward():
    torch.manual_seed(1)
    skew = SOC(5, 5, 3).skew_filter().detach()
    x = torch.randn(3, 5, 6, 6, requires_grad=True)
    g = torch.randn(3, 5, 6, 6)
    taylor = tuple(1 / math.factorial(k) for k in range(6))
    outs = []
    for fn, arg in ((_FastSOC, 6), (_FastPoly, taylor)):
        s = skew.clone().requires_grad_(True)
        y = fn.apply(x, s, arg)
        gx, gs = torch.autograd.grad(y, (x, s), g)
        outs.append((y, gx, gs))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True])
def test_fast_poly_input_gradient_is_exact(dense):
    torch.manual_seed(2)
    skew = SOC(4, 4, 3).skew_filter().detach()
    coeffs = (0.99, 1.01, 0.48, 0.17, 0.04)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    if dense:
        op = soc_mod.dense_conv_matrix(skew.double(), (2, 2))
        x = x.flatten(1)
    else:
        op = skew.double()
    x.requires_grad_(True)
    g = torch.randn_like(x)
    (fast,) = torch.autograd.grad(_FastPoly.apply(x, op, coeffs), x, g)
    (exact,) = torch.autograd.grad(polynomial_series(x, op, coeffs), x, g)
    torch.testing.assert_close(fast, exact)
    torch.testing.assert_close(_FastPoly.apply(x, op, coeffs), polynomial_series(x, op, coeffs))


@pytest.mark.parametrize("tol", [0.05, 1e-3])
@pytest.mark.parametrize("backward", ["fast", "exact"])
def test_trained_function_is_the_certified_one_to_the_tolerance(tol, backward):
    layer = _layer(train_tol=tol, backward=backward, eval_mode="fast", eval_tol=1e-7)
    x = torch.randn(4, 6, 7, 7, dtype=torch.float32)
    layer.train()
    with torch.no_grad():
        trained = layer(x)
    layer.eval()
    with torch.no_grad():
        certified = layer(x)
    # ||p(A) - exp(A)|| <= tol per input, up to float32 rounding (bias cancels)
    gap = (trained - certified).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert float(gap.max()) <= tol + 1e-5
    # and the chosen degree is the fewest whose bound meets tol for the sound bound (with margin)
    a = skew_conv_norm_bound(layer.skew_filter().detach(), (7, 7)) * (1 + soc_mod.TRAIN_BOUND_MARGIN)
    layer.train()
    k = layer.terms
    assert chebyshev_error(a, k) <= tol < chebyshev_error(a, k - 1)


def test_auto_uses_fewer_terms_than_the_paper_where_the_norm_allows():
    # a 1x1 layer's scaled filter has norm ~1: the Chebyshev error of 5 terms is ~6e-4, so at the
    # paper's 6-term Taylor error at norm 1 (1/720) auto trains with 5 terms (4 products, not 5)
    torch.manual_seed(0)
    layer = SOC(16, 16, 1, train_terms="auto", train_tol=1 / 720)
    layer.train()
    layer(torch.randn(2, 16, 4, 4))
    assert layer.terms < 6


def test_bound_is_refreshed_on_schedule_and_resume_trains_the_same_polynomials(monkeypatch):
    monkeypatch.setattr(soc_mod, "TRAIN_BOUND_EVERY", 3)
    calls = []
    real = soc_mod.skew_conv_norm_bound
    monkeypatch.setattr(soc_mod, "skew_conv_norm_bound", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    x = torch.randn(2, 6, 5, 5)
    for step in range(4):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    assert len(calls) == 2  # forwards 0 and 3
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    resumed = _layer()
    resumed.load_state_dict(state)
    resumed.train()
    layer.train()
    torch.testing.assert_close(resumed(x), layer(x), rtol=0, atol=0)  # forward 4: stored bound, no refresh
    assert len(calls) == 2


def test_auto_refuses_bad_values():
    with pytest.raises(ConfigError, match="train_terms"):
        SOC(4, 4, 3, train_terms="six")
    with pytest.raises(ConfigError, match="train_terms"):
        SOC(4, 4, 3, train_terms=1)
    with pytest.raises(ConfigError, match="train_tol"):
        SOC(4, 4, 3, train_terms="auto", train_tol=0.0)


def test_auto_reduces_the_loss():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(8, 6, 5, 5), torch.randn(8, 6, 5, 5)
    layer.train()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_cli_trains_with_auto_terms_certifies_and_resumes(tmp_path):
    import json

    from click.testing import CliRunner

    from certify.cli import cli

    out = tmp_path / "run"
    base = ["train", "--dataset", "synthetic", "--synthetic-size", "48", "--val-split", "16", "--width", "2",
            "--batch-size", "16", "--power-iters", "1", "--device", "cpu", "--no-progress",
            "--train-terms", "auto", "--model-option", "train_tol=0.01", "--output", str(out)]
    r = CliRunner().invoke(cli, [*base, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["train_terms"] == "auto" and config["model_options"]["train_tol"] == 0.01
    r = CliRunner().invoke(cli, ["train", "--resume", "--output", str(out), "--epochs", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["certify", str(out / "best.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_auto_trains_under_bfloat16_autocast():
    # the backward runs outside autocast: what the forward saves must match the filter's dtype
    layer = _layer()
    layer.train()
    x = torch.randn(2, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
