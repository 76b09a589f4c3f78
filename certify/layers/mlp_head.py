"""The MLP head with a curvature-based certificate ("CRC-Lip").

Singla & Feizi, "Improved techniques for deterministic l2 robustness", NeurIPS 2022, technique (a),
building on the curvature-based robustness certificates of Singla & Feizi, "Second-order provable
defenses against adversarial attacks" (ICML 2020). See paper.md section 6.

On top of features ``phi`` that are L_f-Lipschitz in the image (a LipConvnet body), the head is

    f(phi) = W2 softplus_beta(W1 phi + b1) + b2,    softplus_beta(t) = log(1 + exp(beta t)) / beta,

with W1 unconstrained. For a pair of classes (y, j), ``g = f_y - f_j = w . softplus_beta(W1 phi +
b1) + b`` with ``w = W2[y] - W2[j]``, whose Hessian is ``W1^T diag(w * softplus_beta'') W1``. Since
``softplus_beta''(t) = beta s (1 - s)`` (s = sigmoid(beta t)) lies in [0, beta/4],

    -m_yj I <= Hessian(g_yj) <= M_yj I,   m_yj = beta/4 lambda_max(W1^T diag(relu(-w)) W1),
                                          M_yj = beta/4 lambda_max(W1^T diag(relu(w)) W1) = m_jy,

for every phi. These bounds depend on the pair only; lipcert computes them once per model with
exact float64 eigenvalues plus rounding slack (**Fix**: the reference estimates them per sample with
20 power iterations, which under-estimates and is unsound).

Certificates of the distance from phi to the decision boundary {g_yj = 0}, for every j != y:

- quick: ``g(phi + d) >= g - ||grad g|| ||d|| - m/2 ||d||^2``, so no d shorter than
  ``r = (sqrt(||grad g||^2 + 2 m g) - ||grad g||) / m`` reaches the boundary;
- tight (the dual / Lagrangian bound): for eta in [0, 1/m), weak duality gives
  ``dist^2 >= D(eta) = min_d ||d||^2 + 2 eta g(phi + d)``, a problem whose objective h is
  mu-strongly convex with ``mu = 2 (1 - eta m)``. An approximate minimiser d only gives an UPPER
  estimate h(d) of D(eta); lipcert uses the rigorous lower bound ``h(d) - ||grad h(d)||^2 / (2 mu)``
  (**Fix**) and searches eta by bisection on the sign of ``dD/deta = 2 g(phi + d*(eta))``.

The radius in image space is ``min_j max(quick_j, tight_j) / L_f`` over ALL classes j != y
(**Fix**: the reference looks at the 9 largest logits only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .norms import FLOAT64_SLACK
from .protocol import Head
from .registry import register_layer

EPS64 = torch.finfo(torch.float64).eps
CERTIFICATE_MODES = ("tight", "quick")


def softplus64(t: torch.Tensor, beta: float) -> torch.Tensor:
    """softplus_beta(t) = log(1 + exp(beta t)) / beta, overflow-free and without torch's linear
    threshold (which is an approximation), for the float64 certificate computations."""
    bt = beta * t
    return (bt.clamp_min(0) + torch.log1p(torch.exp(-bt.abs()))) / beta


def exact_pair_curvatures(w1: torch.Tensor, w2: torch.Tensor, beta: float) -> torch.Tensor:
    """Rigorous upper bounds ``K[y, j] >= m_yj`` on the lower curvature of ``g_yj = f_y - f_j``.

    ``m_yj = beta/4 lambda_max(W1^T diag(d) W1)`` with ``d = relu(W2[j] - W2[y])``; the upper
    curvature of g_yj is ``K[j, y]``. For each ordered pair the eigenvalue is computed exactly by
    ``eigvalsh`` in float64 on the smaller of two Gram forms with the same nonzero spectrum: the
    features x features matrix ``W1_S^T diag(d_S) W1_S`` or the |S| x |S| matrix
    ``D_S^(1/2) (W1 W1^T)_SS D_S^(1/2)``, S the support of d. Rounding: forming the Gram matrix
    and the backward-stable eigensolver each perturb the eigenvalue by at most (size) eps ||A||,
    and ``||A|| <= trace(A) = sum_h d_h ||W1_h||^2``; lipcert adds ``(F + H + 2) eps trace(A)``
    and then the relative :data:`FLOAT64_SLACK`.
    """
    w1 = w1.detach().to(torch.float64)
    w2 = w2.detach().to(torch.float64)
    hidden, features = w1.shape
    classes = w2.shape[0]
    row_sq = w1.square().sum(1)
    out = torch.zeros(classes, classes, dtype=torch.float64, device=w1.device)
    gram_h = None  # W1 W1^T, built only if some support is smaller than the feature dimension
    for y in range(classes):
        for j in range(classes):
            if y == j:
                continue
            d = (w2[j] - w2[y]).clamp_min(0)
            support = torch.nonzero(d > 0).flatten()
            if support.numel() == 0:
                continue  # g_yj is convex: its Hessian is >= 0
            ds = d[support]
            trace = float((ds * row_sq[support]).sum())
            if support.numel() <= features:
                if gram_h is None:
                    gram_h = w1 @ w1.T
                sq = ds.sqrt()
                mat = sq[:, None] * gram_h[support][:, support] * sq[None, :]
            else:
                ws = w1[support]
                mat = ws.T @ (ds[:, None] * ws)
            lam = float(torch.linalg.eigvalsh(mat)[-1])
            lam = max(lam, 0.0) + (features + hidden + 2) * EPS64 * trace
            out[y, j] = beta / 4 * lam * (1 + FLOAT64_SLACK)
    return out


class _Pairs:
    """Everything the certificate needs about the head, in float64, computed once per weights."""

    def __init__(self, head: "MLPHead") -> None:
        self.w1 = head.fc1.weight.detach().to(torch.float64)
        self.b1 = head.fc1.bias.detach().to(torch.float64)
        self.w2 = head.fc2.weight.detach().to(torch.float64)
        self.b2 = head.fc2.bias.detach().to(torch.float64)
        self.beta = float(head.beta)
        self.hidden, self.features = self.w1.shape
        self.curv = exact_pair_curvatures(self.w1, self.w2, self.beta)  # K[y, j] = m_yj
        self.wdiff = self.w2[:, None, :] - self.w2[None, :, :]  # (C, C, H): w_yj
        self.bdiff = self.b2[:, None] - self.b2[None, :]
        # Per-pair constants of the rounding-error bounds (see _err_g/_err_grad).
        rn = self.w1.norm(dim=1)
        aw = self.wdiff.abs()
        self.e_a = aw @ rn                       # sum_h |w_h| ||W1_h||
        self.e_b = aw @ self.b1.abs()            # sum_h |w_h| |b1_h|
        self.e_a2 = aw @ rn.square()             # sum_h |w_h| ||W1_h||^2
        self.e_a3 = aw @ (rn * self.b1.abs())    # sum_h |w_h| ||W1_h|| |b1_h|


@register_layer("mlp", kind="head", reference="Singla & Feizi, Improved techniques for deterministic l2 robustness "
                                              "(CRC-Lip), NeurIPS 2022",
                bound="curvature certificate: exact float64 pair curvatures of W1, W2 and the features' bound")
class MLPHead(Head):
    """One-hidden-layer softplus MLP head, certified by curvature (CRC-Lip, NeurIPS 2022).

    Args:
        features: size of the (flattened) feature vector.
        num_classes: number of logits.
        hidden: hidden width (the paper uses 4096 on 2048 features).
        beta: softplus sharpness; the Hessian of each logit difference has curvature <= beta/4
            times a spectral quantity of the weights.
        curvature_weight: weight of :meth:`regularizer` in the loss; ``None`` uses ``beta``, the
            paper's "beta * mean over pairs of max(m, M)".
        reg_iters: power-iteration steps per :meth:`regularizer` call on the persistent vectors.
        reg_max_pairs: at most this many class pairs (sampled afresh each call, an unbiased
            estimate of the mean) enter the training regulariser; all when there are fewer.
    """

    kind = "mlp"
    certificate = "curvature"

    def __init__(
        self,
        features: int,
        num_classes: int,
        hidden: int = 4096,
        beta: float = 1.0,
        curvature_weight: float | None = None,
        reg_iters: int = 1,
        reg_max_pairs: int = 64,
    ) -> None:
        super().__init__()
        if features < 1 or hidden < 1:
            raise ConfigError(f"MLP head needs positive sizes, got features={features}, hidden={hidden}")
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes, got {num_classes}")
        if not (beta > 0 and math.isfinite(beta)):
            raise ConfigError(f"softplus beta must be positive and finite, got {beta}")
        self.features, self.num_classes, self.hidden = features, num_classes, hidden
        self.beta = float(beta)
        self.curvature_weight = float(beta if curvature_weight is None else curvature_weight)
        if self.curvature_weight < 0:
            raise ConfigError(f"curvature_weight must be >= 0, got {curvature_weight}")
        self.reg_iters = int(reg_iters)
        self.reg_max_pairs = int(reg_max_pairs)
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self._reg_vecs: torch.Tensor | None = None  # power-iteration state, not saved
        self._cache: tuple[tuple, _Pairs] | None = None

    def config(self) -> dict:
        # W1, W2 are used as they are: the baked head is a frozen copy, rebuilt from these
        return {"features": self.features, "num_classes": self.num_classes, "hidden": self.hidden,
                "beta": self.beta}

    @classmethod
    def examples(cls):
        return [(cls(6, 3, hidden=8), (6,)), (cls(4, 2, hidden=5, beta=2.0), (4,))]

    def extra_repr(self) -> str:
        return (f"features={self.features}, hidden={self.hidden}, classes={self.num_classes}, "
                f"beta={self.beta}, curvature_weight={self.curvature_weight}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.softplus(self.fc1(x.flatten(1)), beta=self.beta))

    def no_weight_decay(self) -> list[str]:
        """Parameter names (relative to this head) that the paper's recipe trains WITHOUT weight
        decay: all of them. The model-level names carry the ``head.`` prefix."""
        return [name for name, _ in self.named_parameters()]

    # ---- training regulariser -----------------------------------------------------------------

    def regularizer(self) -> torch.Tensor:
        """The paper's curvature regulariser, ``curvature_weight * mean over class pairs of
        max(m_yj, M_yj)``, differentiable in W1 and W2.

        Each ``lambda_max(W1^T diag(d_p) W1)`` is the Rayleigh quotient of a persistent unit
        vector refreshed by ``reg_iters`` power-iteration steps per call (no gradient through the
        vector, so the gradient is that of the eigenvalue at convergence). This is an estimate
        from below, fine for training; certification never uses it (see
        :func:`exact_pair_curvatures`).
        """
        w1, w2 = self.fc1.weight, self.fc2.weight
        c = self.num_classes
        iu = torch.triu_indices(c, c, offset=1, device=w1.device)
        n_pairs = iu.shape[1]
        pick = None
        if n_pairs > self.reg_max_pairs:
            pick = torch.randperm(n_pairs, device=w1.device)[: self.reg_max_pairs]
            iu = iu[:, pick]
        ys, js = iu[0], iu[1]
        # Ordered pairs (y, j) and (j, y): m_yj weights relu(W2[j] - W2[y]), M_yj = m_jy.
        a = torch.cat([ys, js])
        b = torch.cat([js, ys])
        dneg = (w2[b] - w2[a]).clamp_min(0)  # (2P, H)
        vecs = self._power_vectors(w1, c)
        idx = a * c + b
        with torch.no_grad():
            v = vecs[idx]
            for _ in range(self.reg_iters):
                v = ((v @ w1.T) * dneg) @ w1
                v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            vecs[idx] = v
        u = v @ w1.T
        lam = self.beta / 4 * (dneg * u.square()).sum(1)  # Rayleigh quotients, ||v|| = 1
        p = ys.numel()
        return self.curvature_weight * torch.maximum(lam[:p], lam[p:]).mean()

    def _power_vectors(self, w1: torch.Tensor, c: int) -> torch.Tensor:
        shape = (c * c, w1.shape[1])
        v = self._reg_vecs
        if v is None or v.shape != shape or v.device != w1.device or v.dtype != w1.dtype:
            v = torch.randn(shape, device=w1.device, dtype=w1.dtype)
            v = v / v.norm(dim=1, keepdim=True)
            self._reg_vecs = v
            # A fresh start converges in a handful of steps; do them now, off the graph.
            with torch.no_grad():
                a = torch.arange(c, device=w1.device).repeat_interleave(c)
                b = torch.arange(c, device=w1.device).repeat(c)
                d = (self.fc2.weight[b] - self.fc2.weight[a]).clamp_min(0)
                for _ in range(20):
                    v = ((v @ w1.T) * d) @ w1
                    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
                self._reg_vecs = v
        return self._reg_vecs

    # ---- certification ------------------------------------------------------------------------

    def _key(self) -> tuple:
        ps = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return (self.beta,) + tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in ps)

    def _pairs(self) -> _Pairs:
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _Pairs(self))
        return self._cache[1]

    @torch.no_grad()
    def curvature_bounds(self) -> torch.Tensor:
        """``K[y, j]``: rigorous float64 upper bound on m_yj, the lower curvature of f_y - f_j
        (its Hessian is >= -K[y, j] I everywhere); its upper curvature is bounded by ``K[j, y]``.
        Computed once per weights and cached (keyed on the parameters' version counters)."""
        return self._pairs().curv.clone()

    def curvature_certifier(
        self, feature_lipschitz: float, mode: str = "tight", **options
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The callable ``(features, logits) -> image-space radius`` used by
        :class:`certify.certificates.Certifier`: the feature-space radius of
        :meth:`certify_features` divided by the feature extractor's Lipschitz upper bound."""
        if not (feature_lipschitz > 0 and math.isfinite(feature_lipschitz)):
            raise ConfigError(f"the feature Lipschitz bound must be positive and finite, got {feature_lipschitz}")
        if mode not in CERTIFICATE_MODES:
            raise ConfigError(f"unknown curvature certificate mode {mode!r}; choose from {CERTIFICATE_MODES}")
        self._pairs()  # the per-pair eigenvalues, once, before the first batch
        lf = float(feature_lipschitz)

        def certify(features: torch.Tensor, logits: torch.Tensor | None = None,
                    pred: torch.Tensor | None = None) -> torch.Tensor:
            return self.certify_features(features, logits, mode=mode, pred=pred, **options) / lf

        return certify

    @torch.no_grad()
    def certify_features(
        self,
        features: torch.Tensor,
        logits: torch.Tensor | None = None,
        mode: str = "tight",
        eta_steps: int = 8,
        inner_steps: int = 30,
        max_rows: int | None = None,
        pred: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feature-space certified radius (float64, shape (N,)) of the prediction at ``features``.

        The predicted class is ``pred`` when given (the class the caller reports), else the top
        class of ``logits`` by the rule of :func:`certify.certificates.predictions_and_margins`
        (the model's own output, so that the radius refers to the prediction the user sees), else
        of the head's float64 logits. Every other class
        j gives a lower bound on the distance to {f_y = f_j}: the quick closed form, and in
        ``tight`` mode the dual bound (``eta_steps`` bisection steps on eta, ``inner_steps``
        accelerated-gradient steps per eta). The minimum over ALL j is returned; a prediction that
        the float64 head does not confirm (a tie or the wrong sign) gets 0.
        """
        if mode not in CERTIFICATE_MODES:
            raise ConfigError(f"unknown curvature certificate mode {mode!r}; choose from {CERTIFICATE_MODES}")
        pairs = self._pairs()
        phi = features.detach().flatten(1).to(device=pairs.w1.device, dtype=torch.float64)
        if phi.shape[1] != pairs.features:
            raise ConfigError(f"expected {pairs.features} features, got {phi.shape[1]}")
        if not torch.isfinite(phi).all():
            raise ConfigError("non-finite features; refusing to certify")
        n, c, h = phi.shape[0], self.num_classes, pairs.hidden
        z0 = phi @ pairs.w1.T + pairs.b1
        if pred is not None:
            pred = pred.to(pairs.w1.device).long()
        elif logits is None:
            pred = (softplus64(z0, pairs.beta) @ pairs.w2.T + pairs.b2).argmax(1)
        else:
            # the same rule as certificates.predictions_and_margins (topk of the float64 logits),
            # so that on a float32 tie the certified class is the reported one
            pred = logits.detach().to(device=pairs.w1.device, dtype=torch.float64).topk(2, dim=1).indices[:, 0]
        max_rows = max_rows or max(1, (1 << 24) // max(h, pairs.features))
        quick = torch.empty(n, c, dtype=torch.float64, device=phi.device)
        chunk = max(1, max_rows // c)
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            quick[sl] = self._quick(pairs, phi[sl], z0[sl], pred[sl])
        radius_sq = quick.square()  # work with squared radii; +inf at j = y
        if mode == "tight":
            radius_sq = self._tighten(pairs, phi, z0, pred, quick, radius_sq, eta_steps, inner_steps, max_rows)
        radius = radius_sq.amin(1).sqrt()
        return radius * (1 - FLOAT64_SLACK)

    # -- quick certificate, all pairs of a chunk of samples --

    def _quick(self, pairs: _Pairs, phi, z0, pred):
        """Quick radii (N, C): +inf at j = y, and 0 for the whole row where some g <= 0."""
        beta = pairs.beta
        sp = softplus64(z0, beta)
        sg = torch.sigmoid(beta * z0)
        w = pairs.wdiff[pred]  # (N, C, H): W2[y] - W2[j]
        g = (w * sp[:, None, :]).sum(-1) + pairs.bdiff[pred]  # (N, C)
        grad = (w * sg[:, None, :]) @ pairs.w1  # (N, C, F)
        gnorm = grad.norm(dim=-1)
        xnorm = phi.norm(dim=1, keepdim=True)
        err_g = self._err_g(pairs, pred, xnorm, (w.abs() * sp[:, None, :]).sum(-1), g)
        err_grad = self._err_grad(pairs, pred, xnorm)
        k = pairs.curv[pred]  # (N, C) lower curvature of g_yj
        g_lo = g - err_g
        gn_hi = gnorm * (1 + (pairs.features + 2) * EPS64) + err_grad
        # r = (sqrt(G^2 + 2 K g) - G) / K written without cancellation; K = 0 gives g / G.
        r = 2 * g_lo / (torch.sqrt(gn_hi.square() + 2 * k * g_lo.clamp_min(0)) + gn_hi)
        r = torch.where(g_lo > 0, r, torch.zeros_like(r))
        r = torch.nan_to_num(r, nan=0.0)  # 0/0 only when g_lo <= 0 too
        r.scatter_(1, pred[:, None], math.inf)
        bad = (g_lo <= 0).scatter(1, pred[:, None], False).any(1)
        r[bad] = 0.0  # the float64 head does not confirm the prediction: no certificate
        return r

    def _err_g(self, pairs, pred, xnorm, abs_w_sp, g):
        """Bound on the float64 rounding error of g(x): z = W1 x + b1 is off by at most
        (F + 2) eps (||W1_h|| ||x|| + |b1_h|), softplus' <= 1 carries that over, and the
        H-term sum adds (H + 2) eps sum |w_h softplus_h|; a factor 4 covers the rest."""
        fdim, hdim = pairs.features, pairs.hidden
        a, b = pairs.e_a[pred], pairs.e_b[pred]
        return 4 * EPS64 * ((fdim + 2) * (a * xnorm + b) + (hdim + 2) * (abs_w_sp + g.abs()))

    def _err_grad(self, pairs, pred, xnorm):
        """Bound on the float64 rounding error of ||grad g(x)||: the H-term sums add (H + 2) eps
        sum |w_h| ||W1_h|| (sigmoid <= 1), and the error of z moves the sigmoid by at most beta/4
        times it."""
        fdim, hdim = pairs.features, pairs.hidden
        return 4 * EPS64 * ((hdim + 2) * pairs.e_a[pred]
                            + pairs.beta / 4 * (fdim + 2) * (pairs.e_a2[pred] * xnorm + pairs.e_a3[pred]))

    # -- tight certificate --

    def _tighten(self, pairs, phi, z0, pred, quick, radius_sq, eta_steps, inner_steps, max_rows):
        """Replace quick radii by max(quick, tight) where it can change the minimum over j.

        Only the minimum over j matters, and tight >= quick, so a pair whose quick radius is
        already >= the current minimum of max(quick, tight) cannot lower it: first the pair with
        the smallest quick radius of each sample, then every pair still below that value. The
        result equals the tight certificate of all pairs, at a fraction of the cost.
        """
        n, c = quick.shape
        alive = torch.isfinite(quick.amin(1)) & (quick.amin(1) > 0)
        first = quick.argmin(1)
        rows_n = torch.nonzero(alive).flatten()
        rows_j = first[rows_n]
        self._tight_rows(pairs, phi, z0, pred, rows_n, rows_j, radius_sq, eta_steps, inner_steps, max_rows)
        current = radius_sq.amin(1, keepdim=True)
        todo = (quick.square() < current) & alive[:, None]
        todo[torch.arange(n, device=phi.device), first] = False
        todo.scatter_(1, pred[:, None], False)
        rows_n, rows_j = torch.nonzero(todo, as_tuple=True)
        self._tight_rows(pairs, phi, z0, pred, rows_n, rows_j, radius_sq, eta_steps, inner_steps, max_rows)
        return radius_sq

    def _tight_rows(self, pairs, phi, z0, pred, rows_n, rows_j, radius_sq, eta_steps, inner_steps, max_rows):
        for s in range(0, rows_n.numel(), max_rows):
            rn, rj = rows_n[s:s + max_rows], rows_j[s:s + max_rows]
            if rn.numel() == 0:
                continue
            t_sq = self._dual_bound(pairs, phi[rn], z0[rn], pred[rn], rj, eta_steps, inner_steps)
            radius_sq[rn, rj] = torch.maximum(radius_sq[rn, rj], t_sq)

    def _dual_bound(self, pairs, phi, z0, y, j, eta_steps, inner_steps):
        """Rigorous lower bound on the squared distance from phi to {g_yj <= 0}, per row.

        For each eta in [0, 1/m): D(eta) = min_d h(d), h(d) = ||d||^2 + 2 eta g(phi + d), is
        <= dist^2 (take d = the nearest boundary point, where g = 0). h is mu-strongly convex
        (mu = 2 (1 - eta m)) and L-smooth (L = 2 (1 + eta M)), so Nesterov's accelerated gradient
        method converges linearly, and at EVERY iterate d, h(d) - ||grad h(d)||^2 / (2 mu) <= D(eta)
        rigorously (strong convexity); rounding allowances are subtracted. eta is searched on a
        log scale around the quick certificate's optimal eta, by bisection on the sign of
        g(phi + d) (= dD/deta / 2 at the minimiser, D being concave in eta).
        """
        beta, w1 = pairs.beta, pairs.w1
        fdim, hdim = pairs.features, pairs.hidden
        w = pairs.wdiff[y, j]  # (R, H)
        bb = pairs.bdiff[y, j]
        m = pairs.curv[y, j]  # lower curvature of g
        big_m = pairs.curv[j, y]  # upper curvature of g
        e_a, e_b = pairs.e_a[y, j], pairs.e_b[y, j]
        e_a2, e_a3 = pairs.e_a2[y, j], pairs.e_a3[y, j]
        absw = w.abs()

        def evaluate(d):
            z = z0 + d @ w1.T
            sp = softplus64(z, beta)
            g = (w * sp).sum(1) + bb
            grad = (w * torch.sigmoid(beta * z)) @ w1
            xn = (phi + d).norm(dim=1)
            err_g = 4 * EPS64 * ((fdim + 2) * (e_a * xn + e_b) + (hdim + 2) * ((absw * sp).sum(1) + g.abs()))
            err_gr = 4 * EPS64 * ((hdim + 2) * e_a + beta / 4 * (fdim + 2) * (e_a2 * xn + e_a3))
            return g, grad, err_g, err_gr

        g0, grad0, _, _ = evaluate(torch.zeros_like(phi))
        gn0 = grad0.norm(dim=1)
        # The quick certificate's 1-D model is maximised at eta_q = r_q / (||grad g|| + m r_q).
        r_q = 2 * g0 / (torch.sqrt(gn0.square() + 2 * m * g0) + gn0)
        eta_q = r_q / (gn0 + m * r_q)
        cap = torch.where(m > 0, (1 - 1e-6) / m, torch.full_like(m, math.inf))
        log_lo = torch.log(eta_q) - math.log(16.0)
        log_hi = torch.minimum(torch.log(eta_q) + math.log(16.0), torch.log(cap))
        log_eta = torch.minimum(torch.log(eta_q), log_hi)
        best = torch.zeros_like(g0)
        d_prev, eta_prev = None, None
        for step in range(max(1, eta_steps)):
            eta = torch.exp(log_eta)
            mu = 2 * (1 - eta * m)
            lip = 2 * (1 + eta * big_m)
            sk = torch.sqrt(lip / mu)
            q = ((sk - 1) / (sk + 1))[:, None]
            if d_prev is None:
                x = -(eta / (1 - eta * m))[:, None] * grad0  # the 1-D model's minimiser
            else:
                x = d_prev * (eta / eta_prev)[:, None]  # d*(eta) = -eta grad g(phi + d*)
            yk, g_last = x, g0
            for _ in range(max(1, inner_steps)):
                g, grad, err_g, err_gr = evaluate(yk)
                dn2 = yk.square().sum(1)
                hval = dn2 + 2 * eta * g
                gh = 2 * yk + 2 * eta[:, None] * grad
                gh_norm = gh.norm(dim=1) * (1 + (fdim + 2) * EPS64) + 2 * eta * err_gr + 4 * EPS64 * dn2.sqrt()
                h_err = 2 * eta * err_g + 4 * (fdim + 2) * EPS64 * (dn2 + 2 * eta * g.abs())
                lb = hval - h_err - gh_norm.square() / (2 * mu)
                best = torch.maximum(best, torch.nan_to_num(lb, nan=0.0, posinf=0.0, neginf=0.0))
                g_last = g
                x_new = yk - gh / lip[:, None]
                yk = x_new + q * (x_new - x)
                x = x_new
            d_prev, eta_prev = x, eta
            # Bisection on the sign of dD/deta: g > 0 at the minimiser means eta is too small.
            up = g_last > 0
            log_lo = torch.where(up, log_eta, log_lo)
            log_hi = torch.where(up, log_hi, log_eta)
            log_eta = 0.5 * (log_lo + log_hi)
        return best
