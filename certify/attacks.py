"""Empirical l2 attacks in [0, 1] pixel space: PGD-L2, APGD (CE and DLR) and a minimum-norm search.

Certified radii are lower bounds on the distance to the nearest adversarial example; attacks give
*upper* bounds (a found adversarial example is a witness). Together they bracket the truth, and an
attack that succeeds inside a certified radius proves the certificate wrong (see
:mod:`certify.audit`).

- :func:`pgd_l2`: projected gradient ascent with l2-normalised steps, random starts and restarts
  (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to adversarial
  attacks", ICLR 2018).
- :func:`apgd_l2`: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks", ICML 2020): momentum 0.75, step size halved at
  checkpoints when progress stalls, restart from the best point, with the cross-entropy or the
  difference-of-logits-ratio (DLR) loss.
- :func:`attack_ensemble`: several attacks in turn, each only on the samples the previous ones did
  not break (AutoAttack's pattern).
- :func:`min_norm_search`: per-sample bisection on eps over an attack, then a line search along the
  witness, giving each sample's empirical robustness radius.

Every returned point satisfies ``||x_adv - x||_2 <= eps`` (checked in float64) and
``x_adv in [0, 1]``; a sample counts as broken when its label is no longer the strict arg-max of
the logits (a tie counts, as a tie also gives a certified radius of 0). All functions are batched,
take a scalar eps or one eps per sample, draw random numbers from a seeded CPU
:class:`torch.Generator` (the same seed gives the same result on any device), stop attacking a
sample as soon as it is broken, and run on whatever device the model and inputs are on, with IEEE
float32 arithmetic (no TF32: :func:`certify.numerics.ieee_float32`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .numerics import ieee_float32_call

ATTACKS = ("apgd-ce", "apgd-dlr", "pgd")
LOSSES = ("ce", "dlr", "margin")

#: Internal projections aim at eps * (1 - PROJECTION_SLACK) so that float32 rounding in
#: ``x + delta`` can never push the final point outside the eps ball (checked in float64).
PROJECTION_SLACK = 1e-6

#: Pairs closer than this (l2, pixel units) are not used for the local Lipschitz estimate: float32
#: rounding in the logits (~1e-6 |z|) would be amplified by 1/||delta||.
LIPSCHITZ_MIN_DISTANCE = 1e-2


# ---- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """Evaluation mode with the parameters frozen: the attack's backward pass then computes only the
    input gradient (no weight gradients), so one step costs one forward plus one input-backward."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def as_eps(eps: float | Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    """One positive finite radius per sample, as a float64 CPU tensor of shape (n,)."""
    t = torch.as_tensor(eps, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        t = t.expand(n).clone()
    if t.shape != (n,):
        raise ConfigError(f"eps must be a number or one value per sample ({n}), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ConfigError("eps must be positive and finite for every sample")
    return t


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"need images (N, ...) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point():
        raise ConfigError(f"images must be floating point in [0, 1], got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ConfigError("images contain NaN or infinite pixels")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError("attacks work in [0, 1] pixel space; images outside [0, 1] were given")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm in float64 (float32 sums over 3072 pixels lose ~1e-6 relative)."""
    return t.flatten(1).to(torch.float64).norm(dim=1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(device=like.device)


def project(x: torch.Tensor, x_new: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A point of {x' in [0,1]^d : ||x' - x||_2 <= eps} near ``x_new``: clamp to the box, then
    rescale the perturbation toward x if it is longer than eps.

    Why this order keeps both constraints: after the clamp, x and x + d lie in the (convex) box,
    so every x + t d with t in [0, 1] does too; the rescale uses such a t. (Ball-then-box would be
    feasible as well, since clamping never lengthens a coordinate of d when x is in the box.) The
    final clamp only removes float32 rounding at the box faces and can only shorten d.
    """
    d = x_new.clamp(0, 1) - x
    eps64 = eps.to(torch.float64).cpu()
    target = eps64 * (1 - PROJECTION_SLACK)
    n = _flat_norm(d).cpu()
    scale = torch.where(n > target, target / n.clamp_min(1e-300), torch.ones_like(target))
    # Rounding in x + d can lengthen the perturbation by ~1e-8 absolute, which matters for tiny
    # eps: measure the point actually returned and shrink again until it fits; as a last resort
    # return x itself (always feasible).
    for _ in range(4):
        xa = (x + d * _view(scale.to(d.dtype), d)).clamp(0, 1)
        actual = _flat_norm(xa - x).cpu()
        over = actual > eps64
        if not over.any():
            return xa
        scale = torch.where(over, scale * (target / actual.clamp_min(1e-300)) * 0.999, scale)
    xa[over.to(xa.device)] = x[over.to(x.device)]
    return xa


def check_feasible(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Assert that every ``x_adv`` lies in [0, 1] and within eps of x (float64); return the norms."""
    norms = _flat_norm(x_adv - x).cpu()
    if x_adv.numel() and (x_adv.min() < 0 or x_adv.max() > 1):
        raise AssertionError("attack produced a point outside [0, 1]; this is a lipcert bug")
    bad = norms > eps.to(torch.float64).cpu()
    if bad.any():
        raise AssertionError(f"attack produced a perturbation longer than eps ({int(bad.sum())} samples); "
                             "this is a lipcert bug")
    return norms


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - max_{j != y} f_j per sample, in float64 (<= 0: the label is not the strict winner)."""
    z = logits.detach().to(torch.float64)
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return zy - others.amax(dim=1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (the loss of Madry et al. 2018 and of APGD-CE)."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} f_j - f_y (Carlini & Wagner's margin; DLR without the rescaling)."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return others.amax(dim=1) - zy


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, eq. 6):
    -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), with z_pi the logits sorted in decreasing order.

    Invariant to shifting and rescaling the logits. It needs 3 classes; with 2 the denominator
    does not exist and the plain margin loss is used (APGD normalises the gradient, so only the
    loss's ordering of points matters, and that is the same).
    """
    if logits.shape[1] < 3:
        return margin_loss(logits, y)
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


_LOSS_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}


def _loss_fn(name: str):
    try:
        return _LOSS_FNS[name]
    except KeyError:
        raise ConfigError(f"unknown attack loss {name!r}; choose from {LOSSES}") from None


def _forward_backward(model, x, y, loss_fn):
    """Logits, per-sample loss and input gradient at x: one forward and one backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return logits.detach(), loss.detach(), grad.detach()


def _normalize_grad(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / _view(n, g)


def _random_in_ball(x: torch.Tensor, eps: torch.Tensor, generator: torch.Generator, radius_scale=None):
    """A uniform point of the eps ball around each x (Gaussian direction, radius eps u^(1/d)),
    drawn on the CPU so the same seed gives the same start on every device; then projected."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    d = x[0].numel()
    if radius_scale is None:
        radius_scale = torch.rand(x.shape[0], generator=generator, dtype=torch.float64) ** (1.0 / d)
    noise = noise / _flat_norm(noise).clamp_min(1e-300).view(-1, *([1] * (x.ndim - 1)))
    noise = noise * (eps * radius_scale).view(-1, *([1] * (x.ndim - 1)))
    return project(x, x + noise.to(device=x.device, dtype=x.dtype), eps)


# ---- results ------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """Outcome of an attack on a batch.

    Attributes:
        x_adv: the adversarial point of each sample (the first point found that breaks it, else
            the point with the smallest margin found); clean x for samples misclassified already.
        success: the label is not the strict arg-max of the logits at ``x_adv``.
        adv_pred: the arg-max class at ``x_adv``.
        adv_margin: f_y - max_{j != y} f_j at ``x_adv`` (float64).
        norm: ||x_adv - x||_2 in float64 (<= eps by construction, asserted).
        eps: the radius each sample was attacked at.
        attack: for each broken sample, the attack that broke it ("clean" when misclassified
            already), else "".
        lipschitz_lower: the largest ||f(x') - f(x)||_2 / ||x' - x||_2 over the points the attack
            visited at distance >= LIPSCHITZ_MIN_DISTANCE (0 if none): a lower bound on the
            model's l2 Lipschitz constant (see :mod:`certify.audit`).
        queries: forward passes spent per sample.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    adv_pred: torch.Tensor
    adv_margin: torch.Tensor
    norm: torch.Tensor
    eps: torch.Tensor
    attack: list[str] = field(default_factory=list)
    lipschitz_lower: torch.Tensor | None = None
    queries: torch.Tensor | None = None

    @property
    def robust_accuracy(self) -> float:
        """Share of samples the attack did not break (empirical robust accuracy at eps)."""
        n = self.success.numel()
        return float((~self.success).sum()) / n if n else math.nan


class _Tracker:
    """Per-sample bookkeeping shared by the attacks: the best point so far, success, early exit
    and the local Lipschitz estimate."""

    def __init__(self, model, x, y, eps, name):
        self.model, self.x, self.y, self.eps, self.name = model, x, y, eps, name
        with torch.no_grad():
            self.clean_logits = model(x).detach()
        m = margins(self.clean_logits, y)
        n = x.shape[0]
        self.best_x = x.clone()
        self.best_margin = m.clone()
        self.best_logits = self.clean_logits.clone()
        self.success = (m <= 0).cpu()
        self.attack = ["clean" if s else "" for s in self.success.tolist()]
        self.lip = torch.zeros(n, dtype=torch.float64)
        self.queries = torch.ones(n, dtype=torch.long)

    def active(self) -> torch.Tensor:
        return (~self.success).nonzero().squeeze(1)

    def update(self, idx: torch.Tensor, x_pts: torch.Tensor, logits: torch.Tensor) -> None:
        """Record points ``x_pts`` (with their logits) for samples ``idx`` (CPU long tensor)."""
        self.queries[idx] += 1
        m = margins(logits, self.y[idx.to(self.y.device)]).cpu()
        # Local Lipschitz lower estimate: ||f(x') - f(x)|| / ||x' - x|| at a safe distance.
        dist = _flat_norm(x_pts - self.x[idx.to(self.x.device)]).cpu()
        dz = _flat_norm(logits - self.clean_logits[idx.to(logits.device)]).cpu()
        ratio = torch.where(dist >= LIPSCHITZ_MIN_DISTANCE, dz / dist.clamp_min(1e-300), torch.zeros_like(dist))
        self.lip[idx] = torch.maximum(self.lip[idx], ratio)
        better = m < self.best_margin[idx]
        if better.any():
            b = idx[better]
            bd = b.to(self.x.device)
            self.best_margin[b] = m[better]
            self.best_x[bd] = x_pts[better.to(x_pts.device)].detach()
            self.best_logits[bd] = logits[better.to(logits.device)].detach()
        broken = m <= 0
        for i in idx[broken & ~self.success[idx]].tolist():
            self.attack[i] = self.name
        self.success[idx[broken]] = True

    def result(self) -> AttackResult:
        norms = check_feasible(self.x, self.best_x, self.eps)
        return AttackResult(
            x_adv=self.best_x, success=self.success.clone(), adv_pred=self.best_logits.argmax(1).cpu(),
            adv_margin=self.best_margin.clone(), norm=norms, eps=self.eps.clone(), attack=list(self.attack),
            lipschitz_lower=self.lip.clone(), queries=self.queries.clone())


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))


def _check_common(model, x, y, eps, steps, restarts):
    if not isinstance(model, nn.Module):
        raise ConfigError("attacks need a differentiable torch model; an exported (ONNX) model cannot be "
                          "attacked, load the .safetensors checkpoint instead")
    _check_inputs(x, y)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    return as_eps(eps, x.shape[0])


# ---- PGD ----------------------------------------------------------------------------------------


@ieee_float32_call
def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 50,
    restarts: int = 1,
    step_size: float | None = None,
    loss: str = "ce",
    random_start: bool = True,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    _tracker: _Tracker | None = None,
) -> AttackResult:
    """PGD in the l2 ball (Madry et al., ICLR 2018): x <- P(x + alpha g/||g||_2), P the projection
    of :func:`project`, from a uniform random point of the ball (or from x with
    ``random_start=False``), repeated ``restarts`` times on the samples not yet broken.

    The step size alpha is ``step_size * eps`` (default 2.5 / steps, Madry et al.'s rule, so the
    iterates can cross the ball). ``loss`` is "ce" (default), "dlr" or "margin".
    """
    eps = _check_common(model, x, y, eps, steps, restarts)
    loss_fn = _loss_fn(loss)
    gen = _generator(seed, generator)
    rel_step = 2.5 / steps if step_size is None else float(step_size)
    with attack_mode(model):
        tr = _tracker or _Tracker(model, x, y, eps, "pgd")
        for r in range(restarts):
            idx = tr.active()
            if idx.numel() == 0:
                break
            dv = idx.to(x.device)
            x0, y0, e0 = x[dv], y[dv], eps[idx]
            if random_start:
                xa = _random_in_ball(x0, e0, gen)
            else:
                xa = x0.clone()
            alpha = _view((rel_step * e0).to(x.dtype), x0)
            for _ in range(steps):
                logits, _, g = _forward_backward(model, xa, y0, loss_fn)
                tr.update(idx, xa, logits)
                keep = ~tr.success[idx]  # early exit: drop the samples just broken
                if not keep.all():
                    idx, kd = idx[keep], keep.to(x.device)
                    if idx.numel() == 0:
                        break
                    xa, g, x0, y0, e0, alpha = xa[kd], g[kd], x0[kd], y0[kd], e0[keep], alpha[kd]
                xa = project(x0, xa + alpha * _normalize_grad(g), e0)
            else:
                with torch.no_grad():
                    tr.update(idx, xa, model(xa).detach())
    return tr.result()


# ---- APGD ---------------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step (Croce & Hein 2020, section 3.2):
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j N)."""
    ps = [0.0, 0.22]
    while ps[-1] < 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    # round() first: 0.57 * 100 is 57.000000000000007 in floating point, and the paper means 57.
    ws = sorted({math.ceil(round(p * steps, 9)) for p in ps if p <= 1})
    return [w for w in ws if 0 < w < steps]


@ieee_float32_call
def apgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 50,
    restarts: int = 1,
    loss: str = "ce",
    rho: float = 0.75,
    alpha: float = 0.75,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    _tracker: _Tracker | None = None,
) -> AttackResult:
    """Auto-PGD for the l2 ball (Croce & Hein, ICML 2020, Algorithm 1).

    - Step size eta starts at 2 eps (per sample). Steps are l2-normalised gradient steps.
    - Momentum: z = P(x_k + eta g/||g||), x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))
      with alpha = 0.75 (plain step for k = 0).
    - The point of highest loss is tracked. At each checkpoint w_j (:func:`apgd_checkpoints`) the
      step is halved and the iterate moved back to the best point when (1) the loss increased in
      fewer than rho = 75% of the steps since w_{j-1}, or (2) neither eta nor the best loss changed
      since w_{j-1}. After such a restart the momentum is reset (our choice: the previous iterate
      is not a neighbour of the best point).
    - Start: a random point on the sphere of radius eps/2 (then projected), a fresh one per restart.
    - ``loss``: "ce" (APGD-CE) or "dlr" (APGD-DLR, :func:`dlr_loss`), or "margin".
    """
    eps = _check_common(model, x, y, eps, steps, restarts)
    loss_fn = _loss_fn(loss)
    gen = _generator(seed, generator)
    checkpoints = apgd_checkpoints(steps)
    with attack_mode(model):
        tr = _tracker or _Tracker(model, x, y, eps, f"apgd-{loss}")
        for _ in range(restarts):
            idx = tr.active()
            if idx.numel() == 0:
                break
            _apgd_run(model, x, y, eps, idx, tr, loss_fn, steps, checkpoints, rho, alpha, gen)
    return tr.result()


def _apgd_run(model, x, y, eps, idx, tr, loss_fn, steps, checkpoints, rho, alpha, gen):
    dev = x.device
    dv = idx.to(dev)
    # Full-size state over the samples of this restart; `live` indexes the ones still attacked.
    x0, y0, e0 = x[dv], y[dv], eps[idx]
    n = idx.numel()
    half = torch.full((n,), 0.5, dtype=torch.float64)
    xk = _random_in_ball(x0, e0, gen, radius_scale=half)
    xprev = xk.clone()
    eta = 2.0 * e0.clone()  # float64, CPU
    best_loss = torch.full((n,), -math.inf, dtype=torch.float64)
    best_x, best_g = xk.clone(), torch.zeros_like(xk)
    prev_loss = torch.full((n,), -math.inf, dtype=torch.float64)
    increases = torch.zeros(n, dtype=torch.long)
    ck_eta, ck_best = eta.clone(), best_loss.clone()
    last_ck = 0
    live = torch.arange(n)
    for k in range(steps + 1):
        lv = live.to(dev)
        if k == steps:  # the last iterate: forward only
            with torch.no_grad():
                tr.update(idx[live], xk[lv], model(xk[lv]).detach())
            break
        logits, loss, g = _forward_backward(model, xk[lv], y0[lv], loss_fn)
        loss = loss.to(torch.float64).cpu()
        tr.update(idx[live], xk[lv], logits)
        keep = ~tr.success[idx[live]]
        live, loss, g = live[keep], loss[keep], g[keep.to(dev)]
        if live.numel() == 0:
            return
        lv = live.to(dev)
        if k > 0:
            increases[live] += (loss > prev_loss[live]).long()
        prev_loss[live] = loss
        improved = loss > best_loss[live]
        if improved.any():
            b = live[improved]
            best_loss[b] = loss[improved]
            best_x[b.to(dev)] = xk[b.to(dev)]
            best_g[b.to(dev)] = g[improved.to(dev)]
        if k in checkpoints:
            cond1 = increases[live] < rho * (k - last_ck)
            cond2 = (ck_eta[live] == eta[live]) & (ck_best[live] == best_loss[live])
            reduce = cond1 | cond2
            ck_eta[live], ck_best[live] = eta[live], best_loss[live]
            increases[live] = 0
            last_ck = k
            if reduce.any():
                r = live[reduce]
                rd = r.to(dev)
                eta[r] /= 2
                xk[rd] = best_x[rd]
                xprev[rd] = best_x[rd]
                g[reduce.to(dev)] = best_g[rd]
        step = _view(eta[live].to(x.dtype), g) * _normalize_grad(g)
        xl, x0l, el = xk[lv], x0[lv], e0[live]
        z = project(x0l, xl + step, el)
        if k == 0:
            xnew = z
        else:
            xnew = project(x0l, xl + alpha * (z - xl) + (1 - alpha) * (xl - xprev[lv]), el)
        xprev[lv] = xl
        xk[lv] = xnew


# ---- ensembles and minimum norm -----------------------------------------------------------------


@ieee_float32_call
def run_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    attack: str = "apgd-ce",
    *,
    steps: int = 50,
    restarts: int = 1,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """One named attack: "pgd", "apgd-ce" or "apgd-dlr" (see :data:`ATTACKS`)."""
    return attack_ensemble(model, x, y, eps, (attack,), steps=steps, restarts=restarts, seed=seed,
                           generator=generator)


def parse_attacks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"all" -> every attack of :data:`ATTACKS`; otherwise one or more of their names."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if "all" in names:
        return ATTACKS
    for n in names:
        if n not in ATTACKS:
            raise ConfigError(f"unknown attack {n!r}; choose from {', '.join(ATTACKS)} or all")
    return tuple(dict.fromkeys(names))


@ieee_float32_call
def attack_ensemble(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    attacks: str | Sequence[str] = "all",
    *,
    steps: int = 50,
    restarts: int = 1,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Run the attacks in turn (APGD-CE, APGD-DLR, PGD by default), each only on the samples that
    the earlier ones did not break, as AutoAttack does; a sample is robust when none breaks it."""
    names = parse_attacks(attacks)
    eps_t = _check_common(model, x, y, eps, steps, restarts)
    gen = _generator(seed, generator)
    with attack_mode(model):
        tr = _Tracker(model, x, y, eps_t, names[0])
        for name in names:
            tr.name = name
            if name == "pgd":
                pgd_l2(model, x, y, eps_t, steps=steps, restarts=restarts, generator=gen, _tracker=tr)
            else:
                apgd_l2(model, x, y, eps_t, steps=steps, restarts=restarts, loss=name.split("-")[1],
                        generator=gen, _tracker=tr)
    return tr.result()


@dataclass
class MinNormResult:
    """Empirical robustness radius per sample (an upper bound on the distance to the nearest
    adversarial example: ``x_adv`` is a witness at distance ``radius``).

    ``radius`` is 0 for samples misclassified already and inf where no adversarial example was
    found up to the farthest point of the box. ``lipschitz_lower`` as in :class:`AttackResult`,
    maximised over every attack of the search.
    """

    radius: torch.Tensor
    x_adv: torch.Tensor
    adv_pred: torch.Tensor
    found: torch.Tensor
    lipschitz_lower: torch.Tensor


def _line_search(model, x, y, x_adv, iters: int):
    """Shrink each witness along its own direction: bisection on t in [0, 1] for the smallest
    x + t (x_adv - x) that still breaks the sample (forward passes only; the segment stays in the
    box because the box is convex)."""
    d = x_adv - x
    lo = torch.zeros(x.shape[0], dtype=torch.float64)
    hi = torch.ones(x.shape[0], dtype=torch.float64)
    best = x_adv.clone()
    with torch.no_grad():
        for _ in range(iters):
            mid = (lo + hi) / 2
            pts = (x + _view(mid.to(x.dtype), d) * d).clamp(0, 1)
            broken = (margins(model(pts), y) <= 0).cpu()
            hi = torch.where(broken, mid, hi)
            lo = torch.where(broken, lo, mid)
            best[broken.to(x.device)] = pts[broken.to(x.device)]
    return best


@ieee_float32_call
def min_norm_search(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: str | Sequence[str] = ("apgd-ce", "apgd-dlr"),
    init_eps: float | torch.Tensor = 0.5,
    lower: float | torch.Tensor | None = None,
    search_steps: int = 8,
    line_search_steps: int = 10,
    steps: int = 50,
    restarts: int = 1,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> MinNormResult:
    """Per-sample empirical robustness radius by bisection on eps over an attack ensemble.

    1. Bracket: attack at ``init_eps``; double eps for the samples not broken until they are, or
       until eps reaches the farthest point of the box from x, ||max(x, 1 - x)||_2 (nothing lies
       beyond it; samples still unbroken there get radius inf).
    2. Bisect ``search_steps`` times between the largest eps that failed and the shortest witness.
       ``lower`` (optional, one value per sample or a number, 0 = none): an eps at which the
       caller's attack already failed, the bisection's starting low end (the audit passes its
       own radius, so that no bisection step re-attacks inside it).
    3. Line search along each witness (:func:`_line_search`).

    The radius reported is the length of the best witness found, so it is a genuine upper bound on
    the minimal adversarial distance whatever the attack's strength; a failed attack at an eps
    proves nothing, so the bisection's lower end is only a search heuristic.
    """
    _check_inputs(x, y)
    if search_steps < 0 or line_search_steps < 0:
        raise ConfigError("search steps must be >= 0")
    n = x.shape[0]
    gen = _generator(seed, generator)
    eps0 = as_eps(init_eps, n)
    with attack_mode(model):
        cap = _flat_norm(torch.maximum(x, 1 - x)).cpu()
        radius = torch.full((n,), math.inf, dtype=torch.float64)
        witness = x.clone()
        lip = torch.zeros(n, dtype=torch.float64)
        lo = torch.zeros(n, dtype=torch.float64)
        if lower is not None:
            lo = torch.as_tensor(lower, dtype=torch.float64).detach().cpu()
            lo = lo.expand(n).clone() if lo.ndim == 0 else lo.clone()
            if lo.shape != (n,) or not torch.isfinite(lo).all() or (lo < 0).any():
                raise ConfigError(f"lower must be one finite value >= 0 per sample ({n}) or a number")

        def attempt(sel: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            """Attack samples ``sel`` at radii ``e``; keep shorter witnesses; return success."""
            sd = sel.to(x.device)
            res = attack_ensemble(model, x[sd], y[sd], e, attacks, steps=steps, restarts=restarts, generator=gen)
            lip[sel] = torch.maximum(lip[sel], res.lipschitz_lower)
            shorter = res.success & (res.norm < radius[sel])
            s = sel[shorter]
            radius[s] = res.norm[shorter]
            witness[s.to(x.device)] = res.x_adv[shorter.to(x.device)]
            return res.success

        # 1. bracket
        todo = torch.arange(n)
        e = torch.minimum(eps0, cap)
        while todo.numel():
            ok = attempt(todo, e[todo])
            at_cap = e[todo] >= cap[todo]
            lo[todo[~ok]] = torch.maximum(lo[todo[~ok]], e[todo[~ok]])
            todo = todo[~ok & ~at_cap]
            e[todo] = torch.minimum(2 * e[todo], cap[todo])
        # 2. bisection
        for _ in range(search_steps):
            sel = torch.isfinite(radius).nonzero().squeeze(1)
            sel = sel[radius[sel] > 0]
            sel = sel[radius[sel] - lo[sel] > 1e-6 * radius[sel]]
            if sel.numel() == 0:
                break
            mid = (lo[sel] + radius[sel]) / 2
            ok = attempt(sel, mid)
            lo[sel[~ok]] = mid[~ok]
        # 3. line search along each witness
        sel = (torch.isfinite(radius) & (radius > 0)).nonzero().squeeze(1)
        if sel.numel() and line_search_steps:
            sd = sel.to(x.device)
            shrunk = _line_search(model, x[sd], y[sd], witness[sd], line_search_steps)
            norms = _flat_norm(shrunk - x[sd]).cpu()
            better = norms < radius[sel]
            radius[sel[better]] = norms[better]
            witness[sd[better.to(x.device)]] = shrunk[better.to(x.device)]
        with torch.no_grad():
            logits = model(witness)
        adv_pred = logits.argmax(1).cpu()
        found = torch.isfinite(radius)
    return MinNormResult(radius=radius, x_adv=witness, adv_pred=adv_pred, found=found, lipschitz_lower=lip)
