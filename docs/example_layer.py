"""A teaching example for docs/adding-a-layer.md: a 1x1 convolution divided by an estimate of its
norm. The conformance suite (tests/test_layer_conformance.py) runs it like every built-in layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certify.layers import LipschitzLayer, register_layer
from certify.layers.norms import matrix_norm_bound
from certify.layers.soc import BakedMatrix


@register_layer("example_scaled_1x1", kind="convolution",
                bound="float64 spectral norm of W / s as the forward applies it (matrix_norm_bound)")
class ScaledConv1x1(LipschitzLayer):
    """y = (W / s) x for a 1x1 filter W, with s = ||W u|| for a unit vector u that power iteration
    moves towards W's top singular vector during training. s is an estimate (a lower one), so W / s
    can have a norm above 1: the certificate bounds the matrix actually applied, never s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.randn(channels, channels) / channels**0.5)
        self.register_buffer("u", F.normalize(torch.randn(channels), dim=0))

    def matrix(self) -> torch.Tensor:
        """W / s, the matrix the forward applies (differentiable in W)."""
        if self.training:  # one power-iteration step per training forward
            with torch.no_grad():
                v = F.normalize(self.weight.T @ self.u, dim=0)
                self.u.copy_(F.normalize(self.weight @ v, dim=0))
        return self.weight / (self.weight.T @ self.u).norm().clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.matrix().to(x.dtype)[:, :, None, None])

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        # a 1x1 convolution has its matrix's norm on any map
        return matrix_norm_bound(self.matrix().to(torch.float64))

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        baked = BakedMatrix(self.channels, self.channels, stride=1, bias=False)
        baked.weight = self.matrix().detach().clone()
        return baked.eval()

    @classmethod
    def examples(cls):
        return [(cls(4), (4, 3, 3)), (cls(6), (6, 2, 2))]
