"""Certificates (paper.md section 1): radius formulas, counting, the LLN pairwise certificate
against brute force, certify_dataset's checks, and soundness against attacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from certify.certificates import (
    SQRT2,
    Certifier,
    certified_accuracy,
    certified_mask,
    certify_dataset,
    empirical_lipschitz_lower_bound,
    global_radius,
    pairwise_radius,
    parse_eps,
    parse_eps_list,
)
from certify.errors import ConfigError, DataError, NotLipschitzError
from certify.layers.heads import LLNHead


class LinearModel(nn.Module):
    """A fixed linear classifier on 1x4x4 images with its exact spectral norm as the bound."""

    head_kind = "linear"
    input_shape = (1, 4, 4)

    def __init__(self, num_classes: int = 3, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.weight = nn.Parameter(scale * torch.randn(num_classes, 16, generator=g), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(num_classes, generator=g), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias

    def lipschitz_bound(self) -> float:
        return float(torch.linalg.matrix_norm(self.weight.double(), 2)) * (1 + 1e-9)


class FeaturesLLN(nn.Module):
    """Identity features (L_f = 1, exactly) followed by an LLN head: the pairwise certificate is
    then the exact distance to the decision boundary, which brute force can check."""

    head_kind = "lln"

    def __init__(self, num_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = LLNHead(num_features, num_classes)
        with torch.no_grad():
            self.head.bias.normal_()
        self.input_shape = (1, 1, num_features)
        self.num_classes = num_classes

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))

    def feature_lipschitz_bound(self) -> float:
        return 1.0


def images(n: int, seed: int = 0, shape=(1, 4, 4)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ---- formulas -------------------------------------------------------------------------------------


def test_global_radius_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 1.0], [-1.0, -4.0, 0.5]])
    r = global_radius(logits, lipschitz=2.0)
    expected = torch.tensor([2.0 / (SQRT2 * 2.0), 0.0, 0.0, 1.5 / (SQRT2 * 2.0)], dtype=torch.float64)
    assert r.dtype == torch.float64
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-15)


def test_radius_scales_inversely_with_the_bound():
    logits = torch.randn(20, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(global_radius(logits, 4.0), global_radius(logits, 1.0) / 4)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_global_radius_refuses_a_bad_bound(bad):
    with pytest.raises(ConfigError):
        global_radius(torch.zeros(1, 2), bad)


def test_certified_counting_is_strict_and_needs_correctness():
    radius = torch.tensor([0.5, 0.5, 0.2, 0.0, 0.9], dtype=torch.float64)
    correct = torch.tensor([True, True, True, True, False])
    # radius == eps is NOT certified; an incorrect sample never is, whatever its radius.
    assert certified_mask(radius, correct, 0.5).tolist() == [False, False, False, False, False]
    assert certified_mask(radius, correct, 0.2).tolist() == [True, True, False, False, False]
    assert certified_accuracy(radius, correct, 0.2) == pytest.approx(2 / 5)
    assert certified_accuracy(radius, correct, 0.1) == pytest.approx(3 / 5)


def test_ties_give_radius_zero_and_are_never_certified():
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 2.0]])
    r = global_radius(logits, 1.0)
    assert r.tolist() == [0.0, 0.0]
    pred = logits.argmax(1)
    assert not certified_mask(r, pred == pred, 1e-12).any()
    rows = torch.ones(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    assert pairwise_radius(logits, 1.0, rows).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("text,value", [("36/255", 36 / 255), ("0.5", 0.5), (" 1/2 ", 0.5), (1.5, 1.5),
                                        ("1e-3", 1e-3)])
def test_parse_eps(text, value):
    assert parse_eps(text) == value


@pytest.mark.parametrize("bad", ["0", "-0.1", "abc", "1/0", "nan", "inf", "", "36//255", 0, -1.0])
def test_parse_eps_rejects(bad):
    with pytest.raises(ConfigError):
        parse_eps(bad)


def test_parse_eps_list_sorts_and_dedupes():
    assert parse_eps_list(["0.5", "36/255", "1/2", "72/255"]) == [
        ("36/255", 36 / 255), ("72/255", 72 / 255), ("0.5", 0.5)]


# ---- pairwise (LLN) certificate against brute force ----------------------------------------------


def _flip_distance(phi, w, b, y, j):
    """Brute force: bisection along the steepest direction for the pair (y, j), in feature space;
    the smallest step that makes f_j >= f_y. Linear in phi, so that is the exact distance."""
    d = w[y] - w[j]
    direction = -d / d.norm()

    def flips(t):
        z = (phi + t * direction) @ w.T + b
        return bool(z[j] >= z[y])

    hi = 1.0
    while not flips(hi):
        hi *= 2
    lo = 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flips(mid) else (mid, hi)
    return hi


def test_pairwise_radius_matches_brute_force_on_a_tiny_lln_model():
    model = FeaturesLLN(num_features=6, num_classes=5, seed=3).double().eval()
    x = torch.randn(12, 1, 1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cert = Certifier(model, method="auto")
    assert cert.method == "pairwise"
    _, pred, _, radius = cert(x)
    w = model.head.normalized_weight().detach().double()
    b = model.head.bias.detach().double()
    for i in range(len(x)):
        phi = x[i].flatten()
        y = int(pred[i])
        brute = min(_flip_distance(phi, w, b, y, j) for j in range(5) if j != y)
        assert radius[i].item() == pytest.approx(brute, rel=1e-6)
        # and the global certificate is never tighter than the pairwise one on this model
        g = global_radius(model(x[i:i + 1]), model.head.lipschitz_bound())
        assert g.item() <= radius[i].item() * (1 + 1e-9)


def test_pairwise_takes_the_minimum_over_all_classes_not_the_top_nine():
    # Class 0 wins. Classes 1-10 have high logits but rows almost equal to w_0 (tiny ||w_0 - w_j||,
    # large ratios); class 11 has the LOWEST logit and the opposite row, and is the binding pair.
    c = 12
    logits = torch.zeros(1, c, dtype=torch.float64)
    logits[0, 0] = 10.0
    logits[0, 1:11] = 9.0
    logits[0, 11] = 6.0
    dist = torch.full((c, c), 1e-3, dtype=torch.float64)
    dist.fill_diagonal_(0)
    dist[0, 11] = dist[11, 0] = 2.0
    r = pairwise_radius(logits, 1.0, dist)
    assert r.item() == pytest.approx(4.0 / 2.0)
    top9 = min((10.0 - 9.0) / 1e-3 for _ in range(9))
    assert r.item() < top9


def test_pairwise_identical_rows_never_limit_the_radius():
    logits = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    dist = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert pairwise_radius(logits, 2.0, dist).item() == pytest.approx(1.0 / 2.0)


# ---- certify_dataset -----------------------------------------------------------------------------


def test_certify_dataset_rows_and_summary_agree_with_the_formula():
    model = LinearModel()
    x = images(30)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[::3] = (y[::3] + 1) % 3  # a third misclassified
    res = certify_dataset(model, TensorDataset(x, y), eps=["0.01", "1/10"], batch_size=7)
    s = res.samples
    assert list(s.columns) == ["index", "label", "prediction", "correct", "margin", "radius",
                               "certified_0.01", "certified_1/10"]
    assert len(s) == 30 and s["index"].tolist() == list(range(30))
    expected = global_radius(logits, model.lipschitz_bound())
    torch.testing.assert_close(torch.tensor(s["radius"].to_numpy()), expected)
    assert s["correct"].sum() == 20
    sm = res.summary
    assert sm["counts"] == {"total": 30, "correct": 20,
                            "certified": {"0.01": int(s["certified_0.01"].sum()),
                                          "1/10": int(s["certified_1/10"].sum())}}
    assert sm["clean_accuracy"] == pytest.approx(20 / 30)
    for label, value in (("0.01", 0.01), ("1/10", 0.1)):
        want = ((expected > value) & torch.tensor(s["correct"].to_numpy())).sum().item() / 30
        assert sm["certified_accuracy"][label] == pytest.approx(want)
        assert res.certified_accuracy(label) == pytest.approx(want)
    good = expected[torch.tensor(s["correct"].to_numpy())]
    assert sm["radius_correct"]["mean"] == pytest.approx(good.mean().item())
    assert sm["radius_correct"]["median"] == pytest.approx(good.median().item())
    c = sm["certificate"]
    assert c["method"] == "global" and c["bound_source"] == "computed from the weights"
    assert c["lipschitz_upper_bound"] == pytest.approx(model.lipschitz_bound())


def test_certify_dataset_limit_and_progress():
    calls = []
    res = certify_dataset(LinearModel(), TensorDataset(images(25), torch.zeros(25, dtype=torch.long)),
                          limit=11, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert len(res.samples) == 11
    assert calls == [(4, 11), (8, 11), (11, 11)]
    assert res.summary["dataset"]["available"] == 25


@pytest.mark.parametrize("case,match", [
    ("empty", "empty"),
    ("nan", "non-finite"),
    ("inf", "non-finite"),
    ("size", "expects 1x4x4"),
    ("channels", "expects 1x4x4"),
    ("range", r"\[0, 1\]"),
    ("label", "labels must lie"),
])
def test_certify_dataset_refuses_bad_data(case, match):
    x, y = images(6), torch.zeros(6, dtype=torch.long)
    if case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x[4, 0, 1, 1] = float("nan")
    elif case == "inf":
        x[2, 0, 0, 0] = float("inf")
    elif case == "size":
        x = images(6, shape=(1, 5, 5))
    elif case == "channels":
        x = images(6, shape=(3, 4, 4))
    elif case == "range":
        x = (x - 0.5) / 0.25  # already normalised images: the radius would be in the wrong units
    elif case == "label":
        y[3] = 7
    with pytest.raises(DataError, match=match):
        certify_dataset(LinearModel(), TensorDataset(x, y))


def test_nan_error_names_the_sample():
    x = images(10)
    x[7, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="sample 7 "):
        certify_dataset(LinearModel(), TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=3)


def test_a_model_without_a_bound_is_refused_unless_one_is_given():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    ds = TensorDataset(images(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(NotLipschitzError):
        certify_dataset(plain, ds)
    res = certify_dataset(plain, ds, lipschitz=10.0)
    assert res.summary["certificate"]["bound_source"] == "user-supplied"
    assert res.summary["certificate"]["lipschitz_upper_bound"] == 10.0


def test_the_bound_source_of_the_model_is_reported():
    model = LinearModel()
    model.bound_source = "stored at export"
    res = certify_dataset(model, TensorDataset(images(3), torch.zeros(3, dtype=torch.long)))
    assert res.summary["certificate"]["bound_source"] == "stored at export"


@pytest.mark.parametrize("kwargs", [dict(eps=["0"]), dict(eps=["x"]), dict(batch_size=0), dict(limit=0),
                                    dict(method="nope")])
def test_certify_dataset_refuses_bad_options(kwargs):
    with pytest.raises(ConfigError):
        certify_dataset(LinearModel(), TensorDataset(images(3), torch.zeros(3, dtype=torch.long)), **kwargs)


def test_empirical_lower_bound_is_below_and_near_the_exact_norm():
    model = LinearModel(num_classes=5, seed=2).double()
    exact = float(torch.linalg.matrix_norm(model.weight, 2))
    lb = empirical_lipschitz_lower_bound(model, images(3).double(), iters=30)
    assert lb <= exact * (1 + 1e-9)
    assert lb >= 0.99 * exact


def test_lower_bound_in_the_summary():
    model = LinearModel()
    res = certify_dataset(model, TensorDataset(images(4), torch.zeros(4, dtype=torch.long)),
                          lower_bound=True, lower_bound_samples=2)
    c = res.summary["certificate"]
    assert c["lower_bound_samples"] == 2
    # a lower bound up to the float32 rounding of one backward pass
    assert 0 < c["lipschitz_lower_bound"] <= c["lipschitz_upper_bound"] * (1 + 1e-6)


# ---- soundness: no point inside a certified ball changes the prediction --------------------------


def _attack_within(model, x, pred, radius, steps: int = 4, seed: int = 0):
    """A random point on the sphere of radius ``radius`` (per sample), then projected gradient
    descent on the margin inside that ball from there; True where any iterate flipped the
    prediction. Every forward pass is also a check."""
    g = torch.Generator().manual_seed(seed)
    r = radius.to(x.dtype).view(-1, 1, 1, 1)

    def proj(d):
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return d * torch.clamp(r / n, max=1.0)

    d = torch.randn(x.shape, generator=g, dtype=x.dtype)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r  # on the sphere
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        d = d.detach().requires_grad_(True)
        z = model(x + d)
        flipped |= z.detach().argmax(1) != pred
        top = z.gather(1, pred[:, None]).squeeze(1)
        margin = top - z.scatter(1, pred[:, None], float("-inf")).amax(1)
        (grad,) = torch.autograd.grad(margin.sum(), d)
        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        d = proj(d.detach() - 0.5 * r * grad / gn)
    with torch.no_grad():
        flipped |= model(x + d).argmax(1) != pred
    return flipped


def _soundness(model, x, y, shrink_bound: float = 1.0, steps: int = 10):
    cert = Certifier(model)
    if shrink_bound != 1.0:
        cert.lipschitz /= shrink_bound  # a deliberately WRONG bound, to show the attack has teeth
    _, pred, _, radius = cert(x)
    inside = radius * (1 - 1e-4)  # strictly inside the certified ball
    keep = inside > 0
    return _attack_within(model, x[keep], pred[keep], inside[keep], steps=steps), int(keep.sum())


def test_soundness_no_attack_inside_certified_balls_flips_the_prediction():
    from certify.models import create_model

    torch.manual_seed(0)
    model = create_model("lipconvnet5", width=4, num_classes=4).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    flipped, n = _soundness(model, x, None)
    assert n >= 4
    assert not flipped.any()
    # The same attack DOES find flips when the bound is understated 50 times: the check can fail.
    flipped_wrong, _ = _soundness(model, x, None, shrink_bound=50.0, steps=2)
    assert flipped_wrong.any()


def test_soundness_on_a_briefly_trained_model():
    from certify.models import create_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # Two easy classes: bright vs dark images with noise.
    y = torch.arange(64) % 2
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.1 * torch.randn(64, 3, 32, 32, generator=g)).clamp(0, 1)
    model = create_model("lipconvnet5", width=4, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(40):
        idx = torch.randint(0, 64, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]) * 4, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    res = certify_dataset(model, TensorDataset(x[:16], y[:16]), eps=["0.05"])
    assert res.summary["clean_accuracy"] > 0.5
    flipped, n = _soundness(model, x[:16], y[:16], steps=20)
    assert n > 0 and not flipped.any()


def test_a_prebuilt_certifier_is_reused():
    model = LinearModel()
    cert = Certifier(model)
    cert.lipschitz *= 2  # visible in the radii only if this very certifier is used
    ds = TensorDataset(images(4), torch.zeros(4, dtype=torch.long))
    a = certify_dataset(model, ds, certifier=cert)
    b = certify_dataset(model, ds)
    torch.testing.assert_close(torch.tensor(a.samples["radius"].to_numpy()) * 2,
                               torch.tensor(b.samples["radius"].to_numpy()))
    with pytest.raises(ConfigError, match="another model"):
        certify_dataset(LinearModel(), ds, certifier=cert)
