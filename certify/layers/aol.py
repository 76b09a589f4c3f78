"""Almost-orthogonal layers (AOL).

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks",
ECCV 2022. A layer ``y = P D x + b`` with a free parameter P and the diagonal rescaling

    D = diag(d),  d_i = (sum_j |P^T P|_ij)^(-1/2)                     (paper, Theorem 1)

is 1-Lipschitz without any iteration: ``D P^T P D`` has Gershgorin row sums at most 1 (a
Schur-test argument), so ``||P D|| <= 1``. For a convolution (Theorem 2) ``|P^T P|`` is the
absolute autocorrelation of the kernel: the (2k-1) x (2k-1) kernel of inner products between the
input channels' filters at every relative shift, ``conv2d`` of the channel-transposed kernel with
itself; d then rescales the kernel's input channels (so the channel count may change). The
rescaled kernel is a plain convolution: the layer bakes to one fixed ``conv2d`` (no inference
overhead, as the paper notes).

Certificates never rely on the theorem: the bound is the sound operator norm of the rescaled
kernel actually applied, on the real input size (:func:`~certify.layers.norms.conv_norm_bound`),
so it stays an upper bound even if the rescaling were wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .linear import BakedConv2d, BakedLinear
from .norms import conv_norm_bound, linear_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer

REFERENCE = "Prach & Lampert, Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks, ECCV 2022"

# A channel whose sum_j |P^T P|_ij is at most this (all its weights below ~1e-10) counts as dead and
# gets d_i = 0: its weights then contribute nothing, which can only lower the norm (P D with a
# zeroed column), and no division by (nearly) zero reaches the forward or the backward (the
# derivative of s^(-1/2) is s^(-3/2)/2, finite in float32 above this floor).
DEAD = 1e-20


def aol_scale(sums: torch.Tensor) -> torch.Tensor:
    """``d_i = sums_i^(-1/2)``, and 0 for a dead channel (``sums_i <= DEAD``; see :data:`DEAD`).
    The unselected branch of each ``where`` is a finite dummy, so gradients stay finite."""
    live = sums > DEAD
    return torch.where(live, torch.rsqrt(torch.where(live, sums, torch.ones_like(sums))), torch.zeros_like(sums))


def aol_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The AOL-rescaled kernel ``P D`` of a conv kernel P (out, in, k, k) (paper, Theorem 2):
    input channel i scaled by ``d_i = (sum_{j, shifts} |autocorrelation|_ij)^(-1/2)``."""
    kh, kw = weight.shape[-2:]
    pt = weight.transpose(0, 1)  # (in, out, k, k): each input channel's filters as one "image"
    autocorr = F.conv2d(pt, pt, padding=(kh - 1, kw - 1))  # (in, in, 2k-1, 2k-1): |P^T P| as a conv
    d = aol_scale(autocorr.abs().sum(dim=(1, 2, 3)))
    return weight * d.view(1, -1, 1, 1)


def aol_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The AOL-rescaled matrix ``P D`` of a dense weight P (out, in) (paper, Theorem 1)."""
    d = aol_scale((weight.T @ weight).abs().sum(dim=1))
    return weight * d.view(1, -1)


def _orthogonal(rows: int, cols: int) -> torch.Tensor:
    """A random (semi-)orthogonal matrix: every column is non-zero, so no channel starts dead."""
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w)
    return w


@register_layer("aol", kind="convolution", reference=REFERENCE,
                bound="conv_norm_bound of the rescaled kernel P D actually applied, on the real input size "
                      "(1 by the paper's Theorem 2; the bound does not rely on it)")
class AOLConv2d(LipschitzLayer):
    """AOL convolution: ``y = conv2d(x, P D) + b``, zero "same" padding, stride 1 (Prach & Lampert,
    ECCV 2022, Theorem 2). ``d_i = (sum_j |P^T P|_ij)^(-1/2)`` with ``|P^T P|`` the absolute
    autocorrelation of the kernel (:func:`aol_conv_kernel`); dead channels get ``d_i = 0``.

    Bound: ``conv_norm_bound(P D)`` on the real input size, from the float32 kernel the forward
    applies (<= 1 up to rounding by the theorem; sound whatever the rescaling computed).

    Args:
        in_channels, out_channels: channels (may differ: D rescales input channels).
        kernel_size: odd filter size.
        bias: add a learnable bias (does not change the Lipschitz constant).

    Initialisation: a random (semi-)orthogonal matrix at the kernel's centre, zeros elsewhere
    (then P D is orthogonal for in == out), as the paper's orthogonal-centre initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ConfigError(f"AOL needs an odd kernel size for 'same' padding, got {kernel_size}")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(f"AOL needs positive channel counts, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        weight = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = _orthogonal(out_channels, in_channels)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "bias": self.bias is not None}

    def kernel(self) -> torch.Tensor:
        """The rescaled kernel P D that the forward applies (differentiable in P)."""
        return aol_conv_kernel(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.kernel().to(x.dtype), b, padding=self.kernel_size // 2)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("an AOL convolution's bound needs its input size")
        return conv_norm_bound(self.kernel(), tuple(input_size), padding=self.kernel_size // 2)

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """One fixed convolution by P D (the forward's own kernel, bit for bit)."""
        return BakedConv2d.of(self.kernel(), self.bias, 1, self.kernel_size // 2)

    @classmethod
    def examples(cls):
        return [(cls(4, 4, 3), (4, 5, 5)), (cls(3, 6, 3), (3, 6, 6)), (cls(6, 4, 3, bias=False), (6, 4, 5)),
                (cls(5, 3, 1), (5, 3, 3))]


@register_layer("aol_dense", kind="dense", reference=REFERENCE,
                bound="float64 spectral norm of the rescaled matrix P D actually applied (linear_norm_bound; "
                      "1 by the paper's Theorem 1, not relied on)")
class AOLLinear(LipschitzLayer):
    """AOL dense layer: ``y = P D x + b`` on (N, features) inputs (Prach & Lampert, ECCV 2022,
    Theorem 1), ``d_i = (sum_j |P^T P|_ij)^(-1/2)`` (:func:`aol_matrix`); dead inputs get 0.

    Bound: ``linear_norm_bound(P D)`` of the float32 matrix the forward applies (<= 1 up to
    rounding by the theorem; sound whatever the rescaling computed). Initialisation: a random
    (semi-)orthogonal P. A 4-D input is flattened first.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"AOL needs positive feature counts, got {in_features} -> {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(_orthogonal(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def matrix(self) -> torch.Tensor:
        """The rescaled matrix P D that the forward applies (differentiable in P)."""
        return aol_matrix(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), self.matrix().to(x.dtype), b)

    def output_channels(self, channels: int) -> int:
        return self.out_features

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return linear_norm_bound(self.matrix())

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """One fixed matrix P D (the forward's own, bit for bit)."""
        return BakedLinear.of(self.matrix(), self.bias)

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(6, 4), (6,)), (cls(3, 6, bias=False), (3,))]
