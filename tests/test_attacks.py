"""Attacks (PGD-L2, APGD-CE/DLR, min-norm search) and the certificate audit.

Models are tiny so the suite stays fast on 2 shared CPU cores: a plain (non-robust) conv net on
8x8 images for attack strength, and a small genuine SOC network (SOC layers, MaxMin, channel
pooling, orthogonal head, with the library's rigorous layer bounds) for the audit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certify import attacks as A
from certify.layers.activations import make_activation
from certify.audit import audit_certificates, quantiles, summarize_audit
from certify.certificates import Certifier
from certify.errors import ConfigError
from certify.layers.heads import OrthoHead
from certify.lipschitz import layer_bounds, product
from certify.layers.pooling import make_pooling
from certify.layers.soc import SOC

SHAPE = (3, 8, 8)


def _blobs(n: int, seed: int, signal: float = 0.08, classes: int = 3):
    """Images near 0.5 whose class raises one colour channel a little: separable, but only by a
    small l2 distance (class means are about signal * 8 * sqrt(2) ~ 0.9 apart)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.5 + 0.05 * torch.randn(n, *SHAPE, generator=g)
    x[torch.arange(n), y % SHAPE[0]] += signal * (1 if classes <= 3 else (y // 3 * 2 - 1)[:, None, None])
    return x.clamp(0, 1), y


def _train(model, x, y, steps, lr=0.05, scale=1.0):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x) * scale, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def plain_model():
    """A non-robust conv net trained to 100% clean accuracy on the blobs."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 3))
    x, y = _blobs(192, seed=1)
    return _train(m, x, y, steps=80, lr=1e-2)


class TinySOCNet(nn.Module):
    """A miniature LipConvnet: SOC 3->8, MaxMin, SOC 8->32 stride 2, max pooling, orthogonal head,
    certified through the same rigorous per-layer bounds as the registry's models."""

    input_shape = SHAPE
    head_kind = "ortho"

    def __init__(self, classes: int = 3):
        super().__init__()
        self.chain = nn.ModuleList([SOC(3, 8, 3), make_activation("maxmin", 8), SOC(8, 32, 3, stride=2),
                                    make_pooling("max", 32)])
        self.head = OrthoHead(16 * 4 * 4, classes)
        self.num_classes = classes

    def forward(self, x):
        for layer in self.chain:
            x = layer(x)
        return self.head(x.flatten(1))

    def lipschitz_bound(self) -> float:
        bounds, _ = layer_bounds([(str(i), m) for i, m in enumerate(self.chain)], SHAPE[1:])
        return product(bounds) * self.head.lipschitz_bound()


@pytest.fixture(scope="module")
def soc_model():
    torch.manual_seed(0)
    x, y = _blobs(96, seed=2, signal=0.25)
    return _train(TinySOCNet(), x, y, steps=30, lr=0.02, scale=4.0)


# ---- projection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.3, 5.0])
def test_projection_stays_in_ball_and_box(eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, *SHAPE, generator=g)
    x[:4] = 0.0
    x[4:8] = 1.0  # corners, where the box clamp binds hardest
    wild = x + 3 * torch.randn(32, *SHAPE, generator=g)
    e = A.as_eps(eps, 32)
    p = A.project(x, wild, e)
    norms = (p.double() - x.double()).flatten(1).norm(dim=1)
    assert (norms <= eps).all()
    assert p.min() >= 0 and p.max() <= 1
    A.check_feasible(x, p, e)  # the attacks' own assertion agrees
    # Points already feasible are left (almost) alone.
    inside = A.project(x, p, e)
    assert torch.allclose(inside, p, atol=1e-6)


def test_check_feasible_catches_bad_points():
    x = torch.full((2, *SHAPE), 0.5)
    with pytest.raises(AssertionError):
        A.check_feasible(x, x + 0.1, A.as_eps(0.1, 2))  # norm 0.1 * sqrt(192) > 0.1
    with pytest.raises(AssertionError):
        A.check_feasible(x, x * 3, A.as_eps(100.0, 2))  # outside [0, 1]


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 -> ceil(p * 100)
    assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_loss_is_shift_and_scale_invariant():
    z = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 2.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    base = A.dlr_loss(z, y)
    assert torch.allclose(A.dlr_loss(3 * z + 7, y), base, atol=1e-6)
    assert base[0] < 0 < base[1]  # negative when correct, positive when wrong
    assert torch.allclose(base, torch.tensor([-2.0 / 2.5, 2.0 / 2.0]))


# ---- attack strength on a non-robust model -------------------------------------------------------


@pytest.mark.parametrize("attack", A.ATTACKS)
def test_attacks_break_a_plain_model_at_large_eps(plain_model, attack):
    x, y = _blobs(48, seed=3)
    with torch.no_grad():
        assert (plain_model(x).argmax(1) == y).float().mean() > 0.9
    res = A.run_attack(plain_model, x, y, 2.0, attack, steps=20)
    assert res.robust_accuracy <= 0.05
    assert (res.norm <= 2.0).all() and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # The reported success is real: re-evaluate the adversarial points.
    with torch.no_grad():
        pred = plain_model(res.x_adv).argmax(1)
    assert torch.equal(pred[res.success], res.adv_pred[res.success])
    assert (pred[res.success] != y[res.success]).all()
    # A tiny eps leaves the model robust: attacks do not invent successes.
    small = A.run_attack(plain_model, x, y, 1e-3, attack, steps=5)
    assert small.robust_accuracy == 1.0


def test_same_seed_same_result_and_seed_matters(plain_model):
    x, y = _blobs(24, seed=4)
    a = A.attack_ensemble(plain_model, x, y, 0.4, steps=8, seed=7)
    b = A.attack_ensemble(plain_model, x, y, 0.4, steps=8, seed=7)
    c = A.attack_ensemble(plain_model, x, y, 0.4, steps=8, seed=8)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_per_sample_eps_and_early_exit(plain_model):
    x, y = _blobs(16, seed=5)
    eps = torch.tensor([1e-3] * 8 + [3.0] * 8, dtype=torch.float64)
    res = A.apgd_l2(plain_model, x, y, eps, steps=15, loss="dlr")
    assert (res.norm <= eps).all()
    assert not res.success[:8].any() and res.success[8:].all()
    # Broken samples stopped early: fewer forward passes than the unbroken ones.
    assert res.queries[8:].max() < res.queries[:8].min()
    # Misclassified samples are counted broken at zero cost.
    y_wrong = (y + 1) % 3
    res2 = A.pgd_l2(plain_model, x, y_wrong, 0.5, steps=5)
    assert res2.success.all() and (res2.norm == 0).all() and set(res2.attack) == {"clean"}


def test_min_norm_search_brackets_the_linear_boundary():
    """For a linear model the exact minimal adversarial distance is known in closed form:
    min_j (f_y - f_j) / ||w_y - w_j|| (when the box does not bind)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    x, y = _blobs(12, seed=6)
    _train(lin, x, y, steps=60, lr=1e-2)
    with torch.no_grad():
        z = lin(x)
    w = lin[1].weight.detach().double()
    gaps = z.double().gather(1, y[:, None]) - z.double()
    dist = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
    exact = torch.where(dist > 0, gaps / dist, torch.full_like(gaps, math.inf))
    exact.scatter_(1, y[:, None], math.inf)
    exact = exact.amin(1)
    mn = A.min_norm_search(lin, x, y, init_eps=0.1, search_steps=8, steps=10)
    ok = exact > 0
    assert mn.found[ok].all()
    # The empirical radius is a witness: never below the truth; and the search is close to it
    # (bisection over the attack, then a line search along the witness: within ~6% here).
    assert (mn.radius[ok] >= exact[ok] * (1 - 1e-4)).all()
    assert (mn.radius[ok] <= exact[ok] * 1.10).all()
    assert (mn.adv_pred[ok] != y[ok]).all()


def test_bad_inputs_raise_config_errors(plain_model):
    x, y = _blobs(4, seed=0)
    with pytest.raises(ConfigError):
        A.pgd_l2(plain_model, x, y, 0.0)
    with pytest.raises(ConfigError):
        A.pgd_l2(plain_model, x, y, float("nan"))
    with pytest.raises(ConfigError):
        A.pgd_l2(plain_model, x, y, torch.ones(3))  # wrong number of radii
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        A.apgd_l2(plain_model, bad, y, 0.5)
    with pytest.raises(ConfigError):
        A.apgd_l2(plain_model, x * 2, y, 0.5)  # not in [0, 1]
    with pytest.raises(ConfigError):
        A.attack_ensemble(plain_model, x, y, 0.5, "fgsm")
    with pytest.raises(ConfigError):
        A.pgd_l2(lambda t: t, x, y, 0.5)  # not a torch module (e.g. an ONNX session)


# ---- audit ---------------------------------------------------------------------------------------


def test_audit_finds_no_violation_on_a_trained_1_lipschitz_model(soc_model):
    x, y = _blobs(24, seed=7, signal=0.25)
    cert = Certifier(soc_model)
    _, pred, _, radius = cert(x)
    assert (pred == y).float().mean() > 0.6
    batch = audit_certificates(soc_model, x, y, radius, steps=10, tightness=True, search_steps=4)
    summary = summarize_audit([batch], cert.lipschitz)
    assert summary["certified_audited"] >= 10
    assert summary["violations"] == 0 and summary["passed"]
    # Sound certificates: every empirical radius is at least the certified one.
    t = batch.tightness[batch.certified]
    assert torch.isfinite(t).all() and (t >= 1).all()
    assert summary["tightness"]["min"] >= 1
    # The attacks' Lipschitz estimate is a lower bound, below the rigorous upper bound.
    assert 0 < summary["lipschitz_lower_attack"] <= cert.lipschitz
    assert summary["lipschitz_gap"] >= 1


def test_audit_catches_inflated_certificates(soc_model):
    """The audit can fail: radii inflated 10x are lies, and it finds witnesses for them."""
    x, y = _blobs(24, seed=7, signal=0.25)
    _, _, _, radius = Certifier(soc_model)(x)
    batch = audit_certificates(soc_model, x, y, radius * 10, steps=10, tightness=False)
    summary = summarize_audit([batch])
    assert summary["violations"] > 0 and not summary["passed"]
    v = batch.violation
    assert (batch.adv_norm[v] < batch.radius[v]).all()
    with torch.no_grad():
        assert (soc_model(batch.x_adv[v]).argmax(1) != y[v]).all()


def test_quantiles_ignore_non_finite():
    q = quantiles(torch.tensor([1.0, 2.0, 3.0, math.inf, math.nan], dtype=torch.float64))
    assert q["min"] == 1.0 and q["median"] == 2.0 and q["max"] == 3.0
    assert quantiles(torch.tensor([math.nan])) == {}


def _colour_classes(n: int):
    """n seeded 32x32 images in 3 classes, each class brighter in its own colour channel."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = 0.4 + 0.1 * torch.rand(n, 3, 32, 32, generator=g)
    x[torch.arange(n), y] += 0.3
    return x, y


def _audit_first(model, cert, x, y, n: int):
    """Certify the first n images, attack each inside its certified radius, assert 0 violations
    among at least one certified image; returns the audit batch and its summary."""
    _, _, _, radius = cert(x[:n])
    batch = audit_certificates(model, x[:n], y[:n], radius, steps=20, tightness=True, search_steps=4)
    summary = summarize_audit([batch], cert.lipschitz)
    assert summary["certified_audited"] > 0
    assert summary["violations"] == 0 and summary["passed"]
    return batch, summary


@pytest.mark.slow
def test_audit_on_a_trained_lipconvnet5(tiny_model):
    """The registry's LipConvnet-5 (width 4), trained a few dozen steps: 0 violations."""
    x, y = _colour_classes(48)
    model = _train(tiny_model(num_classes=3), x, y, steps=30, lr=0.01, scale=4.0)
    cert = Certifier(model)
    _, summary = _audit_first(model, cert, x, y, 16)
    assert summary["lipschitz_lower_attack"] <= cert.lipschitz


def test_audit_on_a_trained_mlp_head_lipconvnet(tiny_model):
    """The MLP head's tight curvature certificate, on LipConvnet-5 trained a few dozen steps with
    its curvature regulariser: strong attacks inside every certified radius find 0 violations."""
    x, y = _colour_classes(36)
    model = tiny_model("lipconvnet5_mlp", width=2, num_classes=3, mlp_hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(30):
        loss = F.cross_entropy(model(x) * 4.0, y) + model.head.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cert = Certifier(model)
    assert cert.method == "curvature"
    batch, _ = _audit_first(model, cert, x, y, 12)
    t = batch.tightness[batch.certified]
    assert (t[torch.isfinite(t)] >= 1).all()


def test_audit_on_dense_fast_evaluation(tiny_model):
    """The fast evaluation path with the small-map SOC layers materialised as dense matrices (and
    certified with those matrices' exact norms): strong attacks inside every certified radius of
    a trained LipConvnet-5 find 0 violations."""
    from certify.layers.soc import SOC
    from certify.layers import set_eval_mode

    x, y = _colour_classes(36)
    model = _train(tiny_model(width=2, num_classes=3), x, y, steps=25, lr=0.01, scale=4.0)
    set_eval_mode(model, "fast", images=10**9)
    cert = Certifier(model)
    assert any(m._plan.kind == "dense" for m in model.modules() if isinstance(m, SOC))
    _, summary = _audit_first(model, cert, x, y, 12)
    assert summary["lipschitz_lower_attack"] <= cert.lipschitz


# ---- audit cost, batching and arithmetic ---------------------------------------------------------


class _Recorder(nn.Module):
    """Wraps a model; records each forward's batch size and float32 matmul precision."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.sizes: list[int] = []
        self.precisions: set[str] = set()

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.precisions.add(torch.get_float32_matmul_precision())
        return self.model(x)


class _Items:
    """A dataset of float images (the __getitem__ path of attack_dataset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_attacks_and_audit_run_with_ieee_float32(plain_model, soc_model):
    """TF32/bf16 switches a caller set are off inside every attack and audit entry point, and
    restored afterwards."""
    from certify.audit import attack_dataset

    x, y = _blobs(6, seed=8, signal=0.25)
    rec = _Recorder(plain_model)
    soc = _Recorder(soc_model)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        A.pgd_l2(rec, x, y, 0.1, steps=2)
        A.apgd_l2(rec, x, y, 0.1, steps=2)
        A.attack_ensemble(rec, x, y, 0.1, steps=2)
        A.min_norm_search(rec, x, y, steps=2, search_steps=1, line_search_steps=1)
        _, _, _, radius = Certifier(soc_model)(x)
        audit_certificates(soc, x, y, radius, steps=2, tightness=True, search_steps=1)
        attack_dataset(soc, _Items(x, y), [("0.1", 0.1)], attacks="pgd", steps=2, audit=True,
                       certifier=Certifier(soc_model))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert rec.precisions == {"highest"} and soc.precisions == {"highest"}


def test_default_audit_costs_one_attack_ensemble(soc_model):
    """The tightness search (about search_steps + 2 ensembles more) is opt-in: the default audit
    spends at most one ensemble's forward passes per certified sample, and measures no
    empirical radius; with tightness=True it does."""
    x, y = _blobs(24, seed=7, signal=0.25)
    _, _, _, radius = Certifier(soc_model)(x)
    steps = 5
    rec = _Recorder(soc_model)
    batch = audit_certificates(rec, x, y, radius, steps=steps)
    audited = int(batch.certified.sum())
    assert audited >= 10
    # one clean pass of all, then per attack: a clean pass, the steps and the last iterate
    assert sum(rec.sizes) <= len(y) + len(A.ATTACKS) * (steps + 2) * audited
    assert torch.isnan(batch.empirical_radius).all()
    assert summarize_audit([batch])["tightness_not_broken"] is None
    measured = audit_certificates(soc_model, x, y, radius, steps=steps, tightness=True, search_steps=2)
    assert torch.isfinite(measured.empirical_radius[measured.certified]).all()


def test_attack_dataset_audits_certified_images_together(soc_model, monkeypatch):
    """The audit attacks the certified images of the whole dataset together, in the fewest batches
    of at most batch_size (not the certified part of each batch), and maps its results back to the
    dataset's indices."""
    import certify.audit as audit_mod

    x, y = _blobs(40, seed=9, signal=0.25)
    y[::3] = (y[::3] + 1) % 3  # 14 wrong labels: not certified, not audited
    calls = []
    real = audit_mod.audit_certificates

    def recording(model, xs, ys, r, **kw):
        out = real(model, xs, ys, r, **kw)
        calls.append(int(out.certified.sum()))
        return out

    monkeypatch.setattr(audit_mod, "audit_certificates", recording)
    cert = Certifier(soc_model)
    _, pred, _, radius = cert(x)
    certified = int(((pred == y) & (radius > 0)).sum())
    assert 8 < certified < 40 and certified % 8  # several batches, some partly certified
    report = audit_mod.attack_dataset(soc_model, _Items(x, y), [("0.01", 0.01)], attacks="apgd-ce", steps=3,
                                      audit=True, batch_size=8, certifier=cert)
    chunks = -(-certified // 8)  # the fewest batches of at most 8, of nearly equal sizes
    assert len(calls) == chunks and sum(calls) == certified and max(calls) - min(calls) <= 1
    assert report.summary["audit"]["certified_audited"] == certified
    rows = report.radii
    assert [r["index"] for r in rows] == list(range(40))
    for r in rows:
        assert r["audited"] == (r["clean_prediction"] == r["label"] and r["certified_radius"] > 0)
        if r["audited"]:
            assert r["audit_perturbation_norm"] <= r["audit_eps"] < r["certified_radius"]


def test_attack_dataset_maps_inflated_certificates_to_their_images(soc_model):
    """Radii inflated 10x: the audit's violations carry the dataset indices of their images."""
    from certify.audit import attack_dataset

    class Liar(Certifier):
        def __call__(self, x, thresholds=()):
            logits, pred, margin, radius = super().__call__(x, thresholds)
            return logits, pred, margin, radius * 10

    x, y = _blobs(24, seed=7, signal=0.25)
    report = attack_dataset(soc_model, _Items(x, y), [("0.01", 0.01)], steps=10, audit=True, batch_size=8,
                            certifier=Liar(soc_model), keep_adversarials=True)
    a = report.summary["audit"]
    assert a["violations"] > 0 and not a["passed"]
    names = {name for name, _ in report.adversarials if name.startswith("violation_")}
    assert len(names) == a["violations"]
    for i in a["violation_indices"]:
        row = report.radii[i]
        assert row["index"] == i and row["violation"]
        img = next(t for name, t in report.adversarials if name.startswith(f"violation_{i:06d}_"))
        with torch.no_grad():
            assert soc_model(img[None]).argmax(1).item() != y[i]
        assert (img - x[i]).norm() <= row["audit_eps"]


def test_attack_dataset_confirms_certificates_at_each_eps(soc_model):
    """The eps are the certifier's thresholds: radii near one of them are re-checked in float64
    before "certified at eps" is decided."""
    from certify.audit import attack_dataset

    seen = []

    class Recording(Certifier):
        def __call__(self, x, thresholds=()):
            seen.append(tuple(thresholds))
            return super().__call__(x, thresholds)

    x, y = _blobs(8, seed=7, signal=0.25)
    attack_dataset(soc_model, _Items(x, y), [("a", 0.01), ("b", 0.1)], attacks="pgd", steps=1, batch_size=4,
                   certifier=Recording(soc_model))
    assert seen == [(0.01, 0.1)] * 2


def test_min_norm_search_lower_end():
    """``lower`` (an eps where an attack failed already) only moves the bisection's start: the
    result stays a witness, and a bad value is a ConfigError."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    x, y = _blobs(8, seed=6)
    _train(lin, x, y, steps=60, lr=1e-2)
    base = A.min_norm_search(lin, x, y, init_eps=0.1, search_steps=6, steps=10)
    ok = base.found
    lower = torch.where(ok, 0.5 * base.radius, torch.zeros_like(base.radius))
    mn = A.min_norm_search(lin, x, y, init_eps=0.1, lower=lower, search_steps=6, steps=10)
    assert torch.equal(mn.found, base.found)
    with torch.no_grad():
        assert (lin(mn.x_adv[ok]).argmax(1) != y[ok]).all()
    assert (mn.radius[ok] <= base.radius[ok] * 1.05).all()
    with pytest.raises(ConfigError):
        A.min_norm_search(lin, x, y, lower=torch.ones(3))
    with pytest.raises(ConfigError):
        A.min_norm_search(lin, x, y, lower=-1.0)
