"""The exponential of a skew-symmetric operator applied to vectors, with sound error bounds.

SOC layers compute exp(A) x for a skew-symmetric linear operator A (a convolution, or a matrix for
1x1 filters). Two polynomial approximations are offered, each with a rigorous bound on
||p(A) - exp(A)|| given an upper bound ``a >= ||A||``:

- Taylor: ``T_{K-1}(A) = sum_{j<K} A^j / j!`` (Horner), error <= a^K / K! (integral remainder
  with ||exp(tA)|| = 1). This is what the SOC papers use (K = 6 in training, 15 in evaluation).
- Chebyshev (Jacobi-Anger): with S = A / a (spectrum in i[-1, 1]; A is normal),
  ``exp(aS) = J_0(a) I + 2 sum_{k>=1} J_k(a) U_k(S)`` where ``U_k(S) = i^k T_k(-iS)`` are real
  polynomials with ``U_0 = I, U_1 = S, U_{k+1} = 2 S U_k + U_{k-1}`` and ``||U_k(S)|| <= 1``
  (T_k of a Hermitian operator with spectrum in [-1, 1]). Truncating after K terms leaves an error
  <= 2 sum_{k>=K} |J_k(a)| <= 2 (a/2)^K / K! / (1 - a / (2(K+1))), about 2^(K-1) times smaller than
  Taylor's with the same number of operator applications (Clenshaw's recurrence, K-1 of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Absolute error allowed for each float64 Chebyshev coefficient (their true values are below 1;
# the float64 series used here is accurate to ~1e-16), counted into the error bound.
COEFF_ERROR = 1e-14


def taylor_error(a: float, terms: int) -> float:
    """Bound on ||exp(A) - sum_{j<terms} A^j/j!|| for skew A with ||A|| <= a."""
    return a**terms / math.factorial(terms)


def _exp_tail(t: float, k: int) -> float:
    """Upper bound on sum_{j>=k} t^j / j! for 0 <= t < k + 1."""
    return t**k / math.factorial(k) / (1.0 - t / (k + 1))


def chebyshev_error(a: float, terms: int) -> float:
    """Bound on ||exp(A) - sum_{k<terms} c_k U_k(A/a)|| for skew A with ||A|| <= a.

    Uses |J_k(a)| <= (a/2)^k / k! for real a and k >= 0, plus the coefficients' rounding.
    """
    return 2.0 * _exp_tail(a / 2.0, terms) + terms * 2 * COEFF_ERROR


def bessel_j(k: int, a: float) -> float:
    """J_k(a) for integer k >= 0 and moderate real a (power series in float64)."""
    half = a / 2.0
    total, m = 0.0, 0
    term = half**k / math.factorial(k)
    while True:
        total += term
        m += 1
        term *= -(half * half) / (m * (m + k))
        if abs(term) < 1e-18 * max(abs(total), 1e-300) or m > 200:
            return total


def chebyshev_coefficients(a: float, terms: int) -> list[float]:
    """c_0 = J_0(a), c_k = 2 J_k(a): exp(aS) ~ sum_{k<terms} c_k U_k(S)."""
    return [bessel_j(0, a)] + [2.0 * bessel_j(k, a) for k in range(1, terms)]


def choose_terms(a: float, tol: float, method: str, max_terms: int = 40) -> int:
    """Fewest terms whose error bound is <= tol (relative to ||exp(A)|| = 1)."""
    err = taylor_error if method == "taylor" else chebyshev_error
    for k in range(2, max_terms + 1):
        if a < k + 1 and err(a, k) <= tol:
            return k
    raise ValueError(f"no polynomial of up to {max_terms} terms reaches tolerance {tol} for ||A|| <= {a}")


def chebyshev_apply(x: torch.Tensor, apply_s: Callable[[torch.Tensor], torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    """sum_k c_k U_k(S) x by Clenshaw's recurrence: b_k = c_k x + 2 S b_{k+1} + b_{k+2},
    result c_0 x + S b_1 + b_2; ``len(coeffs) - 1`` applications of S."""
    n = len(coeffs)
    if n == 1:
        return coeffs[0] * x
    b1 = coeffs[n - 1] * x
    b2 = torch.zeros_like(x)
    for k in range(n - 2, 0, -1):
        # in place on the fresh product: no extra temporaries (autograd-safe, S's backward
        # does not need its output)
        b1, b2 = apply_s(b1).mul_(2.0).add_(b2).add_(x, alpha=coeffs[k]), b1
    return apply_s(b1).add_(b2).add_(x, alpha=coeffs[0])
