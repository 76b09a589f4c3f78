"""Lipschitz bounds: rigorous upper bounds from the weights, empirical lower bounds from inputs.

The certificate of :mod:`certify.certificates` divides a margin by an upper bound L on the l2->l2
Lipschitz constant of x -> f(x), so L must be *provably* an upper bound. Every layer of a lipcert
model reports a rigorous upper bound on its operator norm (``lipschitz_bound(input_size)``); a
network's bound is the product of its layers' bounds times the input normalisation factor
1/min_c(std_c). Power iteration, by contrast, gives a *lower* estimate of a norm: it is used here
only for :func:`empirical_lower_bound`, which tells the user how tight the upper bound is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, NotLipschitzError


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Refuse non-finite parameters and buffers: a NaN angle makes an activation discontinuous
    and a NaN anywhere makes every bound computed from the weights meaningless."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
                raise NotLipschitzError(f"{what} has a non-finite {kind} {name!r} (NaN or inf); "
                                        "no sound bound exists, refusing to certify")


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


class LipschitzNet(nn.Module):
    """Shared forward and bounds of lipcert's networks (trained or baked): ``normalize``, zero
    padding to ``padded_size`` (an isometric embedding), the chain of layers in ``body`` (named
    ``layer_names``), flattening, then ``head``.

    Subclasses set ``input_shape``, ``normalize``, ``padded_size``, ``layer_names``, ``body`` (layers
    of the protocol of :mod:`certify.layers.protocol`) and ``head`` (a
    :class:`~certify.layers.protocol.Head`, which says which certificate the model supports).
    """

    @property
    def head_kind(self) -> str:
        """The head's kind as checkpoints and exports record it (``ortho``, ``lln``, ``mlp``)."""
        return self.head.kind

    @property
    def certificate(self) -> str:
        """The certificate the head supports: ``global``, ``pairwise`` or ``curvature``."""
        return self.head.certificate

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ConfigError(
                f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """1-Lipschitz (times 1/min(std)) features, flattened, before the head."""
        self._check_input(x)
        x = self.normalize(x)
        h, w = x.shape[-2:]
        ph, pw = self.padded_size
        if (h, w) != (ph, pw):
            x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h))
        for layer in self.body.values():
            x = layer(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def feature_layer_bounds(self) -> list[LayerBound]:
        """Per-layer bounds of x -> features(x); normalize's bound is size-free and the zero
        padding after it is an isometry."""
        chain = [("normalize", self.normalize)] + list(zip(self.layer_names, self.body.values()))
        bounds, _ = layer_bounds(chain, tuple(self.padded_size))
        return bounds

    def layer_bounds(self) -> list[LayerBound]:
        """Per-layer rigorous upper bounds, normalisation first and head last."""
        bounds = self.feature_layer_bounds()
        if self.certificate != "curvature":  # a curvature head is certified by curvature, not by a norm
            bounds.append(LayerBound("head", type(self.head).__name__, None, float(self.head.lipschitz_bound())))
        return bounds

    def feature_lipschitz_bound(self) -> float:
        """Upper bound on the Lipschitz constant of x -> features(x)."""
        check_finite(self)
        return product(self.feature_layer_bounds())

    def lipschitz_bound(self) -> float:
        """Rigorous upper bound on the l2 Lipschitz constant of x -> logits (eval mode)."""
        if self.certificate == "curvature":
            raise NotLipschitzError(f"a {self.head_kind} head has no global Lipschitz bound; use its curvature "
                                    "certificate")
        check_finite(self)
        return product(self.layer_bounds())


def upper_bound(model: nn.Module) -> float:
    """The model's rigorous Lipschitz upper bound (l2 -> l2, input in [0, 1] pixel units)."""
    if not hasattr(model, "lipschitz_bound"):
        raise NotLipschitzError(
            f"{type(model).__name__} is not a lipcert 1-Lipschitz model; pass a known bound instead"
        )
    return float(model.lipschitz_bound())


def empirical_lower_bound(
    fn,
    inputs: torch.Tensor,
    iters: int = 20,
    seed: int = 0,
    step: float = 1e-2,
) -> float:
    """A lower bound on the Lipschitz constant of ``fn`` (a model or any function of a batch),
    by batched power iteration on J(x)^T J(x) at each of ``inputs``.

    Each step reports ``||J(x)^T u||`` for a unit vector ``u`` (one reverse-mode pass), which can
    never exceed ``||J(x)|| <= L`` up to the rounding of that pass; the secant
    ``fn(x + h v) - fn(x)`` only steers the iteration (``u ~ J v``; in float32 its own ratio would
    carry a rounding error of about 1e-7 |f| / h). Rows of the batch must not interact (eval
    mode). Plain autograd, because ``torch.func`` transforms are an order of magnitude slower
    through SOC layers.
    """
    module = fn if isinstance(fn, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        x = inputs.detach()
        if x.shape[0] == 0:
            return 0.0
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)

        def unit(t: torch.Tensor) -> torch.Tensor:
            return t / t.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (t.ndim - 1)))

        v = unit(v)
        with torch.no_grad():
            base = fn(x).detach()
        best = 0.0
        for _ in range(int(iters)):
            with torch.no_grad():
                u = unit((fn(x + step * v).detach() - base).to(torch.float64).flatten(1))
            xg = x.clone().requires_grad_(True)
            out = fn(xg)
            (grad,) = torch.autograd.grad(out, xg, grad_outputs=u.to(out.dtype).view_as(out))
            gnorm = grad.detach().flatten(1).to(torch.float64).norm(dim=1)
            best = max(best, float(gnorm.max()))
            if not bool((gnorm > 0).any()):
                break
            v = unit(grad.detach())
        return best
    finally:
        if module is not None:
            module.train(was_training)
