"""The LiResNet block: a linear residual convolution ``y = x + W x + b`` as ONE convolution.

Hu, Zhang, Wang & Fredrikson, "Unlocking Deterministic Robustness Certification on ImageNet",
NeurIPS 2023, and Hu, Leino, Wang & Fredrikson, "A Recipe for Improved Certifiable Robustness",
ICLR 2024. The authors' block (gloro's ``LiResNetBlock``, liresnet's ``LiResConv``) convolves by
the kernel ``K = I + alpha W`` (the identity at the centre tap, alpha a fixed residual scale, 1 in
gloro, depth^-1/2 in the ICLR code), with the activation outside the block, and trains it with
GloRo, whose loss divides the margins by the product of power-iteration estimates of every
layer's norm. With a positively homogeneous activation (MaxMin) that is the same network as one
whose blocks are divided by those estimates, which is how lipcert trains it (its losses assume
1-Lipschitz layers):

- ``normalize="block"`` (default): ``K = (I + alpha W) / sigma``, sigma the power-iteration
  estimate of ||I + alpha W|| (the GloRo network, made nominally 1-Lipschitz);
- ``normalize="residual"``: ``K = I + alpha W / sigma``, sigma estimating ||W|| (spectral
  normalisation of the residual branch; nominally ``1 + alpha``-Lipschitz).

Bound: the evaluation forward is one convolution by the float32 kernel ``K`` it applies (``sigma``
the stored buffer, so a stale estimate is caught), bounded by
:func:`~certify.layers.norms.conv_norm_bound` on the real input size. That is never above
``1 + u`` with ``u = conv_norm_bound(K - I)`` (the residual form's triangle inequality, see
:meth:`LiResNetBlock.residual_bound`) and often well below it. The block bakes to that one
convolution (:class:`~certify.layers.linear.BakedConv2d`), whose own bound is the same number.

Training: one power-iteration step per training forward on the circular embedding of the input
map (:mod:`certify.layers.cpl`), the estimate differentiable in ``W`` as spectral normalisation;
the after-epoch :meth:`~LiResNetBlock.refresh` stores sigma from the sound bound
(``eval_norm="bound"``, times 1 + 1e-5 so that the rounded kernel stays within 1) or the power
estimate (``"power"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..numerics import no_autocast
from .cpl import _check_eval_norm, _PowerIterated, adjoint_filter, circular_conv, power_estimate, power_steps
from .linear import BakedConv2d
from .norms import conv_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer

NORMALIZATIONS = ("block", "residual")
#: relative margin on an exact (sound-bound) sigma, so that the float32 kernel K / sigma has norm <= 1
EXACT_MARGIN = 1e-5


def identity_filter(channels: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """The filter of the identity map: ones at the centre tap of the diagonal."""
    eye = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    c = kernel_size // 2
    eye[:, :, c, c] = torch.eye(channels, dtype=like.dtype, device=like.device)
    return eye


@register_layer("liresnet", kind="convolution",
                reference="Hu, Zhang, Wang & Fredrikson, Unlocking Deterministic Robustness Certification on "
                          "ImageNet, NeurIPS 2023 (LiResNet); Hu, Leino, Wang & Fredrikson, ICLR 2024",
                bound="conv_norm_bound of the one kernel I + alpha W (normalised by the stored sigma) as applied, "
                      "on the real input size (<= 1 + u, u = conv_norm_bound of its residual part)")
class LiResNetBlock(_PowerIterated):
    """``y = conv(x, K) + b`` with ``K = (I + alpha W)/sigma`` (``normalize="block"``) or
    ``K = I + alpha W/sigma`` (``"residual"``): the LiResNet block, see the module docstring.

    Bound: ``conv_norm_bound(K, input size)`` for the float32 ``K`` the evaluation forward applies.

    Args:
        in_channels, out_channels: must be equal (an identity skip connection).
        kernel_size: odd filter size.
        scale: the fixed residual scale alpha.
        normalize: ``"block"`` or ``"residual"`` (what sigma normalises).
        bias: add a learnable bias.
        input_size, init_iters, update_iters, eval_norm: the power iteration, as
            :class:`~certify.layers.cpl.CPLConv2d`.
    """

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale: float = 1.0,
                 normalize: str = "block", bias: bool = True, input_size=None, init_iters: int = 10,
                 update_iters: int = 1, eval_norm: str = "bound") -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ConfigError(f"a LiResNet block has an identity skip connection: in_channels ({in_channels}) "
                              f"must equal out_channels ({out_channels})")
        if kernel_size % 2 != 1:
            raise ConfigError(f"a LiResNet block needs an odd kernel size (the identity at its centre), got {kernel_size}")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not scale > 0:
            raise ConfigError(f"the residual scale must be positive, got {scale}")
        _check_eval_norm(eval_norm)
        self.channels, self.kernel_size, self.scale = int(in_channels), int(kernel_size), float(scale)
        self.normalization, self.eval_norm = normalize, eval_norm
        self.init_iters, self.update_iters = int(init_iters), int(update_iters)
        # the ICLR code's initialisation: a block close to the identity
        self.weight = nn.Parameter(torch.randn(in_channels, in_channels, kernel_size, kernel_size)
                                   / (in_channels * kernel_size * kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.zeros(in_channels))
        else:
            self.register_parameter("bias", None)
        self._init_power(in_channels, kernel_size, input_size)
        self.register_buffer("sigma", torch.ones(1))
        if not self.weight.is_meta:  # a meta build (model facts) has shapes only
            self.refresh(self.init_iters, exact=False)  # a build stays cheap: the first refresh is exact

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, scale={self.scale}, "
                f"normalize={self.normalization}, bias={self.bias is not None}")

    def normalised_part(self) -> torch.Tensor:
        """The filter sigma estimates the norm of: ``I + alpha W`` (block) or ``W`` (residual)."""
        if self.normalization == "block":
            return identity_filter(self.channels, self.kernel_size, self.weight) + self.scale * self.weight
        return self.weight

    def kernel(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The one filter the forward convolves by, for ``sigma`` (default: the stored one)."""
        sigma = self.sigma if sigma is None else sigma
        if self.normalization == "block":
            return self.normalised_part() / sigma
        return identity_filter(self.channels, self.kernel_size, self.weight) + self.weight * (self.scale / sigma)

    def _power_steps(self, iters: int) -> None:
        a = self.normalised_part().detach()
        adj = adjoint_filter(a)
        power_steps(lambda v: circular_conv(v, a), lambda v: circular_conv(v, adj), self.u, iters)

    @torch.no_grad()
    def refresh(self, iters: int, exact: bool | None = None) -> None:
        """``iters`` power-iteration steps, then the evaluation forward's sigma: the power estimate
        or, with ``eval_norm="bound"`` (``exact``), the sound bound on the tracked input size
        (times 1 + 1e-5)."""
        exact = self.eval_norm == "bound" if exact is None else exact
        with no_autocast(self.weight.device):
            self._power_steps(iters)
            a = self.normalised_part()
            if exact:
                bound = conv_norm_bound(a, self.tracked_size(), padding=self.kernel_size // 2)
                self.sigma.fill_(bound * (1 + EXACT_MARGIN))
            else:
                self.sigma.copy_(power_estimate(lambda v: circular_conv(v, a), self.u).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._follow_size(tuple(x.shape[-2:]))
            with no_autocast(x.device):
                self._power_steps(self.update_iters)
                a = self.normalised_part()
                sigma = power_estimate(lambda v: circular_conv(v, a), self.u).clamp_min(1e-12)
            self.sigma.copy_(sigma.detach())
            k = self.kernel(sigma)
        else:
            k = self.kernel()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, k.to(x.dtype), bias, padding=self.kernel_size // 2)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("a convolution's bound needs its input size")
        return conv_norm_bound(self.kernel(), tuple(input_size), padding=self.kernel_size // 2)

    @torch.no_grad()
    def residual_bound(self, input_size) -> float:
        """``1 + conv_norm_bound(K - I)``: the residual form's bound (sound, never below
        :meth:`lipschitz_bound` but for rounding; for reports and tests)."""
        k = self.kernel().to(torch.float64)  # K - I is exact in float64 for a float32 K
        return 1.0 + conv_norm_bound(k - identity_filter(self.channels, self.kernel_size, k), tuple(input_size),
                                     padding=self.kernel_size // 2)

    def decay_parameters(self):
        yield self.weight

    def config(self) -> dict:
        return {"in_channels": self.channels, "out_channels": self.channels, "kernel_size": self.kernel_size,
                "scale": self.scale, "normalize": self.normalization, "bias": self.bias is not None}

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """ONE convolution by the kernel the evaluation forward applies (identity folded in)."""
        p = self.kernel_size // 2
        return BakedConv2d.of(self.kernel(), None if self.bias is None else self.bias, 1, p)

    @classmethod
    def examples(cls):
        return [(cls(4, 4, 3, input_size=5), (4, 5, 5)), (cls(6, 6, 3, normalize="residual", scale=0.5), (6, 4, 4)),
                (cls(3, 3, 1), (3, 2, 3)), (cls(4, 4, 3, bias=False, input_size=(2, 3), eval_norm="power"), (4, 2, 3))]
