"""Block reflector orthogonal (BRO) layers.

Lai, Huang, Hsu, Tsai et al., "Enhancing Certified Robustness via Block Reflector Orthogonal
Layers and Logit Annealing Loss", ICML 2025 (BRONet). A block reflector W = I - 2 V (V^H V)^-1 V^H
(V a c x m matrix of rank m < c) is unitary and Hermitian: it is -I on the range of V and I on its
orthogonal complement (the paper's BRO definition). The convolution applies one per rfft2 frequency of the map,
V(f) the DFT of a c x m x k x k filter, through the FFT machinery of :mod:`certify.layers.cayley`
(no iterative solver, no series); the dense layer applies one real reflector.

Regularisation as the authors' code: V^H V + eps d I with d the mean of V^H V's diagonal (per
frequency) and a relative eps (1e-5, their BRO layer's). The applied matrix then has eigenvalues
1 - 2 s^2 / (s^2 + eps d) in (-1, 1] (s the singular values of V): slightly contractive, never
expansive. At full rank m = c the reflector is -I whatever V is, so ``rank`` must be below c.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .cayley import FFTOrthogonalConv, OrthogonalDense, kernel_spectrum
from .registry import register_layer

REFERENCE = ("Lai, Huang, Hsu, Tsai et al., Enhancing Certified Robustness via Block Reflector Orthogonal Layers "
             "and Logit Annealing Loss, ICML 2025")
#: the relative regularisation of V^H V in the authors' BRO layer
EPS = 1e-5
PADDINGS = ("circular", "zero")


def block_reflector(v: torch.Tensor, eps: float) -> torch.Tensor:
    """I - 2 V (V^H V + eps d I)^-1 V^H for a (batch of) c x m V, d = mean diag(V^H V) (plus the
    dtype's smallest normal number, so that V = 0 gives I rather than a singular solve)."""
    c, m = v.shape[-2:]
    gram = v.mH @ v
    d = gram.diagonal(dim1=-2, dim2=-1).real.mean(dim=-1)
    reg = eps * d + torch.finfo(d.dtype).tiny
    gram = gram + reg[..., None, None] * torch.eye(m, dtype=v.dtype, device=v.device)
    return torch.eye(c, dtype=v.dtype, device=v.device) - 2 * v @ torch.linalg.solve(gram, v.mH)


def _rank(rank, channels: int) -> int:
    if channels < 2:
        raise ConfigError("a BRO layer needs at least 2 channels (a rank-m reflector with 0 < m < c)")
    if rank is None:
        return channels // 2  # the authors' weight_rank_ratio 0.5
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < channels:
        raise ConfigError(f"BRO rank must be an int in [1, {channels - 1}] for {channels} channels "
                          f"(at rank {channels} the reflector is -I), got {rank!r}")
    return rank


def _eps(eps) -> float:
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise ConfigError(f"BRO eps must be a number in [0, 1), got {eps!r}")
    return float(eps)


@register_layer("bro", kind="convolution", reference=REFERENCE,
                bound="largest float64 spectral norm of the per-frequency block reflectors the forward applies on the "
                      "real (padded) map size (Gram eigvalsh + rounding) x (1 + float32 FFT rounding allowance); 1x1: "
                      "the float64 norm of its matrix")
class BROConv2d(FFTOrthogonalConv):
    """BRO convolution (Lai et al., ICML 2025, the block reflector per frequency): per rfft2 frequency f,
    W(f) = I - 2 V(f) (V(f)^H V(f) + eps d(f) I)^-1 V(f)^H, V(f) the DFT (c x m) of a centred
    c x m x k x k filter, c = max(in s^2, out), m = ``rank`` (default c // 2, the authors' ratio
    0.5; 1 <= m < c). Applied as rfft2 -> per-frequency product -> irfft2, the input's channels
    zero-padded to c, the output's sliced (W[:out, :in s^2]); ``stride=2``: ``pixel_unshuffle``
    first, as the authors' code.

    ``padding="circular"`` (default): a circular convolution on the map, orthogonal (eps = 0) or
    slightly contractive (eps > 0). ``padding="zero"``: the authors' LipConvnet layer: k // 2 zero
    rows/columns on each side, the circular convolution on that larger grid, the output cropped
    back (a compression of an orthogonal map: 1-Lipschitz, not orthogonal; the circular
    wrap-around then only meets zeros at the border).

    Evaluation caches, per map size, the matrices computed in float64 and rounded to the weights'
    dtype. Bound (:meth:`lipschitz_bound`): max_f ||W(f)||_2 of those rounded matrices in float64,
    times 1 + rho for the float32 FFTs (:func:`~certify.layers.cayley.fft_rounding`); a 1x1 filter
    is one real matrix (no FFT).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, stride: int = 1,
                 rank: int | None = None, eps: float = EPS, padding: str = "circular", input_size=None) -> None:
        if padding not in PADDINGS:
            raise ConfigError(f"BRO padding must be one of {PADDINGS}, got {padding!r}")
        pad = kernel_size // 2 if padding == "zero" and isinstance(kernel_size, int) else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, pad=pad, input_size=input_size)
        self.padding, self.eps = padding, _eps(eps)
        self.rank = _rank(rank, self.channels)
        bound = 1.0 / math.sqrt(self.rank * kernel_size * kernel_size)
        self.weight = nn.Parameter(torch.empty(self.channels, self.rank, kernel_size, kernel_size).uniform_(-bound, bound))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"rank={self.rank}, eps={self.eps:g}, padding={self.padding}, bias={self.bias is not None}")

    def full_matrices(self, grid, dtype):
        v = self.weight.to(dtype)
        if self.kernel_size == 1:
            return block_reflector(v[:, :, 0, 0], self.eps)
        return block_reflector(kernel_spectrum(v, grid), self.eps)

    @classmethod
    def examples(cls):
        # input_size: the size bake() uses (the suite bakes some examples before any forward)
        return [(cls(4, 4, 3, input_size=6), (4, 6, 6)), (cls(5, 3, 3, padding="zero", input_size=5), (5, 5, 5)),
                (cls(2, 4, 3, stride=2, rank=3, input_size=4), (2, 4, 4)), (cls(6, 6, 1, rank=5), (6, 3, 3)),
                (cls(4, 6, 3, bias=False, eps=0.0, input_size=(4, 5)), (4, 4, 5))]


@register_layer("bro_dense", kind="dense", reference=REFERENCE,
                bound="float64 spectral norm of the applied block reflector I - 2V(V^T V + eps d I)^-1 V^T [:out, :in] "
                      "(Gram eigvalsh + rounding)")
class BROLinear(OrthogonalDense):
    """BRO dense layer (Lai et al., ICML 2025, the block reflector): W = I - 2 V (V^T V + eps d I)^-1 V^T with V
    c x m (c = max(in, out), m = ``rank``, default c // 2 as the authors' BROLinear; 1 <= m < c),
    sliced to W[:out, :in]. Input (N, in) (a 4-D input is flattened). Bound: the float64 norm of
    the applied float32 matrix (:func:`~certify.layers.norms.linear_norm_bound`), at most 1 plus
    rounding."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int | None = None,
                 eps: float = EPS) -> None:
        super().__init__(in_features, out_features, bias)
        self.eps = _eps(eps)
        self.rank = _rank(rank, self.channels)
        self.weight = nn.Parameter(torch.randn(self.channels, self.rank) / math.sqrt(self.channels))

    def full_matrix(self, dtype):
        return block_reflector(self.weight.to(dtype), self.eps)

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(7, 4, rank=2), (7,)), (cls(3, 5, bias=False, eps=0.0), (3,))]
