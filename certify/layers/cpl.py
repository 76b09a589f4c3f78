"""Convex potential layers (CPL).

Meunier, Delattre, Araujo & Allauzen, "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML 2022: one explicit Euler step of the gradient flow of a convex potential,

    z = x - (2 / h) W^T relu(W x + b),      h = ||W||^2 (eq. 8 and Proposition 3),

with ``W`` a convolution (``cpl``) or a matrix (``cpl_dense``) and ``h`` estimated by power
iteration during training, as the authors' code does (plus their epsilon, 1e-4).

Soundness. The map is piecewise affine with Jacobian ``J = I - s W^T D W`` on each piece
(s = 2/h, D diagonal with entries in {0, 1}), a symmetric matrix whose eigenvalues are
``1 - s mu`` with ``mu`` in [0, ||W||^2]. So ``||J|| <= max(1, |1 - s u^2|)`` for any ``u >= ||W||``,
and the layer's Lipschitz constant is at most that. The bound takes ``u`` from the sound norm tools
(:func:`~certify.layers.norms.conv_norm_bound` on the real input size,
:func:`~certify.layers.norms.linear_norm_bound`) and ``s`` exactly as the evaluation forward
computes it from the stored ``h``: a stale or too small ``h`` (power iteration is a LOWER estimate)
gives a bound above 1, it is never trusted.

Tightness. ``h`` below ``u^2`` by a relative gap g costs about 2g above 1. The authors iterate on
the zero-padded convolution, whose norm on 16-32 pixel maps is 0.2-0.5% below the sound bound (a
circular embedding; 3-4% on 8 pixel maps, measured), and their evaluation ``h`` is a 100-step
estimate. Here the training-time power iteration runs on that same circular embedding (grid
(h + k//2) x (w + k//2), :func:`circular_grid`), and the after-epoch :meth:`~CPLConv2d.refresh`
stores ``h = u^2 + 1e-4`` from the sound bound itself (``eval_norm="bound"``, the default): the
evaluation step is then at most 1% smaller than the training one and the certificate is exactly 1
on the tracked input size. ``eval_norm="power"`` keeps the authors' estimate (``iters`` steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError, NotLipschitzError
from ..numerics import no_autocast
from .norms import FLOAT64_SLACK, conv_norm_bound, linear_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer

#: the authors' epsilon in h = sigma^2 + epsilon
EPSILON = 1e-4
#: grid of the construction-time power iteration when the input size is not known yet
DEFAULT_SIZE = (8, 8)


# ---- power iteration on the circular embedding (shared with certify.layers.residual) -----------


def circular_grid(size: tuple[int, int], kernel_size: int) -> tuple[int, int]:
    """The circular grid whose convolution the "same" zero-padded one on an ``size`` map is a
    compression of, the grid :func:`~certify.layers.norms.conv_norm_bound` bounds (k odd)."""
    p = kernel_size // 2
    return (int(size[0]) + p, int(size[1]) + p)


def circular_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Circular "same" correlation by an odd kernel (the operator the power iteration tracks)."""
    p = kernel.shape[-1] // 2
    if p:
        x = F.pad(x, (p, p, p, p), mode="circular")
    return F.conv2d(x, kernel)


def adjoint_filter(kernel: torch.Tensor) -> torch.Tensor:
    """The filter of the adjoint convolution: in/out channels swapped, both spatial axes flipped."""
    return torch.flip(kernel.transpose(0, 1), dims=(2, 3))


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(1e-30)


@torch.no_grad()
def power_steps(op, adjoint, u: torch.Tensor, iters: int) -> None:
    """``iters`` power-iteration steps on ``adjoint(op(.))``, in place on the unit vector ``u``."""
    for _ in range(iters):
        u.copy_(_unit(adjoint(op(u))))


def power_estimate(op, u: torch.Tensor) -> torch.Tensor:
    """``||op(u)||`` for the unit vector ``u``: a LOWER estimate of ||op||, differentiable in the
    operator's weights (never a certificate)."""
    return op(u).norm()


class _PowerIterated(LipschitzLayer):
    """Shared by the convolution layers whose training-time normalisation tracks a norm by power
    iteration on a buffer ``u`` (the circular embedding of the input map).

    ``u``'s shape follows the input size: given at construction (``input_size``), it is fixed and
    saved with the weights (a training forward on another size is refused); without it, ``u`` is
    sized by the first training forward (re-initialised when the size changes) and not saved (a
    resumed run re-converges it in the after-epoch refresh)."""

    def _init_power(self, channels: int, kernel_size: int, input_size) -> None:
        self.fixed_size = input_size is not None
        size = DEFAULT_SIZE if input_size is None else _size2(input_size)
        u = _unit(torch.randn(1, channels, *circular_grid(size, kernel_size)))
        self.register_buffer("u", u, persistent=self.fixed_size)

    def tracked_size(self) -> tuple[int, int]:
        """The input size the power iteration tracks."""
        p = self.kernel_size // 2
        return (self.u.shape[-2] - p, self.u.shape[-1] - p)

    def _follow_size(self, size: tuple[int, int]) -> None:
        if size == self.tracked_size():
            return
        if self.fixed_size:
            raise ConfigError(f"{type(self).__name__} was built for {self.tracked_size()} inputs (input_size), "
                              f"got {size} in training")
        with torch.no_grad():
            self.u = _unit(torch.randn(1, self.u.shape[1], *circular_grid(size, self.kernel_size),
                                       device=self.u.device, dtype=self.u.dtype))
            self._power_steps(self.init_iters)

    def _power_steps(self, iters: int) -> None:
        raise NotImplementedError


EVAL_NORMS = ("bound", "power")


def _check_eval_norm(eval_norm: str) -> None:
    if eval_norm not in EVAL_NORMS:
        raise ConfigError(f"eval_norm must be one of {EVAL_NORMS}, got {eval_norm!r}")


def _size2(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_step(h: torch.Tensor) -> float:
    """The step s = 2/h exactly as the forward computes it (a float32 division), as a float."""
    if h.numel() != 1 or not bool(torch.isfinite(h).all()) or float(h) <= 0:
        raise NotLipschitzError(f"a CPL layer's h must be one positive finite number, got {h.tolist()}")
    step = float(2.0 / h)
    if not math.isfinite(step):
        raise NotLipschitzError(f"a CPL layer's step 2/h overflows (h = {float(h)!r})")
    return step


def cpl_bound(u: float, h: torch.Tensor) -> float:
    """``max(1, s u^2 - 1)`` (= ``max(1, |1 - s u^2|)`` as s > 0) for the forward's step
    ``s = 2/h`` and ``u >= ||W||`` (module docstring), with relative slack above the float64
    rounding of the products."""
    step = _check_step(h)
    return max(1.0, step * u * u * (1 + FLOAT64_SLACK) - 1.0)


# ---- the convolution ---------------------------------------------------------------------------


class _CPLConvForward(LipschitzLayer):
    """The evaluation arithmetic of a convolutional CPL, shared by the layer and its baked form."""

    def _evaluate(self, x: torch.Tensor, weight: torch.Tensor, bias, step: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        w = weight.to(x.dtype)
        res = torch.relu(F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=p))
        return x - step.to(x.dtype) * F.conv_transpose2d(res, w, padding=p)

    def _bound(self, weight: torch.Tensor, h: torch.Tensor, input_size) -> float:
        if input_size is None:
            raise ConfigError("a convolution's bound needs its input size")
        u = conv_norm_bound(weight, tuple(input_size), padding=self.kernel_size // 2)
        return cpl_bound(u, h)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Conv (+ bias), Relu, ConvTranspose by the same filter, Mul by 2/h, Sub: the forward op for op."""
        if c != self.channels:
            raise ExportError(f"layer {g.scope!r} expects {self.channels} channels, gets {c}")
        k, p = self.kernel_size, self.kernel_size // 2
        weight = g.tensor(prefix + "weight")
        inputs = [x, weight] + ([g.tensor(prefix + "bias")] if self.bias is not None else [])
        conv = dict(kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1], group=1)
        res = g.op("Relu", g.op("Conv", *inputs, **conv))
        back = g.op("ConvTranspose", res, weight, **conv)
        step = g.op("Div", g.f32(2.0), g.tensor(prefix + "h"))
        return g.op("Sub", x, g.op("Mul", step, back)), c, h, w


@register_layer("cpl", kind="convolution",
                reference="Meunier, Delattre, Araujo & Allauzen, A Dynamical System Perspective for Lipschitz "
                          "Neural Networks, ICML 2022",
                bound="max(1, |1 - (2/h) u^2|), u = conv_norm_bound of W on the real input size, h as the "
                      "evaluation forward uses it (a stale h raises the bound)")
class CPLConv2d(_PowerIterated, _CPLConvForward):
    """Convolutional convex potential layer ``z = x - (2/h) W^T relu(W x + b)`` (ICML 2022, eq. 8),
    ``W`` a "same" zero-padded ``inner_channels x channels`` convolution, ``W^T`` its adjoint
    (``conv_transpose2d`` by the same filter).

    Bound (module docstring): ``max(1, |1 - s u^2|)`` with ``s = 2/h`` as the evaluation forward
    applies it and ``u = conv_norm_bound(W, input size)`` >= ||W||.

    Training: each training forward takes ``update_iters`` power-iteration steps and uses
    ``h = sigma^2 + 1e-4`` with the estimate ``sigma`` differentiable in ``W`` (as the authors'
    code), and stores that ``h`` (a buffer) for the evaluation forward; :meth:`refresh` (after each
    epoch) iterates further and stores ``h`` from the sound bound (``eval_norm="bound"``) or the
    power estimate (``"power"``).

    Args:
        in_channels, out_channels: must be equal (a CPL maps a space to itself).
        kernel_size: odd filter size.
        inner_channels: channels of ``W x`` (default: ``in_channels``, the paper's).
        bias: the bias ``b`` inside the ReLU.
        input_size: the map size the power iteration tracks (see :class:`_PowerIterated`).
        init_iters, update_iters: power-iteration steps at construction and per training forward.
        eval_norm: ``"bound"`` or ``"power"``: what :meth:`refresh` takes ``h`` from.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, inner_channels: int | None = None,
                 bias: bool = True, input_size=None, init_iters: int = 10, update_iters: int = 1,
                 eval_norm: str = "bound") -> None:
        super().__init__()
        _check_eval_norm(eval_norm)
        if in_channels != out_channels:
            raise ConfigError(f"a CPL maps a space to itself: in_channels ({in_channels}) must equal "
                              f"out_channels ({out_channels})")
        if kernel_size % 2 != 1:
            raise ConfigError(f"CPL needs an odd kernel size (its adjoint is then a same-padded conv), got {kernel_size}")
        inner = in_channels if inner_channels is None else int(inner_channels)
        if in_channels < 1 or inner < 1:
            raise ConfigError(f"CPL needs positive channel counts, got {in_channels} and inner {inner}")
        self.channels, self.inner_channels, self.kernel_size = int(in_channels), inner, int(kernel_size)
        self.init_iters, self.update_iters, self.eval_norm = int(init_iters), int(update_iters), eval_norm
        self.weight = nn.Parameter(torch.empty(inner, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the authors' (nn.Conv2d's) initialisation
        if bias:
            bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
            self.bias = nn.Parameter(torch.empty(inner).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._init_power(in_channels, kernel_size, input_size)
        self.register_buffer("h", torch.ones(1))
        if not self.weight.is_meta:  # a meta build (model facts) has shapes only
            self.refresh(self.init_iters, exact=False)  # a build stays cheap: the first refresh is exact

    def extra_repr(self) -> str:
        return (f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}")

    def _op(self, v: torch.Tensor) -> torch.Tensor:
        return circular_conv(v, self.weight.to(v.dtype))

    def _power_steps(self, iters: int) -> None:
        adj = adjoint_filter(self.weight.detach())
        power_steps(lambda v: circular_conv(v, self.weight.detach()), lambda v: circular_conv(v, adj), self.u, iters)

    @torch.no_grad()
    def refresh(self, iters: int, exact: bool | None = None) -> None:
        """``iters`` power-iteration steps, then the evaluation forward's ``h = sigma^2 + 1e-4``,
        ``sigma`` the power estimate or, with ``eval_norm="bound"`` (``exact``), the sound bound
        on the tracked input size (then a certificate of exactly 1 on that size)."""
        exact = self.eval_norm == "bound" if exact is None else exact
        with no_autocast(self.weight.device):
            self._power_steps(iters)
            if exact:
                sigma = conv_norm_bound(self.weight, self.tracked_size(), padding=self.kernel_size // 2)
                self.h.fill_(sigma * sigma + EPSILON)
            else:
                self.h.copy_(power_estimate(self._op, self.u).square() + EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._follow_size(tuple(x.shape[-2:]))
            with no_autocast(x.device):
                self._power_steps(self.update_iters)
                h = power_estimate(self._op, self.u).square() + EPSILON
            self.h.copy_(h.detach())
            step = 2.0 / h
        else:
            step = 2.0 / self.h
        return self._evaluate(x, self.weight, self.bias, step)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return self._bound(self.weight, self.h, input_size)

    def decay_parameters(self):
        yield self.weight

    def config(self) -> dict:
        return {"in_channels": self.channels, "out_channels": self.channels, "kernel_size": self.kernel_size,
                "inner_channels": self.inner_channels, "bias": self.bias is not None}

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        """The weights and the stored ``h``: the evaluation forward, op for op."""
        out = BakedCPLConv2d(self.channels, self.inner_channels, self.kernel_size, self.bias is not None)
        out.weight = self.weight.detach().clone()
        if self.bias is not None:
            out.bias = self.bias.detach().clone()
        out.h = self.h.detach().clone()
        return out.to(self.weight.device).eval()

    @classmethod
    def examples(cls):
        return [(cls(4, 4, 3, input_size=5), (4, 5, 5)), (cls(6, 6, 3, inner_channels=8), (6, 4, 4)),
                (cls(3, 3, 1, inner_channels=5), (3, 2, 3)), (cls(4, 4, 3, bias=False, input_size=(2, 3)), (4, 2, 3))]


@register_layer("cpl_baked", kind="baked", bound="max(1, |1 - (2/h) u^2|), u = conv_norm_bound of the stored filter "
                                                 "on the real input size, h the stored one")
class BakedCPLConv2d(_CPLConvForward):
    """A convolutional CPL with fixed tensors: ``z = x - (2/h) W^T relu(W x + b)``, ``h`` stored."""

    def __init__(self, channels: int, inner_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"invalid baked CPL: kernel {kernel_size}")
        self.channels, self.inner_channels, self.kernel_size = int(channels), int(inner_channels), int(kernel_size)
        self.register_buffer("weight", torch.zeros(inner_channels, channels, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(inner_channels) if bias else None)
        self.register_buffer("h", torch.ones(1))

    def config(self) -> dict:
        return {"channels": self.channels, "inner_channels": self.inner_channels, "kernel_size": self.kernel_size,
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, self.weight, self.bias, 2.0 / self.h)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return self._bound(self.weight, self.h, input_size)

    @classmethod
    def examples(cls):
        return [(CPLConv2d(4, 4, 3).bake(), (4, 5, 5)), (CPLConv2d(3, 3, 1, inner_channels=6).bake(), (3, 2, 2))]


# ---- the dense layer ---------------------------------------------------------------------------


class _CPLDenseForward(LipschitzLayer):
    """The evaluation arithmetic of a dense CPL, shared by the layer and its baked form."""

    def _evaluate(self, x: torch.Tensor, weight: torch.Tensor, bias, step: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        w = weight.to(x.dtype)
        res = torch.relu(F.linear(x, w, None if bias is None else bias.to(x.dtype)))
        return x - step.to(x.dtype) * (res @ w)

    def output_channels(self, channels: int) -> int:
        return self.features

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Flatten, Gemm (+ bias), Relu, MatMul by W, Mul by 2/h, Sub: the forward op for op."""
        if c * h * w != self.features:
            raise ExportError(f"layer {g.scope!r} expects {self.features} features, gets {c * h * w}")
        x = g.op("Flatten", x, axis=1)
        g.flat = True  # from here on the values are (N, features)
        weight = g.tensor(prefix + "weight")
        inputs = [x, weight] + ([g.tensor(prefix + "bias")] if self.bias is not None else [])
        res = g.op("Relu", g.op("Gemm", *inputs, transB=1))
        step = g.op("Div", g.f32(2.0), g.tensor(prefix + "h"))
        return g.op("Sub", x, g.op("Mul", step, g.op("MatMul", res, weight))), self.features, 1, 1


@register_layer("cpl_dense", kind="dense",
                reference="Meunier, Delattre, Araujo & Allauzen, A Dynamical System Perspective for Lipschitz "
                          "Neural Networks, ICML 2022",
                bound="max(1, |1 - (2/h) u^2|), u = float64 spectral norm bound of W (linear_norm_bound), h as the "
                      "evaluation forward uses it")
class CPLLinear(_CPLDenseForward):
    """Dense convex potential layer ``z = x - (2/h) W^T relu(W x + b)`` (ICML 2022, eq. 8) on
    (N, features) inputs, ``W`` an ``inner x features`` matrix.

    Bound: ``max(1, |1 - s u^2|)``, ``s = 2/h`` as the evaluation forward applies it,
    ``u = linear_norm_bound(W)``. Training and ``eval_norm`` as :class:`CPLConv2d` (power
    iteration on ``W``).
    """

    def __init__(self, in_features: int, out_features: int, inner: int | None = None, bias: bool = True,
                 init_iters: int = 10, update_iters: int = 1, eval_norm: str = "bound") -> None:
        super().__init__()
        _check_eval_norm(eval_norm)
        if in_features != out_features:
            raise ConfigError(f"a CPL maps a space to itself: in_features ({in_features}) must equal "
                              f"out_features ({out_features})")
        inner = in_features if inner is None else int(inner)
        if in_features < 1 or inner < 1:
            raise ConfigError(f"CPL needs positive sizes, got {in_features} features and inner {inner}")
        self.features, self.inner = int(in_features), inner
        self.init_iters, self.update_iters, self.eval_norm = int(init_iters), int(update_iters), eval_norm
        self.weight = nn.Parameter(torch.empty(inner, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(inner).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("u", _unit(torch.randn(in_features)))
        self.register_buffer("h", torch.ones(1))
        if not self.weight.is_meta:  # a meta build (model facts) has shapes only
            self.refresh(self.init_iters, exact=False)  # a build stays cheap: the first refresh is exact

    def extra_repr(self) -> str:
        return f"{self.features}, inner={self.inner}, bias={self.bias is not None}"

    def _power_steps(self, iters: int) -> None:
        w = self.weight.detach()
        power_steps(lambda v: w @ v, lambda v: w.T @ v, self.u, iters)

    @torch.no_grad()
    def refresh(self, iters: int, exact: bool | None = None) -> None:
        """``iters`` power-iteration steps, then the evaluation forward's ``h = sigma^2 + 1e-4``,
        ``sigma`` the power estimate or, with ``eval_norm="bound"`` (``exact``), the sound bound."""
        exact = self.eval_norm == "bound" if exact is None else exact
        with no_autocast(self.weight.device):
            self._power_steps(iters)
            if exact:
                sigma = linear_norm_bound(self.weight)
                self.h.fill_(sigma * sigma + EPSILON)
            else:
                self.h.copy_((self.weight @ self.u).norm().square() + EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with no_autocast(x.device):
                self._power_steps(self.update_iters)
                h = (self.weight @ self.u).norm().square() + EPSILON
            self.h.copy_(h.detach())
            step = 2.0 / h
        else:
            step = 2.0 / self.h
        return self._evaluate(x, self.weight, self.bias, step)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return cpl_bound(linear_norm_bound(self.weight), self.h)

    def decay_parameters(self):
        yield self.weight

    def config(self) -> dict:
        return {"in_features": self.features, "out_features": self.features, "inner": self.inner,
                "bias": self.bias is not None}

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        out = BakedCPLLinear(self.features, self.inner, self.bias is not None)
        out.weight = self.weight.detach().clone()
        if self.bias is not None:
            out.bias = self.bias.detach().clone()
        out.h = self.h.detach().clone()
        return out.to(self.weight.device).eval()

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(5, 5, inner=8), (5,)), (cls(7, 7, inner=3, bias=False), (7,))]


@register_layer("cpl_dense_baked", kind="baked", bound="max(1, |1 - (2/h) u^2|), u = float64 spectral norm bound of "
                                                       "the stored W, h the stored one")
class BakedCPLLinear(_CPLDenseForward):
    """A dense CPL with fixed tensors: ``z = x - (2/h) W^T relu(W x + b)``, ``h`` stored."""

    def __init__(self, features: int, inner: int, bias: bool = True) -> None:
        super().__init__()
        self.features, self.inner = int(features), int(inner)
        self.register_buffer("weight", torch.zeros(inner, features))
        self.register_buffer("bias", torch.zeros(inner) if bias else None)
        self.register_buffer("h", torch.ones(1))

    def config(self) -> dict:
        return {"features": self.features, "inner": self.inner, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, self.weight, self.bias, 2.0 / self.h)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return cpl_bound(linear_norm_bound(self.weight), self.h)

    @classmethod
    def examples(cls):
        return [(CPLLinear(6, 6).bake(), (6,))]
