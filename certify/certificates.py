"""Deterministic l2 robustness certificates (Singla & Feizi, NeurIPS 2022, section 1 of paper.md).

- Global: r(x) = m(x) / (sqrt(2) L), m the margin between the top logit and the runner-up, L an
  upper bound on the Lipschitz constant of x -> logits.
- Pairwise, for a last linear layer W on features with Lipschitz bound L_f (the LLN head):
  r(x) = min over ALL j != y of (f_y - f_j) / (L_f ||w_y - w_j||).

A sample is certified at eps when it is correctly classified and r(x) > eps (strict); ties in the
logits give a margin of 0, hence a radius of 0. Margins are taken in float64 from the logits.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .errors import ConfigError

SQRT2 = math.sqrt(2.0)
STANDARD_EPS = ("36/255", "72/255", "108/255")


def parse_eps(text: str | float) -> float:
    """Parse an l2 radius written as a fraction (``36/255``) or a decimal (``0.5``); must be > 0."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"malformed eps {text!r}: use a fraction like 36/255 or a decimal like 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"eps must be a positive finite number, got {text!r}")
    return value


def predictions_and_margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class and margin f_y - max_{j != y} f_j (>= 0; 0 on a tie), in float64."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ConfigError(f"logits must have shape (N, C>=2), got {tuple(logits.shape)}")
    z = logits.detach().to(torch.float64)
    top2 = z.topk(2, dim=1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]


def global_radius(logits: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """r = margin / (sqrt(2) L) for an upper bound L on the Lipschitz constant of the logits."""
    if not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise ConfigError(f"the Lipschitz bound must be positive and finite, got {lipschitz}")
    _, margin = predictions_and_margins(logits)
    return margin / (SQRT2 * float(lipschitz))


def pairwise_radius(logits: torch.Tensor, feature_lipschitz: float, row_distances: torch.Tensor) -> torch.Tensor:
    """r = min_{j != y} (f_y - f_j) / (L_f ||w_y - w_j||), over ALL other classes.

    ``row_distances[y, j]`` is an upper bound on ||w_y - w_j||. A pair with identical rows can
    never swap order (f_y - f_j is the constant bias difference), so it imposes no limit.
    """
    if not (feature_lipschitz > 0 and math.isfinite(feature_lipschitz)):
        raise ConfigError(f"the feature Lipschitz bound must be positive and finite, got {feature_lipschitz}")
    pred, margin = predictions_and_margins(logits)
    z = logits.detach().to(torch.float64)
    dist = row_distances.to(device=z.device, dtype=torch.float64)[pred]  # (N, C)
    gaps = z.gather(1, pred[:, None]) - z  # f_y - f_j >= 0
    radius = gaps / (float(feature_lipschitz) * dist)
    radius = torch.where(dist > 0, radius, torch.full_like(radius, math.inf))
    radius.scatter_(1, pred[:, None], math.inf)  # j = y is not a competitor
    radius = radius.amin(dim=1)
    return torch.where(margin > 0, radius, torch.zeros_like(radius))


def certified_mask(radius: torch.Tensor, correct: torch.Tensor, eps: float) -> torch.Tensor:
    """Certified at eps: correctly classified and radius strictly greater than eps."""
    return correct & (radius > eps)


CERTIFICATE_METHODS = ("auto", "global", "pairwise", "curvature")


class Certifier:
    """Certified radii for one model: the bounds are computed once, then each batch costs one
    evaluation forward pass.

    Args:
        model: a lipcert model (``lipschitz_bound()``, ``head_kind``), or any callable model when
            ``lipschitz`` is given.
        method: ``auto`` picks the tightest sound certificate for the head (pairwise for LLN,
            curvature for MLP, global otherwise); ``global``, ``pairwise`` or ``curvature`` force one.
        lipschitz: a user-supplied Lipschitz bound of the whole model, for models that are not
            1-Lipschitz by construction; reports then say the bound is user-supplied.
    """

    def __init__(self, model, method: str = "auto", lipschitz: float | None = None) -> None:
        if method not in CERTIFICATE_METHODS:
            raise ConfigError(f"unknown certificate {method!r}; choose from {CERTIFICATE_METHODS}")
        self.model = model
        head = getattr(model, "head_kind", None)
        if lipschitz is not None:
            if method not in ("auto", "global"):
                raise ConfigError("a user-supplied Lipschitz bound only supports the global certificate")
            if not (lipschitz > 0 and math.isfinite(lipschitz)):
                raise ConfigError(f"--lipschitz must be positive and finite, got {lipschitz}")
            self.method, self.lipschitz, self.bound_source = "global", float(lipschitz), "user-supplied"
            return
        if method == "auto":
            method = {"lln": "pairwise", "mlp": "curvature"}.get(head, "global")
        if method == "pairwise" and head != "lln":
            raise ConfigError(f"the pairwise certificate needs an LLN head; this model's head is {head!r}")
        if method == "curvature" and head != "mlp":
            raise ConfigError(f"the curvature certificate needs an MLP head; this model's head is {head!r}")
        if method == "global" and head == "mlp":
            raise ConfigError("an MLP head has no global Lipschitz bound; use the curvature certificate")
        from .lipschitz import upper_bound

        self.method = method
        self.bound_source = getattr(model, "bound_source", "computed from the weights")
        if method == "global":
            self.lipschitz = upper_bound(model)
        else:
            self.lipschitz = None
            self.feature_lipschitz = float(model.feature_lipschitz_bound())
            if method == "pairwise":
                self.row_distances = model.head.pairwise_row_distances()
            else:
                self.curvature = model.head.curvature_certifier(self.feature_lipschitz)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, predictions, margins (float64) and certified radii (float64) of a batch."""
        if self.method == "curvature":
            feats = self.model.features(x)
            logits = self.model.head(feats)
            radius = self.curvature(feats, logits)
        else:
            logits = self.model(x)
            if self.method == "global":
                radius = global_radius(logits, self.lipschitz)
            else:
                radius = pairwise_radius(logits, self.feature_lipschitz, self.row_distances)
        pred, margin = predictions_and_margins(logits)
        if not torch.isfinite(logits).all():
            raise ConfigError("the model produced non-finite logits; refusing to certify")
        return logits, pred, margin, radius
