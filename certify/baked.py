"""Baked inference models: a trained lipcert model with its parametrisations evaluated once.

A training model recomputes its weights in every forward (the SOC skew filter ``(W - W^T)/2``
scaled by power-iteration norm estimates, the LLN rows re-normalised). For deployment that is
wasted work and, worse, training-only machinery (power iteration, custom backward) that an
exporter must trace. :func:`bake` evaluates all of it once and returns a :class:`BakedLipNet` made
of fixed tensors only:

- a 3x3 SOC becomes :class:`BakedSOC`: the scaled skew filter and its number of Taylor terms;
- a 1x1 SOC (block 5, the orthogonal head) becomes ONE matrix, ``exp(A)`` computed once in float64
  by ``torch.linalg.matrix_exp`` and restricted to the channels the layer reads and keeps
  (:class:`BakedMatrix`, :class:`BakedLinearHead`): one product per forward instead of K;
- the LLN head keeps its rows already normalised (:class:`BakedLLNHead`);
- normalisation stays a fixed :class:`~certify.lipschitz.Normalize` layer (bound 1/min(std));
- activations and poolings are the library's own layers with their (fixed) angles.

Soundness does not rest on the training model: every baked layer computes its own rigorous
Lipschitz upper bound from the tensors it actually applies (the exp(A) matrix is not the K-term
Taylor polynomial the original evaluates, so its bound is the exact float64 spectral norm of the
stored matrix, not ``1 + a^K/K!``). A baked model is saved as a ``.safetensors`` checkpoint with
``checkpoint_kind = "baked"`` and its layer plan in the metadata; loading it needs only this
module, the layer modules and :mod:`certify.checkpoint` (no training code, no registry builder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS, make_activation
from .errors import CheckpointError, ConfigError, ExportError, LipcertError, NotLipschitzError
from .heads import LLNHead, OrthoHead
from .lipschitz import LipschitzNet, Normalize
from .pooling import POOLINGS, make_pooling
from .soc import SOC, _real_matrix_norm_bound, skew_conv_norm_bound, strided_size, taylor_series, transpose_filter

#: ``checkpoint_kind`` metadata value of a baked safetensors checkpoint.
BAKED_KIND = "baked"
#: Version of the layer plan stored under ``baked_plan``; bump on an incompatible change.
PLAN_VERSION = 1


# ---- layers -----------------------------------------------------------------------------------


class BakedSOC(nn.Module):
    """A SOC with a fixed, already scaled skew filter: ``y = T_{K-1}(conv_A)(pad(s2d(x)))[:out] + b``.

    The forward is the training layer's evaluation forward (same Horner series, same filter bits),
    so it reproduces the original's outputs exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 channels: int, terms: int, bias: bool) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or stride not in (1, 2) or terms < 2:
            raise ConfigError(f"invalid baked SOC: kernel {kernel_size}, stride {stride}, terms {terms}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.channels, self.terms = kernel_size, stride, channels, terms
        self.register_buffer("skew", torch.zeros(channels, channels, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def config(self) -> dict[str, Any]:
        return {"type": "soc", "in_channels": self.in_channels, "out_channels": self.out_channels,
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


class BakedMatrix(nn.Module):
    """A 1x1 SOC as one matrix: ``y = Q s2d(x) + b`` with ``Q = exp(A)[:out, :in*s^2]``.

    Channel zero-padding of the input only meets the first ``in*s^2`` columns of exp(A) and the
    slice keeps its first ``out`` rows, so Q is the whole layer. Q is a block of an orthogonal
    matrix, but the stored float32 Q is not exactly that: the bound is its own spectral norm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"invalid baked matrix layer: stride {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.register_buffer("weight", torch.zeros(out_channels, in_channels * stride * stride))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def config(self) -> dict[str, Any]:
        return {"type": "matrix", "in_channels": self.in_channels, "out_channels": self.out_channels,
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

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """Exact float64 spectral norm of the stored matrix plus rounding slack (a 1x1 conv on any
        map has the matrix's norm; space-to-depth is a permutation)."""
        return _real_matrix_norm_bound(self.weight.detach().to(torch.float64))


class BakedLinearHead(nn.Module):
    """The orthogonal head baked to one matrix: ``logits = Q phi + b``, ``Q = exp(A)[:C, :F]``."""

    kind = "ortho"

    def __init__(self, features: int, num_classes: int, bias: bool) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.register_buffer("weight", torch.zeros(num_classes, features))
        self.register_buffer("bias", torch.zeros(num_classes) if bias else None)

    def config(self) -> dict[str, Any]:
        return {"type": "ortho", "features": self.features, "num_classes": self.num_classes,
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), self.weight.to(x.dtype), b)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return _real_matrix_norm_bound(self.weight.detach().to(torch.float64))


class BakedSOCHead(nn.Module):
    """The orthogonal head kept as a 1x1 Taylor-series SOC (``bake(..., one_by_one="taylor")``)."""

    kind = "ortho"

    def __init__(self, features: int, num_classes: int, channels: int, terms: int, bias: bool) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.soc = BakedSOC(features, num_classes, 1, 1, channels, terms, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.soc(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)

    def lipschitz_bound(self, input_size=None) -> float:
        return self.soc.lipschitz_bound((1, 1))


class BakedLLNHead(LLNHead):
    """The LLN head with its rows normalised once; the bound and the pairwise row distances are
    :class:`~certify.heads.LLNHead`'s own code, run on the stored (already normalised) rows."""

    kind = "lln"

    def __init__(self, features: int, num_classes: int) -> None:
        nn.Module.__init__(self)  # no trainable parameters: buffers only
        self.features, self.num_classes = features, num_classes
        self.register_buffer("weight", torch.zeros(num_classes, features))
        self.register_buffer("bias", torch.zeros(num_classes))

    def config(self) -> dict[str, Any]:
        return {"type": "lln", "features": self.features, "num_classes": self.num_classes}

    def normalized_weight(self) -> torch.Tensor:
        # The rows were normalised at bake time; normalising again would change their last bits
        # and make the baked logits differ from the original's.
        return self.weight


# ---- the baked model --------------------------------------------------------------------------

_ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}
_POOLING_NAMES = {cls: name for name, cls in POOLINGS.items()}


def _build_layer(cfg: dict[str, Any]) -> nn.Module:
    kind = cfg.get("type")
    if kind == "soc":
        return BakedSOC(cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], cfg["stride"],
                        cfg["channels"], cfg["terms"], cfg["bias"])
    if kind == "matrix":
        return BakedMatrix(cfg["in_channels"], cfg["out_channels"], cfg["stride"], cfg["bias"])
    if kind == "activation":
        return make_activation(cfg["layer"], cfg["channels"])
    if kind == "pooling":
        return make_pooling(cfg["layer"], cfg["channels"])
    raise ConfigError(f"unknown baked layer type {kind!r}")


def _build_head(cfg: dict[str, Any]) -> nn.Module:
    kind = cfg.get("type")
    if kind == "ortho":
        return BakedLinearHead(cfg["features"], cfg["num_classes"], cfg["bias"])
    if kind == "ortho_soc":
        return BakedSOCHead(cfg["features"], cfg["num_classes"], cfg["channels"], cfg["terms"], cfg["bias"])
    if kind == "lln":
        return BakedLLNHead(cfg["features"], cfg["num_classes"])
    if kind == "mlp":
        from .mlp_head import MLPHead

        return MLPHead(cfg["features"], cfg["num_classes"], **cfg.get("kwargs", {}))
    raise ConfigError(f"unknown baked head type {kind!r}")


class BakedLipNet(LipschitzNet):
    """An inference-only LipConvnet of fixed tensors, built from a plan (see :func:`bake`).

    It exposes the certification interface of :class:`certify.models.LipConvNet`:
    ``num_classes``, ``input_shape``, ``mean``, ``std``, ``head_kind``, ``features(x)``, ``head``,
    ``layer_bounds()``, ``feature_lipschitz_bound()`` and ``lipschitz_bound()``, all computed from
    the baked tensors.
    """

    bound_source = "computed from the weights (baked model)"
    head_kinds = {"ortho_soc": "ortho"}  # plan head type -> certification head kind

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__()
        if plan.get("version") != PLAN_VERSION:
            raise ConfigError(f"baked plan version {plan.get('version')!r}; this lipcert reads {PLAN_VERSION}")
        self.plan = plan
        self.num_classes = int(plan["num_classes"])
        self.input_shape = tuple(int(s) for s in plan["input_shape"])
        self.mean = tuple(float(m) for m in plan["mean"])
        self.std = tuple(float(s) for s in plan["std"])
        self.padded_size = tuple(int(s) for s in plan["padded_size"])
        self.head_kind = self.head_kinds.get(plan["head"]["type"], plan["head"]["type"])
        self.normalize = Normalize(self.mean, self.std)
        self.layer_names = [layer["name"] for layer in plan["layers"]]
        self.body = nn.ModuleDict({cfg["name"].replace(".", "-"): _build_layer(cfg) for cfg in plan["layers"]})
        self.head = _build_head(plan["head"])
        self.requires_grad_(False)


# ---- baking -----------------------------------------------------------------------------------


@torch.no_grad()
def _matrix_from_soc(soc: SOC) -> torch.Tensor:
    """``exp(A)[:out, :in_eff]`` of a 1x1 SOC, computed in float64 and rounded once."""
    a = soc.skew_filter().detach()[:, :, 0, 0].to(torch.float64)
    q = torch.linalg.matrix_exp(a)[: soc.out_channels, : soc.in_channels_eff]
    return q.to(soc.weight.dtype).contiguous()


@torch.no_grad()
def _bake_soc(name: str, soc: SOC, one_by_one: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    bias = None if soc.bias is None else soc.bias.detach().clone()
    if soc.kernel_size == 1 and one_by_one == "matrix":
        cfg = {"type": "matrix", "in_channels": soc.in_channels, "out_channels": soc.out_channels,
               "stride": soc.stride, "bias": bias is not None}
        tensors = {"weight": _matrix_from_soc(soc)}
    else:
        cfg = {"type": "soc", "in_channels": soc.in_channels, "out_channels": soc.out_channels,
               "kernel_size": soc.kernel_size, "stride": soc.stride, "channels": soc.channels,
               "terms": soc.eval_terms, "bias": bias is not None}
        tensors = {"skew": soc.skew_filter().detach().clone()}
    if bias is not None:
        tensors["bias"] = bias
    return {"name": name, **cfg}, tensors


def _bake_head(head: nn.Module, one_by_one: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(head, OrthoHead) and one_by_one == "taylor":
        soc = head.soc
        tensors = {"soc.skew": soc.skew_filter().detach().clone()}
        if soc.bias is not None:
            tensors["soc.bias"] = soc.bias.detach().clone()
        return {"type": "ortho_soc", "features": head.features, "num_classes": head.num_classes,
                "channels": soc.channels, "terms": soc.eval_terms, "bias": soc.bias is not None}, tensors
    if isinstance(head, OrthoHead):
        soc = head.soc
        tensors = {"weight": _matrix_from_soc(soc)}
        if soc.bias is not None:
            tensors["bias"] = soc.bias.detach().clone()
        return {"type": "ortho", "features": head.features, "num_classes": head.num_classes,
                "bias": soc.bias is not None}, tensors
    if isinstance(head, LLNHead):
        return ({"type": "lln", "features": head.features, "num_classes": head.num_classes},
                {"weight": head.normalized_weight().detach().clone(), "bias": head.bias.detach().clone()})
    if getattr(head, "kind", None) == "mlp":
        # The MLP head has no parametrisation to evaluate (W1, W2 are used as they are); it is
        # kept as the library's own layer, rebuilt from its constructor arguments.
        kwargs = {}
        for attr, key in (("hidden", "hidden"), ("beta", "beta")):
            if hasattr(head, attr):
                kwargs[key] = getattr(head, attr)
        return ({"type": "mlp", "features": head.features, "num_classes": head.num_classes, "kwargs": kwargs},
                {k: v.detach().clone() for k, v in head.state_dict().items()})
    raise ExportError(f"cannot bake a head of type {type(head).__name__}")


@torch.no_grad()
def bake(model: nn.Module, one_by_one: str = "matrix") -> BakedLipNet:
    """An inference model equal to ``model`` in evaluation mode, made of fixed tensors only.

    ``one_by_one`` chooses how 1x1 SOC layers (block 5 and the orthogonal head) are baked:
    ``"matrix"`` (default) as the single matrix exp(A), one product per forward instead of K and
    closer to the exact orthogonal map than the original's K-term series (the logits then differ
    from the original's by float32 rounding, ~1e-6); ``"taylor"`` as the original's own series,
    which reproduces the original's logits bit for bit.

    ``model`` is a LipConvnet from :func:`certify.models.create_model` (or a checkpoint loaded
    by :func:`certify.checkpoint.load`); it is not modified. The baked model is in eval mode, on
    the same device, and carries the original's ``model_name``, ``model_kwargs`` and
    ``class_names`` so that it can be saved and described like the original.
    """
    for attr in ("body", "layer_names", "normalize", "head", "input_shape", "padded_size"):
        if not hasattr(model, attr):
            raise ExportError(f"cannot bake {type(model).__name__}: not a lipcert LipConvnet (no {attr!r})")
    if isinstance(model, BakedLipNet):
        raise ExportError("this model is baked already")
    if one_by_one not in ("matrix", "taylor"):
        raise ConfigError(f"one_by_one must be 'matrix' or 'taylor', got {one_by_one!r}")
    layers: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] = {}
    for name, layer in zip(model.layer_names, model.body.values()):
        key = name.replace(".", "-")
        if isinstance(layer, SOC):
            cfg, tensors = _bake_soc(name, layer, one_by_one)
        elif type(layer) in _ACTIVATION_NAMES or type(layer) in _POOLING_NAMES:
            kind = "activation" if type(layer) in _ACTIVATION_NAMES else "pooling"
            names = _ACTIVATION_NAMES if kind == "activation" else _POOLING_NAMES
            channels = _layer_channels(layer, model, name)
            cfg = {"name": name, "type": kind, "layer": names[type(layer)], "channels": channels}
            tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        else:
            raise ExportError(f"cannot bake layer {name!r} of type {type(layer).__name__}")
        layers.append(cfg)
        state.update({f"body.{key}.{k}": v for k, v in tensors.items()})
    head_cfg, head_tensors = _bake_head(model.head, one_by_one)
    state.update({f"head.{k}": v for k, v in head_tensors.items()})
    state.update({f"normalize.{k}": v.detach().clone() for k, v in model.normalize.state_dict().items()})
    plan = {
        "version": PLAN_VERSION,
        "num_classes": int(model.num_classes),
        "input_shape": list(model.input_shape),
        "mean": list(model.mean),
        "std": list(model.std),
        "padded_size": list(model.padded_size),
        "layers": layers,
        "head": head_cfg,
    }
    baked = build_baked(plan)
    device = next((t.device for t in state.values()), torch.device("cpu"))
    baked = baked.to(device)
    baked.load_state_dict(state, strict=True)
    for attr in ("model_name", "model_kwargs", "class_names", "checkpoint_metadata"):
        if hasattr(model, attr):
            setattr(baked, attr, getattr(model, attr))
    return baked.eval()


def _layer_channels(layer: nn.Module, model: nn.Module, name: str) -> int:
    """Channels a pairwise layer expects: twice its number of per-pair angles, or (MaxMin, max
    pooling have none) the output channels of the SOC just before it."""
    for p in layer.parameters():
        return 2 * p.shape[0]
    prev = None
    for n, m in zip(model.layer_names, model.body.values()):
        if n == name:
            break
        if isinstance(m, SOC):
            prev = m
    if prev is None:
        raise ExportError(f"cannot infer the channels of layer {name!r}")
    return prev.out_channels


def build_baked(plan: dict[str, Any]) -> BakedLipNet:
    """A :class:`BakedLipNet` with the layout of ``plan`` and zero tensors (to be loaded)."""
    try:
        return BakedLipNet(plan)
    except LipcertError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"malformed baked layer plan ({type(e).__name__}: {e})") from None


# ---- baked checkpoints ------------------------------------------------------------------------


def save_baked(path, baked: BakedLipNet, **info: Any) -> Path:
    """Save a baked model as a ``.safetensors`` checkpoint (atomically), marked
    ``checkpoint_kind = "baked"`` with its layer plan, so :func:`certify.checkpoint.load` rebuilds
    it without the registry or any training code. ``info`` adds metadata, as for
    :func:`certify.checkpoint.save`."""
    from .checkpoint import save

    if not isinstance(baked, BakedLipNet):
        raise ExportError(f"save_baked needs a baked model (see bake()), got {type(baked).__name__}")
    info = {k: v for k, v in info.items() if k not in ("checkpoint_kind", "baked_plan")}
    return save(path, baked, checkpoint_kind=BAKED_KIND, baked_plan=json.dumps(baked.plan, sort_keys=True), **info)


def model_from_metadata(meta: dict[str, str], path: Path | str = "<checkpoint>") -> BakedLipNet:
    """The (zero-weight) baked model that a baked checkpoint's metadata describes."""
    path = Path(path)
    try:
        plan = json.loads(meta["baked_plan"])
    except KeyError:
        raise CheckpointError(f"{path}: a baked checkpoint without its layer plan ('baked_plan')") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata entry 'baked_plan' is not valid JSON") from None
    try:
        model = build_baked(plan)
    except LipcertError as e:
        raise CheckpointError(f"{path}: cannot rebuild the baked model: {e}") from None
    model.model_name = meta.get("model", "?")
    try:
        model.model_kwargs = json.loads(meta.get("model_kwargs", "{}"))
    except json.JSONDecodeError:
        model.model_kwargs = {}
    return model
