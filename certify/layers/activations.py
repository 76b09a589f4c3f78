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

from ..errors import ConfigError, ExportError
from .protocol import LipschitzLayer
from .registry import register_layer


def _split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[1] % 2:
        raise ConfigError(f"pairwise activations need an even number of channels, got {x.shape[1]}")
    return x.chunk(2, dim=1)


def _per_pair(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-pair parameter of shape (C/2,) to broadcast over (B, C/2, ...)."""
    return p.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)


def _check_channels(name: str, channels: int | None) -> int:
    if channels is None or channels < 2 or channels % 2:
        raise ConfigError(f"{name} needs an even number of channels >= 2, got {channels}")
    return int(channels)


class LipschitzOne(LipschitzLayer):
    """Base of the pairwise layers: 1-Lipschitz for every value of their parameters (bound 1,
    exact), on ``channels`` channels paired as (c, c + C/2). Their baked form is a frozen copy
    (the parameters are used as they are)."""

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0

    def pairs(self, g, x: str, c: int) -> tuple[str, str]:
        """The ONNX graph's two halves of ``x`` (channels c must be this layer's)."""
        if c % 2 or (self.channels is not None and c != self.channels):
            raise ExportError(f"layer {g.scope!r} is planned for {self.channels} channels, gets {c}")
        return g.channel_slice(x, 0, c // 2), g.channel_slice(x, c // 2, c)

    @classmethod
    def examples(cls):
        return [(cls(4), (4, 3, 3)), (cls(6), (6, 2, 5))]


@register_layer("maxmin", kind="activation", bound="1 (piecewise orthogonal, continuous)",
                reference="Anil, Lucas & Grosse, Sorting out Lipschitz function approximation, ICML 2019")
class MaxMin(LipschitzOne):
    """(x, y) -> (max(x, y), min(x, y)) on channel pairs."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        # parameter-free: None works on any even number of channels (a model always says how many)
        self.channels = None if channels is None else _check_channels("MaxMin", channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def to_onnx(self, g, prefix, x, c, h, w):
        a, b = self.pairs(g, x, c)
        return g.op("Concat", g.op("Max", a, b), g.op("Min", a, b), axis=1), c, h, w


@register_layer("hh1", kind="activation", bound="1 (a reflection on a half-plane, identity on the other)",
                reference="Singla, Singla & Feizi, Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100, ICLR 2022")
class HouseholderOrder1(LipschitzOne):
    """HH1: reflect z = (x, y) by I - 2vv^T where v.z > 0, keep it otherwise.

    v = (sin(theta/2), -cos(theta/2)) with one learnable theta per pair; theta = pi/2 (the init)
    is MaxMin with its two outputs swapped. ``z - 2 relu(v.z) v`` writes both cases at once.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = _check_channels("HH1", channels)
        self.theta = nn.Parameter(torch.full((channels // 2,), math.pi / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _split_pairs(x)
        half = _per_pair(self.theta, x) / 2
        v1, v2 = torch.sin(half), -torch.cos(half)
        d = 2 * torch.relu(v1 * a + v2 * b)
        return torch.cat([a - d * v1, b - d * v2], dim=1)

    def to_onnx(self, g, prefix, x, c, h, w):
        a, b = self.pairs(g, x, c)
        half = g.op("Div", g.per_channel(prefix + "theta"), g.f32(2.0))
        v1, v2 = g.op("Sin", half), g.op("Neg", g.op("Cos", half))
        d = g.op("Mul", g.f32(2.0), g.op("Relu", g.op("Add", g.op("Mul", v1, a), g.op("Mul", v2, b))))
        return g.op("Concat", g.op("Sub", a, g.op("Mul", d, v1)), g.op("Sub", b, g.op("Mul", d, v2)), axis=1), c, h, w


@register_layer("hh2", kind="activation", bound="1 (continuous, orthogonal on each of four convex sectors)",
                reference="Singla, Singla & Feizi, Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100, ICLR 2022")
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
        self.channels = _check_channels("HH2", channels)
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

    def to_onnx(self, g, prefix, x, c, h, w):
        a, b = self.pairs(g, x, c)
        two_pi = 2 * math.pi
        t0 = g.per_channel(prefix + "theta0")
        t1 = g.op("Clip", g.per_channel(prefix + "theta1"), g.f32(0.0), g.f32(two_pi))
        t2 = g.op("Clip", g.per_channel(prefix + "theta2"), g.f32(0.0), g.f32(two_pi))
        phi = g.remainder(g.op("Sub", g.atan2(b, a), g.op("Div", t0, g.f32(2.0))), two_pi)
        s1 = g.op("Less", phi, g.op("Div", t1, g.f32(2.0)))
        s2 = g.op("Less", phi, g.op("Div", g.op("Add", t1, t2), g.f32(2.0)))
        s3 = g.op("Less", phi, g.op("Add", g.f32(math.pi), g.op("Div", t2, g.f32(2.0))))
        t01 = g.op("Add", t0, t1)
        c01, s01 = g.op("Cos", t01), g.op("Sin", t01)
        c2, sn2 = g.op("Cos", t2), g.op("Sin", t2)
        c0, s0 = g.op("Cos", t0), g.op("Sin", t0)

        def mul(u, v):
            return g.op("Mul", u, v)

        refl1 = (g.op("Add", mul(a, c01), mul(b, s01)), g.op("Sub", mul(a, s01), mul(b, c01)))
        rot = (g.op("Add", mul(a, c2), mul(b, sn2)), g.op("Add", mul(g.op("Neg", a), sn2), mul(b, c2)))
        refl0 = (g.op("Add", mul(a, c0), mul(b, s0)), g.op("Sub", mul(a, s0), mul(b, c0)))
        outs = []
        for i, keep in enumerate((a, b)):
            inner = g.op("Where", s3, rot[i], refl0[i])
            outs.append(g.op("Where", s1, keep, g.op("Where", s2, refl1[i], inner)))
        return g.op("Concat", *outs, axis=1), c, h, w


def make_activation(name: str, channels: int) -> nn.Module:
    """Build a registered activation by name (``maxmin``, ``hh1``, ``hh2``, ...)."""
    from .registry import make_layer

    return make_layer(name, channels, kind="activation")
