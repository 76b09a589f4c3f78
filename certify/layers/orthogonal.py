"""Orthogonal dense layers: a free weight mapped to a (nearly) orthogonal matrix in every
training forward.

- :class:`BjorckLinear` (``bjorck``): Björck & Bowie's iteration ``W <- 1.5 W - 0.5 W W^T W``
  (order 1), as used by Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation",
  ICML 2019, after scaling ``W`` by an upper bound on its norm.
- :class:`CholeskyLinear` (``cholesky``): CHORD, Hu, Leino, Wang & Fredrikson, "A Recipe for
  Improved Certifiable Robustness", ICLR 2024: ``W = L^-1 X`` with ``L L^T = X X^T + eps I``
  (Cholesky), ``eps = 1e-3 mean(diag(X X^T))`` as the authors' code.

Neither is exactly orthogonal: unconverged Björck steps leave singular values below 1 (and
rounding, or a scale below the norm, can leave them above), CHORD's epsilon shrinks them to
``sqrt(1 - eps / (lambda + eps))``. So the certificate never assumes 1: it is
:func:`~certify.layers.norms.linear_norm_bound` (exact float64 spectral norm with rounding slack)
of the float32 matrix the forward applies, and each layer bakes to that matrix
(:class:`~certify.layers.linear.BakedLinear`).

The matrix depends on the weight only: the evaluation forward computes it once per weight version
(an in-place optimiser step or ``load_state_dict`` changes it) and reuses it, and the bound is
taken of that very tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NotLipschitzError
from .linear import BakedLinear
from .norms import linear_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer


class _OrthogonalLinear(LipschitzLayer):
    """``x @ M(weight).T + bias`` on (N, features) inputs, ``M`` the subclass's :meth:`_matrix`."""

    is_linear = True

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"a dense layer needs positive sizes, got {in_features} -> {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)
        self._cache: tuple | None = None

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _settings(self) -> tuple:
        return ()

    def eval_matrix(self) -> torch.Tensor:
        """The matrix the evaluation forward applies, computed once per weight version."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device, self.weight.dtype, self._settings())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                # contiguous: the same matmul kernel as the baked copy (bit-equal outputs)
                self._cache = (key, self._matrix(self.weight).detach().contiguous())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._matrix(self.weight) if self.training else self.eval_matrix()
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), m.to(x.dtype), b)

    def output_channels(self, channels: int) -> int:
        return self.out_features

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return linear_norm_bound(self.eval_matrix())

    def decay_parameters(self):
        yield self.weight

    @torch.no_grad()
    def bake(self, **options) -> LipschitzLayer:
        return BakedLinear.of(self.eval_matrix(), None if self.bias is None else self.bias)


def _norm_scale(w: torch.Tensor) -> torch.Tensor:
    """An upper bound on ||w||_2 (the smaller of the Frobenius norm and sqrt(||w||_1 ||w||_inf)),
    so that the scaled matrix starts with singular values <= 1 (where order-1 Björck steps stay)."""
    fro = w.norm()
    holder = (w.abs().sum(dim=0).max() * w.abs().sum(dim=1).max()).sqrt()
    return torch.minimum(fro, holder).clamp_min(1e-12)


@register_layer("bjorck", kind="dense",
                reference="Anil, Lucas & Grosse, Sorting out Lipschitz function approximation, ICML 2019 "
                          "(Björck & Bowie orthonormalisation)",
                bound="float64 spectral norm (linear_norm_bound) of the matrix after the Björck steps, as applied")
class BjorckLinear(_OrthogonalLinear):
    """Dense layer with a Björck-orthonormalised weight: ``W_0 = W / c`` with ``c >= ||W||``
    (:func:`_norm_scale`), then ``iters`` steps ``W_{k+1} = 1.5 W_k - 0.5 W_k W_k^T W_k``, which
    move every singular value in (0, 1] towards 1 (quadratically near 1). Plain autograd through
    the steps. Bound: ``linear_norm_bound(W_iters)`` of the float32 matrix applied."""

    def __init__(self, in_features: int, out_features: int, iters: int = 20, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        if iters < 0:
            raise ConfigError(f"Björck iterations must be >= 0, got {iters}")
        self.iters = int(iters)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, iters={self.iters}, bias={self.bias is not None}"

    def _settings(self) -> tuple:
        return (self.iters,)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        w = w / _norm_scale(w)
        tall = w.shape[0] >= w.shape[1]  # the smaller Gram product
        for _ in range(self.iters):
            w = 1.5 * w - 0.5 * (w @ (w.T @ w) if tall else (w @ w.T) @ w)
        return w

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "iters": self.iters,
                "bias": self.bias is not None}

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(8, 3, iters=5), (8,)), (cls(3, 7, iters=2, bias=False), (3,))]


@register_layer("cholesky", kind="dense",
                reference="Hu, Leino, Wang & Fredrikson, A Recipe for Improved Certifiable Robustness, ICLR 2024 "
                          "(CHORD)",
                bound="float64 spectral norm (linear_norm_bound) of L^-1 X as applied")
class CholeskyLinear(_OrthogonalLinear):
    """Dense layer with a CHORD-orthogonalised weight (ICLR 2024, Cholesky-based orthogonalisation):
    ``W = L^-1 X`` with ``L`` the lower Cholesky factor of ``X X^T + eps I``,
    ``eps = eps_scale * mean(diag(X X^T))`` (detached, as the authors' code). In exact arithmetic
    ``W W^T = I - eps (L^T L)^-1``: singular values ``sqrt(1 - eps / (lambda + eps))`` for the
    eigenvalues lambda of ``X X^T``, just below 1. Plain autograd through
    ``cholesky`` and ``solve_triangular``. Bound: ``linear_norm_bound(W)`` of the float32 ``W``
    applied. A factorisation that fails in the weight's precision is retried in float64."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps_scale: float = 1e-3) -> None:
        super().__init__(in_features, out_features, bias)
        if not 0 < eps_scale < 1:
            raise ConfigError(f"eps_scale must be in (0, 1), got {eps_scale}")
        self.eps_scale = float(eps_scale)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, eps_scale={self.eps_scale}, bias={self.bias is not None}"

    def _settings(self) -> tuple:
        return (self.eps_scale,)

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        for dtype in (x.dtype, torch.float64):
            xd = x.to(dtype)
            s = xd @ xd.T
            eps = self.eps_scale * s.diagonal().mean().detach()
            if not eps > 0:
                raise NotLipschitzError("a CHORD layer's weight is zero; it cannot be orthogonalised")
            eye = torch.eye(s.shape[0], dtype=dtype, device=s.device)
            factor, info = torch.linalg.cholesky_ex(s + eps * eye)
            if int(info) == 0:
                return torch.linalg.solve_triangular(factor, xd, upper=False).to(x.dtype)
        raise NotLipschitzError("a CHORD layer's Cholesky factorisation failed in float64 (non-finite weights?)")

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "eps_scale": self.eps_scale}

    @classmethod
    def examples(cls):
        return [(cls(6, 6), (6,)), (cls(8, 3), (8,)), (cls(3, 7, bias=False), (3,))]

