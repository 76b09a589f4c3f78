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


def chebyshev_apply(x: torch.Tensor, apply_s: Callable[[torch.Tensor], torch.Tensor], coeffs: list[float],
                    apply_2s: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k c_k U_k(S) x by Clenshaw's recurrence: b_k = c_k x + 2 S b_{k+1} + b_{k+2},
    result c_0 x + S b_1 + b_2; ``len(coeffs) - 1`` applications of S. ``apply_2s`` (optional)
    applies 2S directly, e.g. a convolution by the doubled filter: doubling is exact in floating
    point, so the result is the same, with one pass over the activations fewer per term."""
    n = len(coeffs)
    if n == 1:
        return coeffs[0] * x
    if apply_2s is None:
        apply_2s = lambda v: apply_s(v).mul_(2.0)  # noqa: E731
    b1 = coeffs[n - 1] * x
    b2 = torch.zeros_like(x)
    for k in range(n - 2, 0, -1):
        # in place on the fresh product: no extra temporaries (autograd-safe, S's backward
        # does not need its output)
        b1, b2 = apply_2s(b1).add_(b2).add_(x, alpha=coeffs[k]), b1
    return apply_s(b1).add_(b2).add_(x, alpha=coeffs[0])


def chebyshev_to_monomial(coeffs: list[float]) -> list[float]:
    """Monomial coefficients m_j with ``sum_k c_k U_k(S) = sum_j m_j S^j``.

    ``U_0 = 1, U_1 = S, U_{k+1} = 2 S U_k + U_{k-1}`` have integer coefficients (exact in float64
    for the degrees used here); only the final weighted sums round. For exp(aS) with moderate a the
    m_j are close to the Taylor coefficients a^j / j!, so the monomial form loses little accuracy.
    """
    polys: list[list[float]] = [[1.0], [0.0, 1.0]]
    while len(polys) < len(coeffs):
        nxt = [0.0] + [2.0 * c for c in polys[-1]]
        for j, c in enumerate(polys[-2]):
            nxt[j] += c
        polys.append(nxt)
    out = [0.0] * len(coeffs)
    for c, poly in zip(coeffs, polys):
        for j, pc in enumerate(poly):
            out[j] += c * pc
    return out


def _ps_plan(degree: int) -> tuple[int, int]:
    """(block size, matrix products) of the cheapest Paterson-Stockmeyer split of a polynomial."""
    best = None
    for b in range(1, degree + 2):
        chunks = -(-(degree + 1) // b)
        top_is_scalar = (degree + 1) - (chunks - 1) * b == 1
        products = (b - 1) + (chunks - 1) - (1 if top_is_scalar and chunks > 1 else 0)
        if best is None or products < best[1]:
            best = (b, products)
    return best


def matrix_products(degree: int) -> int:
    """Matrix products :func:`paterson_stockmeyer` needs for a polynomial of this degree."""
    return _ps_plan(degree)[1]


def paterson_stockmeyer(s: torch.Tensor, m: list[float]) -> torch.Tensor:
    """``sum_j m_j S^j`` for a square matrix S with about 2 sqrt(degree) matrix products instead of
    ``degree`` (Paterson & Stockmeyer, "On the number of nonscalar multiplications necessary to
    evaluate polynomials", SIAM J. Comput. 1973): powers S^1..S^b, then Horner's rule in S^b over
    blocks of b coefficients."""
    degree = len(m) - 1
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    if degree == 0:
        return m[0] * eye
    b, _ = _ps_plan(degree)
    powers = [eye, s]
    for _ in range(b - 1):
        powers.append(powers[-1] @ s)

    def block(i: int) -> torch.Tensor:
        out = torch.zeros_like(s)
        for j, c in enumerate(m[i * b: (i + 1) * b]):
            out.add_(powers[j], alpha=c)
        return out

    chunks = -(-(degree + 1) // b)
    top = chunks - 1
    if chunks > 1 and degree + 1 - top * b == 1:  # the top block is the scalar m_d: S^b m_d is free
        result = block(top - 1).add_(powers[b], alpha=m[degree])
        top -= 1
    else:
        result = block(top)
    for i in range(top - 1, -1, -1):
        result = (powers[b] @ result).add_(block(i))
    return result
