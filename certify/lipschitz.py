"""Lipschitz bounds: rigorous upper bounds from the weights, empirical lower bounds from inputs.

The certificate of :mod:`certify.certificates` divides a margin by an upper bound L on the l2->l2
Lipschitz constant of x -> f(x), so L must be *provably* an upper bound. Every layer of a lipcert
model reports a rigorous upper bound on its operator norm (``lipschitz_bound(input_size)``); a
network's bound is the product of its layers' bounds times the input normalisation factor
1/min_c(std_c). Power iteration, by contrast, gives a *lower* estimate of a norm: it is used here
only for :func:`empirical_lower_bound`, which tells the user how tight the upper bound is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NotLipschitzError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, inside the model so radii are in [0, 1] pixel units.

    Its Lipschitz constant is exactly 1/min_c(std_c) (a diagonal map), not 1/max(std).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def lipschitz_bound(self, input_size=None) -> float:
        # 1/std in float64 from the stored float32 std, the value the forward divides by.
        return float(1.0 / self.std.detach().to(torch.float64).min())

    def output_size(self, size):
        return size


@dataclass(frozen=True)
class LayerBound:
    """One layer's contribution to a network's Lipschitz upper bound."""

    name: str
    kind: str
    input_size: tuple[int, int] | None
    bound: float


def layer_bounds(
    layers: Iterable[tuple[str, nn.Module]], input_size: tuple[int, int] | None
) -> tuple[list[LayerBound], tuple[int, int] | None]:
    """Per-layer upper bounds of a chain of layers, threading the spatial size through.

    Every layer must implement ``lipschitz_bound(input_size)``; a layer that does not is not
    1-Lipschitz by construction and raises :class:`NotLipschitzError`.
    """
    bounds = []
    size = input_size
    for name, layer in layers:
        if not hasattr(layer, "lipschitz_bound"):
            raise NotLipschitzError(
                f"layer {name!r} ({type(layer).__name__}) has no Lipschitz bound; lipcert cannot "
                "certify a network containing it"
            )
        bounds.append(LayerBound(name, type(layer).__name__, size, float(layer.lipschitz_bound(size))))
        if size is not None and hasattr(layer, "output_size"):
            size = layer.output_size(size)
    return bounds, size


def product(bounds: Iterable[LayerBound]) -> float:
    """Product of per-layer bounds (float64 products of numbers >= 1 round up only by ~1e-16)."""
    out = 1.0
    for b in bounds:
        out *= b.bound
    return out


def upper_bound(model: nn.Module) -> float:
    """The model's rigorous Lipschitz upper bound (l2 -> l2, input in [0, 1] pixel units)."""
    if not hasattr(model, "lipschitz_bound"):
        raise NotLipschitzError(
            f"{type(model).__name__} is not a lipcert 1-Lipschitz model; pass a known bound instead"
        )
    return float(model.lipschitz_bound())


def empirical_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    iters: int = 20,
    seed: int = 0,
    step: float = 1e-3,
) -> float:
    """A lower bound on the Lipschitz constant from difference quotients found by power iteration.

    For each input x, power iteration on J(x)^T J(x) (``J v`` by a central difference, ``J^T u`` by
    one backward pass) steers a direction v towards the top right-singular vector; every value
    recorded is an actual secant slope ``||f(x + h v) - f(x - h v)|| / (2h)`` of the model, so the
    result is a genuine lower bound on its Lipschitz constant whatever the approximation quality.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best = 0.0
    try:
        for x in inputs:
            x = x.unsqueeze(0).detach()
            v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            v = v / v.norm()
            for _ in range(iters):
                with torch.no_grad():
                    diff = model(x + step * v) - model(x - step * v)
                best = max(best, float(diff.norm()) / (2 * step))
                xg = x.clone().requires_grad_(True)
                (u,) = torch.autograd.grad(model(xg), xg, grad_outputs=diff / (2 * step))
                norm = u.norm()
                if not torch.isfinite(norm) or norm == 0:
                    break
                v = u / norm
    finally:
        model.train(was_training)
    return best
