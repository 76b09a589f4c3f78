"""Training losses for 1-Lipschitz classifiers, per sample (the training loop averages them).

- ``ce``: cross-entropy (with a temperature).
- ``cr``: certificate regularisation (Singla et al., ICLR 2022), ``CE - gamma relu(r(x))`` with
  ``r(x) = (f_y - max_{j != y} f_j) / (sqrt(2) L)`` the true-class margin over the nominal
  Lipschitz constant ``L = 1/min(std)`` of a 1-Lipschitz body (misclassified samples add 0).
- ``offset``: offset cross-entropy, ``CE((f - offset onehot(y)) / T, y)`` (the true-class logit
  lowered by ``offset``; default ``sqrt(2) L 36/255``, the margin the global certificate needs at
  36/255; ``"2x"`` is twice that).
- ``emma``: efficient margin maximisation (Hu, Zhang, Wang, Fredrikson, "Unlocking Deterministic
  Robustness Certification on ImageNet", NeurIPS 2023): every other class's logit is raised by
  ``eps_j K_yj`` with ``K_yj`` the Lipschitz constant of the margin ``f_y - f_j`` and
  ``eps_j = clamp((f_y - f_j) / K_yj, 0, eps)`` held constant (no gradient), then CE: the logits
  of the worst case in the eps ball, clipped at the decision boundary.
- ``la``: logit annealing (Lai et al., "Enhancing Certified Robustness via Block Reflector
  Orthogonal Layers and Logit Annealing Loss", ICML 2025): the offset cross-entropy weighted
  focal-style, ``T alpha (1 - p_y)^beta CE((f - offset onehot(y)) / T, y)`` with ``p_y`` the
  softmax probability of the true class on those logits (alpha 0.25, beta 2, the reference's
  values; the offset defaults as for ``offset``), so that samples with a large margin stop pushing
  it and capacity goes to the others. ``la_alpha`` and ``la_beta`` set alpha and beta.
- ``emma_la``: logit annealing on EMMA's lifted logits, the loss of the BRONet trainer
  (ntuaislab/BRONet ``logit_annealing_loss`` with ``lip_reg``; its CIFAR config: alpha 1, beta 5,
  offset 2.0, temperature 0.75). As that code, the lift keeps at least 1% of eps
  (``eps_j = clamp((f_y - f_j) / K_yj, 0.01 eps, eps)``), misclassified samples included.

The losses use the NOMINAL Lipschitz constant (what a 1-Lipschitz body would have) to steer
training; certificates never do: they use the sound bound computed from the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

LOSSES = ("ce", "cr", "offset", "emma", "la", "emma_la")
#: logit annealing's focal weight (the BRONet reference's LipConvnet defaults)
LA_ALPHA, LA_BETA = 0.25, 2.0
#: ``emma_la``: the least lift, as a fraction of eps (the BRONet trainer's clip of eps_j at 0.01)
EMMA_LA_FLOOR = 0.01


def nominal_lipschitz(model: nn.Module) -> float:
    """1/min(std): the Lipschitz constant of a model whose layers are all 1-Lipschitz. Used by
    the training losses only (the certificates use the sound bound computed from the weights)."""
    std = getattr(model, "std", None)
    return 1.0 / min(std) if std else 1.0


def default_offset(model: nn.Module, eps: float = 36 / 255) -> float:
    """sqrt(2) * L * eps: the margin that the global certificate needs at ``eps``."""
    return math.sqrt(2.0) * nominal_lipschitz(model) * eps


def parse_offset(value: float | str | None) -> float | str | None:
    """An offset as a user gives it: None (the default margin), a number >= 0 (logits), or
    ``"<k>x"``, k >= 0 times the default margin ``sqrt(2) L 36/255`` (the CVPR'24 comparison of
    Prach et al. trains with ``2x``: ``2 sqrt(2) eps`` on inputs in [0, 1]). Returns the number or
    the normalised ``"<k>x"``; raises :class:`ConfigError` on anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        scaled = text.endswith("x")
        try:
            k = float(text[:-1] if scaled else text)
        except ValueError:
            k = float("nan")
        if not (math.isfinite(k) and k >= 0):
            raise ConfigError(f"offset must be a number >= 0 or a multiple of the margin such as 2x, got {value!r}")
        return f"{k:g}x" if scaled else k
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"offset must be a number >= 0 or a multiple of the margin such as 2x, got {value!r}")
    return float(value)


def resolve_offset(offset: float | str | None, model: nn.Module) -> float:
    """The logit offset to train with: :func:`parse_offset`'s value made a number for ``model``."""
    offset = parse_offset(offset)
    if offset is None:
        return default_offset(model)
    if isinstance(offset, str):
        return float(offset[:-1]) * default_offset(model)
    return offset


def true_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """f_y - max_{j != y} f_j for the TRUE class y (negative when misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(dim=1)


def margin_lipschitz(model: nn.Module, lipschitz: float) -> torch.Tensor | float:
    """The nominal Lipschitz constants ``K[y, j]`` of the margins ``f_y - f_j`` for EMMA: with a
    pairwise head (LLN), ``L ||w_y - w_j||`` from its normalised rows (differentiable, as in the
    reference); otherwise ``sqrt(2) L`` for every pair."""
    head = getattr(model, "head", None)
    if getattr(head, "certificate", None) == "pairwise" and hasattr(head, "normalized_weight"):
        w = head.normalized_weight()
        diff = w[:, None, :] - w[None, :, :]
        return lipschitz * diff.square().sum(-1).clamp_min(1e-12).sqrt()
    return math.sqrt(2.0) * lipschitz


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str, *, gamma: float = 0.5,
                    offset: float = 0.0, temperature: float = 1.0, lipschitz: float = 1.0,
                    pair_lipschitz: torch.Tensor | float | None = None, eps: float = 36 / 255,
                    la_alpha: float = LA_ALPHA, la_beta: float = LA_BETA) -> torch.Tensor:
    """The training loss of each sample (see the module docstring), in float32."""
    logits = logits.float()
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    if loss == "offset":
        return F.cross_entropy((logits - offset * onehot) / temperature, labels, reduction="none")
    if loss == "la":
        return _logit_annealing(logits, labels, onehot, offset, temperature, la_alpha, la_beta)
    if loss in ("emma", "emma_la"):
        k = pair_lipschitz if pair_lipschitz is not None else math.sqrt(2.0) * lipschitz
        k = k[labels] if isinstance(k, torch.Tensor) else torch.full_like(logits, float(k))
        true = logits.gather(1, labels[:, None])
        floor = 0.0 if loss == "emma" else EMMA_LA_FLOOR * eps
        with torch.no_grad():
            eps_j = ((true - logits) / k.clamp_min(1e-12)).clamp(floor, eps)
        lifted = logits + (1 - onehot) * eps_j * k
        if loss == "emma_la":
            return _logit_annealing(lifted, labels, onehot, offset, temperature, la_alpha, la_beta)
        return F.cross_entropy(lifted / temperature, labels, reduction="none")
    ce = F.cross_entropy(logits / temperature, labels, reduction="none")
    if loss == "cr":
        radius = true_class_margin(logits, labels) / (math.sqrt(2.0) * lipschitz)
        return ce - gamma * torch.relu(radius)
    if loss == "ce":
        return ce
    raise ConfigError(f"unknown loss {loss!r}; choose from {LOSSES}")


def _logit_annealing(logits: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor, offset: float,
                     temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """``T alpha (1 - p_y)^beta CE((f - offset onehot(y)) / T, y)``, ``p_y = exp(-CE)``."""
    ce = F.cross_entropy((logits - offset * onehot) / temperature, labels, reduction="none")
    p_true = torch.exp(-ce)
    return temperature * alpha * (1 - p_true).pow(beta) * ce
