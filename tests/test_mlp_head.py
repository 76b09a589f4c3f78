"""The MLP head and its curvature certificate (CRC-Lip, Singla & Feizi NeurIPS 2022; issue 7).

Soundness is checked against a strong feature-space attack: for every pair (y, j) it finds points
with f_j >= f_y (verified in float64), so their distance is an UPPER bound on the distance to the
decision boundary, which no certificate may exceed.
"""

from __future__ import annotations

import math

import pytest
import torch

from certify.certificates import Certifier, pairwise_radius
from certify.errors import ConfigError
from certify.layers.mlp_head import MLPHead, exact_pair_curvatures, softplus64


def random_head(seed: int, features=8, hidden=16, classes=4, beta=1.0, scale=3.0) -> MLPHead:
    torch.manual_seed(seed)
    head = MLPHead(features, classes, hidden=hidden, beta=beta)
    with torch.no_grad():
        head.fc1.weight.mul_(scale)  # strong curvature relative to the margins
        head.fc2.weight.mul_(2.0)
    return head.double()


def pair_g(head: MLPHead, y: torch.Tensor, j: torch.Tensor):
    """g(x) = f_y(x) - f_j(x) per row, in float64 with the exact softplus."""
    w1, b1 = head.fc1.weight.detach().double(), head.fc1.bias.detach().double()
    w2, b2 = head.fc2.weight.detach().double(), head.fc2.bias.detach().double()
    w, b = w2[y] - w2[j], b2[y] - b2[j]

    def g(x):
        return (w * softplus64(x @ w1.T + b1, head.beta)).sum(1) + b

    return g


def attack_distance(head: MLPHead, phi: torch.Tensor, y: torch.Tensor, j: torch.Tensor,
                    bisections: int = 30, steps: int = 60, seed: int = 0) -> torch.Tensor:
    """Per row, the shortest verified ||d|| with g_yj(phi + d) <= 0 found by (1) Newton/DeepFool
    steps towards {g = 0} and (2) bisection on rho of projected gradient descent on g in the ball
    of radius rho, restarted from the best point so far and from random points. +inf where
    nothing was found."""
    gen = torch.Generator().manual_seed(seed)
    g = pair_g(head, y, j)

    def value_grad(x):
        x = x.detach().requires_grad_(True)
        v = g(x)
        (gr,) = torch.autograd.grad(v.sum(), x)
        return v.detach(), gr

    best = torch.full((phi.shape[0],), math.inf, dtype=torch.float64)
    best_d = torch.zeros_like(phi)

    def record(d):
        nonlocal best, best_d
        v = g(phi + d)
        n = d.norm(dim=1)
        better = (v <= 0) & (n < best)
        best = torch.where(better, n, best)
        best_d = torch.where(better[:, None], d, best_d)

    d = torch.zeros_like(phi)
    for _ in range(60):  # DeepFool with a small overshoot
        v, gr = value_grad(phi + d)
        d = d - ((v / gr.square().sum(1).clamp_min(1e-300)) * 1.02)[:, None] * gr
        record(d)
    lo = torch.zeros_like(best)
    hi = torch.where(torch.isfinite(best), best, torch.full_like(best, 20.0))
    for _ in range(bisections):
        rho = 0.5 * (lo + hi)
        found = torch.zeros_like(best, dtype=torch.bool)
        starts = [best_d * (rho / best.clamp_min(1e-300)).clamp(max=1.0).nan_to_num(0.0)[:, None],
                  torch.randn(phi.shape, generator=gen, dtype=phi.dtype) * 1e-3]
        for d in starts:
            for k in range(steps):
                v, gr = value_grad(phi + d)
                step = rho * 0.5 * (0.9 ** (k / 4))
                d = d - step[:, None] * gr / gr.norm(dim=1, keepdim=True).clamp_min(1e-300)
                n = d.norm(dim=1, keepdim=True)
                d = d * torch.where(n > rho[:, None], rho[:, None] / n, torch.ones_like(n))
                found |= g(phi + d) <= 0
                record(d)
        hi = torch.where(found, rho, hi)
        lo = torch.where(found, lo, rho)
    return best


def rows_for(head: MLPHead, phi: torch.Tensor):
    """All (sample, predicted y, other class j) rows."""
    with torch.no_grad():
        pred = head(phi).argmax(1)
    c = head.num_classes
    n_idx = torch.arange(phi.shape[0]).repeat_interleave(c - 1)
    others = torch.stack([torch.tensor([k for k in range(c) if k != int(p)]) for p in pred]).flatten()
    return n_idx, pred[n_idx], others


# ---- curvature bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, *[pytest.param(s, marks=pytest.mark.slow) for s in range(2, 8)]])
def test_curvature_bounds_dominate_hessian_and_are_exact(seed):
    beta = [0.5, 1.0, 3.0][seed % 3]
    head = random_head(seed, features=6, hidden=12, classes=3, beta=beta)
    k = head.curvature_bounds()
    w1 = head.fc1.weight.detach().double()
    w2 = head.fc2.weight.detach().double()
    for y in range(3):
        for j in range(3):
            if y == j:
                continue
            dneg = (w2[j] - w2[y]).clamp_min(0)
            dense = beta / 4 * torch.linalg.eigvalsh(w1.T @ torch.diag(dneg) @ w1)[-1].clamp_min(0)
            # an upper bound, but no looser than the rounding slack
            assert k[y, j] >= dense
            assert k[y, j] <= dense * (1 + 1e-8) + 1e-12
            # power iteration (a lower estimate) never exceeds it
            v = torch.randn(6, dtype=torch.float64)
            for _ in range(200):
                v = w1.T @ (dneg * (w1 @ v))
                v = v / v.norm().clamp_min(1e-300)
            assert beta / 4 * float(v @ (w1.T @ (dneg * (w1 @ v)))) <= k[y, j]
            # the Hessian of g_yj at random points lies in [-K[y, j], K[j, y]]
            g = pair_g(head, torch.tensor([y]), torch.tensor([j]))
            for x in torch.randn(8, 6, dtype=torch.float64) * 2:
                hess = torch.func.hessian(lambda t: g(t[None])[0])(x)
                eig = torch.linalg.eigvalsh(hess)
                assert eig[0] >= -k[y, j] - 1e-12
                assert eig[-1] <= k[j, y] + 1e-12


def test_curvature_bounds_use_both_gram_forms():
    # hidden < features takes the hidden x hidden form, hidden > features the features x features
    for features, hidden in ((20, 6), (4, 30)):
        head = random_head(1, features=features, hidden=hidden, classes=3)
        w1, w2 = head.fc1.weight.detach().double(), head.fc2.weight.detach().double()
        k = exact_pair_curvatures(w1, w2, head.beta)
        d = (w2[1] - w2[0]).clamp_min(0)
        dense = head.beta / 4 * torch.linalg.eigvalsh(w1.T @ torch.diag(d) @ w1)[-1]
        assert dense <= k[0, 1] <= dense * (1 + 1e-8) + 1e-12


def test_curvature_cache_follows_weight_updates():
    head = random_head(2)
    k0 = head.curvature_bounds()
    assert head.curvature_bounds().equal(k0)  # cached
    with torch.no_grad():
        head.fc1.weight.mul_(2)
    k1 = head.curvature_bounds()
    assert torch.allclose(k1, 4 * k0, rtol=1e-6)


# ---- certificates -----------------------------------------------------------------------------


SLOW = pytest.mark.slow


@pytest.mark.parametrize("seed,classes,beta,points", [
    (0, 2, 4.0, 12), (1, 4, 1.0, 10),
    *[pytest.param(s, c, b, 40, marks=SLOW) for s, c, b in
      [(2, 2, 1.0), (3, 4, 2.0), (4, 3, 0.5), (5, 5, 1.0), (6, 10, 1.0), (7, 3, 8.0)]],
])
def test_tight_never_exceeds_attack_distance(seed, classes, beta, points):
    head = random_head(seed, features=8, hidden=16, classes=classes, beta=beta)
    phi = torch.randn(points, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    tight = head.certify_features(phi, mode="tight")
    quick = head.certify_features(phi, mode="quick")
    n_idx, y, j = rows_for(head, phi)
    fast = points <= 12
    dist = attack_distance(head, phi[n_idx], y, j, bisections=20 if fast else 30, steps=40 if fast else 60, seed=seed)
    attack = dist.view(phi.shape[0], classes - 1).amin(1)
    assert torch.isfinite(attack).all()
    assert (tight <= attack * (1 + 1e-9)).all(), (tight / attack).max()
    assert (tight >= quick).all()
    # not vacuous: the tight certificate reaches a good share of the attack distance
    assert float((tight / attack).median()) > 0.5


def test_attack_catches_an_unsound_certificate():
    """The soundness test above has teeth: ignoring the curvature (r = g / ||grad g||, the linear
    certificate) over-states the radius of a curved head, and the attack shows it."""
    head = random_head(7, features=8, hidden=16, classes=2, beta=4.0)
    phi = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    n_idx, y, j = rows_for(head, phi)
    g = pair_g(head, y, j)
    x = phi[n_idx].clone().requires_grad_(True)
    v = g(x)
    (gr,) = torch.autograd.grad(v.sum(), x)
    linear = v.detach() / gr.norm(dim=1)
    dist = attack_distance(head, phi[n_idx], y, j, bisections=20, steps=40)
    assert (linear > dist * 1.01).any()


def test_tight_improves_on_quick_and_close_to_long_solve():
    head = random_head(3, features=12, hidden=24, classes=4, beta=2.0)
    phi = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    quick = head.certify_features(phi, mode="quick")
    tight = head.certify_features(phi, mode="tight")
    long = head.certify_features(phi, mode="tight", eta_steps=16, inner_steps=150)
    assert (tight >= quick).all() and (tight > quick * 1.01).any()
    assert (tight >= long * 0.98).all()


def test_linear_limit_reduces_to_margin_over_row_distance():
    """With beta -> 0 the softplus is affine (log 2 / beta + t / 2) and the curvature bounds
    vanish: the radius is the pairwise certificate of the linear head W2 W1 / 2."""
    torch.manual_seed(0)
    head = MLPHead(8, 5, hidden=16, beta=1e-6).double()
    with torch.no_grad():  # cancel the huge constant log(2)/beta so that margins stay O(1)
        head.fc2.bias.sub_(math.log(2) / head.beta * head.fc2.weight.sum(1))
    k = head.curvature_bounds()
    assert float(k.max()) < 1e-5
    phi = torch.randn(40, 8, dtype=torch.float64)
    w_eff = head.fc2.weight.detach() @ head.fc1.weight.detach() / 2
    logits = head(phi).detach()
    expected = pairwise_radius(logits, 1.0, torch.cdist(w_eff, w_eff))
    for mode in ("quick", "tight"):
        got = head.certify_features(phi, logits, mode=mode)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_zero_first_layer_gives_constant_logits_and_infinite_radius():
    torch.manual_seed(0)
    head = MLPHead(6, 3, hidden=8).double()
    with torch.no_grad():
        head.fc1.weight.zero_()
        head.fc2.bias.copy_(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))
    assert float(head.curvature_bounds().abs().max()) == 0.0
    r = head.certify_features(torch.randn(5, 6, dtype=torch.float64))
    assert torch.isinf(r).all()  # constant logits never change


def test_ties_and_unconfirmed_predictions_get_zero():
    head = random_head(0, classes=3)
    phi = torch.randn(4, 8, dtype=torch.float64)
    logits = head(phi).detach()
    wrong = logits.clone()
    wrong[:, :] = 0
    wrong[torch.arange(4), logits.argmin(1)] = 1  # claim the least likely class
    assert (head.certify_features(phi, wrong) == 0).all()


def test_curvature_certifier_divides_by_feature_lipschitz_and_checks_options():
    head = random_head(1)
    phi = torch.randn(6, 8, dtype=torch.float64)
    logits = head(phi).detach()
    cert = head.curvature_certifier(2.0)
    torch.testing.assert_close(cert(phi, logits), head.certify_features(phi, logits) / 2.0)
    quick = head.curvature_certifier(2.0, mode="quick")
    assert (quick(phi, logits) <= cert(phi, logits)).all()
    with pytest.raises(ConfigError):
        head.curvature_certifier(0.0)
    with pytest.raises(ConfigError):
        head.curvature_certifier(1.0, mode="exact")
    with pytest.raises(ConfigError):
        MLPHead(4, 2, hidden=4, beta=0.0)


# ---- training regulariser ---------------------------------------------------------------------


def test_regularizer_matches_exact_bounds_and_is_differentiable():
    torch.manual_seed(0)
    head = MLPHead(10, 4, hidden=20, beta=2.0)
    for _ in range(30):
        reg = head.regularizer()
    k = head.curvature_bounds()
    off = ~torch.eye(4, dtype=torch.bool)
    exact = head.curvature_weight * torch.maximum(k, k.T)[off].mean()
    assert head.curvature_weight == 2.0  # the paper's default: the softplus beta
    assert float(reg.detach()) <= float(exact) * (1 + 1e-6)
    assert float(reg.detach()) == pytest.approx(float(exact), rel=1e-3)
    reg.backward()
    assert head.fc1.weight.grad.abs().sum() > 0 and head.fc2.weight.grad.abs().sum() > 0


def test_regularizer_samples_pairs_for_many_classes():
    torch.manual_seed(0)
    head = MLPHead(6, 12, hidden=10, reg_max_pairs=8)
    reg = head.regularizer()
    assert reg.ndim == 0 and torch.isfinite(reg) and reg > 0


def test_no_weight_decay_names_are_the_head_parameters():
    head = MLPHead(6, 3, hidden=8)
    assert set(head.no_weight_decay()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


# ---- through the Certifier on a tiny LipConvnet ----------------------------------------------


def test_certifier_on_tiny_lipconvnet_is_sound_against_perturbations():
    from certify.models import create_model

    torch.manual_seed(0)
    model = create_model("lipconvnet5_mlp", width=4, mlp_hidden=32).eval()
    assert model.head_kind == "mlp"
    x = torch.rand(6, 3, 32, 32)
    cert = Certifier(model)  # auto picks the curvature certificate
    assert cert.method == "curvature"
    logits, pred, margin, radius = cert(x)
    assert radius.dtype == torch.float64
    assert torch.isfinite(radius).all() and (radius >= 0).all() and (radius > 0).any()
    quick = model.head.curvature_certifier(cert.feature_lipschitz, mode="quick")
    with torch.no_grad():
        r_quick = quick(model.features(x), logits)
    assert (r_quick <= radius).all()
    # The same quick certificate through the Certifier (`lipcert certify --certificate curvature-quick`).
    cert_quick = Certifier(model, "curvature-quick", precision="float32")
    assert cert_quick.method == "curvature" and cert_quick.curvature_mode == "quick"
    assert cert_quick.name == "curvature-quick" and cert.name == "curvature"
    assert torch.equal(cert_quick(x)[3], r_quick)
    # with the float64 re-check (the default), never above the float32 radius
    assert (Certifier(model, "curvature-quick")(x)[3] <= r_quick).all()
    with pytest.raises(ConfigError, match="MLP head"):
        Certifier(create_model("lipconvnet5", width=4, head="lln"), "curvature-quick")
    gen = torch.Generator().manual_seed(0)
    inside = 0.999 * radius.float()
    for _ in range(5):  # random directions on the sphere of the certified radius
        delta = torch.randn(x.shape, generator=gen)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * inside.view(-1, 1, 1, 1)
        with torch.no_grad():
            assert (model(x + delta).argmax(1) == pred).all()
    # gradient attack on the margin inside the certified ball (no box clipping: the certificate
    # holds in all of R^n)
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(20):
        out = model(x + delta)
        top = out.gather(1, pred[:, None]).squeeze(1)
        other = out.masked_fill(torch.nn.functional.one_hot(pred, out.shape[1]).bool(), -1e9).amax(1)
        (grad,) = torch.autograd.grad((top - other).sum(), delta)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta -= 0.3 * inside.view(-1, 1, 1, 1) * step
            n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.where(n > inside.view(-1, 1, 1, 1), inside.view(-1, 1, 1, 1) / n, torch.ones_like(n))
    with torch.no_grad():
        assert (model(x + delta).argmax(1) == pred).all()


def test_mlp_variants_are_registered():
    from certify.models import create_model, list_models

    assert {"lipconvnet5_mlp", "lipconvnet15_mlp", "lipconvnet40_mlp"} <= set(list_models("*_mlp"))
    with pytest.raises(ConfigError):
        create_model("lipconvnet5_mlp", width=4, head="ortho")
