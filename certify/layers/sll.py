"""SDP-based Lipschitz layers (SLL).

Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic Perspective on Lipschitz Neural
Networks", ICLR 2023 (arXiv 2303.03169). The residual layer of the paper's SLL theorem (Section 4,
dense and convolutional forms)

    z = x - 2 W T^(-1) sigma(W^T x + b),   T = diag_i( sum_j |W^T W|_ij q_j / q_i ),  q = exp(log_q) > 0

with sigma = ReLU. ``W^T`` maps the channels to ``inner`` channels (a zero-padded "same"
convolution, or a matrix); ``W`` is its adjoint (the transposed convolution). For a convolution
``|W^T W|`` is the absolute autocorrelation of the kernel (a (2k-1) x (2k-1) kernel of inner
products between the inner channels' filters), summed over its shifts.

Why the bound holds. Where the ReLU is differentiable its derivative is D = diag(D_i), D_i in
{0, 1} (its generalised Jacobians have D_i in [0, 1]), so the Jacobian is

    J = I - 2 W T^(-1) D W^T = I - 2 A^T D A,   A = T^(-1/2) W^T

(T and D are diagonal and commute). ``A^T D A`` is symmetric positive semi-definite with largest
eigenvalue at most ||A||^2 (D <= I), so J is symmetric with eigenvalues in [1 - 2||A||^2, 1] and

    ||J|| <= max(1, 2 ||A||^2 - 1).

The paper's choice of T gives T >= W^T W (the q-weighted Gershgorin/Schur test, as in AOL), i.e.
||A|| <= 1 and ||J|| <= 1. The certificate does not rely on that: it computes a sound upper bound
u >= ||A|| of the operator actually applied (``conv_norm_bound`` of the conv W^T with its output
channels scaled by the float32 T^(-1/2) the forward uses, on the real input size; for the dense
layer ``matrix_norm_bound``), plus the float64 rounding of that scaling, and returns
max(1, 2 u^2 - 1).

Not the published epsilon variant. The first public SLL code stabilised the division with
``T_ii = sum_j |W^T W|_ij |q_j| / (|q_i| + eps)``: for a small |q_i| that shrinks T below W^T W
and the layer is not 1-Lipschitz (the revised arXiv version's Appendix D, as its authors note in
berndprach/1LipschitzLayersCompared issue #2; tests/test_sll.py builds a case with Jacobian norm 3). Here q = exp(log_q) > 0 needs no stabiliser; the only guards keep the
divisions finite and can only make T^(-1) smaller, i.e. ||A|| smaller: the ratios q_j / q_i are
capped at exp(50) (never reached in practice; a capped ratio only changes T, and the bound is
computed from the T^(-1) the forward applies), and a dead inner channel (t_i <= 1e-20, all its
weights below ~1e-10) gets T^(-1)_i = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError, NotLipschitzError
from .norms import FLOAT64_SLACK, conv_norm_bound, matrix_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer

REFERENCE = ("Araujo, Havens, Delattre, Allauzen & Hu, A Unified Algebraic Perspective on Lipschitz Neural "
             "Networks, ICLR 2023")

# An inner channel with t_i <= DEAD (all its weights below ~1e-10) is dead: T^(-1)_i = 0. Its
# weights contribute (almost) nothing anyway, a smaller T^(-1) only lowers ||A||, and 1/t and its
# derivative 1/t^2 stay finite in float32 above this floor.
DEAD = 1e-20
# Cap on log(q_j / q_i): exp(50) times a finite |W^T W| entry cannot make 0 * inf = NaN.
LOG_RATIO_MAX = 50.0
_EPS64 = torch.finfo(torch.float64).eps


def inverse_t(gram_abs: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """T^(-1) as a vector: ``1 / sum_j |W^T W|_ij q_j / q_i`` for ``gram_abs`` (inner, inner) =
    |W^T W| (summed over shifts for a convolution), 0 for a dead channel (see :data:`DEAD`)."""
    ratio = torch.exp((log_q.view(1, -1) - log_q.view(-1, 1)).clamp(max=LOG_RATIO_MAX))  # q_j / q_i
    t = (gram_abs * ratio).sum(dim=1)
    live = t > DEAD
    return torch.where(live, 1.0 / torch.where(live, t, torch.ones_like(t)), torch.zeros_like(t))


def sll_conv_scale(weight: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """T^(-1) (inner,) of a conv W^T with kernel ``weight`` (inner, C, k, k)."""
    k = weight.shape[-1]
    autocorr = F.conv2d(weight, weight, padding=k - 1)  # (inner, inner, 2k-1, 2k-1): W^T W as a conv
    return inverse_t(autocorr.abs().sum(dim=(2, 3)), log_q)


def sll_dense_scale(weight: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """T^(-1) (inner,) of a dense W^T = ``weight`` (inner, features)."""
    return inverse_t((weight @ weight.T).abs(), log_q)


def sll_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x - 2 W diag(scale) relu(W^T x + b)``, W^T = conv2d by ``weight`` with "same" zero padding,
    W = its adjoint (conv_transpose2d by the same kernel and padding)."""
    p = weight.shape[-1] // 2
    h = F.relu(F.conv2d(x, weight, bias, padding=p)) * scale.view(1, -1, 1, 1)
    return x - 2 * F.conv_transpose2d(h, weight, padding=p)


def sll_dense_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x - 2 W diag(scale) relu(W^T x + b)`` with W^T = ``weight`` (inner, features)."""
    x = x.flatten(1)
    h = F.relu(F.linear(x, weight, bias)) * scale
    return x - 2 * (h @ weight)


def _checked_scale(scale: torch.Tensor) -> torch.Tensor:
    s = scale.detach().to(torch.float64)
    if not torch.isfinite(s).all():
        raise NotLipschitzError("the SLL layer's T^-1 has non-finite entries")
    if (s < 0).any():
        # J = I - 2 W Lambda W^T is bounded by the formula only for Lambda >= 0
        raise NotLipschitzError("the SLL layer's T^-1 has negative entries; lipcert cannot bound it")
    return s


def residual_bound(u: float) -> float:
    """``max(1, 2 u^2 - 1)`` for u >= ||T^(-1/2) W^T|| (module docstring), with float64 slack."""
    return max(1.0, (2.0 * u * u - 1.0) * (1 + FLOAT64_SLACK))


@torch.no_grad()
def sll_conv_bound(weight: torch.Tensor, scale: torch.Tensor, input_size) -> float:
    """Sound bound on the conv SLL layer's Lipschitz constant on ``input_size`` maps: u = the
    conv_norm_bound of A = diag(sqrt(scale)) W^T (output channels of the conv scaled) plus the
    rounding of forming A in float64 (each entry within 2 eps relative, and a conv's norm is at
    most the sum of its taps' norms, each at most the tap's Frobenius norm)."""
    s = _checked_scale(scale)
    a = weight.detach().to(torch.float64) * s.sqrt().view(-1, 1, 1, 1)
    rounding = 2 * _EPS64 * float(a.square().sum(dim=(0, 1)).sqrt().sum())
    u = conv_norm_bound(a, tuple(input_size), padding=weight.shape[-1] // 2) + rounding
    return residual_bound(u)


@torch.no_grad()
def sll_dense_bound(weight: torch.Tensor, scale: torch.Tensor) -> float:
    """As :func:`sll_conv_bound` for a dense W^T (inner, features): u = matrix_norm_bound of
    diag(sqrt(scale)) W^T plus its float64 rounding (2 eps ||A||_F)."""
    s = _checked_scale(scale)
    a = weight.detach().to(torch.float64) * s.sqrt().view(-1, 1)
    if not torch.isfinite(a).all():
        raise NotLipschitzError("the SLL layer's weight has non-finite entries")
    u = matrix_norm_bound(a) + 2 * _EPS64 * float(a.norm())
    return residual_bound(u)


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ConfigError(f"SLL needs an odd kernel size (W must be the exact adjoint of W^T), got {kernel_size}")


@register_layer("sll", kind="convolution", reference=REFERENCE,
                bound="max(1, 2 u^2 - 1), u = conv_norm_bound of the conv W^T with its output channels scaled by "
                      "the T^-1/2 actually applied, on the real input size")
class SLLConv2d(LipschitzLayer):
    """SLL convolution: ``z = x - 2 W T^(-1) relu(W^T x + b)`` (Araujo et al., ICLR 2023, the SLL
    theorem's convolutional form), W^T a zero-padded "same" convolution channels -> inner
    channels, W its transpose, ``T = diag(sum_j |W^T W|_ij q_j / q_i)`` with q = exp(log_q).

    Bound: max(1, 2 u^2 - 1) with u a sound bound on ||T^(-1/2) W^T|| on the real input size (the
    derivation is in the module docstring). Not the published epsilon-stabilised variant, which
    is not 1-Lipschitz (module docstring; tests/test_sll.py).

    Args:
        in_channels, out_channels: must be equal (a residual layer).
        kernel_size: odd filter size.
        inner_channels: channels of W^T x (default: ``in_channels``).

    Initialisation: W^T Xavier-normal, b uniform in +-1/sqrt(fan_in) (as the reference code),
    log_q = 0 (q = 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 inner_channels: int | None = None) -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ConfigError(f"SLL is a residual layer: in_channels ({in_channels}) must equal out_channels "
                              f"({out_channels})")
        _check_kernel(kernel_size)
        inner = in_channels if inner_channels is None else inner_channels
        if in_channels < 1 or inner < 1:
            raise ConfigError(f"SLL needs positive channel counts, got {in_channels} channels, {inner} inner")
        self.channels, self.inner_channels, self.kernel_size = int(in_channels), int(inner), int(kernel_size)
        self.weight = nn.Parameter(torch.empty(inner, in_channels, kernel_size, kernel_size))  # W^T
        nn.init.xavier_normal_(self.weight)
        fan_in = in_channels * kernel_size * kernel_size
        self.bias = nn.Parameter((torch.rand(inner) * 2 - 1) / math.sqrt(fan_in))
        self.log_q = nn.Parameter(torch.zeros(inner))

    def extra_repr(self) -> str:
        return f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"

    def config(self) -> dict:
        return {"in_channels": self.channels, "out_channels": self.channels, "kernel_size": self.kernel_size,
                "inner_channels": self.inner_channels}

    def scale(self) -> torch.Tensor:
        """T^(-1) (inner,), as the forward applies it (differentiable in W and log_q)."""
        return sll_conv_scale(self.weight, self.log_q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sll_conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.scale().to(x.dtype))

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("an SLL convolution's bound needs its input size")
        return sll_conv_bound(self.weight, self.scale(), input_size)

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """W^T, b and T^(-1) as fixed tensors (the forward's own, bit for bit)."""
        out = BakedSLL(self.channels, self.inner_channels, self.kernel_size)
        out.weight, out.bias = self.weight.detach().clone(), self.bias.detach().clone()
        out.scale = self.scale().detach().clone()
        return out.to(self.weight.device).eval()

    @classmethod
    def examples(cls):
        return [(cls(4, 4, 3), (4, 5, 5)), (cls(3, 3, 3, inner_channels=6), (3, 6, 6)),
                (cls(4, 4, 1, inner_channels=2), (4, 3, 3))]


@register_layer("sll_dense", kind="dense", reference=REFERENCE,
                bound="max(1, 2 u^2 - 1), u = float64 spectral norm of W^T with its rows scaled by the T^-1/2 "
                      "actually applied (matrix_norm_bound + rounding)")
class SLLLinear(LipschitzLayer):
    """SLL dense layer: ``z = x - 2 W T^(-1) relu(W^T x + b)`` on (N, features) inputs (Araujo et
    al., ICLR 2023, the SLL theorem), W^T = ``weight`` (inner, features), ``T = diag(sum_j |W^T W|_ij
    q_j / q_i)``, q = exp(log_q). A 4-D input is flattened first.

    Bound: max(1, 2 u^2 - 1), u a sound bound on ||T^(-1/2) W^T|| (module docstring). Not the
    published epsilon-stabilised variant, which is not 1-Lipschitz.
    """

    def __init__(self, in_features: int, out_features: int, inner: int | None = None) -> None:
        super().__init__()
        if in_features != out_features:
            raise ConfigError(f"SLL is a residual layer: in_features ({in_features}) must equal out_features "
                              f"({out_features})")
        inner = in_features if inner is None else inner
        if in_features < 1 or inner < 1:
            raise ConfigError(f"SLL needs positive sizes, got {in_features} features, {inner} inner")
        self.features, self.inner = int(in_features), int(inner)
        self.weight = nn.Parameter(torch.empty(inner, in_features))  # W^T
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter((torch.rand(inner) * 2 - 1) / math.sqrt(in_features))
        self.log_q = nn.Parameter(torch.zeros(inner))

    def extra_repr(self) -> str:
        return f"{self.features}, inner={self.inner}"

    def config(self) -> dict:
        return {"in_features": self.features, "out_features": self.features, "inner": self.inner}

    def scale(self) -> torch.Tensor:
        """T^(-1) (inner,), as the forward applies it (differentiable in W and log_q)."""
        return sll_dense_scale(self.weight, self.log_q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sll_dense_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.scale().to(x.dtype))

    def output_channels(self, channels: int) -> int:
        return self.features

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return sll_dense_bound(self.weight, self.scale())

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """W^T, b and T^(-1) as fixed tensors (the forward's own, bit for bit)."""
        out = BakedSLLDense(self.features, self.inner)
        out.weight, out.bias = self.weight.detach().clone(), self.bias.detach().clone()
        out.scale = self.scale().detach().clone()
        return out.to(self.weight.device).eval()

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(6, 6, inner=3), (6,)), (cls(4, 4, inner=8), (4,))]


# ---- baked forms: W^T, b and T^-1 as fixed tensors ----------------------------------------------


@register_layer("sll_baked", kind="baked", reference=REFERENCE,
                bound="max(1, 2 u^2 - 1), u = conv_norm_bound of the stored W^T scaled by sqrt(stored T^-1) on the "
                      "real input size (refused if T^-1 has negative or non-finite entries)")
class BakedSLL(LipschitzLayer):
    """A conv SLL layer with fixed W^T (``weight``), ``bias`` and T^(-1) (``scale``):
    ``x - 2 conv_transpose(scale * relu(conv(x, W^T) + b), W^T)``, the training layer's forward.
    Its bound is computed from the stored tensors, as the training layer's; it holds for any
    stored W^T and any scale >= 0 (and is refused otherwise), whatever produced them."""

    def __init__(self, channels: int, inner_channels: int, kernel_size: int) -> None:
        super().__init__()
        _check_kernel(kernel_size)
        self.channels, self.inner_channels, self.kernel_size = int(channels), int(inner_channels), int(kernel_size)
        self.register_buffer("weight", torch.zeros(inner_channels, channels, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(inner_channels))
        self.register_buffer("scale", torch.zeros(inner_channels))

    def config(self) -> dict:
        return {"channels": self.channels, "inner_channels": self.inner_channels, "kernel_size": self.kernel_size}

    def extra_repr(self) -> str:
        return f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sll_conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.scale.to(x.dtype))

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("an SLL convolution's bound needs its input size")
        return sll_conv_bound(self.weight, self.scale, input_size)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Conv (W^T, b), Relu, Mul by T^-1, ConvTranspose (W), Mul by 2, Sub from x."""
        if c != self.channels:
            raise ExportError(f"layer {g.scope!r} expects {self.channels} channels, gets {c}")
        k, weight = self.kernel_size, g.tensor(prefix + "weight")
        p = k // 2
        geometry = dict(kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1], group=1)
        y = g.op("Conv", x, weight, g.tensor(prefix + "bias"), **geometry)
        y = g.op("Mul", g.op("Relu", y), g.per_channel(prefix + "scale"))
        y = g.op("ConvTranspose", y, weight, **geometry)
        return g.op("Sub", x, g.op("Mul", y, g.f32(2.0))), c, h, w

    @classmethod
    def examples(cls):
        return [(SLLConv2d(4, 4, 3).bake(), (4, 5, 5)), (SLLConv2d(3, 3, 3, inner_channels=5).bake(), (3, 4, 6))]


@register_layer("sll_dense_baked", kind="baked", reference=REFERENCE,
                bound="max(1, 2 u^2 - 1), u = float64 spectral norm of the stored W^T scaled by sqrt(stored T^-1) "
                      "(refused if T^-1 has negative or non-finite entries)")
class BakedSLLDense(LipschitzLayer):
    """A dense SLL layer with fixed W^T (``weight``, (inner, features)), ``bias`` and T^(-1)
    (``scale``): ``x - 2 (scale * relu(W^T x + b)) W^T`` on (N, features) inputs, bounded from
    the stored tensors (refused unless scale >= 0)."""

    def __init__(self, features: int, inner: int) -> None:
        super().__init__()
        self.features, self.inner = int(features), int(inner)
        self.register_buffer("weight", torch.zeros(inner, features))
        self.register_buffer("bias", torch.zeros(inner))
        self.register_buffer("scale", torch.zeros(inner))

    def config(self) -> dict:
        return {"features": self.features, "inner": self.inner}

    def extra_repr(self) -> str:
        return f"{self.features}, inner={self.inner}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sll_dense_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.scale.to(x.dtype))

    def output_channels(self, channels: int) -> int:
        return self.features

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return sll_dense_bound(self.weight, self.scale)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Flatten, Gemm (W^T, b), Relu, Mul by T^-1, MatMul (W), Mul by 2, Sub from x."""
        if c * h * w != self.features:
            raise ExportError(f"layer {g.scope!r} expects {self.features} features, gets {c * h * w}")
        x = g.op("Flatten", x, axis=1)
        g.flat = True  # from here on the values are (N, features)
        weight = g.tensor(prefix + "weight")
        y = g.op("Gemm", x, weight, g.tensor(prefix + "bias"), transB=1)
        y = g.op("Mul", g.op("Relu", y), g.tensor(prefix + "scale"))
        y = g.op("MatMul", y, weight)
        return g.op("Sub", x, g.op("Mul", y, g.f32(2.0))), self.features, 1, 1

    @classmethod
    def examples(cls):
        return [(SLLLinear(6, 6).bake(), (6,)), (SLLLinear(5, 5, inner=3).bake(), (5,))]
