"""The protocol every 1-Lipschitz layer of lipcert implements, and the model-level operations
built on it (no ``isinstance`` checks on layer types anywhere else).

A layer is an ``nn.Module`` subclass of :class:`LipschitzLayer`; a head (features -> logits) is a
:class:`Head`. Both are registered by name (:func:`certify.layers.registry.register_layer`), which
is all a new layer type needs: the models, training, baking, export, certification and the
conformance suite (tests/test_layer_conformance.py) then use it through these methods.

Soundness contract: :meth:`LipschitzLayer.lipschitz_bound` is a float64 upper bound on the l2
Lipschitz constant of the layer's *evaluation* forward (eval mode, as it is configured now),
computed from the weights as they are at the call, with the rounding of that computation
accounted for. It is never an estimate: a training-time parametrisation may use estimates (power
iteration), its certificate never does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, ExportError

Size = tuple[int, int]


class LipschitzLayer(nn.Module):
    """A layer with a sound Lipschitz upper bound (see the module docstring). Its input is
    (N, C, H, W), or (N, features) for a dense layer (whose ``examples`` give a shape (features,)).

    Must implement: ``forward``; :meth:`lipschitz_bound`. Override where the default is wrong:
    :meth:`output_size` (default: same spatial size), :meth:`output_channels` (default: same),
    :meth:`bake` (default: a frozen copy, right for layers whose parameters are used as they are),
    :meth:`config` (default: ``self.channels`` only), the training hooks :meth:`decay_parameters`
    (default: none) and :meth:`refresh` (default: nothing), the evaluation hooks
    :meth:`set_evaluation` and :meth:`evaluation_settings` (default: a single evaluation path),
    :meth:`to_onnx` (default: no ONNX translation) and :meth:`examples` (the instances the
    conformance suite checks).
    """

    #: the registered name (set by ``register_layer``)
    layer_type: ClassVar[str] = ""
    #: whether the evaluation forward is affine in its input (its Jacobian is then the same
    #: everywhere; the conformance suite checks the claim and checks a nonlinear layer's bound at
    #: several points)
    is_linear: ClassVar[bool] = False

    # ---- shapes -------------------------------------------------------------------------------

    def output_size(self, size: Size) -> Size:
        """Spatial output size for a spatial input size."""
        return size

    def output_channels(self, channels: int) -> int:
        """Output channels for ``channels`` input channels."""
        return channels

    # ---- the bound ----------------------------------------------------------------------------

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        """Sound float64 upper bound on the l2 Lipschitz constant of the evaluation forward on
        inputs of spatial size ``input_size`` (None: a size-free bound where the layer has one)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement lipschitz_bound")

    # ---- baking and export --------------------------------------------------------------------

    def bake(self, **options: Any) -> "LipschitzLayer":
        """A module of fixed tensors that computes the same function as this layer's evaluation
        forward (and bounds itself from those tensors). ``options`` are baking choices a layer
        may understand (SOC: ``one_by_one``) and must otherwise ignore."""
        return frozen_copy(self)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this (baked) layer with zero tensors, stored in
        a baked model's plan; :meth:`from_config` is their inverse."""
        return {"channels": self.channels}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LipschitzLayer":
        return cls(**cfg)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int) -> tuple[str, int, int, int]:
        """Append this layer's forward to the ONNX graph builder ``g`` (:mod:`certify.onnx_graph`)
        reading value ``x`` of shape (N, c, h, w) and tensors ``prefix + name``; returns the output
        value and its (channels, height, width). The graph must compute the forward's float32
        arithmetic op for op (the exported file is verified against it). A dense layer (input
        (N, features)) is given ``c = features, h = w = 1`` and returns a value of shape (N, out)."""
        raise ExportError(f"no ONNX translation for layer {g.scope!r} ({type(self).__name__}); "
                          "export it as safetensors")

    # ---- training hooks -----------------------------------------------------------------------

    def decay_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that get weight decay in the reference recipe (default: none)."""
        return iter(())

    def refresh(self, iters: int) -> None:
        """Training-time upkeep after an epoch (SOC: ``iters`` power-iteration steps)."""

    # ---- evaluation paths ---------------------------------------------------------------------

    def set_evaluation(self, mode: str, *, tol: float | None = None, images: int | None = None,
                       dense_max: int | None = None) -> bool:
        """Switch the evaluation path (``"taylor"``: the paper's; ``"fast"``: cached plans);
        returns whether this layer has such paths. Sound either way: the bound follows the path."""
        return False

    def evaluation_settings(self) -> tuple:
        """What decides which function the evaluation forward computes, beyond the tensors (a
        certifier recomputes its bound when it changes)."""
        return ()

    # ---- the conformance suite ----------------------------------------------------------------

    @classmethod
    def examples(cls) -> list[tuple["LipschitzLayer", tuple[int, int, int]]]:
        """Small instances and an input shape (C, H, W) for each, for the conformance suite."""
        return []


class Head(nn.Module):
    """The last layer, features -> logits, and the certificate it supports.

    ``certificate`` is ``"global"`` (radius = margin / (sqrt(2) L), needs :meth:`lipschitz_bound`),
    ``"pairwise"`` (LLN: needs :meth:`lipschitz_bound` and :meth:`pairwise_row_distances`) or
    ``"curvature"`` (MLP: :meth:`curvature_certifier`). Heads have ``features`` and ``num_classes``
    and the same baking, config and ONNX hooks as layers.
    """

    layer_type: ClassVar[str] = ""
    is_linear: ClassVar[bool] = False
    certificate: ClassVar[str] = "global"
    #: the head kind recorded in checkpoints and exports (``ortho``, ``lln``, ``mlp``)
    kind: ClassVar[str] = ""

    def lipschitz_bound(self, input_size=None) -> float:
        raise NotImplementedError(f"{type(self).__name__} has no Lipschitz bound")

    def bake(self, **options: Any) -> "Head":
        return frozen_copy(self)

    def config(self) -> dict[str, Any]:
        return {"features": int(self.features), "num_classes": int(self.num_classes)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Head":
        return cls(**cfg)

    def to_onnx(self, g, x: str) -> str:
        """Append the head to the ONNX graph: ``x`` (N, features) to the graph output."""
        raise ExportError(f"no ONNX translation for a {type(self).__name__} head (export it as safetensors)")

    def decay_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def refresh(self, iters: int) -> None:
        pass

    def set_evaluation(self, mode: str, **kwargs) -> bool:
        return False

    def evaluation_settings(self) -> tuple:
        return ()

    @classmethod
    def examples(cls) -> list[tuple["Head", tuple[int]]]:
        return []


# ---- model-level operations, through the protocol -------------------------------------------

EVAL_MODES = ("taylor", "fast")


def protocol_modules(model: nn.Module) -> Iterator[LipschitzLayer | Head]:
    """Every module of ``model`` that implements the protocol (layers and heads, nested ones too)."""
    for m in model.modules():
        if isinstance(m, (LipschitzLayer, Head)):
            yield m


def set_eval_mode(model: nn.Module, mode: str, tol: float | None = None, images: int | None = None,
                  dense_max: int | None = None) -> int:
    """Switch every layer of ``model`` that has evaluation paths to ``"taylor"`` or ``"fast"``
    (see :class:`certify.layers.soc.SOC`); returns the number of layers switched. Sound either
    way: each layer's bound is computed for the path it evaluates.

    ``images``: how many images (forward passes of one image) the fast path will serve; layers on
    small maps become one dense operator where that pays for its build.
    ``dense_max``: the largest operator dimension to materialise (0: never)."""
    if mode not in EVAL_MODES:
        raise ConfigError(f"eval mode must be 'taylor' or 'fast', got {mode!r}")
    if images is not None and images < 0:
        raise ConfigError(f"images must be >= 0, got {images}")
    if dense_max is not None and dense_max < 0:
        raise ConfigError(f"dense_max must be >= 0, got {dense_max}")
    return sum(bool(m.set_evaluation(mode, tol=tol, images=images, dense_max=dense_max))
               for m in protocol_modules(model))


def decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that get weight decay (each layer's :meth:`decay_parameters`)."""
    seen: dict[int, nn.Parameter] = {}
    for m in protocol_modules(model):
        for p in m.decay_parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def refresh_layers(model: nn.Module, iters: int) -> None:
    """Every layer's after-epoch upkeep (SOC: ``iters`` power-iteration steps)."""
    if iters > 0:
        for m in protocol_modules(model):
            m.refresh(iters)


@torch.no_grad()
def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (the default :meth:`LipschitzLayer.bake`)."""
    out = copy.deepcopy(module).eval()
    out.requires_grad_(False)
    return out
