"""Channel pooling layers that map C channels to C/2, one output per pair (c, c + C/2).

Singla & Feizi, "Improved techniques for deterministic l2 robustness" (NeurIPS 2022), technique c:
the signed l2 distance from a point to a closed set is 1-Lipschitz, so pooling a pair of channels
by its distance to a manifold keeps the network 1-Lipschitz.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import LipschitzOne, _check_channels, _per_pair, _split_pairs
from .registry import register_layer


class _ChannelPool(LipschitzOne):
    """C channels -> C/2."""

    def output_channels(self, channels: int) -> int:
        return channels // 2


@register_layer("max", kind="pooling", bound="1 (max of a pair)",
                reference="Singla & Feizi, Improved techniques for deterministic l2 robustness, NeurIPS 2022")
class MaxChannelPool(_ChannelPool):
    """(x, y) -> max(x, y): the signed distance to a half-line, up to scale; 1-Lipschitz."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        # parameter-free: None works on any even number of channels (a model always says how many)
        self.channels = None if channels is None else _check_channels("max pooling", channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        return torch.maximum(a, b)

    def to_onnx(self, g, prefix, x, c, h, w):
        a, b = self.pairs(g, x, c)
        return g.op("Max", a, b), c // 2, h, w


@register_layer("lip", kind="pooling", bound="1 (a signed distance to a closed set)",
                reference="Singla & Feizi, Improved techniques for deterministic l2 robustness, NeurIPS 2022")
class LipChannelPool(_ChannelPool):
    """Signed distance from (x, y) to the boundary of a cone of half-angle theta/2 around the
    first axis, negative inside the cone; one learnable theta per pair, clamped to [0, pi].

    With phi = atan2(y, x) mod 2 pi: below (pi + theta)/2 the nearest boundary point is on the
    upper ray, between (pi + theta)/2 and (3 pi - theta)/2 it is the apex, above it the lower ray.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = _check_channels("Lip pooling", channels)
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

    def to_onnx(self, g, prefix, x, c, h, w):
        a, b = self.pairs(g, x, c)
        theta = g.op("Clip", g.per_channel(prefix + "theta"), g.f32(0.0), g.f32(math.pi))
        half = g.op("Div", theta, g.f32(2.0))
        sin, cos = g.op("Sin", half), g.op("Cos", half)
        phi = g.remainder(g.atan2(b, a), 2 * math.pi)
        neg_a_sin = g.op("Mul", g.op("Neg", a), sin)
        upper = g.op("Add", neg_a_sin, g.op("Mul", b, cos))
        lower = g.op("Sub", neg_a_sin, g.op("Mul", b, cos))
        in_upper = g.op("Less", phi, g.op("Div", g.op("Add", g.f32(math.pi), theta), g.f32(2.0)))
        below_lower = g.op("Less", phi, g.op("Div", g.op("Sub", g.f32(3 * math.pi), theta), g.f32(2.0)))
        in_apex = g.op("And", g.op("Not", in_upper), below_lower)
        apex = g.op("Sqrt", g.op("Add", g.op("Mul", a, a), g.op("Mul", b, b)))
        return g.op("Where", in_upper, upper, g.op("Where", in_apex, apex, lower)), c // 2, h, w


def make_pooling(name: str, channels: int) -> nn.Module:
    """Build a registered channel pooling layer by name (``max``, ``lip``, ...)."""
    from .registry import make_layer

    return make_layer(name, channels, kind="pooling")
