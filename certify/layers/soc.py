"""Skew orthogonal convolution (SOC).

Singla & Feizi, "Skew Orthogonal Convolutions", ICML 2021, with the fast training backward of
Singla & Feizi, "Improved techniques for deterministic l2 robustness", NeurIPS 2022 (technique b).

The layer computes ``exp(conv_A) x`` for a skew-symmetric convolution ``A = (W - W^T) / 2`` by a
truncated Taylor series. ``W^T`` swaps the in/out channel axes and flips both spatial axes; with
zero "same" padding and an odd kernel the convolution by ``A`` is then exactly skew-symmetric as a
linear operator, so ``exp(conv_A)`` is exactly orthogonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError, NotLipschitzError
from .protocol import LipschitzLayer
from .registry import register_layer
from .norms import matrix_norm_bound, skew_conv_norm_bound
from .expm import (
    chebyshev_apply,
    chebyshev_coefficients,
    chebyshev_error,
    chebyshev_to_monomial,
    choose_terms,
    matrix_products,
    paterson_stockmeyer,
    taylor_error,
)


# Largest operator dimension (channels x height x width) that the fast evaluation materialises as
# one dense matrix: its float64 build holds a few n x n matrices (512 MiB each at 8192).
DENSE_MAX = 8192


def strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Spatial size after space-to-depth by ``stride`` (which needs sizes divisible by it)."""
    h, w = size
    if h % stride or w % stride:
        raise ConfigError(f"a stride-{stride} layer needs spatial sizes divisible by {stride}, got {tuple(size)}")
    return h // stride, w // stride


def transpose_filter(w: torch.Tensor) -> torch.Tensor:
    """The filter of the adjoint convolution: swap in/out channels and flip both spatial axes."""
    return torch.flip(w.transpose(0, 1), dims=(2, 3))


def dense_conv_matrix(w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The zero-padded "same" convolution by ``w`` (M, M, k, k) on an (h, w) map as one
    (M h w) x (M h w) matrix, indexed like ``Tensor.flatten(1)`` of (M, h, w) feature maps, so
    that ``conv2d(x, w, padding=k // 2).flatten(1) == x.flatten(1) @ matrix.T``. Its entries are the
    filter's own values (no arithmetic), so it is exactly the same linear operator. Built by one
    gather of the taps (differentiable: its backward is one scatter-add into the filter)."""
    m, k = w.shape[0], w.shape[-1]
    h, wd = size
    p = k // 2
    # block (out pixel, in pixel) -> tap index, or k*k (a zero block) where no tap connects them
    tap = torch.full((h * wd, h * wd), k * k, dtype=torch.long)
    for i in range(h):
        for j in range(wd):
            for di in range(k):
                for dj in range(k):
                    ii, jj = i + di - p, j + dj - p  # output pixel (i, j) reads input (ii, jj)
                    if 0 <= ii < h and 0 <= jj < wd:
                        tap[i * wd + j, ii * wd + jj] = di * k + dj
    taps = torch.cat([w.permute(2, 3, 0, 1).reshape(k * k, m, m), w.new_zeros(1, m, m)])
    blocks = taps[tap.to(w.device)]  # (hw_out, hw_in, M, M)
    return blocks.permute(2, 0, 3, 1).reshape(m * h * wd, m * h * wd)


def dense_pays_off(size: tuple[int, int], channels: int, kernel: int, terms: int, images: int,
                   dense_dims: tuple[int, int]) -> bool:
    """Whether one dense orthogonal operator is cheaper than ``terms - 1`` convolutions per image,
    counting its one-time build over ``images`` images.

    Cost model in float32 multiply-adds: the polynomial costs ``(terms - 1) h w M^2 k^2`` per image
    (a padded convolution computes every tap), the dense operator ``n_out n_in`` per image. The
    build costs the float64 products of n x n matrices of :func:`~certify.layers.expm.paterson_stockmeyer`,
    one more for the Gram matrix and about 1.5 for ``eigvalsh`` (1.4-1.8x a product's time, measured
    at n = 4096 and 8192 on a CPU), each counted twice: float64 products ran at 35 GMAC/s there,
    float32 products at 77 and the convolutions at 47 (2 threads), so the factor 2 errs towards
    fewer dense layers. On 2x2 maps the operator is ~20x cheaper per image than the polynomial; on
    8x8 maps it is not worth it.
    """
    h, w = size
    n = channels * h * w
    saving = (terms - 1) * h * w * channels * channels * kernel * kernel - dense_dims[0] * dense_dims[1]
    build = 2 * (matrix_products(terms - 1) + 2.5) * n**3
    return saving > 0 and images * saving > build


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(1e-12)


def taylor_series(x: torch.Tensor, skew: torch.Tensor, terms: int) -> torch.Tensor:
    """``sum_{j<terms} conv_A^j(x) / j!`` by Horner's rule, with plain autograd (exact gradients)."""
    pad = skew.shape[-1] // 2
    y = x
    for i in range(terms - 1, 0, -1):
        y = x + F.conv2d(y, skew, padding=pad) / i
    return y


def _apply_op(v: torch.Tensor, op: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """A skew operator applied to a batch: a filter (4-D) convolves (N, C, H, W) maps; a dense
    matrix (2-D) multiplies flattened (N, n) rows. ``adjoint``: its transpose, which for a skew
    operator is its negative."""
    if op.dim() == 2:
        return v @ op if adjoint else v @ op.T
    return F.conv2d(v, -op if adjoint else op, padding=op.shape[-1] // 2)


class _FastSOC(torch.autograd.Function):
    """Taylor series of exp(conv_A) with the paper's low-memory backward (NeurIPS 2022, tech. b).

    The forward saves only ``z = sum_{j<K-1} A^j x / (j+1)!`` (so that ``y = x + A z``). The input
    gradient is exact for the truncated series: the adjoint of ``conv_A`` is ``conv_{-A}``, so it is
    the same series with ``-A``. The filter gradient is approximated by ONE weight-gradient
    convolution of ``z`` against the backward partial sum ``w = sum_{i<K-1} (-A)^i g / (i+1)!``:
    it weights the pair of powers (i, l) by ``1/((i+1)!(l+1)!)`` instead of ``1/(i+l+1)!``, exact
    for the leading terms and a few percent off for ||A|| about 1 to 2.

    ``skew`` is a filter, or the same convolution as a dense (n, n) matrix on flattened maps (on
    1x1 and 2x2 maps most taps of a padded convolution multiply zeros; the matrix skips them).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, skew: torch.Tensor, terms: int) -> torch.Tensor:
        z = x
        for i in range(terms - 1, 1, -1):
            z = x + _apply_op(z, skew) / i
        ctx.save_for_backward(z, skew)
        ctx.terms = terms
        return x + _apply_op(z, skew)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, skew = ctx.saved_tensors
        grad_out = grad_out.to(z.dtype)
        w = grad_out
        for i in range(ctx.terms - 1, 1, -1):
            w = grad_out + _apply_op(w, skew, adjoint=True) / i
        grad_x = grad_out + _apply_op(w, skew, adjoint=True) if ctx.needs_input_grad[0] else None
        grad_skew = None
        if ctx.needs_input_grad[1]:
            if skew.dim() == 2:  # d<w, A z>/dA, summed over the batch
                grad_skew = w.T @ z
            else:
                grad_skew = torch.nn.grad.conv2d_weight(z, skew.shape, w, padding=skew.shape[-1] // 2)
        return grad_x, grad_skew, None


class _FastPoly(torch.autograd.Function):
    """``p(A) x = sum_k m_k A^k x`` for a polynomial given by its monomial coefficients in A, with
    the fast backward of :class:`_FastSOC` generalised: writing ``p(A) = m_0 + A q(A)``, the
    forward saves only ``z = q(A) x``, the input gradient ``p(A)^T g = p(-A) g`` is exact, and the
    filter gradient is ONE weight-gradient convolution of ``z`` against ``w = q(A)^T g`` (for the
    Taylor coefficients this is the paper's backward exactly). Used with the Chebyshev
    coefficients that :meth:`SOC.train_polynomial` chooses from the layer's sound norm bound."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, skew: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
        # out of place, as _FastSOC: under autocast the sums promote to x's dtype, so the saved z
        # matches the filter's dtype in the backward (which runs outside autocast)
        z = coeffs[-1] * x
        for c in coeffs[-2:0:-1]:
            z = _apply_op(z, skew) + c * x
        ctx.save_for_backward(z, skew)
        ctx.coeffs = coeffs
        return _apply_op(z, skew) + coeffs[0] * x

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, skew = ctx.saved_tensors
        coeffs = ctx.coeffs
        grad_out = grad_out.to(z.dtype)
        w = coeffs[-1] * grad_out
        for c in coeffs[-2:0:-1]:
            w = _apply_op(w, skew, adjoint=True).add_(grad_out, alpha=c)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _apply_op(w, skew, adjoint=True).add_(grad_out, alpha=coeffs[0])
        grad_skew = None
        if ctx.needs_input_grad[1]:
            if skew.dim() == 2:
                grad_skew = w.T @ z
            else:
                grad_skew = torch.nn.grad.conv2d_weight(z, skew.shape, w, padding=skew.shape[-1] // 2)
        return grad_x, grad_skew, None


def polynomial_series(x: torch.Tensor, skew: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """``sum_k m_k conv_A^k(x)`` by Horner's rule with plain autograd (exact gradients)."""
    z = coeffs[-1] * x
    for c in coeffs[-2::-1]:
        z = _apply_op(z, skew) + c * x
    return z


#: sound-bound refreshes of an ``train_terms="auto"`` layer: every this many training forwards
TRAIN_BOUND_EVERY = 100
#: headroom on the refreshed bound, for the weights' drift until the next refresh
TRAIN_BOUND_MARGIN = 0.02


@dataclass
class _EvalPlan:
    """Input-independent tensors of a SOC layer's fast evaluation, and their sound bound."""

    # "chebyshev" (filter S, coefficients), "matrix" (the whole 1x1 operator, channels x channels)
    # or "dense" (the whole operator on the flattened (channels, h, w) map)
    kind: str
    tensor: torch.Tensor
    coeffs: list[float] | None
    bound: float
    terms: int
    out_shape: tuple[int, int, int] | None = None  # (channels, h, w) of a dense plan's output
    doubled: torch.Tensor | None = None  # 2S for a Chebyshev plan (exact), used by Clenshaw's steps

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            c, h, w = self.out_shape
            n_in = self.tensor.shape[1]
            x = x[:, : n_in // (h * w)]  # drop the zero channels that padding added
            return F.linear(x.flatten(1), self.tensor).view(x.shape[0], c, h, w)
        if self.kind == "matrix":
            if x.shape[1] > self.tensor.shape[1]:  # drop the zero channels that padding added
                x = x[:, : self.tensor.shape[1]]
            return F.conv2d(x, self.tensor[:, :, None, None])
        pad = self.tensor.shape[-1] // 2
        return chebyshev_apply(x, lambda v: F.conv2d(v, self.tensor, padding=pad), self.coeffs,
                               lambda v: F.conv2d(v, self.doubled, padding=pad))


@register_layer("soc", kind="convolution", reference="Singla & Feizi, Skew Orthogonal Convolutions, ICML 2021",
                bound="taylor: 1 + a^K/K!, fast: 1 + Chebyshev error + coefficient rounding (or the float64 norm of "
                      "a materialised operator); a = float64 eigenvalues of the skew filter's DFT blocks on the "
                      "real map size")
class SOC(LipschitzLayer):
    """Skew orthogonal convolution, 1-Lipschitz up to a Taylor truncation error that
    :meth:`lipschitz_bound` accounts for.

    Args:
        in_channels, out_channels: channels of the input and output.
        kernel_size: odd filter size (1 or 3 in LipConvnets).
        stride: 1, or 2 by an invertible space-to-depth rearrangement (``pixel_unshuffle``).
        bias: add a learnable bias after the orthogonal map (does not change the Lipschitz constant).
        train_terms, eval_terms: number of Taylor terms K in training and in evaluation.
            ``train_terms="auto"`` trains with the Chebyshev polynomial of the fewest terms whose
            error bound is below ``train_tol``, for ``a`` the layer's SOUND norm bound on its real
            map size (refreshed every :data:`TRAIN_BOUND_EVERY` training forwards, with
            :data:`TRAIN_BOUND_MARGIN` headroom for the drift in between; see
            :meth:`train_polynomial`): the trained function is then exp(A) to ``train_tol``, as
            the certified one is to ``eval_tol``, instead of the paper's fixed 6-term Taylor series
            (whose error is ``a^6/720``, 4-6% at the a ~ 1.8 of 3x3 layers).
        train_tol: the error tolerance of ``train_terms="auto"`` (relative to ||exp(A)|| = 1).
        init_iters, update_iters: power-iteration steps for the norm scaling at construction and
            per training forward.
        backward: ``"fast"`` (the paper's one-weight-gradient backward) or ``"exact"`` (autograd).
        eval_mode: ``"taylor"`` evaluates the paper's fixed ``eval_terms``-term Taylor series;
            ``"fast"`` caches everything that does not depend on the input and evaluates a
            Chebyshev expansion whose degree is chosen per layer from the sound norm bound so
            that the truncation error stays below ``eval_tol`` (1x1 layers become one matrix).
            See :mod:`certify.layers.expm`. Both are certified with their own rigorous bound.
        eval_tol: error tolerance of the ``"fast"`` evaluation (relative to ||exp(A)|| = 1).

    Two attributes, set by :func:`set_eval_mode` rather than the constructor (they describe an
    evaluation run, not the model): ``eval_images``, the number of images the fast path is expected
    to serve (0, the default, never materialises a dense operator), and ``dense_max``, the largest
    operator dimension to materialise.
    """

    is_linear = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        train_terms: int | str = 6,
        eval_terms: int = 15,
        init_iters: int = 50,
        update_iters: int = 1,
        backward: str = "fast",
        eval_mode: str = "taylor",
        eval_tol: float = 1e-6,
        train_tol: float = 0.02,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"SOC needs an odd kernel size, got {kernel_size}")
        if stride not in (1, 2):
            raise ConfigError(f"SOC supports stride 1 or 2, got {stride}")
        if backward not in ("fast", "exact"):
            raise ConfigError(f"backward must be 'fast' or 'exact', got {backward!r}")
        if train_terms != "auto" and (isinstance(train_terms, str) or train_terms < 2):
            raise ConfigError(f"train_terms must be an integer >= 2 or 'auto', got {train_terms!r}")
        if eval_terms < 2:
            raise ConfigError("SOC needs at least 2 Taylor terms")
        if not 0 < train_tol < 0.5:
            raise ConfigError(f"train_tol must be in (0, 0.5), got {train_tol}")
        if eval_mode not in ("taylor", "fast"):
            raise ConfigError(f"eval_mode must be 'taylor' or 'fast', got {eval_mode!r}")
        if not 0 < eval_tol < 0.1:
            raise ConfigError(f"eval_tol must be in (0, 0.1), got {eval_tol}")
        self.eval_mode, self.eval_tol = eval_mode, eval_tol
        self._plan: _EvalPlan | None = None
        self._plan_key: tuple | None = None
        self.eval_images, self.dense_max = 0, DENSE_MAX
        # training: run the fast backward on a dense matrix where the map is tiny (see forward)
        self.train_dense = True
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.train_terms = train_terms
        self.train_tol = float(train_tol)
        self.eval_terms = eval_terms
        self.update_iters = update_iters
        self.backward_mode = backward
        self.in_channels_eff = in_channels * stride * stride
        self.channels = max(out_channels, self.in_channels_eff)
        m, k = self.channels, kernel_size
        self.weight = nn.Parameter(torch.randn(m, m, k, k) / math.sqrt(m))
        if bias:
            self.bias = nn.Parameter((torch.rand(out_channels) * 2 - 1) / math.sqrt(m))
        else:
            self.register_parameter("bias", None)
        # Singular-vector estimates of the four reshapings of the filter (the "fantastic four"
        # of Singla & Feizi 2021), tracked across training steps by power iteration.
        shapes = {
            "u1": (1, m, 1, k), "v1": (m, 1, k, 1),
            "u2": (1, m, k, 1), "v2": (m, 1, 1, k),
            "u3": (1, m, k, k), "v3": (m, 1, 1, 1),
            "u4": (m, 1, k, k), "v4": (1, m, 1, 1),
        }
        for name, shape in shapes.items():
            self.register_buffer(name, _l2_normalize(torch.randn(shape)))
        if train_terms == "auto":
            # the bound behind the current training polynomial and the forwards since it was
            # computed: in the state dict, so that a resumed run trains the same polynomials
            self.register_buffer("train_bound", torch.zeros((), dtype=torch.float64))
            self.register_buffer("train_forwards", torch.zeros((), dtype=torch.int64))
            self._train_poly: tuple | None = None
        if self.weight.device.type != "meta":  # a meta build (shapes only, `lipcert models`) has no values
            self.power_iteration(init_iters)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, terms={self.train_terms}/{self.eval_terms}, "
            + (f"train_tol={self.train_tol}, " if self.train_terms == "auto" else "")
            + f"backward={self.backward_mode}, eval={self.eval_mode}, bias={self.bias is not None}"
        )

    def raw_skew(self) -> torch.Tensor:
        """The unscaled skew filter ``(W - W^T) / 2``."""
        return 0.5 * (self.weight - transpose_filter(self.weight))

    @torch.no_grad()
    def power_iteration(self, iters: int) -> None:
        """Refresh the singular-vector estimates of the four filter reshapings (matrix-vector
        products on the reshaped filter: no full-size temporaries per step)."""
        if iters <= 0:
            return
        a = self.raw_skew()
        m, k = self.channels, self.kernel_size
        # (matrix, left vector over its rows, right vector over its columns), built one at a time
        # so that only one reshaped copy of the filter is alive at once
        pairs = (
            (lambda: a.permute(0, 2, 1, 3).reshape(m * k, m * k), self.v1, self.u1),  # (co,kh) x (ci,kw)
            (lambda: a.permute(0, 3, 1, 2).reshape(m * k, m * k), self.v2, self.u2),  # (co,kw) x (ci,kh)
            (lambda: a.reshape(m, m * k * k), self.v3, self.u3),  # co x (ci,kh,kw)
            (lambda: a.permute(0, 2, 3, 1).reshape(m * k * k, m), self.u4, self.v4),  # (co,kh,kw) x ci
        )
        for make, left, right in pairs:
            mat = make()
            lv, rv = left.reshape(-1), right.reshape(-1)
            for _ in range(iters):
                lv = _l2_normalize(mat @ rv)
                rv = _l2_normalize(mat.T @ lv)
            left.copy_(lv.view_as(left))
            right.copy_(rv.view_as(right))
            del mat

    def skew_filter(self) -> torch.Tensor:
        """The scaled skew filter used by the forward pass (differentiable in the weight).

        The skew filter is divided by the smallest of the four power-iteration norm estimates, so
        the Taylor series converges fast. This scaling is a heuristic for speed only; soundness
        rests on :meth:`skew_norm_bound`, which is computed from the scaled filter itself.
        """
        a = self.raw_skew()
        # (u * v) first: a fresh tensor is saved for backward, not the buffers themselves, which
        # the next training forward's power iteration updates in place (two forwards before one
        # backward would otherwise fail with "modified by an inplace operation").
        sigmas = torch.stack([
            (a * (self.u1 * self.v1)).sum(), (a * (self.u2 * self.v2)).sum(),
            (a * (self.u3 * self.v3)).sum(), (a * (self.u4 * self.v4)).sum(),
        ])
        return a / sigmas.abs().min().clamp_min(1e-12)

    @property
    def terms(self) -> int:
        if not self.training:
            return self.eval_terms
        if self.train_terms == "auto":
            return len(self._train_poly[2]) if self._train_poly is not None else 0
        return self.train_terms

    @torch.no_grad()
    def train_polynomial(self, size: tuple[int, int]) -> tuple[float, ...]:
        """Monomial coefficients in A of the polynomial an ``train_terms="auto"`` layer trains with.

        Every :data:`TRAIN_BOUND_EVERY` training forwards (and on the first): ``a`` = the sound
        bound :func:`skew_conv_norm_bound` of the current scaled filter on this map size, times
        ``1 +`` :data:`TRAIN_BOUND_MARGIN`; then the Chebyshev expansion of exp on ``i[-a, a]``
        with the fewest terms whose error bound is below ``train_tol`` (the evaluation path's
        rule, :func:`choose_terms`), in monomial form. Between refreshes the weights drift by a
        few SGD steps; the margin absorbs that (training may use estimates; the certificate never
        does: it bounds what the evaluation forward applies)."""
        count = int(self.train_forwards)
        resized = self._train_poly is not None and self._train_poly[0] != size
        refresh = count % TRAIN_BOUND_EVERY == 0 or float(self.train_bound) == 0.0 or resized
        if refresh:
            with torch.autocast(self.weight.device.type, enabled=False):  # float64 under --amp too
                a = skew_conv_norm_bound(self.skew_filter(), size) * (1 + TRAIN_BOUND_MARGIN)
            self.train_bound.fill_(a)
        a = float(self.train_bound)  # a resumed (or reloaded) layer uses the stored bound until its next refresh
        if self._train_poly is None or self._train_poly[:2] != (size, a):
            terms = choose_terms(a, self.train_tol, "chebyshev")
            mono = chebyshev_to_monomial(chebyshev_coefficients(a, terms))
            self._train_poly = (size, a, tuple(m / a**j for j, m in enumerate(mono)))
        self.train_forwards.add_(1)
        return self._train_poly[2]

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        if self.channels > x.shape[1]:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        return x

    def _finish_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_channels < self.channels:
            y = y[:, : self.out_channels]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_mode == "fast":
            plan = self.eval_plan(tuple(x.shape[-2:]), x.device, x.dtype)
            return self._finish_output(plan.apply(self._prepare_input(x)))
        if self.training and self.update_iters > 0:
            self.power_iteration(self.update_iters)
        skew = self.skew_filter().to(x.dtype)
        x = self._prepare_input(x)
        poly = None
        if self.training and self.train_terms == "auto":
            poly = self.train_polynomial(tuple(x.shape[-2:]))
        if self.training and self.backward_mode == "fast" and torch.is_grad_enabled():
            h, w = x.shape[-2:]
            if self.train_dense and self.kernel_size > 1 and 2 * h * w <= self.kernel_size**2:
                # fewer multiply-adds as one matrix than as a padded convolution (1x1 and 2x2 maps
                # for 3x3 filters); the gradient reaches the filter through the matrix's entries
                a = dense_conv_matrix(skew, (h, w))
                flat = x.flatten(1)
                y = (_FastSOC.apply(flat, a, self.terms) if poly is None else _FastPoly.apply(flat, a, poly)).view(x.shape)
            else:
                y = _FastSOC.apply(x, skew, self.terms) if poly is None else _FastPoly.apply(x, skew, poly)
        elif poly is not None:
            y = polynomial_series(x, skew, poly)
        else:
            y = taylor_series(x, skew, self.terms)
        return self._finish_output(y)

    # ---- sound bounds -------------------------------------------------------------------------

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size for a spatial input size."""
        return strided_size(size, self.stride)

    @torch.no_grad()
    def skew_norm_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """A rigorous upper bound on ||conv_A||_2 for the scaled skew filter A used in evaluation
        (see :func:`skew_conv_norm_bound`), on this layer's feature map after space-to-depth."""
        size = None if input_size is None else self.output_size(input_size)
        return skew_conv_norm_bound(self.skew_filter().detach(), size)

    def lipschitz_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """Rigorous upper bound on the layer's l2 Lipschitz constant in evaluation mode.

        ``T_{K-1}(A) = exp(A) - R_K`` with ``||exp(A)|| = 1`` (A skew) and, by the integral form of
        the Taylor remainder with ``||exp(tA)|| = 1``, ``||R_K|| <= a^K / K!`` for any ``a >=
        ||A||``. Channel padding/slicing and space-to-depth do not increase the norm.
        """
        if self.eval_mode == "fast":
            if input_size is None:
                raise ConfigError("the fast evaluation path needs the layer's input size for its bound")
            return self.eval_plan(tuple(input_size), self.weight.device, self.weight.dtype).bound
        a = self.skew_norm_bound(input_size)
        return 1.0 + taylor_error(a, self.eval_terms)

    def evaluation_settings(self) -> tuple:
        """The settings that decide which function the evaluation forward computes (and so its
        bound): a certifier recomputes its bound when they change."""
        return (self.eval_mode, self.eval_tol, self.eval_terms, self.eval_images, self.dense_max)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    def decay_parameters(self):
        yield self.weight  # the reference recipe decays the SOC filters only

    def refresh(self, iters: int) -> None:
        self.power_iteration(iters)

    def set_evaluation(self, mode: str, *, tol: float | None = None, images: int | None = None,
                       dense_max: int | None = None) -> bool:
        if mode not in ("taylor", "fast"):
            raise ConfigError(f"eval mode must be 'taylor' or 'fast', got {mode!r}")
        self.eval_mode = mode
        if tol is not None:
            self.eval_tol = tol
        if images is not None:
            self.eval_images = images
        if dense_max is not None:
            self.dense_max = dense_max
        self._plan = self._plan_key = None
        return True

    @torch.no_grad()
    def bake(self, one_by_one: str = "matrix", **options) -> LipschitzLayer:
        """The evaluation forward as fixed tensors: a 1x1 layer as ONE matrix ``exp(A)`` (computed
        in float64 by ``torch.linalg.matrix_exp``, restricted to the channels read and kept) with
        ``one_by_one="matrix"``, otherwise the scaled skew filter and the ``eval_terms``-term Taylor
        series (the ``"taylor"`` path's own arithmetic, bit for bit)."""
        if one_by_one not in ("matrix", "taylor"):
            raise ConfigError(f"one_by_one must be 'matrix' or 'taylor', got {one_by_one!r}")
        bias = None if self.bias is None else self.bias.detach().clone()
        if self.kernel_size == 1 and one_by_one == "matrix":
            out = BakedMatrix(self.in_channels, self.out_channels, self.stride, bias is not None)
            a = self.skew_filter().detach()[:, :, 0, 0].to(torch.float64)
            q = torch.linalg.matrix_exp(a)[: self.out_channels, : self.in_channels_eff]
            out.weight = q.to(self.weight.dtype).contiguous()
        else:
            out = BakedSOC(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.channels,
                           self.eval_terms, bias is not None)
            out.skew = self.skew_filter().detach().clone()
        if bias is not None:
            out.bias = bias
        return out.to(self.weight.device).eval()

    @classmethod
    def examples(cls):
        return [(cls(4, 4, 3), (4, 5, 5)), (cls(2, 6, 3, stride=2), (2, 6, 6)), (cls(8, 4, 1), (8, 3, 3)),
                (cls(3, 5, 1, stride=2), (3, 4, 4)), (cls(4, 4, 3, backward="exact"), (4, 2, 2)),
                (cls(4, 4, 3, train_terms="auto"), (4, 5, 5))]

    def _plan_state(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict, power iteration) bump _version.
        return (self.weight._version, self.weight.data_ptr(), self.u1._version, self.u2._version,
                self.u3._version, self.u4._version)

    def _dense_fits(self, size: tuple[int, int], terms: int) -> bool:
        h, w = size
        n = self.channels * h * w
        dims = (self.out_channels * h * w, self.in_channels_eff * h * w)
        return n <= self.dense_max and dense_pays_off(size, self.channels, self.kernel_size, terms,
                                                      self.eval_images, dims)

    @torch.no_grad()
    def eval_plan(self, input_size: tuple[int, int], device, dtype) -> "_EvalPlan":
        """The cached input-independent part of the ``"fast"`` evaluation, with its sound bound.

        Built once per weights/size/device/dtype: the scaled skew filter S = A / a' with
        a' = a (1 + 1e-4) slightly above the sound bound a >= ||A|| (so that the rounded S still
        has norm <= 1), the Chebyshev coefficients of exp(a' S) of the lowest degree whose error
        bound is below ``eval_tol``, and for 1x1 filters the whole operator as one matrix. On small
        maps, where :func:`dense_pays_off` over ``eval_images`` images, the whole operator becomes
        one dense matrix Q (the same polynomial, evaluated in float64 on the dense skew matrix,
        then rounded to ``dtype``). A materialised operator's bound is the exact float64 norm of
        the rounded matrix that is applied, not the polynomial's error bound.
        """
        key = (self._plan_state(), tuple(input_size), str(device), dtype, self.eval_images, self.dense_max)
        if self._plan is not None and self._plan_key == key:
            return self._plan
        size = self.output_size(input_size)
        skew = self.skew_filter().detach()
        a = skew_conv_norm_bound(skew, size)
        a_used = a * (1 + 1e-4)
        s_filter = (skew / a_used).to(device=device, dtype=dtype)
        # ||S|| <= a / a' + ||fl(A/a') - A/a'||, the rounding term bounded tap by tap (Frobenius).
        unit = torch.finfo(dtype).eps
        rounding = unit * float(s_filter.double().square().sum(dim=(0, 1)).sqrt().sum())
        if a / a_used + rounding > 1.0:
            raise ArithmeticError("rounding pushed the scaled skew filter outside the unit ball")
        terms = choose_terms(a_used, self.eval_tol, "chebyshev")
        # The coefficients as applied: float32 scalars in a float32 forward. They are rounded to
        # the weights' precision here, once, so that a float64 evaluation of this model (the
        # float64 re-check of a certificate) applies the very same polynomial, and the bound
        # adds sum_k |c_k - fl(c_k)| (||U_k(S)|| <= 1).
        exact = chebyshev_coefficients(a_used, terms)
        coeffs = [float(torch.tensor(c, dtype=self.weight.dtype)) for c in exact]
        coeff_rounding = sum(abs(c - r) for c, r in zip(exact, coeffs))
        # A materialised operator is rounded to the weights' precision before it is cast to the
        # evaluation dtype: float32 and float64 evaluations then apply the same matrix.
        stored = self.weight.dtype
        if self.kernel_size == 1:
            s64 = s_filter.double()[:, :, 0, 0]
            eye = torch.eye(self.channels, dtype=torch.float64, device=device)
            q64 = chebyshev_apply(eye, lambda v: s64 @ v, coeffs)
            q = q64[: self.out_channels].to(stored).to(dtype)  # rows kept: channel slicing folded in
            if self.channels > self.in_channels_eff:  # zero-padded input channels never used
                q = q[:, : self.in_channels_eff]
            plan = _EvalPlan("matrix", q.contiguous(), None, matrix_norm_bound(q.double()), terms)
        elif self._dense_fits(size, terms):
            # the same polynomial as the Chebyshev path, on the dense matrix, in few products
            q64 = paterson_stockmeyer(dense_conv_matrix(s_filter.double(), size), chebyshev_to_monomial(coeffs))
            h, w = size
            # rows of kept output channels, columns of real input channels (channel-major order)
            q = q64[: self.out_channels * h * w, : self.in_channels_eff * h * w].to(stored).to(dtype).contiguous()
            del q64
            plan = _EvalPlan("dense", q, None, matrix_norm_bound(q.double()), terms,
                             out_shape=(self.out_channels, h, w))
        else:
            bound = 1.0 + chebyshev_error(a_used, terms) + coeff_rounding
            plan = _EvalPlan("chebyshev", s_filter.contiguous(), coeffs, bound, terms,
                             doubled=(2 * s_filter).contiguous())
        self._plan, self._plan_key = plan, key
        return plan


# ---- baked forms: fixed tensors, bounded from the tensors they apply ----------------------------


@register_layer("soc_baked", kind="baked", bound="1 + a^K/K!, a from the float64 DFT-block eigenvalues of the "
                                                 "stored skew filter on the real map size (refused unless exactly skew)")
class BakedSOC(LipschitzLayer):
    """A SOC with a fixed, already scaled skew filter: ``y = T_{K-1}(conv_A)(pad(s2d(x)))[:out] + b``.

    The forward is the training layer's ``"taylor"`` evaluation forward (same Horner series, same
    filter bits), so it reproduces the original's outputs exactly.
    """

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 channels: int, terms: int, bias: bool) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or stride not in (1, 2) or terms < 2:
            raise ConfigError(f"invalid baked SOC: kernel {kernel_size}, stride {stride}, terms {terms}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.channels, self.terms = kernel_size, stride, channels, terms
        self.register_buffer("skew", torch.zeros(channels, channels, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "channels": self.channels,
                "terms": self.terms, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, terms={self.terms}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        if self.channels > x.shape[1]:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        y = taylor_series(x, self.skew.to(x.dtype), self.terms)
        if self.out_channels < self.channels:
            y = y[:, : self.out_channels]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return y

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return strided_size(size, self.stride)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """``1 + a^K/K!`` with ``a`` a rigorous bound on ||conv_A|| (as for the training SOC).

        That bound needs ``exp(conv_A)`` orthogonal, i.e. A exactly skew. The training layer's
        ``(W - W^T)/2`` is exactly skew in floating point (negation is exact), so a genuine bake
        passes this check bit for bit; a file edited by hand may not, and is refused.
        """
        if not torch.equal(self.skew, -transpose_filter(self.skew)):
            raise NotLipschitzError("a baked SOC filter is not exactly skew-symmetric; its weights were "
                                    "altered after baking, and lipcert cannot bound it")
        size = None if input_size is None else self.output_size(input_size)
        a = skew_conv_norm_bound(self.skew, size)
        return 1.0 + a**self.terms / math.factorial(self.terms)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Space-to-depth, channel padding, Horner's ``x + conv(y)/i``, slice, bias."""
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        if self.stride > 1:
            x, c, h, w = g.pixel_unshuffle(x, c, h, w, self.stride)
        if self.channels < c:
            raise ExportError(f"layer {g.scope!r}: {c} input channels for a {self.channels}-channel SOC")
        if self.channels > c:
            x = g.op("Pad", x, g.i64([0, 0, 0, 0, 0, self.channels - c, 0, 0]))
        k, skew = self.kernel_size, g.tensor(prefix + "skew")
        p = k // 2
        y = x
        for i in range(self.terms - 1, 0, -1):
            conv = g.op("Conv", y, skew, kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1],
                        group=1)
            y = g.op("Add", x, g.op("Div", conv, g.f32(i)))
        c = self.channels
        if self.out_channels < c:
            y, c = g.channel_slice(y, 0, self.out_channels), self.out_channels
        if self.bias is not None:
            y = g.op("Add", y, g.per_channel(prefix + "bias"))
        return y, c, h, w

    @classmethod
    def examples(cls):
        return [(SOC(4, 4, 3).bake(), (4, 5, 5)), (SOC(2, 6, 3, stride=2).bake(), (2, 4, 4)),
                (SOC(6, 3, 1).bake(one_by_one="taylor"), (6, 2, 2))]


@register_layer("soc_matrix", kind="baked", bound="float64 spectral norm of the stored matrix (Gram eigvalsh + "
                                                  "rounding); space-to-depth is a permutation")
class BakedMatrix(LipschitzLayer):
    """A 1x1 SOC as one matrix: ``y = Q s2d(x) + b`` with ``Q = exp(A)[:out, :in*s^2]``.

    Channel zero-padding of the input only meets the first ``in*s^2`` columns of exp(A) and the
    slice keeps its first ``out`` rows, so Q is the whole layer. Q is a block of an orthogonal
    matrix, but the stored float32 Q is not exactly that: the bound is its own spectral norm.
    """

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"invalid baked matrix layer: stride {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.register_buffer("weight", torch.zeros(out_channels, in_channels * stride * stride))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "stride": self.stride, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        w = self.weight.to(x.dtype)[:, :, None, None]
        return F.conv2d(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return strided_size(size, self.stride)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """Exact float64 spectral norm of the stored matrix plus rounding slack (a 1x1 conv on any
        map has the matrix's norm; space-to-depth is a permutation)."""
        return matrix_norm_bound(self.weight.detach().to(torch.float64))

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        """Space-to-depth, then one 1x1 convolution by the stored matrix."""
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        if self.stride > 1:
            x, c, h, w = g.pixel_unshuffle(x, c, h, w, self.stride)
        weight = g.op("Unsqueeze", g.tensor(prefix + "weight"), g.i64([2, 3]))
        inputs = [x, weight] + ([g.tensor(prefix + "bias")] if self.bias is not None else [])
        y = g.op("Conv", *inputs, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1)
        return y, self.out_channels, h, w

    @classmethod
    def examples(cls):
        return [(SOC(8, 4, 1).bake(), (8, 3, 3)), (SOC(3, 5, 1, stride=2).bake(), (3, 4, 4))]
