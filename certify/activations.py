"""Gradient-norm-preserving activations on channel pairs.

Channels are paired as (c, c + C/2). MaxMin is from Anil, Lucas & Grosse, "Sorting out Lipschitz
function approximation" (ICML 2019); the Householder activations HH1 and HH2 are from Singla,
Singla & Feizi, "Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100" (ICLR 2022).

Every activation here is continuous and orthogonal on each of finitely many convex cones, hence
1-Lipschitz for every value of its parameters (the parameters are clamped where ordering matters).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def _split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[1] % 2:
        raise ConfigError(f"pairwise activations need an even number of channels, got {x.shape[1]}")
    return x.chunk(2, dim=1)


def _per_pair(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-pair parameter of shape (C/2,) to broadcast over (B, C/2, ...)."""
    return p.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)


class LipschitzOne(nn.Module):
    """Mixin for parameter-free or parameterised layers that are 1-Lipschitz and keep the size."""

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0

    def output_size(self, size):
        return size


class MaxMin(LipschitzOne):
    """(x, y) -> (max(x, y), min(x, y)) on channel pairs."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class HouseholderOrder1(LipschitzOne):
    """HH1: reflect z = (x, y) by I - 2vv^T where v.z > 0, keep it otherwise.

    v = (sin(theta/2), -cos(theta/2)) with one learnable theta per pair; theta = pi/2 (the init)
    is MaxMin with its two outputs swapped. ``z - 2 relu(v.z) v`` writes both cases at once.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ConfigError(f"HH1 needs an even number of channels, got {channels}")
        self.theta = nn.Parameter(torch.full((channels // 2,), math.pi / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        half = _per_pair(self.theta, x) / 2
        v1, v2 = torch.sin(half), -torch.cos(half)
        d = 2 * torch.relu(v1 * a + v2 * b)
        return torch.cat([a - d * v1, b - d * v2], dim=1)


class HouseholderOrder2(LipschitzOne):
    """HH2: a continuous, piecewise-orthogonal map of the plane with four angular sectors.

    With phi the polar angle of (x, y) measured from theta0/2, the sectors are
    [0, t1/2) identity, [t1/2, (t1+t2)/2) the reflection across the line at angle (theta0+t1)/2,
    [(t1+t2)/2, pi + t2/2) the rotation by -t2, and the rest the reflection across the line at
    angle theta0/2. The four maps agree on the sector boundaries for every t1, t2 in [0, 2 pi]
    (each sector is then a convex cone), so the map is 1-Lipschitz; t1, t2 are clamped there.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ConfigError(f"HH2 needs an even number of channels, got {channels}")
        n = channels // 2
        self.theta0 = nn.Parameter(torch.rand(n) * math.pi)
        self.theta1 = nn.Parameter(torch.rand(n) * math.pi)
        self.theta2 = nn.Parameter(torch.rand(n) * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        two_pi = 2 * math.pi
        t0 = _per_pair(self.theta0, x)
        t1 = _per_pair(self.theta1, x).clamp(0.0, two_pi)
        t2 = _per_pair(self.theta2, x).clamp(0.0, two_pi)
        phi = torch.remainder(torch.atan2(b, a) - t0 / 2, two_pi)
        s1, s2, s3 = phi < t1 / 2, phi < (t1 + t2) / 2, phi < math.pi + t2 / 2

        c01, s01 = torch.cos(t0 + t1), torch.sin(t0 + t1)
        c2, s2_ = torch.cos(t2), torch.sin(t2)
        c0, s0 = torch.cos(t0), torch.sin(t0)
        refl1 = (a * c01 + b * s01, a * s01 - b * c01)
        rot = (a * c2 + b * s2_, -a * s2_ + b * c2)
        refl0 = (a * c0 + b * s0, a * s0 - b * c0)
        out_a = torch.where(s1, a, torch.where(s2, refl1[0], torch.where(s3, rot[0], refl0[0])))
        out_b = torch.where(s1, b, torch.where(s2, refl1[1], torch.where(s3, rot[1], refl0[1])))
        return torch.cat([out_a, out_b], dim=1)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "maxmin": MaxMin,
    "hh1": HouseholderOrder1,
    "hh2": HouseholderOrder2,
}


def make_activation(name: str, channels: int) -> nn.Module:
    """Build an activation by name (``maxmin``, ``hh1``, ``hh2``)."""
    try:
        return ACTIVATIONS[name](channels)
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None
