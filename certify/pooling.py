"""Channel pooling layers that map C channels to C/2, one output per pair (c, c + C/2).

Singla & Feizi, "Improved techniques for deterministic l2 robustness" (NeurIPS 2022), technique c:
the signed l2 distance from a point to a closed set is 1-Lipschitz, so pooling a pair of channels
by its distance to a manifold keeps the network 1-Lipschitz.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import LipschitzOne, _per_pair, _split_pairs
from .errors import ConfigError


class MaxChannelPool(LipschitzOne):
    """(x, y) -> max(x, y): the signed distance to a half-line, up to scale; 1-Lipschitz."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        return torch.maximum(a, b)


class LipChannelPool(LipschitzOne):
    """Signed distance from (x, y) to the boundary of a cone of half-angle theta/2 around the
    first axis, negative inside the cone; one learnable theta per pair, clamped to [0, pi].

    With phi = atan2(y, x) mod 2 pi: below (pi + theta)/2 the nearest boundary point is on the
    upper ray, between (pi + theta)/2 and (3 pi - theta)/2 it is the apex, above it the lower ray.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ConfigError(f"Lip pooling needs an even number of channels, got {channels}")
        self.theta = nn.Parameter(torch.rand(channels // 2) * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        theta = _per_pair(self.theta, x).clamp(0.0, math.pi)
        sin, cos = torch.sin(theta / 2), torch.cos(theta / 2)
        phi = torch.remainder(torch.atan2(b, a), 2 * math.pi)
        upper = -a * sin + b * cos
        lower = -a * sin - b * cos
        in_upper = phi < (math.pi + theta) / 2
        in_apex = ~in_upper & (phi < (3 * math.pi - theta) / 2)
        # hypot's gradient is 0/0 at the origin, which always falls in the upper case; feed the
        # apex branch a safe value there so that torch.where's backward cannot produce NaN.
        one = torch.ones_like(a)
        apex = torch.hypot(torch.where(in_apex, a, one), torch.where(in_apex, b, one))
        return torch.where(in_upper, upper, torch.where(in_apex, apex, lower))


POOLINGS: dict[str, type[nn.Module]] = {"max": MaxChannelPool, "lip": LipChannelPool}


def make_pooling(name: str, channels: int) -> nn.Module:
    """Build a channel pooling layer by name (``max``, ``lip``)."""
    try:
        return POOLINGS[name](channels)
    except KeyError:
        raise ConfigError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)}") from None
