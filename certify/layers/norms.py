"""Sound norm bounds, shared by every layer: float64 upper bounds on l2 operator norms, with
their rounding accounted for.

- :func:`matrix_norm_bound`: a dense matrix, by the float64 Gram matrix's largest eigenvalue
  (``eigvalsh``) plus the Gram product's worst-case rounding error and relative slack.
- :func:`skew_conv_norm_bound`: the zero-padded "same" convolution by a skew-symmetric filter (SOC),
  by the eigenvalues of the filter's DFT blocks on a circular embedding.
- :func:`linear_norm_bound`: a dense (out, in) layer, :func:`matrix_norm_bound` of its weight.
- :func:`conv_norm_bound`: any zero-padded conv2d (stride, dilation, groups, channel change,
  rectangular kernels), by space-to-depth and the largest DFT block norm on a circular embedding.
- :func:`conv_norm_lower`: the same norm from below by power iteration, for tests and reports only.

A bound here is never an estimate: power iteration (a lower estimate) may steer training, never a
certificate.
"""

from __future__ import annotations

import math
import operator

import torch

from ..errors import ConfigError, NotLipschitzError

# Relative slack added to every float64 norm computation, far above its rounding error (about
# 1e-13 for the sizes used here), so that a bound stays an upper bound after rounding.
FLOAT64_SLACK = 1e-9


def matrix_norm_bound(a: torch.Tensor) -> float:
    """Upper bound on the spectral norm of a real float64 matrix: sqrt(lambda_max) of the smaller
    Gram matrix, plus the worst-case rounding error of the Gram product (n eps ||A||_F^2 for an
    inner dimension n) and relative slack."""
    if a.shape[0] < a.shape[1]:
        a = a.T  # same norm; the Gram matrix below is then the smaller one
    gram = a.T @ a
    n = a.shape[0]
    rounding = n * torch.finfo(torch.float64).eps * float(a.square().sum())
    lam = float(torch.linalg.eigvalsh(gram)[-1]) + rounding
    return math.sqrt(max(lam, 0.0)) * (1 + FLOAT64_SLACK)


@torch.no_grad()
def skew_conv_norm_bound(skew: torch.Tensor, size: tuple[int, int] | None = None) -> float:
    """A rigorous upper bound on the l2 operator norm of the zero-padded "same" convolution by
    the skew filter ``skew`` (M, M, k, k) on an (h, w) = ``size`` feature map.

    The zero-padded convolution on an h x w map is a compression of the circular convolution on
    an (h + k//2) x (w + k//2) map (the smallest size at which no wrapped-around tap reaches a
    pixel of the embedded h x w map), whose norm is exactly the largest spectral norm of the
    filter's 2-D DFT blocks (one M x M matrix per frequency). Those blocks are skew-Hermitian, so
    their norm is the largest |eigenvalue| of a Hermitian matrix (``eigvalsh``), plus the Frobenius
    norm of any rounding asymmetry (Weyl). A 1x1 filter is a plain matrix. Without a size, the
    triangle inequality over the taps gives a size-free bound. All in float64, then inflated by
    :data:`FLOAT64_SLACK`.
    """
    a = skew.detach().to(torch.float64)
    m, k = a.shape[0], a.shape[-1]
    if k == 1:
        return matrix_norm_bound(a[:, :, 0, 0])
    if size is None:
        taps = a.permute(2, 3, 0, 1).reshape(k * k, m, m)
        return float(torch.linalg.matrix_norm(taps, ord=2).sum()) * (1 + FLOAT64_SLACK)
    h, w = size
    n_h, n_w = max(h + k // 2, k), max(w + k // 2, k)  # any size >= h + k//2 works
    # Centre tap at index 0 so that each DFT block is exactly skew-Hermitian (a phase factor
    # would not change the norm but would break the Hermitian computation). Blocks at -omega
    # are the conjugates of those at omega, with the same norm, so rfft2's half suffices.
    padded = torch.zeros(m, m, n_h, n_w, dtype=a.dtype, device=a.device)
    padded[:, :, :k, :k] = a
    padded = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(2, 3))
    spec = torch.fft.rfft2(padded)  # (M, M, N, N // 2 + 1) complex128
    mats = spec.permute(2, 3, 0, 1).reshape(-1, m, m)
    herm = 1j * mats
    sym = 0.5 * (herm + herm.conj().transpose(-1, -2))
    asym = 0.5 * (herm - herm.conj().transpose(-1, -2))
    # Weyl: ||herm|| <= ||sym|| + ||asym||_F; asym is rounding noise only.
    eig = torch.linalg.eigvalsh(sym).abs().amax(dim=-1)
    extra = torch.linalg.matrix_norm(asym, ord="fro")
    return float((eig + extra).max()) * (1 + FLOAT64_SLACK)


# ---- General convolutions ----------------------------------------------------------------------

_EPS64 = torch.finfo(torch.float64).eps
# Frequencies per chunk of conv_norm_bound: for 512 x 512 channels a chunk's DFT blocks and Gram
# matrices take 64 MiB each, whatever the map size.
_FREQ_CHUNK = 16


def linear_norm_bound(weight: torch.Tensor) -> float:
    """Upper bound on the l2 operator norm of a dense layer ``x @ weight.T`` ((out, in) weight):
    :func:`matrix_norm_bound` of the float64 weight."""
    if weight.dim() != 2:
        raise ConfigError(f"a dense layer's weight must be (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise NotLipschitzError("the dense layer's weight has non-finite entries")
    return matrix_norm_bound(w)


def _pair(value, name: str) -> tuple[int, int]:
    try:
        pair = (value, value) if isinstance(value, int) else tuple(value)
        if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
            raise TypeError
        return tuple(operator.index(v) for v in pair)
    except TypeError:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def _conv_geometry(weight, input_size, stride, padding, dilation, groups):
    """Validate a conv2d configuration; per axis (h, w): size, kernel, stride, dilation, padding
    (low, high), output size."""
    if weight.dim() != 4:
        raise ConfigError(f"a conv weight must be (C_out, C_in/groups, kh, kw), got {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ConfigError(f"groups={groups!r} must be a positive divisor of C_out={weight.shape[0]}")
    if min(weight.shape) < 1:
        raise ConfigError(f"a conv weight must have no empty dimension, got {tuple(weight.shape)}")
    size, stride, dilation = _pair(input_size, "input_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    kernel = tuple(weight.shape[2:])
    if min(size) < 1 or min(stride) < 1 or min(dilation) < 1:
        raise ConfigError(f"input_size, stride and dilation must be positive, got {size}, {stride}, {dilation}")
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))  # the dilated kernel's extent
    if padding is None:
        if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
            raise ConfigError(f"padding=None means 'same' for odd kernels only, got kernel {kernel}")
        pads = tuple((d * (k // 2),) * 2 for d, k in zip(dilation, kernel))
    elif padding == "valid":
        pads = ((0, 0), (0, 0))
    elif padding == "same":
        if stride != (1, 1):
            raise ConfigError("padding='same' needs stride 1 (as in torch.nn.functional.conv2d)")
        # conv2d's rule: total d (k - 1), the odd one on the high side.
        pads = tuple(((s - 1) // 2, (s - 1) - (s - 1) // 2) for s in span)
    elif isinstance(padding, str):
        raise ConfigError(f"padding must be an int, a pair, None, 'same' or 'valid', got {padding!r}")
    else:
        pads = tuple((p, p) for p in _pair(padding, "padding"))
        if min(pads[0] + pads[1]) < 0:
            raise ConfigError(f"padding must be non-negative, got {padding!r}")
    out = tuple((n + lo + hi - e) // s + 1 for n, (lo, hi), e, s in zip(size, pads, span, stride))
    if min(n + lo + hi - e for n, (lo, hi), e in zip(size, pads, span)) < 0:
        raise ConfigError(f"the kernel (extent {span}) is larger than the padded input {size} + {pads}")
    return size, kernel, stride, dilation, pads, out


def _reaching_taps(n, pad, stride, span, out):
    """Mask of the dilated kernel's taps (one axis) that reach an image pixel for some output:
    tap a meets padded index s i + a, i < out, and the image is the padded rows [lo, lo + n)."""
    i = torch.arange(out).unsqueeze(1) * stride + torch.arange(span)  # (out, span)
    return ((i >= pad[0]) & (i < pad[0] + n)).any(dim=0)


def _polyphase_filter(w, kernel, stride, dilation, reach):
    """The stride-1 filter of the space-to-depth form: (G, C_out/G, C_in/G * sh * sw, qh, qw) with
    q = ceil(extent / s) taps per axis, tap (q, r) of phase r being the dilated filter's tap s q + r.
    Taps that only ever meet zero padding (not in ``reach``) are dropped: they never contribute."""
    g, co, ci = w.shape[:3]
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    taps = [-(-e // s) for e, s in zip(span, stride)]
    full = w.new_zeros(g, co, ci, taps[0] * stride[0], taps[1] * stride[1])
    full[..., : span[0] : dilation[0], : span[1] : dilation[1]] = w  # a dilated filter has zeros
    full[..., : span[0], : span[1]] *= (reach[0].unsqueeze(1) & reach[1]).to(w.dtype)
    full = full.view(g, co, ci, taps[0], stride[0], taps[1], stride[1])
    return full.permute(0, 1, 2, 4, 6, 3, 5).reshape(g, co, ci * stride[0] * stride[1], *taps)


def _circular_size(n, pad, stride, out, taps):
    """Smallest circular grid (in space-to-depth coordinates) on which the valid stride-1
    correlation with ``taps`` taps agrees with the circular one for every input supported on
    the image rows [lo, hi): the image fits (hi), the outputs are distinct (out), the filter does
    not alias (taps), and every wrapped-around index lands below the image (touched - lo)."""
    lo = pad[0] // stride
    hi = (pad[0] + n - 1) // stride + 1
    touched = out + taps - 1
    return max(hi, touched - lo, out, taps)


@torch.no_grad()
def conv_norm_bound(weight: torch.Tensor, input_size, *, stride=1, padding=None, dilation=1,
                    groups: int = 1) -> float:
    """A rigorous float64 upper bound on the l2 operator norm of
    ``conv2d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)`` on
    inputs of spatial size ``input_size`` = (h, w), with zero padding.

    Algorithm. (1) Dilation: a dilated filter is a larger filter with zeros. (2) Stride s, by
    space-to-depth (polyphase): on the zero-padded input (zero-extended to a multiple of s), a
    stride-s conv equals a stride-1 conv of ``pixel_unshuffle(x_padded)`` (C_in s_h s_w channels) by the rearranged filter with ceil(extent/s)
    taps per axis; pixel_unshuffle only permutes pixels, so the norms are equal, and a
    non-overlapping strided conv becomes a single matrix (tight). (3) That valid stride-1 conv is
    a compression of the circular convolution on an N_h x N_w grid (:func:`_circular_size`, no
    wrap-around reaches an output that matters), whose norm is exactly the largest spectral norm
    of the filter's per-frequency C_out x C_in DFT blocks. (4) Groups: the max over groups (the
    map is block-diagonal). Taps that only ever meet zero padding (a kernel nearly as large as the
    map) are dropped first; they never contribute.

    Tightness (measured against the dense Jacobian on 5x5 to 8x8 maps): exact for 1x1 and
    non-overlapping strided convs, within 1.3x where the kernel's extent is at most 0.6 of the map
    (median 1.02), looser (up to 2.5x) for kernels about as large as the map, where few outputs
    share the taps that the circular embedding lets interfere.

    Rounding, each step an upper bound. The DFT blocks B are computed directly (a float64 matmul
    of the K taps against twiddle factors, chunked over frequencies so memory stays bounded): each
    twiddle factor exp(-2 pi i m / (N_h N_w)) comes from an exact integer m, so its error is a few
    eps (bounded by 64 eps), and the K-term sums add at most 2 (K + 2) eps sum|w| (real and
    imaginary parts are separate real dot products), so each entry is off by at most
    (2 K + 80) eps sum_taps |w| and the block by at most the Frobenius norm E of those bounds
    (||B|| <= ||B~|| + E). ||B~||^2 <= the largest eigenvalue (``eigvalsh``) of the smaller
    computed Gram matrix plus its worst-case rounding, 4 (n + 2) eps ||B~||_F^2 for an inner
    dimension n (complex products, as :func:`matrix_norm_bound`). eigvalsh's own error, a small
    multiple of n eps ||Gram||, and the final sqrt are covered by :data:`FLOAT64_SLACK`.
    """
    size, kernel, stride, dilation, pads, out = _conv_geometry(weight, input_size, stride, padding,
                                                               dilation, groups)
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise NotLipschitzError("the conv weight has non-finite entries")
    w = w.view(groups, w.shape[0] // groups, *w.shape[1:])
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    reach = [_reaching_taps(*a).to(w.device) for a in zip(size, pads, stride, span, out)]
    poly = _polyphase_filter(w, kernel, stride, dilation, reach)  # (G, Co, Ci', qh, qw)
    g, co, ci, th, tw = poly.shape
    n_h, n_w = (_circular_size(*a) for a in zip(size, pads, stride, out, (th, tw)))
    taps = th * tw
    flat = poly.reshape(g * co * ci, taps)

    # Each block entry's DFT error bound, frequency-independent; E = its Frobenius norm per group.
    entry_err = (2 * taps + 80) * _EPS64 * flat.abs().sum(dim=1)
    dft_err = entry_err.view(g, co * ci).square().sum(dim=1).sqrt()  # (G,)

    # Real filters: the block at -omega is the conjugate of the one at omega (same norm), so half
    # of the w-frequencies suffice.
    fh = torch.arange(n_h, dtype=torch.int64, device=w.device)
    fw = torch.arange(n_w // 2 + 1, dtype=torch.int64, device=w.device)
    freqs = torch.stack(torch.meshgrid(fh, fw, indexing="ij"), dim=-1).reshape(-1, 2)  # (F, 2)
    qh = torch.arange(th, dtype=torch.int64, device=w.device).repeat_interleave(tw)
    qw = torch.arange(tw, dtype=torch.int64, device=w.device).repeat(th)
    n_sum = max(co, ci)  # the smaller Gram matrix's inner dimension
    best = torch.zeros(g, dtype=torch.float64, device=w.device)
    for start in range(0, freqs.shape[0], _FREQ_CHUNK):
        f = freqs[start : start + _FREQ_CHUNK]
        # m / (N_h N_w) = (kh qh / N_h + kw qw / N_w) mod 1, as an exact integer.
        m = (((f[:, :1] * qh) % n_h) * n_w + ((f[:, 1:] * qw) % n_w) * n_h) % (n_h * n_w)  # (chunk, K)
        angle = (2 * math.pi / (n_h * n_w)) * m.to(torch.float64)
        re = flat @ torch.cos(angle).T  # (G Co Ci, chunk)
        im = flat @ (-torch.sin(angle)).T
        blocks = torch.complex(re, im).view(g, co, ci, -1).permute(3, 0, 1, 2)  # (chunk, G, Co, Ci)
        gram = blocks.mH @ blocks if ci <= co else blocks @ blocks.mH  # (chunk, G, inner, inner)
        fro2 = blocks.abs().square().sum(dim=(-2, -1))
        lam = torch.linalg.eigvalsh(gram)[..., -1] + 4 * (n_sum + 2) * _EPS64 * fro2
        block_norm = lam.clamp_min(0.0).sqrt() + dft_err
        best = torch.maximum(best, block_norm.amax(dim=0))
    return float(best.max()) * (1 + FLOAT64_SLACK)


def conv_norm_lower(weight: torch.Tensor, input_size, *, stride=1, padding=None, dilation=1,
                    groups: int = 1, iters: int = 500, seed: int = 0) -> float:
    """A LOWER estimate of the same operator norm as :func:`conv_norm_bound`, by float64 power
    iteration on A^T A (the adjoint by autograd): ||A x|| for a unit x, never above the norm but
    for rounding. For tests and reports only, never for a certificate."""
    size, kernel, stride, dilation, pads, out = _conv_geometry(weight, input_size, stride, padding,
                                                               dilation, groups)
    w = weight.detach().to(torch.float64)
    c_in = w.shape[1] * groups
    (lo_h, hi_h), (lo_w, hi_w) = pads

    def conv(x):
        x = torch.nn.functional.pad(x, (lo_w, hi_w, lo_h, hi_h))
        return torch.nn.functional.conv2d(x, w, stride=stride, dilation=dilation, groups=groups)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, c_in, *size, generator=gen, dtype=torch.float64).to(w.device)
    x = x / x.norm()
    with torch.enable_grad():  # the adjoint comes from autograd, even when called under no_grad
        for _ in range(iters):
            x.requires_grad_(True)
            y = conv(x)
            (grad,) = torch.autograd.grad(y, x, grad_outputs=y)  # A^T A x
            norm = grad.norm()
            if norm == 0:
                return 0.0
            x = (grad / norm).detach()
    with torch.no_grad():
        return float(conv(x).norm())
