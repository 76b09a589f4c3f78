"""Ways a printed certificate could exceed the truth (issue 14, items 1-6), each closed at the
shared mechanism: one prediction and one tie rule for every certificate kind, finite parameters,
eval mode, bounds that follow the weights, IEEE float32, and the float32 rounding covered."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from certify.certificates import CONFIRM_BAND, Certifier, certify_dataset
from certify.errors import CheckpointError, ConfigError, NotLipschitzError
from certify.numerics import ieee_float32, reduced_precision_state
from certify.layers.soc import SOC
from certify.layers import set_eval_mode


def _x(n=6, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- 1. one prediction, and margin 0 gives radius 0, for every certificate kind ----------------

def _tied_mlp_model(tiny_model):
    model = tiny_model(head="mlp", num_classes=3, mlp_hidden=16).eval()
    with torch.no_grad():
        w2, b2 = model.head.fc2.weight, model.head.fc2.bias
        w2[0] = w2[0].abs() * 50  # classes 0 and 1 far ahead of class 2 on every input
        w2[1] = w2[0]
        w2[2] = -w2[0]
        b2.zero_()
        b2[1] = 2.0**-30  # invisible in float32 logits of size ~1, visible to the float64 head
    return model


@pytest.mark.parametrize("method", ["curvature", "curvature-quick"])
def test_a_float32_tie_gets_radius_zero_and_the_reported_class(tiny_model, method):
    model = _tied_mlp_model(tiny_model)
    x = _x()
    cert = Certifier(model, method=method)
    logits, pred, margin, radius = cert(x)
    assert (margin == 0).all(), "the construction must give exact float32 ties"
    assert (radius == 0).all()
    ref = logits.double().topk(2, dim=1).indices[:, 0]
    assert torch.equal(pred, ref)


def test_the_curvature_certificate_uses_the_prediction_it_is_given(tiny_model):
    model = _tied_mlp_model(tiny_model)
    feats = model.features(_x())
    r0 = model.head.certify_features(feats, pred=torch.zeros(6, dtype=torch.long))
    r1 = model.head.certify_features(feats, pred=torch.ones(6, dtype=torch.long))
    assert (r0 == 0).all()  # the float64 head says class 1 is ahead of class 0
    assert (r1 > 0).all()


# ---- 2. non-finite parameters ------------------------------------------------------------------

def test_a_checkpoint_with_a_nan_angle_is_refused(tiny_model, tmp_path):
    from certify.checkpoint import save
    from certify.loading import load

    model = tiny_model(activation="hh2")
    name = next(n for n, _ in model.named_parameters() if "theta" in n or "angle" in n)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = math.nan
    path = save(tmp_path / "nan.safetensors", model)
    with pytest.raises(CheckpointError, match="non-finite"):
        load(path)


@pytest.mark.parametrize("what", ["parameter", "buffer"])
def test_no_bound_and_no_certificate_for_non_finite_weights(tiny_model, what):
    model = tiny_model(activation="hh2").eval()
    with torch.no_grad():
        if what == "parameter":
            next(p for n, p in model.named_parameters() if "theta" in n).view(-1)[0] = math.nan
        else:
            model.normalize.std.view(-1)[0] = math.inf
    with pytest.raises(NotLipschitzError, match="non-finite"):
        model.lipschitz_bound()
    with pytest.raises(NotLipschitzError, match="non-finite"):
        Certifier(model)


def test_weights_turned_nan_after_the_certifier_was_built_are_refused(tiny_model):
    model = tiny_model().eval()
    cert = Certifier(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(NotLipschitzError):
        cert(_x(2))


# ---- 3. training mode --------------------------------------------------------------------------

def test_the_certifier_certifies_the_eval_function_of_a_fresh_model(tiny_model):
    x = _x()
    fresh = tiny_model(seed=3)  # create_model() returns a model in training mode
    assert fresh.training
    r_fresh = Certifier(fresh, precision="float32")(x)[3]
    r_eval = Certifier(tiny_model(seed=3).eval(), precision="float32")(x)[3]
    torch.testing.assert_close(r_fresh, r_eval, rtol=0, atol=0)


def test_switching_back_to_training_mode_does_not_change_the_certificate(tiny_model):
    model = tiny_model().eval()
    x = _x()
    cert = Certifier(model, precision="float32")
    before = cert(x)[3]
    model.train()
    torch.testing.assert_close(cert(x)[3], before, rtol=0, atol=0)


# ---- 4. stale bounds ---------------------------------------------------------------------------

def test_changing_the_input_normalisation_changes_the_certificate(tiny_model):
    model = tiny_model().eval()
    x = _x()
    cert = Certifier(model, precision="float32")
    cert(x)
    with torch.no_grad():
        model.normalize.std.mul_(0.1)
    got = cert(x)[3]
    want = Certifier(model, precision="float32")(x)[3]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_optimizer_step_and_load_state_dict_recompute_the_bound(tiny_model):
    model = tiny_model(head="lln").eval()
    other = tiny_model(seed=5, head="lln").eval()
    x = _x()
    cert = Certifier(model, precision="float32")
    cert(x)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(cert(x)[3], Certifier(other, precision="float32")(x)[3], rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    model(x).sum().backward()
    opt.step()
    model.eval()
    assert cert.refresh()
    assert cert.feature_lipschitz == Certifier(model, precision="float32").feature_lipschitz


def test_switching_the_evaluation_path_recomputes_the_bound(tiny_model):
    model = tiny_model().eval()
    cert = Certifier(model, precision="float32")
    taylor = cert.lipschitz
    set_eval_mode(model, "fast", tol=1e-3)
    cert(_x(2))
    assert cert.lipschitz != taylor
    assert cert.lipschitz == Certifier(model, precision="float32").lipschitz


# ---- 5. TF32 and bf16 off, the caller's settings restored --------------------------------------

class _Spy(nn.Module):
    """A user-bounded model that records the float32 precision switches its forward sees."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 32 * 32, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(reduced_precision_state())
        return self.lin(x.flatten(1).to(self.lin.weight.dtype))


def test_certification_runs_in_ieee_float32_and_restores_the_user_setting():
    spy = _Spy()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # oneDNN bf16 / TF32 matrix products
        before = reduced_precision_state()
        assert any(v in ("tf32", "bf16") for v in before.values())
        cert = Certifier(spy, lipschitz=10.0)
        cert(_x(2))
        certify_dataset(spy, [(_x(1)[0], 0)], lipschitz=10.0)
        assert spy.seen and all(s["matmul_precision"] == "highest" for s in spy.seen)
        assert all(v in ("ieee", "highest") for s in spy.seen for k, v in s.items() if "." in k)
        assert reduced_precision_state() == before
    finally:
        torch.set_float32_matmul_precision(old)


def test_ieee_float32_restores_the_settings_when_the_block_raises():
    before = reduced_precision_state()
    with pytest.raises(RuntimeError):
        with ieee_float32():
            raise RuntimeError("boom")
    assert reduced_precision_state() == before


# ---- 6a. the applied Chebyshev coefficients are the ones bounded -------------------------------

def test_fast_path_coefficients_are_float32_numbers_and_their_rounding_is_bounded():
    torch.manual_seed(0)
    soc = SOC(4, 4, 3).eval()
    set_eval_mode(soc, "fast", tol=1e-6)
    plan = soc.eval_plan((4, 4), torch.device("cpu"), torch.float32)
    assert plan.kind == "chebyshev"
    assert all(float(torch.tensor(c, dtype=torch.float32)) == c for c in plan.coeffs)
    from certify.layers.expm import chebyshev_coefficients, chebyshev_error

    # the plan's degree is the one chosen for a' = a (1 + 1e-4); find it from the coefficients
    from certify.layers.norms import skew_conv_norm_bound

    a_used = skew_conv_norm_bound(soc.skew_filter().detach(), (4, 4)) * (1 + 1e-4)
    exact = chebyshev_coefficients(a_used, plan.terms)
    rounding = sum(abs(c - r) for c, r in zip(exact, plan.coeffs))
    assert rounding > 0
    assert plan.bound >= 1 + chebyshev_error(a_used, plan.terms) + rounding


def test_a_float64_evaluation_applies_the_same_dense_operator_as_float32(tiny_model):
    model = tiny_model().eval()
    set_eval_mode(model, "fast", images=100_000)
    plans = []
    for m in model.modules():
        if isinstance(m, SOC) and m.kernel_size == 3:
            p32 = m.eval_plan((2, 2), torch.device("cpu"), torch.float32)
            p64 = m.eval_plan((2, 2), torch.device("cpu"), torch.float64)
            plans.append((p32, p64))
    assert plans
    for p32, p64 in plans:
        assert p32.kind == p64.kind
        if p32.kind == "chebyshev":
            assert p32.coeffs == p64.coeffs
        assert torch.equal(p32.tensor.double(), p64.tensor)


# ---- 6b. the float32 rounding of the forward pass ----------------------------------------------

class _Rounded(nn.Module):
    """A linear model whose float32 forward is off by ``delta`` on class 0 (a stand-in for
    rounding error), while its float64 forward is exact."""

    def __init__(self, delta: float):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 32 * 32, 3)
        self.delta = delta

    def forward(self, x):
        z = nn.functional.linear(x.flatten(1), self.lin.weight.to(x.dtype), self.lin.bias.to(x.dtype))
        if x.dtype == torch.float32:
            z = z + torch.tensor([self.delta, 0.0, 0.0])
        return z


def _threshold_between(model, x, lipschitz):
    """A radius between the float64 and the float32 radius of the sample predicted as class 0."""
    r32 = Certifier(model, lipschitz=lipschitz, precision="float32")(x)[3]
    r64 = Certifier(model, lipschitz=lipschitz, precision="float64")(x)[3]
    pred = model(x.double()).argmax(1)
    i = int((pred == 0).nonzero()[0, 0])
    assert r32[i] > r64[i]
    return i, float((r32[i] + r64[i]) / 2), r64


def _inputs_with_class0():
    model = _Rounded(0.0)
    x = _x(64)
    pred = model(x.double()).argmax(1)
    assert (pred == 0).any()
    return x


def test_radii_near_a_threshold_are_confirmed_in_float64():
    x = _inputs_with_class0()
    model = _Rounded(1e-6)  # a relative radius error far below the band
    i, eps, r64 = _threshold_between(model, x, 50.0)
    unchecked = Certifier(model, lipschitz=50.0, precision="float32")(x, thresholds=[eps])[3]
    assert unchecked[i] > eps  # the hole: float32 alone certifies it at eps
    cert = Certifier(model, lipschitz=50.0)
    first = cert(x, thresholds=[eps])[3]  # the calibration batch: all of it in float64
    assert cert.rechecked == x.shape[0] and not cert.escalated
    radius = cert(x, thresholds=[eps])[3]  # then only the samples near a threshold
    for r in (first, radius):
        assert r[i] <= eps
        torch.testing.assert_close(r[i], r64[i], rtol=1e-12, atol=0)
    assert x.shape[0] < cert.rechecked < 2 * x.shape[0]
    assert cert.max_float32_error < CONFIRM_BAND / 10


def test_a_batch_with_large_float32_error_is_evaluated_in_float64_throughout():
    x = _inputs_with_class0()
    model = _Rounded(0.05)  # an error larger than the band: the band alone would not be safe
    i, eps, r64 = _threshold_between(model, x, 50.0)
    cert = Certifier(model, lipschitz=50.0)
    for call in (1, 2):
        radius = cert(x, thresholds=[eps])[3]
        assert torch.all(radius <= r64 * (1 + 1e-12))
        assert cert.escalated and cert.rechecked == call * x.shape[0]
    assert radius[i] < eps


def test_the_report_says_what_the_certificate_covers(tiny_model):
    model = tiny_model(num_classes=4).eval()
    ds = [(x, 0) for x in _x(4)]
    summary = certify_dataset(model, ds).summary["certificate"]
    assert summary["precision"] == "confirm"
    assert summary["float64_rechecked"] >= 0
    with pytest.raises(ConfigError):
        Certifier(model, precision="float16")


def test_cli_certify_records_the_precision(tmp_path, tiny_model):
    import json

    from click.testing import CliRunner

    from certify.checkpoint import save
    from certify.cli import cli

    path = save(tmp_path / "m.safetensors", tiny_model(num_classes=10).eval(), dataset="synthetic")
    out = CliRunner().invoke(cli, ["certify", str(path), "--dataset", "synthetic", "--limit", "8",
                                    "--precision", "float64", "--format", "json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["certificate"]["precision"] == "float64"
    assert summary["certificate"]["float64_throughout"] is True
    assert summary["certificate"]["float64_rechecked"] == 8
