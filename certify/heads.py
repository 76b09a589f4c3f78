"""Last layers ("heads") that map 1-Lipschitz features to logits.

- :class:`OrthoHead`: a 1x1 SOC from features to classes (Singla & Feizi, ICML 2021); orthogonal,
  certified with the global certificate.
- :class:`LLNHead`: last layer normalisation (Singla, Singla & Feizi, ICLR 2022): a linear layer
  whose rows are normalised to unit norm in every forward, free bias; certified pairwise with
  ``||w_y - w_j||`` (see :mod:`certify.certificates`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .soc import FLOAT64_SLACK, SOC


class OrthoHead(nn.Module):
    """Orthogonal head: a 1x1 SOC over the feature vector, first ``num_classes`` outputs kept."""

    kind = "ortho"

    def __init__(self, features: int, num_classes: int, **soc_kwargs) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.soc = SOC(features, num_classes, kernel_size=1, **soc_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.soc(x.view(x.shape[0], -1, 1, 1)).flatten(1)

    def lipschitz_bound(self, input_size=None) -> float:
        return self.soc.lipschitz_bound((1, 1))


class LLNHead(nn.Module):
    """Linear layer with unit-norm rows (re-normalised in every forward) and a free bias."""

    kind = "lln"

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.weight = nn.Parameter(torch.randn(num_classes, features) / math.sqrt(features))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.normalized_weight().to(x.dtype), self.bias.to(x.dtype))

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """Exact spectral norm of the normalised weight, in float64, plus rounding slack."""
        w = self.normalized_weight().detach().to(torch.float64)
        return float(torch.linalg.matrix_norm(w, ord=2)) * (1 + FLOAT64_SLACK)

    @torch.no_grad()
    def pairwise_row_distances(self) -> torch.Tensor:
        """``D[y, j] = ||w_y - w_j||`` in float64 (exact differences, not sqrt(2 - 2 w_y.w_j),
        which loses precision when two rows nearly coincide), inflated by rounding slack."""
        w = self.normalized_weight().detach().to(torch.float64)
        return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * (1 + FLOAT64_SLACK)
