"""Baked inference models: a trained lipcert model with its parametrisations evaluated once.

A training model recomputes its weights in every forward (the SOC skew filter ``(W - W^T)/2``
scaled by power-iteration norm estimates, the LLN rows re-normalised). For deployment that is
wasted work and, worse, training-only machinery (power iteration, custom backward) that an
exporter must trace. :func:`bake` evaluates all of it once and returns a :class:`BakedLipNet` made
of fixed tensors only. Each layer bakes itself (``bake()`` of the layer protocol,
:mod:`certify.layers.protocol`); for the built-in layers:

- a 3x3 SOC becomes :class:`~certify.layers.soc.BakedSOC`: the scaled skew filter and its number
  of Taylor terms;
- a 1x1 SOC (block 5, the orthogonal head) becomes ONE matrix, ``exp(A)`` computed once in float64
  by ``torch.linalg.matrix_exp`` and restricted to the channels the layer reads and keeps
  (:class:`~certify.layers.soc.BakedMatrix`, :class:`~certify.layers.heads.BakedLinearHead`): one
  product per forward instead of K;
- the LLN head keeps its rows already normalised (:class:`~certify.layers.heads.BakedLLNHead`);
- normalisation stays a fixed :class:`~certify.layers.normalize.Normalize` layer (bound 1/min(std));
- activations, poolings and the MLP head are frozen copies of themselves.

The layer plan (metadata ``baked_plan``) lists each layer by its registered name with its
``config()``; loading rebuilds each from the registry (``from_config``) and loads its tensors.

Soundness does not rest on the training model: every baked layer computes its own rigorous
Lipschitz upper bound from the tensors it actually applies (the exp(A) matrix is not the K-term
Taylor polynomial the original evaluates, so its bound is the exact float64 spectral norm of the
stored matrix, not ``1 + a^K/K!``). A baked model is saved as a ``.safetensors`` checkpoint with
``checkpoint_kind = "baked"`` and its layer plan in the metadata; loading it needs only this
module, the layer modules and :mod:`certify.checkpoint` (no training code, no registry builder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ExportError, LipcertError
from .layers.normalize import Normalize
from .lipschitz import LipschitzNet

#: ``checkpoint_kind`` metadata value of a baked safetensors checkpoint.
BAKED_KIND = "baked"
#: Version of the layer plan stored under ``baked_plan``; bump on an incompatible change.
PLAN_VERSION = 2


# ---- the baked model --------------------------------------------------------------------------

#: Plan version 1 (lipcert before the layers package) named layers by role; version 2 names every
#: layer and head by its registered name (certify.layers.registry). Version 1 plans are read.
_V1_LAYER_TYPES = {"soc": "soc_baked", "matrix": "soc_matrix"}
_V1_HEAD_TYPES = {"ortho": "ortho_matrix", "ortho_soc": "ortho_soc_baked", "lln": "lln_baked", "mlp": "mlp"}


def _upgrade_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A version-1 plan as the version-2 plan of the same model (same layers, same tensors)."""
    if plan.get("version") != 1:
        return plan
    layers = []
    for cfg in plan["layers"]:
        cfg = dict(cfg)
        kind = cfg.pop("type", None)
        if kind in ("activation", "pooling"):
            cfg["type"] = cfg.pop("layer")
        else:
            cfg["type"] = _V1_LAYER_TYPES.get(kind, kind)
        layers.append(cfg)
    head = dict(plan["head"])
    head["type"] = _V1_HEAD_TYPES.get(head.get("type"), head.get("type"))
    head.update(head.pop("kwargs", {}))
    return {**plan, "version": PLAN_VERSION, "layers": layers, "head": head}


def _from_config(cfg: dict[str, Any], what: str, head: bool) -> nn.Module:
    """A registered (baked) layer or head rebuilt with zero tensors from its plan entry."""
    from .layers.protocol import Head, LipschitzLayer
    from .layers.registry import layer_info

    cfg = dict(cfg)
    cfg.pop("name", None)
    name = cfg.pop("type", None)
    info = layer_info(str(name))
    if head != issubclass(info.cls, Head) or not issubclass(info.cls, (Head, LipschitzLayer)):
        raise ConfigError(f"{what}: {name!r} is not a {'head' if head else 'body layer'}")
    return info.cls.from_config(cfg)


class BakedLipNet(LipschitzNet):
    """An inference-only LipConvnet of fixed tensors, built from a plan (see :func:`bake`).

    It exposes the certification interface of :class:`certify.models.LipConvNet`:
    ``num_classes``, ``input_shape``, ``mean``, ``std``, ``head_kind``, ``features(x)``, ``head``,
    ``layer_bounds()``, ``feature_lipschitz_bound()`` and ``lipschitz_bound()``, all computed from
    the baked tensors.
    """

    bound_source = "computed from the weights (baked model)"

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__()
        if plan.get("version") not in (1, PLAN_VERSION):
            raise ConfigError(f"baked plan version {plan.get('version')!r}; this lipcert reads 1 and {PLAN_VERSION}")
        plan = _upgrade_plan(plan)
        self.plan = plan
        self.num_classes = int(plan["num_classes"])
        self.input_shape = tuple(int(s) for s in plan["input_shape"])
        self.mean = tuple(float(m) for m in plan["mean"])
        self.std = tuple(float(s) for s in plan["std"])
        self.padded_size = tuple(int(s) for s in plan["padded_size"])
        self.normalize = Normalize(self.mean, self.std)
        self.layer_names = [layer["name"] for layer in plan["layers"]]
        self.body = nn.ModuleDict({cfg["name"].replace(".", "-"): _from_config(cfg, f"layer {cfg['name']!r}", False)
                                   for cfg in plan["layers"]})
        self.head = _from_config(plan["head"], "the head", True)
        self.requires_grad_(False)


# ---- baking -----------------------------------------------------------------------------------


@torch.no_grad()
def bake(model: nn.Module, one_by_one: str = "matrix") -> BakedLipNet:
    """An inference model equal to ``model`` in evaluation mode, made of fixed tensors only: every
    layer and the head bake themselves (:meth:`certify.layers.protocol.LipschitzLayer.bake`).

    ``one_by_one`` chooses how 1x1 SOC layers (block 5 and the orthogonal head) are baked:
    ``"matrix"`` (default) as the single matrix exp(A), one product per forward instead of K and
    closer to the exact orthogonal map than the original's K-term series (the logits then differ
    from the original's by float32 rounding, ~1e-6); ``"taylor"`` as the original's own series,
    which reproduces the original's logits bit for bit.

    ``model`` is a LipConvnet from :func:`certify.models.create_model` (or a checkpoint loaded
    by :func:`certify.loading.load`); it is not modified. The baked model is in eval mode, on
    the same device, and carries the original's ``model_name``, ``model_kwargs`` and
    ``class_names`` so that it can be saved and described like the original.
    """
    from .layers.protocol import Head, LipschitzLayer

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
        if not isinstance(layer, LipschitzLayer):
            raise ExportError(f"cannot bake layer {name!r} of type {type(layer).__name__}")
        baked_layer = layer.bake(one_by_one=one_by_one)
        layers.append({"name": name, "type": baked_layer.layer_type, **baked_layer.config()})
        key = name.replace(".", "-")
        state.update({f"body.{key}.{k}": v.detach().clone() for k, v in baked_layer.state_dict().items()})
    if not isinstance(model.head, Head):
        raise ExportError(f"cannot bake a head of type {type(model.head).__name__}")
    head = model.head.bake(one_by_one=one_by_one)
    state.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    state.update({f"normalize.{k}": v.detach().clone() for k, v in model.normalize.state_dict().items()})
    plan = {
        "version": PLAN_VERSION,
        "num_classes": int(model.num_classes),
        "input_shape": list(model.input_shape),
        "mean": list(model.mean),
        "std": list(model.std),
        "padded_size": list(model.padded_size),
        "layers": layers,
        "head": {"type": head.layer_type, **head.config()},
    }
    baked = build_baked(plan)
    device = next((t.device for t in state.values()), torch.device("cpu"))
    baked = baked.to(device)
    baked.load_state_dict(state, strict=True)
    for attr in ("model_name", "model_kwargs", "class_names", "checkpoint_metadata"):
        if hasattr(model, attr):
            setattr(baked, attr, getattr(model, attr))
    return baked.eval()


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
    ``checkpoint_kind = "baked"`` with its layer plan, so :func:`certify.loading.load` rebuilds
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
