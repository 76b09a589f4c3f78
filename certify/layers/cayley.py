"""Cayley orthogonal convolutions and dense layers, and the FFT machinery of the orthogonal layers
that are block-diagonal in the 2-D DFT basis (Cayley here, BRO in :mod:`certify.layers.bro`).

Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021.
A CIRCULAR convolution on an h x w map is block-diagonal in the 2-D DFT basis: one c x c complex
matrix W(f) per frequency f (the filter's DFT). With A(f) = W(f) - W(f)^H skew-Hermitian, the
Cayley transform Q(f) = (I - A(f))(I + A(f))^-1 is unitary, and x -> irfft2(Q(f) rfft2(x)(f)) is
an orthogonal map of real h x w maps: the paper's Cayley transform of a skew-symmetric matrix,
applied per frequency to the skew-symmetric convolution W - W^T (its Algorithm 1, FFT -> batched
per-frequency solve -> inverse FFT).

The shared machinery (:func:`kernel_spectrum`, :func:`fft_conv`, :func:`spectral_norm_bound`,
:func:`fft_rounding`, :class:`FFTOrthogonalConv`, :class:`BakedFFTConv`, :class:`OrthogonalDense`)
only needs a layer to say which matrices it applies per frequency.

Soundness. For real inputs, ``irfft2(Q ⊙ rfft2(x))`` in exact arithmetic has norm at most
max_f ||Q(f)||_2 over the stored half-spectrum frequencies (the half spectrum's mirror blocks are
the conjugates; the Hermitian projection ``irfft2`` applies on its self-conjugate columns only
averages a block with its mirror's conjugate). The bound is that maximum, computed in float64 from
the float32 matrices the forward applies (:func:`spectral_norm_bound`), times 1 + rho, rho a
generous allowance for the float32 FFTs (:func:`fft_rounding`). The certified function is, as for
every layer, this map in exact arithmetic with the stored float32 matrices (its Lipschitz
constant is at most the maximum); rho also covers how far the float32 FFTs can move an output
(relative to ||x||), so the bound bounds the float32 forward's gain too, up to the rounding of the
per-frequency products, which is that of any layer's weight products (the certifier's float64
re-check of the margins covers both).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError, NotLipschitzError
from ..numerics import no_autocast
from .linear import BakedConv2d, BakedLinear
from .norms import FLOAT64_SLACK, linear_norm_bound, matrix_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer
from .soc import strided_size

REFERENCE = "Trockman & Kolter, Orthogonalizing Convolutional Layers with the Cayley Transform, ICLR 2021"
_EPS64 = torch.finfo(torch.float64).eps
_U32 = 2.0**-24  # float32 unit roundoff


# ---- the FFT machinery shared by the orthogonal FFT layers -----------------------------------


def _size(value, name: str = "input_size") -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"{name} must be a positive int or pair, got {value!r}")
    return size


def _tap_angles(grid: tuple[int, int], k: int, device) -> torch.Tensor:
    """(k*k, F) float64 angles 2 pi m / (h w) of a centred k x k filter at the rfft2 frequencies
    (row-major (k1, k2), k2 <= w // 2), m an exact integer: taps wrap around on small grids."""
    h, w = grid
    offsets = torch.arange(k, device=device) - (k - 1) // 2
    m1 = (torch.arange(h, device=device)[:, None] * offsets) % h  # (h, k)
    m2 = (torch.arange(w // 2 + 1, device=device)[:, None] * offsets) % w  # (wr, k)
    m = (m1[:, None, :, None] * w + m2[None, :, None, :] * h) % (h * w)  # (h, wr, kh, kw)
    return (2 * math.pi / (h * w)) * m.reshape(-1, k * k).T.to(torch.float64)


def kernel_spectrum(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The per-frequency matrices (F, co, ci) of the circular cross-correlation (``conv2d``'s
    convention) by a centred ``weight`` (co, ci, k, k) on an h x w grid, at the rfft2 frequencies:
    W(f) = sum_taps w[:, :, a, b] exp(2 pi i (f1 (a - p) / h + f2 (b - p) / w)), p = (k - 1) // 2.
    Differentiable in ``weight``; computed in its dtype."""
    co, ci, k, _ = weight.shape
    angles = _tap_angles(grid, k, weight.device)
    flat = weight.reshape(co * ci, k * k)
    re = flat @ torch.cos(angles).to(weight.dtype)
    im = flat @ torch.sin(angles).to(weight.dtype)
    return torch.complex(re, im).T.reshape(-1, co, ci)


def fft_conv(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``irfft2(Q(f) rfft2(x)(f))``: x (N, ci, h, w) real, q (h * (w // 2 + 1), co, ci) complex
    (cast to x's precision) -> (N, co, h, w)."""
    n, ci, h, w = x.shape
    spec = torch.fft.rfft2(x)
    wr = spec.shape[-1]
    spec = spec.permute(2, 3, 1, 0).reshape(h * wr, ci, n)
    out = q.to(spec.dtype) @ spec  # (F, co, N)
    out = out.reshape(h, wr, q.shape[1], n).permute(3, 2, 0, 1)
    return torch.fft.irfft2(out, s=(h, w))


@torch.no_grad()
def spectral_norm_bound(q: torch.Tensor) -> float:
    """Sound float64 upper bound on max_f ||Q(f)||_2 for complex blocks q (F, co, ci): the
    largest eigenvalue (``eigvalsh``) of each block's smaller Gram matrix, plus that product's
    worst-case rounding 4 (n + 2) eps ||Q||_F^2 (inner dimension n; complex products, as
    :func:`~certify.layers.norms.conv_norm_bound`), square root, times 1 + FLOAT64_SLACK.
    The float32 blocks are exact in complex128."""
    q = q.detach().to(torch.complex128)
    if not torch.isfinite(torch.view_as_real(q)).all():
        raise NotLipschitzError("the per-frequency matrices have non-finite entries")
    f, co, ci = q.shape
    inner = max(co, ci)
    chunk = max(1, 2**22 // (min(co, ci) ** 2 + inner * min(co, ci)))
    best = 0.0
    for start in range(0, f, chunk):
        b = q[start : start + chunk]
        gram = b.mH @ b if ci <= co else b @ b.mH
        fro2 = b.abs().square().sum(dim=(-2, -1))
        lam = torch.linalg.eigvalsh(gram)[..., -1] + 4 * (inner + 2) * _EPS64 * fro2
        best = max(best, float(lam.clamp_min(0).sqrt().max()))
    return best * (1 + FLOAT64_SLACK)


def _axis_allowance(n: int) -> float:
    """Normwise relative error allowance of a length-n float32 FFT, in units of u = 2^-24.

    Power of two: Higham, Accuracy and Stability of Numerical Algorithms (2002), Thm 24.2: radix-2
    Cooley-Tukey with twiddles accurate to mu has error <= log2(n) eta / (1 - log2(n) eta),
    eta = mu + gamma_4 (sqrt 2 + mu), about 6.7 u per level; we allow 24 u per level (a radix-4
    or radix-8 pass replaces two or three such levels, with fewer roundings). Other lengths: the worst case of a direct DFT,
    gamma_{2n+2} sqrt(n) ~ (2n + 2) sqrt(n) u, doubled; a mixed-radix FFT's passes (one per prime
    factor, each at most a direct DFT of that length) sum to less, and Bluestein's three
    power-of-two FFTs (used by FFT libraries for large prime factors only) to far less."""
    if n <= 1:
        return 0.0
    if n & (n - 1) == 0:
        return 24.0 * math.log2(n)
    return 4.0 * (n + 1) * math.sqrt(n)


def fft_rounding(grid: tuple[int, int]) -> float:
    """rho: a generous bound, relative to ||x||, on how far the float32 forward
    ``irfft2(Q rfft2(x))`` can be from the same map in exact arithmetic, per unit of max ||Q(f)||,
    from the float32 FFTs (the per-frequency products round like any layer's weight products).

    Each 2-D transform has normwise relative error delta = u (a(h) + a(w) + 8) (a: the per-axis
    allowance of :func:`_axis_allowance`; 8 u for the real-data packing pass and the 1/(hw)
    scaling). The forward's error E (||E|| <= delta ||X||, X the full spectrum, ||X|| = sqrt(hw)
    ||x||) reaches the output through the exact inverse of a half spectrum, whose norm is at most
    sqrt(2 / (hw)) (each interior bin stands for two); the inverse's own error is at most
    delta sqrt(2 / (hw)) ||Q (X + E)||. Together: ||error|| <= sqrt(2) delta (2 + delta)
    max||Q|| ||x||."""
    h, w = grid
    delta = _U32 * (_axis_allowance(h) + _axis_allowance(w) + 8.0)
    return math.sqrt(2.0) * delta * (2.0 + delta)


def fft_forward(x: torch.Tensor, q: torch.Tensor, stride: int, pad: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The evaluation forward of an FFT layer (trained or baked, the same arithmetic): a real q
    (co, ci s^2) is a 1x1 layer after space-to-depth, i.e. ``conv2d`` by q as an s x s filter with
    stride s; a complex q is ``pixel_unshuffle``, ``pad`` zero rows/columns on each side,
    :func:`fft_conv`, the crop back to the map, and the bias."""
    if not q.is_complex():
        co = q.shape[0]
        w = q.reshape(co, -1, stride, stride).to(x.dtype)
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride=stride)
    if stride > 1:
        x = F.pixel_unshuffle(x, stride)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    y = fft_conv(x, q)
    if pad:
        y = y[:, :, pad:-pad, pad:-pad]
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    return y


def _grid(size: tuple[int, int], stride: int, pad: int) -> tuple[int, int]:
    h, w = strided_size(size, stride)
    return (h + 2 * pad, w + 2 * pad)


class FFTOrthogonalConv(LipschitzLayer):
    """An orthogonal convolution applied per frequency (Cayley, BRO): subclasses give
    :meth:`full_matrices`; this class handles the channels (zero-padded input channels, sliced
    output channels: Q[:out, :in]), space-to-depth for stride 2, the evaluation plan (the applied
    matrices computed once per weights and map size in float64, rounded to the weights' dtype),
    the bound and baking.

    ``pad``: 0 for a circular convolution on the map itself; k // 2 for the zero-padded variant
    (the map padded with zeros, the circular convolution on the larger grid, the output cropped:
    a compression of an orthogonal map, norm <= 1, not orthogonal).

    The baked module holds the matrices of ONE map size: the size given as ``input_size`` (to the
    constructor or to :meth:`bake`), else the last one a forward saw (kept in the state dict).
    """

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool,
                 pad: int, input_size=None) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2 (2: invertible space-to-depth, as the paper), got {stride!r}")
        self.in_channels, self.out_channels, self.kernel_size, self.stride = in_channels, out_channels, kernel_size, stride
        self.in_channels_eff = in_channels * stride * stride
        self.channels = max(out_channels, self.in_channels_eff)
        self.pad = pad
        self.fixed_size = input_size is not None
        size = _size(input_size) if input_size is not None else (0, 0)
        self.register_buffer("bake_size", torch.tensor(size, dtype=torch.int64))
        self._recorded: tuple[int, int] | None = None
        if bias:
            self.bias = nn.Parameter((torch.rand(out_channels) * 2 - 1) / math.sqrt(self.channels))
        else:
            self.register_parameter("bias", None)
        self._plans: dict = {}
        self._plans_state: tuple | None = None

    # ---- what a subclass defines ----------------------------------------------------------------

    def full_matrices(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The c x c matrices per rfft2 frequency of ``grid`` (F, c, c) complex, computed in
        ``dtype`` (differentiable); for a 1x1 filter ONE real (c, c) matrix (all frequencies)."""
        raise NotImplementedError

    def spectral_parameters(self) -> list[nn.Parameter]:
        """The parameters the matrices depend on (the plan is rebuilt when one changes)."""
        return [p for name, p in self.named_parameters() if name != "bias"]

    # ---- shapes -------------------------------------------------------------------------------

    def output_size(self, size):
        return strided_size(size, self.stride)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    # ---- forward --------------------------------------------------------------------------------

    def _applied(self, mats: torch.Tensor) -> torch.Tensor:
        return mats[..., : self.out_channels, : self.in_channels_eff]

    def _record(self, size: tuple[int, int]) -> None:
        if not self.fixed_size and self._recorded != size:
            self.bake_size.copy_(torch.tensor(size, dtype=torch.int64))
            self._recorded = size

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._recorded = None  # the loaded bake_size is the truth now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        strided_size(size, self.stride)  # refuses sizes that space-to-depth cannot split
        self._record(size)
        # outside autocast (--amp): torch has no bfloat16 FFT, and the parametrisation's inverses in
        # bfloat16 would be far from orthogonal. A bfloat16 input is promoted to the weights' dtype;
        # a float64 one is never cast down (the certifier's float64 re-check relies on it)
        with no_autocast(x.device):
            if self.training:
                q = self._applied(self.full_matrices(_grid(size, self.stride, self.pad), self.weight.dtype))
            else:
                q = self.plan(size)[0]
            x = x.to(torch.promote_types(x.dtype, self.weight.dtype))
            return fft_forward(x, q, self.stride, self.pad, self.bias)

    # ---- the evaluation plan and the bound ------------------------------------------------------

    def _state(self) -> tuple:
        return tuple((p._version, p.data_ptr(), str(p.device), p.dtype) for p in self.spectral_parameters())

    @torch.no_grad()
    def plan(self, input_size) -> list:
        """[applied matrices, bound or None] for this map size: computed in float64 from the
        weights, then rounded to the weights' dtype (a float64 forward applies the same values);
        rebuilt when a spectral parameter changes (optimiser steps, ``load_state_dict``, ``.to``)."""
        state = self._state()
        if state != self._plans_state:
            self._plans, self._plans_state = {}, state
        grid = (1, 1) if self.kernel_size == 1 else _grid(_size(input_size), self.stride, self.pad)
        if grid not in self._plans:
            q = self._applied(self.full_matrices(grid, torch.float64))
            dtype = self.weight.dtype if not q.is_complex() else (torch.complex128 if self.weight.dtype == torch.float64
                                                                   else torch.complex64)
            self._plans[grid] = [q.to(dtype).contiguous(), None]
        return self._plans[grid]

    def lipschitz_bound(self, input_size=None) -> float:
        """max_f ||Q(f)||_2 of the applied (rounded) matrices on this map size, in float64
        (:func:`spectral_norm_bound`), times 1 + :func:`fft_rounding` of the grid; a 1x1 filter:
        the float64 norm of its one real matrix (no FFT). Channel padding/slicing, space-to-depth
        and the zero-padding crop do not increase the norm."""
        if input_size is None:
            if self.kernel_size != 1:
                raise ConfigError(f"the bound of a {self.layer_type} convolution needs its input size")
            input_size = (self.stride, self.stride)
        entry = self.plan(input_size)
        if entry[1] is None:
            q = entry[0]
            if q.is_complex():
                grid = _grid(_size(input_size), self.stride, self.pad)
                entry[1] = spectral_norm_bound(q) * (1 + fft_rounding(grid))
            else:
                entry[1] = matrix_norm_bound(q.to(torch.float64))
        return entry[1]

    def decay_parameters(self):
        yield self.weight

    # ---- baking ---------------------------------------------------------------------------------

    @torch.no_grad()
    def bake(self, input_size=None, **options) -> LipschitzLayer:
        """The evaluation forward as fixed tensors: the applied matrices of ONE map size
        (``input_size``, else this layer's ``bake_size``) in a :class:`BakedFFTConv` (which
        refuses other sizes); a 1x1 filter is one size-free :class:`~certify.layers.linear.BakedConv2d`
        (stride s: an s x s filter with stride s, the same arithmetic as this layer's forward)."""
        bias = None if self.bias is None else self.bias.detach().clone()
        if self.kernel_size == 1:
            q = self.plan((self.stride, self.stride))[0]
            weight = q.reshape(self.out_channels, self.in_channels, self.stride, self.stride)
            return BakedConv2d.of(weight, bias, stride=self.stride, padding=0)
        if input_size is None:
            input_size = tuple(int(v) for v in self.bake_size.tolist())
            if min(input_size) < 1:
                raise ConfigError(f"{self.layer_type}: its per-frequency matrices depend on the map size; bake it "
                                  "with bake(input_size=(h, w)) or run a forward first")
        size = _size(input_size)
        q = self.plan(size)[0]
        return BakedFFTConv.of(q, bias, size, self.stride, self.pad)


@register_layer("fft_conv_baked", kind="baked",
                bound="largest float64 spectral norm of the stored per-frequency matrices (Gram eigvalsh + rounding) "
                      "x (1 + float32 FFT rounding allowance); one map size only")
class BakedFFTConv(LipschitzLayer):
    """A fixed orthogonal FFT convolution (baked Cayley or BRO) for ONE input size (part of its
    config; other sizes are refused): ``pixel_unshuffle`` (stride 2), ``pad`` zeros on each side,
    ``irfft2(Q(f) rfft2(x)(f))`` with the stored Q = q_real + i q_imag (F, out, in s^2), the crop
    back, the bias. The same arithmetic as the trained layer's evaluation forward."""

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, input_size, stride: int = 1, pad: int = 0,
                 bias: bool = True) -> None:
        super().__init__()
        if stride not in (1, 2) or pad < 0:
            raise ConfigError(f"invalid baked FFT convolution: stride {stride}, pad {pad}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.input_size, self.stride, self.pad = _size(input_size), int(stride), int(pad)
        gh, gw = _grid(self.input_size, self.stride, self.pad)
        shape = (gh * (gw // 2 + 1), self.out_channels, self.in_channels * self.stride**2)
        self.register_buffer("q_real", torch.zeros(shape))
        self.register_buffer("q_imag", torch.zeros(shape))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def of(cls, q: torch.Tensor, bias: torch.Tensor | None, input_size, stride: int = 1, pad: int = 0) -> "BakedFFTConv":
        out = cls(q.shape[2] // stride**2, q.shape[1], input_size, stride, pad, bias is not None)
        if tuple(q.shape) != tuple(out.q_real.shape):
            raise ConfigError(f"per-frequency matrices of shape {tuple(q.shape)} do not fit a {out.input_size} map "
                              f"(expected {tuple(out.q_real.shape)})")
        out.q_real = q.real.detach().clone().contiguous()
        out.q_imag = q.imag.detach().clone().contiguous()
        if bias is not None:
            out.bias = bias.detach().clone().contiguous()
        return out.to(q.device).eval()

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "input_size": list(self.input_size), "stride": self.stride, "pad": self.pad,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, stride={self.stride}, pad={self.pad}"

    def _check_size(self, size) -> None:
        if tuple(int(v) for v in size) != self.input_size:
            raise ConfigError(f"this baked FFT convolution holds the matrices of a {self.input_size} map; "
                              f"it cannot be applied to {tuple(size)} (re-bake the layer for that size)")

    def matrices(self) -> torch.Tensor:
        return torch.complex(self.q_real, self.q_imag)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x.shape[-2:])
        return fft_forward(x, self.matrices(), self.stride, self.pad, self.bias)

    def output_size(self, size):
        return strided_size(size, self.stride)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """As the trained layer's: max_f ||Q(f)|| of the stored matrices, in float64, times
        1 + :func:`fft_rounding`; on this module's own map size only."""
        if input_size is not None:
            self._check_size(input_size)
        grid = _grid(self.input_size, self.stride, self.pad)
        return spectral_norm_bound(self.matrices()) * (1 + fft_rounding(grid))

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Space-to-depth, zero padding, then the DFTs as real matrix products (MatMul in every
        opset lipcert writes; ONNX's DFT op needs opset 17 and cannot invert a one-sided
        spectrum): the rfft along w, the complex DFT along h, the per-frequency products
        Re/Im-wise, the inverse DFT along h, the one-sided inverse along w (weights 1, 2, ..., 2,
        1, the 1/(hw) scaling folded in), the crop and the bias. The twiddle matrices are float32
        constants of exact-integer angles; the graph computes the same map as PyTorch's FFTs up
        to float32 rounding (a different order of operations)."""
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        if (h, w) != self.input_size:
            raise ExportError(f"layer {g.scope!r} holds the matrices of a {self.input_size} map, gets {(h, w)}")
        h0, w0 = self.output_size((h, w))
        if self.stride > 1:
            x, c, h, w = g.pixel_unshuffle(x, c, h, w, self.stride)
        p = self.pad
        if p:
            x = g.op("Pad", x, g.i64([0, 0, p, p, 0, 0, p, p]))
            h, w = h + 2 * p, w + 2 * p
        wr, co = w // 2 + 1, self.out_channels
        cw, sw = _dft_matrices(w, wr)  # (w, wr): x @ cw, x @ sw is the rfft along w
        ch, sh = _dft_matrices(h, h)  # (h, h), symmetric: the DFT along h is (ch + i sh) @ .
        cw, sw, ch, sh = (g.const(m, np.float32) for m in (cw, sw, ch, sh))
        ar, ai = g.op("MatMul", x, cw), g.op("MatMul", x, sw)
        xr = g.op("Sub", g.op("MatMul", ch, ar), g.op("MatMul", sh, ai))
        xi = g.op("Add", g.op("MatMul", ch, ai), g.op("MatMul", sh, ar))
        to_freq = g.i64([h * wr, c, -1])
        xr = g.op("Reshape", g.op("Transpose", xr, perm=[2, 3, 1, 0]), to_freq)
        xi = g.op("Reshape", g.op("Transpose", xi, perm=[2, 3, 1, 0]), to_freq)
        qr, qi = g.tensor(prefix + "q_real"), g.tensor(prefix + "q_imag")
        yr = g.op("Sub", g.op("MatMul", qr, xr), g.op("MatMul", qi, xi))
        yi = g.op("Add", g.op("MatMul", qr, xi), g.op("MatMul", qi, xr))
        back = g.i64([h, wr, co, -1])
        yr = g.op("Transpose", g.op("Reshape", yr, back), perm=[3, 2, 0, 1])
        yi = g.op("Transpose", g.op("Reshape", yi, back), perm=[3, 2, 0, 1])
        zr = g.op("Add", g.op("MatMul", ch, yr), g.op("MatMul", sh, yi))  # conj(DFT_h) @ y
        zi = g.op("Sub", g.op("MatMul", ch, yi), g.op("MatMul", sh, yr))
        er, ei = _inverse_rdft_matrices(w, wr, h * w)
        y = g.op("Add", g.op("MatMul", zr, g.const(er, np.float32)), g.op("MatMul", zi, g.const(ei, np.float32)))
        if p:
            y = g.op("Slice", y, g.i64([p, p]), g.i64([p + h0, p + w0]), g.i64([2, 3]))
        if self.bias is not None:
            y = g.op("Add", y, g.per_channel(prefix + "bias"))
        return y, co, h0, w0

    @classmethod
    def examples(cls):
        from .bro import BROConv2d

        return [(CayleyConv2d(4, 4, 3, input_size=5).bake(), (4, 5, 5)),
                (CayleyConv2d(2, 5, 3, stride=2, input_size=(4, 6)).bake(), (2, 4, 6)),
                (BROConv2d(4, 3, 3, padding="zero", input_size=4).bake(), (4, 4, 4))]


def _trig(n: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2 pi (i j mod n) / n for i < rows, j < cols, in float64, exact zeros kept."""
    m = (np.arange(rows)[:, None] * np.arange(cols)[None, :]) % n
    angle = 2 * np.pi * m / n
    c, s = np.cos(angle), np.sin(angle)
    c[np.abs(c) < 1e-12] = 0.0
    s[np.abs(s) < 1e-12] = 0.0
    return c, s


def _dft_matrices(n: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, cols) cos and -sin of 2 pi j k / n: real and imaginary parts of the forward DFT."""
    c, s = _trig(n, n, cols)
    return c, -s


def _inverse_rdft_matrices(w: int, wr: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(wr, w) matrices of the one-sided inverse along w: y = Zr @ er + Zi @ ei, weight 1 for the
    bins 0 and w/2 (w even), 2 for the others (their mirror images), divided by ``scale``."""
    c, s = _trig(w, wr, w)
    a = np.full((wr, 1), 2.0)
    a[0] = 1.0
    if w % 2 == 0:
        a[-1] = 1.0
    return a * c / scale, -a * s / scale


# ---- the Cayley convolution ------------------------------------------------------------------


def cayley(a: torch.Tensor) -> torch.Tensor:
    """(I - A)(I + A)^-1 for a (batch of) skew-Hermitian A, as ``solve(I + A, I - A)`` (the two
    factors commute; I + A is invertible: A's eigenvalues are imaginary)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye + a, eye - a)


@register_layer("cayley", kind="convolution", reference=REFERENCE,
                bound="largest float64 spectral norm of the per-frequency Cayley matrices the forward applies on the "
                      "real map size (Gram eigvalsh + rounding) x (1 + float32 FFT rounding allowance); 1x1: the "
                      "float64 norm of its matrix")
class CayleyConv2d(FFTOrthogonalConv):
    """Cayley orthogonal convolution (Trockman & Kolter, ICLR 2021), with CIRCULAR padding: the
    map is treated as a torus (the paper's FFT convolution), so the layer is exactly orthogonal
    (in exact arithmetic) on circularly padded inputs, not a zero-padded "same" convolution.

    Per rfft2 frequency f of the (space-to-depth) map: W(f) the DFT of the centred c x c x k x k
    filter (``kernel_spectrum``), scaled by the paper's learnable ``alpha`` over the filter's
    Frobenius norm (the paper normalises by the DFT's norm, which differs by a size-dependent
    constant); A(f) = W(f) - W(f)^H and Q(f) = (I - A(f))(I + A(f))^-1 (the paper's Cayley
    transform, per frequency: its Algorithm 1). Channel changes: c = max(in s^2, out), the input's channels
    zero-padded to c and the output's sliced, i.e. Q(f)[:out, :in s^2] (orthonormal columns if
    out >= in s^2, rows otherwise). ``stride=2``: the paper's invertible downsampling
    (``pixel_unshuffle``) first; the kernel size is kept.

    Training computes Q in the weights' dtype with autograd (``torch.linalg.solve`` per
    frequency); evaluation caches, per map size, Q computed in float64 and rounded to the weights'
    dtype. Bound (:meth:`lipschitz_bound`): max_f ||Q(f)||_2 of those rounded matrices in float64
    (1 + about 1e-7), times 1 + rho for the float32 FFTs (:func:`fft_rounding`, 1.9e-5 on 5x5 maps,
    4.2e-5 on 32x32); a 1x1 filter is one real matrix (no FFT).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, stride: int = 1,
                 input_size=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, pad=0, input_size=input_size)
        c, k = self.channels, kernel_size
        bound = 1.0 / math.sqrt(c * k * k)  # conv2d's default initialisation, as the paper's code
        self.weight = nn.Parameter(torch.empty(c, c, k, k).uniform_(-bound, bound))
        self.alpha = nn.Parameter(self.weight.detach().norm().clone())  # scale 1 at initialisation

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, circular")

    def full_matrices(self, grid, dtype):
        w = self.weight.to(dtype)
        w = w * (self.alpha.to(dtype) / w.norm().clamp_min(1e-12))
        if self.kernel_size == 1:
            m = w[:, :, 0, 0]
            return cayley(m - m.T)
        spec = kernel_spectrum(w, grid)
        return cayley(spec - spec.mH)

    @classmethod
    def examples(cls):
        # input_size: the size bake() uses (the suite bakes some examples before any forward)
        return [(cls(4, 4, 3, input_size=5), (4, 5, 5)), (cls(3, 5, 3, bias=False, input_size=4), (3, 4, 4)),
                (cls(2, 6, 3, stride=2, input_size=(4, 6)), (2, 4, 6)), (cls(6, 4, 1), (6, 3, 3)),
                (cls(5, 4, 3, input_size=(6, 5)), (5, 6, 5))]


# ---- orthogonal dense layers (Cayley here, BRO in bro.py) ------------------------------------


class OrthogonalDense(LipschitzLayer):
    """A dense layer ``x @ Q[:out, :in].T + b`` with Q a c x c orthogonal matrix (c = max(in,
    out)) from :meth:`full_matrix`: computed with autograd in training; in evaluation computed in
    float64, rounded to the weights' dtype once per weights (cached), and bounded as applied
    (:func:`~certify.layers.norms.linear_norm_bound`). Bakes to ``BakedLinear`` of that matrix."""

    is_linear = True

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.channels = max(in_features, out_features)
        if bias:
            self.bias = nn.Parameter((torch.rand(out_features) * 2 - 1) / math.sqrt(self.channels))
        else:
            self.register_parameter("bias", None)
        self._plan: list | None = None
        self._plan_state: tuple | None = None

    def full_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> tuple:
        return tuple((p._version, p.data_ptr(), str(p.device), p.dtype) for name, p in self.named_parameters()
                     if name != "bias")

    @torch.no_grad()
    def plan(self) -> list:
        """[the applied matrix (float64-computed, rounded to the weights' dtype), bound or None]."""
        state = self._state()
        if self._plan is None or state != self._plan_state:
            q = self.full_matrix(torch.float64)[: self.out_features, : self.in_features]
            self._plan, self._plan_state = [q.to(self.weight.dtype).contiguous(), None], state
        return self._plan

    def matrix(self) -> torch.Tensor:
        if self.training:
            return self.full_matrix(self.weight.dtype)[: self.out_features, : self.in_features]
        return self.plan()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), self.matrix().to(x.dtype), b)

    def output_channels(self, channels: int) -> int:
        return self.out_features

    def lipschitz_bound(self, input_size=None) -> float:
        """The float64 spectral norm of the applied matrix, plus rounding slack
        (:func:`~certify.layers.norms.linear_norm_bound`)."""
        entry = self.plan()
        if entry[1] is None:
            entry[1] = linear_norm_bound(entry[0])
        return entry[1]

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        return BakedLinear.of(self.plan()[0], None if self.bias is None else self.bias.detach())


@register_layer("cayley_dense", kind="dense", reference=REFERENCE,
                bound="float64 spectral norm of the applied matrix (I - A)(I + A)^-1 [:out, :in] (Gram eigvalsh + "
                      "rounding)")
class CayleyLinear(OrthogonalDense):
    """Cayley dense layer (Trockman & Kolter, ICLR 2021, the Cayley transform): W = (I - A)(I + A)^-1 with A =
    s (V - V^T) skew (V c x c, c = max(in, out), s = alpha / ||V||_F, the paper's learnable
    scale), sliced to W[:out, :in] (orthonormal columns if out >= in, rows otherwise). Input
    (N, in) (a 4-D input is flattened). Bound: the float64 norm of the applied float32 matrix,
    1 + about 1e-7 (:func:`~certify.layers.norms.linear_norm_bound`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        c = self.channels
        self.weight = nn.Parameter(torch.empty(c, c).uniform_(-1 / math.sqrt(c), 1 / math.sqrt(c)))
        self.alpha = nn.Parameter(self.weight.detach().norm().clone())

    def full_matrix(self, dtype):
        v = self.weight.to(dtype)
        v = v * (self.alpha.to(dtype) / v.norm().clamp_min(1e-12))
        return cayley(v - v.T)

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(7, 4), (7,)), (cls(3, 5, bias=False), (3,))]
