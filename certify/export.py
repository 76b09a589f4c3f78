"""Export a lipcert model for deployment: ONNX (run by onnxruntime) or a baked safetensors file.

Both formats start from :func:`certify.baked.bake` (the parametrisations evaluated once) and are
checked before anything is written: the exported artefact is run on a random batch and its logits
are compared with the original model's; an export whose maximum absolute logit difference exceeds
the tolerance fails with :class:`~certify.errors.ExportError` and leaves no file behind.

- ONNX: lipcert's own translation of the baked model (:mod:`certify.onnx_graph`), with a dynamic
  batch axis, validated by ``onnx.checker`` and run by onnxruntime. ``metadata_props`` holds the
  layer plan and the graph format. :func:`load_onnx_model` rebuilds the baked model from the plan
  and the graph's own initializers, requires the graph to be exactly the one lipcert writes for
  it, and computes the bounds from the rebuilt model (``bound_source`` :data:`BOUND_VERIFIED`);
  the bounds at export are stored too, as a record, and are read only when the user opts in to
  trusting a file that does not verify (:data:`BOUND_TRUSTED`).
- safetensors: the baked model's tensors with its layer plan; :func:`certify.loading.load`
  rebuilds it with no training code, and the bound is recomputed from those tensors as usual.

Needs the ``export`` extra (onnx, onnxruntime) for ONNX only.
"""

from __future__ import annotations

import importlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .baked import BakedLipNet, bake
from .checkpoint import SCHEMA, atomic_write_bytes
from .errors import CheckpointError, ConfigError, ExportError, LipcertError, NotLipschitzError
from .lipschitz import LayerBound

EXTRA_INSTALL = "pip install 'lipcert[export]'"
FORMATS = ("onnx", "safetensors")
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # as certify.onnx_graph names them

BOUND_METHOD = (
    "product of per-layer rigorous upper bounds computed from the baked weights at export time: "
    "3x3 SOC 1 + a^K/K! with a from the float64 eigenvalues of the filter's DFT blocks on the real "
    "feature-map size; 1x1 SOC (one matrix exp(A)) and LLN head the float64 spectral norm of the "
    "stored matrix; activations and pooling 1; input normalisation 1/min(std)"
)

# Metadata of the source checkpoint that describes the model rather than the file: copied into
# the export so that a deployed model still says what it was trained on.
# The data keys let `lipcert certify` rebuild the checkpoint's own validation split from an export.
_PASSTHROUGH = ("class_names", "dataset", "dataset_fingerprint", "seed", "epoch", "config", "data_seed",
                "val_split", "val_limit", "val_fingerprint", "synthetic_size", "data_dir", "limit")


def require(module: str, purpose: str):
    """Import an optional dependency of the ``export`` extra or say exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"{purpose} needs the Python package {module!r}, which is not installed; "
            f"install the export extra: {EXTRA_INSTALL}"
        ) from None


@dataclass
class ExportReport:
    """What an export wrote and how closely it matches the original model."""

    path: Path
    format: str
    exporter: str  # "dynamo", "torchscript" or "safetensors"
    opset: int | None
    max_abs_logit_diff: float  # exported artefact vs the original model, on the check batch
    baked_max_abs_logit_diff: float  # baked PyTorch model vs the original
    tolerance: float
    lipschitz_bound: float | None  # of the exported model (None for an MLP head)
    original_lipschitz_bound: float | None
    certificate: str
    check_batch: int
    seconds: float
    size_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        d["path"] = str(self.path)
        return {**d, **self.extra}


# ---- shared helpers ---------------------------------------------------------------------------


def _check_output(path: Path, overwrite: bool, source: Path | None = None) -> None:
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give the output file name")
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise ExportError(f"{path}: the output would replace the checkpoint being exported")
    if path.exists() and not overwrite:
        raise ExportError(f"{path}: exists already; pass --overwrite (overwrite=True) to replace it")


def _check_batch(model: nn.Module, batch_size: int, seed: int) -> torch.Tensor:
    """Uniform random images in [0, 1]: what the model sees in deployment, whatever the data."""
    if batch_size < 1:
        raise ConfigError(f"the check batch needs at least 1 image, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, *model.input_shape), generator=gen)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.to(_model_device(model))).detach().to("cpu", torch.float64)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ExportError(f"the exported model gives logits of shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    d = (a.to(torch.float64) - b.to(torch.float64)).abs()
    if not torch.isfinite(d).all():
        return math.inf
    return float(d.max()) if d.numel() else 0.0


def _source_info(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, "checkpoint_metadata", None) or {}
    info = {k: meta[k] for k in _PASSTHROUGH if k in meta}
    if getattr(model, "class_names", None) is not None:
        info["class_names"] = list(model.class_names)
    return info


def _prepare(model: nn.Module, one_by_one: str) -> tuple[nn.Module, BakedLipNet]:
    if not hasattr(model, "num_classes") or not hasattr(model, "input_shape"):
        raise ExportError(f"cannot export {type(model).__name__}: not a lipcert model")
    model.eval()
    baked = model if isinstance(model, BakedLipNet) else bake(model, one_by_one=one_by_one)
    return model, baked.to("cpu").eval()


def _tolerance(tolerance: float) -> float:
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"the tolerance must be a finite number >= 0, got {tolerance}")
    return float(tolerance)


# ---- safetensors ------------------------------------------------------------------------------


def export_safetensors(
    model: nn.Module,
    path: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    one_by_one: str = "matrix",
    source: Path | None = None,
) -> ExportReport:
    """Bake ``model`` and write it as a baked ``.safetensors`` checkpoint (loadable by
    :func:`certify.loading.load` without training code), after checking that the file, read
    back, gives the original's logits within ``tolerance``."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from .baked import BAKED_KIND, model_from_metadata

    start = time.perf_counter()
    path, tolerance = Path(path), _tolerance(tolerance)
    _check_output(path, overwrite, source)
    model, baked = _prepare(model, one_by_one)
    x = _check_batch(baked, batch_size, seed)
    want = _logits(model, x)
    baked_diff = _max_diff(want, _logits(baked, x))

    # Serialise in memory, read the bytes back exactly as `load` will, check, then write.
    from .checkpoint import _metadata, load_state_strict

    meta = _metadata(baked, checkpoint_kind=BAKED_KIND, baked_plan=json.dumps(baked.plan, sort_keys=True),
                     **_source_info(model))
    data = st_save({k: v.detach().cpu().contiguous() for k, v in baked.state_dict().items()}, metadata=meta)
    again = model_from_metadata(meta, path)
    load_state_strict(again, st_load(data), path)
    diff = _max_diff(want, _logits(again.eval(), x))
    if not diff <= tolerance:
        raise ExportError(f"the baked model's logits differ from the original's by {diff:.3g} "
                          f"(tolerance {tolerance:g}); nothing written")
    atomic_write_bytes(path, data)
    curvature = baked.certificate == "curvature"
    return ExportReport(
        path=path, format="safetensors", exporter="safetensors", opset=None,
        max_abs_logit_diff=diff, baked_max_abs_logit_diff=baked_diff, tolerance=tolerance,
        lipschitz_bound=None if curvature else again.lipschitz_bound(),
        original_lipschitz_bound=None if curvature else float(model.lipschitz_bound()),
        certificate=baked.certificate, check_batch=batch_size,
        seconds=time.perf_counter() - start, size_bytes=len(data),
    )


# ---- ONNX -------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _ort_session(ort, model_bytes_or_path, device: str | torch.device = "cpu"):
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            warnings.warn("onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on the CPU",
                          RuntimeWarning, stacklevel=3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings would clutter the CLI's stderr
    return ort.InferenceSession(model_bytes_or_path, sess_options=opts, providers=providers)


def _bounds_metadata(baked: BakedLipNet) -> dict[str, str]:
    """The bounds at export, as a record for readers of the file. lipcert itself recomputes them
    from the graph on load and reads these only under ``bound="trust"`` for a graph it cannot
    verify."""
    meta: dict[str, str] = {"head_kind": baked.head_kind, "certificate": baked.certificate}
    if baked.certificate == "curvature":
        return meta
    bounds = baked.layer_bounds()
    meta["lipschitz_bound"] = repr(float(baked.lipschitz_bound()))
    meta["lipschitz_bound_method"] = BOUND_METHOD
    meta["layer_bounds"] = json.dumps([
        {"name": b.name, "kind": b.kind, "input_size": None if b.input_size is None else list(b.input_size),
         "bound": b.bound} for b in bounds])
    if baked.certificate == "pairwise":
        meta["feature_lipschitz_bound"] = repr(float(baked.feature_lipschitz_bound()))
        dist = baked.head.pairwise_row_distances().to(torch.float64).cpu()
        meta["pairwise_row_distances"] = json.dumps(dist.tolist())  # floats via repr: exact
    return meta


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    one_by_one: str = "matrix",
    source: Path | None = None,
) -> ExportReport:
    """Bake ``model``, write lipcert's ONNX graph of it (:func:`certify.onnx_graph.build_model`)
    and check it with onnx.checker and onnxruntime.

    The ONNX model has one input ``images`` (N, C, H, W) in [0, 1] with a dynamic batch axis and
    one output ``logits`` (N, classes); normalisation is inside the graph. onnxruntime runs it on
    ``batch_size`` random images and on a single image (a second batch size, which checks the
    dynamic axis); if any logit differs from the original model's by more than ``tolerance``
    the export fails and nothing is written. ``metadata_props`` holds the lipcert metadata, the
    layer plan and the graph format that :func:`load_onnx_model` needs to rebuild and verify the
    graph, and the bounds at export as a record. The file is read back and verified exactly as
    :func:`load_onnx_model` does before it is written.
    """
    start = time.perf_counter()
    onnx = require("onnx", "ONNX export")
    ort = require("onnxruntime", "checking the exported ONNX model")
    from .onnx_graph import GRAPH_FORMAT, OPSET, build_model

    opset = OPSET if opset is None else int(opset)
    path, tolerance = Path(path), _tolerance(tolerance)
    _check_output(path, overwrite, source)
    model, baked = _prepare(model, one_by_one)
    if baked.certificate == "curvature":
        raise ExportError("ONNX export of a model with an MLP head is not supported: its curvature "
                          "certificate needs the head's weights and the features, which the ONNX "
                          "graph does not expose; export it with --format safetensors")
    x = _check_batch(baked, batch_size, seed)
    want = _logits(model, x)
    baked_diff = _max_diff(want, _logits(baked, x))

    proto = build_model(baked, opset)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {_first_line(e)}") from None
    try:
        session = _ort_session(ort, proto.SerializeToString())
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        got_one = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x[:1].numpy()})[0])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(e)}") from None
    diff = max(_max_diff(want, got), _max_diff(want[:1], got_one))
    if not diff <= tolerance:
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} (tolerance "
                          f"{tolerance:g}); nothing written")

    meta = {
        "schema": SCHEMA,
        "format": "onnx",
        "graph_format": GRAPH_FORMAT,
        "baked_plan": json.dumps(baked.plan, sort_keys=True),
        "model": getattr(model, "model_name", type(model).__name__),
        "model_kwargs": json.dumps(getattr(model, "model_kwargs", {}), sort_keys=True),
        "num_classes": str(int(baked.num_classes)),
        "input_shape": json.dumps(list(baked.input_shape)),
        "mean": json.dumps(list(baked.mean)),
        "std": json.dumps(list(baked.std)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "exporter": "lipcert",
        "opset": str(opset),
        "max_abs_logit_diff": repr(diff),
        "tolerance": repr(tolerance),
        "lipcert_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        **_bounds_metadata(baked),
    }
    info = _source_info(model)
    info.setdefault("class_names", [str(i) for i in range(baked.num_classes)])
    for k, v in info.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    data = proto.SerializeToString()
    # The bytes written are ones the loader accepts: same parse, same verification.
    again = verify_onnx_graph(onnx.load_model_from_string(data), path)
    bound = float(again.lipschitz_bound())
    atomic_write_bytes(path, data)
    return ExportReport(
        path=path, format="onnx", exporter="lipcert", opset=opset, max_abs_logit_diff=diff,
        baked_max_abs_logit_diff=baked_diff, tolerance=tolerance, lipschitz_bound=bound,
        original_lipschitz_bound=float(model.lipschitz_bound()),
        certificate=meta["certificate"], check_batch=batch_size,
        seconds=time.perf_counter() - start, size_bytes=len(data),
        extra={"notes": [], "graph_format": GRAPH_FORMAT},
    )


def export_model(model: nn.Module, path: str | Path, format: str = "onnx", **kwargs) -> ExportReport:
    """Export ``model`` to ``path`` in ``format`` (``onnx`` or ``safetensors``)."""
    if format == "onnx":
        return export_onnx(model, path, **kwargs)
    if format == "safetensors":
        kwargs.pop("opset", None)
        return export_safetensors(model, path, **kwargs)
    raise ConfigError(f"unknown export format {format!r}; choose from {FORMATS}")


# ---- loading an exported ONNX model -----------------------------------------------------------

#: ``bound_source`` of an ONNX model whose graph lipcert verified and whose bound it computed.
BOUND_VERIFIED = "computed from the weights (ONNX graph verified as lipcert's)"
#: ``bound_source`` of an ONNX model certified with the bound its metadata stores (opt-in).
BOUND_TRUSTED = "trusted from the file (stored at export, not verified)"
#: How :func:`load_onnx_model` obtains a bound: verify the graph, fall back to the stored bound, or none.
BOUND_MODES = ("verify", "trust", "none")
#: Largest |logit| difference, relative to max(1, |logit|), between onnxruntime and the rebuilt
#: PyTorch model on load (the same ops in float32: ~1e-6 is typical).
LOAD_TOLERANCE = 1e-4


def verify_onnx_graph(proto, path: str | Path = "<onnx>") -> BakedLipNet:
    """The baked model an ONNX ``proto`` is the lipcert graph of, or :class:`CheckpointError`.

    The layer plan comes from the metadata and every baked tensor from the graph's initializer of
    the same name; the rebuilt model's graph (:func:`certify.onnx_graph.build_model`, for the
    file's opset) must then equal the file's in every node, attribute, initializer value, input,
    output and opset (:func:`certify.onnx_graph.model_difference`). So the graph computes what
    the rebuilt model computes, and a bound computed from the rebuilt model is a bound of the
    graph, whatever the metadata says. The error names the first thing that differs.
    """
    from onnx import TensorProto, numpy_helper

    from .baked import model_from_metadata
    from .checkpoint import load_state_strict
    from .onnx_graph import GRAPH_FORMAT, OPSETS, build_model, model_difference

    path = Path(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    _validate_meta(meta, path)
    if meta.get("graph_format") != GRAPH_FORMAT:
        found = meta.get("graph_format")
        raise CheckpointError(
            f"{path}: {'no graph format recorded' if found is None else f'graph format {found!r}'}, "
            f"this lipcert verifies {GRAPH_FORMAT!r} (an export of an older lipcert, or another tool's graph; "
            "re-export the checkpoint with `lipcert export`)")
    opsets = [int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if len(opsets) != 1 or opsets[0] not in OPSETS:
        raise CheckpointError(f"{path}: ONNX opset {opsets or 'none'}; lipcert writes one of {OPSETS[0]}-{OPSETS[-1]}")
    baked = model_from_metadata(meta, path)
    if baked.certificate == "curvature":
        raise CheckpointError(f"{path}: its layer plan has an MLP head, which lipcert never exports to ONNX")
    initializers = {t.name: t for t in proto.graph.initializer}
    state = {}
    for key in baked.state_dict():
        t = initializers.get(key)
        if t is None:
            raise CheckpointError(f"{path}: the graph has no initializer {key!r} (a tensor of its layer plan)")
        if t.data_type != TensorProto.FLOAT or t.data_location == TensorProto.EXTERNAL:
            raise CheckpointError(f"{path}: initializer {key!r} is not a float32 tensor stored in the file")
        state[key] = torch.from_numpy(numpy_helper.to_array(t).copy())
    load_state_strict(baked, state, path)
    baked.eval()
    try:
        expected = build_model(baked, opsets[0])
    except LipcertError as e:
        raise CheckpointError(f"{path}: its layer plan has no lipcert graph ({e})") from None
    difference = model_difference(expected, proto)
    if difference is not None:
        raise CheckpointError(f"{path}: not the graph lipcert writes for its layer plan: {difference}")
    return baked


def _cross_check(session, baked: BakedLipNet, path: Path) -> None:
    """A second line of defence behind the graph comparison: onnxruntime and the rebuilt PyTorch
    model agree on a few random images."""
    from .numerics import ieee_float32

    x = torch.rand((4, *baked.input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with ieee_float32():
            want = _logits(baked, x)
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    except Exception as e:
        raise CheckpointError(f"{path}: the graph or the model rebuilt from it cannot run ({_first_line(e)})") from None
    diff = _max_diff(want, got)
    limit = LOAD_TOLERANCE * max(1.0, float(want.abs().max()))
    if not diff <= limit:
        raise CheckpointError(f"{path}: onnxruntime's logits differ from the model rebuilt from the graph by "
                              f"{diff:.3g} (more than {limit:.3g}); refusing to certify it")


class _StoredLLNHead:
    """The LLN head as a file's metadata describes it (``bound="trust"`` only)."""

    kind = "lln"

    def __init__(self, distances: torch.Tensor, bound: float | None) -> None:
        self._distances, self._bound = distances, bound

    def pairwise_row_distances(self) -> torch.Tensor:
        return self._distances.clone()

    def lipschitz_bound(self, input_size=None) -> float:
        if self._bound is None:
            raise ExportError("no bound of the LLN head is stored in the ONNX metadata")
        return self._bound


class _StoredBounds:
    """The bounds a file's metadata claims, taken on trust (``bound="trust"`` only)."""

    def __init__(self, meta: dict[str, str], path: Path) -> None:
        if "schema" not in meta:
            raise CheckpointError(f"{path}: an ONNX model without lipcert metadata stores no Lipschitz bound to "
                                  "trust; pass one you vouch for (--lipschitz L)")
        _validate_meta(meta, path)
        if "lipschitz_bound" not in meta:
            raise CheckpointError(f"{path}: the file stores no Lipschitz bound to trust; pass a bound you vouch "
                                  "for (--lipschitz L)")
        try:
            self.head_kind = meta.get("head_kind", "ortho")
            self.certificate = "pairwise" if self.head_kind == "lln" else "global"
            self.num_classes = int(meta["num_classes"])
            self.input_shape = tuple(int(s) for s in json.loads(meta["input_shape"]))
            self.mean = tuple(float(v) for v in json.loads(meta["mean"]))
            self.std = tuple(float(v) for v in json.loads(meta["std"]))
            self.bound = float(meta["lipschitz_bound"])
            self.layers = [
                LayerBound(b["name"], b["kind"], None if b["input_size"] is None else tuple(b["input_size"]),
                           float(b["bound"])) for b in json.loads(meta.get("layer_bounds", "[]"))]
            self.head = None
            if self.head_kind == "lln":
                self.feature_bound = float(meta["feature_lipschitz_bound"])
                dist = torch.tensor(json.loads(meta["pairwise_row_distances"]), dtype=torch.float64)
                if dist.shape != (self.num_classes, self.num_classes):
                    raise ValueError(f"pairwise_row_distances has shape {tuple(dist.shape)}")
                head_bound = next((b.bound for b in self.layers if b.name == "head"), None)
                self.head = _StoredLLNHead(dist, head_bound)
            for value in (self.bound, getattr(self, "feature_bound", 1.0)):
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"a stored bound of {value!r} is not a positive finite number")
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: incomplete or malformed lipcert metadata in the ONNX model "
                                  f"({type(e).__name__}: {e})") from None

    def lipschitz_bound(self) -> float:
        return self.bound

    def feature_lipschitz_bound(self) -> float:
        if self.head_kind != "lln":
            raise ExportError("a feature bound is stored for LLN heads only")
        return self.feature_bound

    def layer_bounds(self) -> list[LayerBound]:
        return list(self.layers)


class OnnxModel:
    """An ONNX model run by onnxruntime, usable like a lipcert model by
    :class:`~certify.certificates.Certifier`: callable on a float image batch (any torch device;
    logits come back on the same device).

    Its bounds come from ``bounds``: the baked model rebuilt from a verified lipcert graph
    (:func:`verify_onnx_graph`), the bounds a file's metadata stores (taken on trust), or none
    (the caller supplies a bound); ``bound_source`` says which.
    """

    training = False

    def __init__(self, session, path: Path, meta: dict[str, str], bounds=None, bound_source: str | None = None) -> None:
        self.session, self.path = session, Path(path)
        self.metadata = dict(meta)
        self._bounds = bounds
        self.bound_source = bound_source or "none (a bound must be supplied)"
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise CheckpointError(f"{path}: an ONNX model with {len(inputs)} inputs and {len(outputs)} outputs; "
                                  "lipcert certifies models with one image input and a logits output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        in_shape, out_shape = list(inputs[0].shape), list(outputs[0].shape)
        self._fixed_batch = in_shape[0] if in_shape and isinstance(in_shape[0], int) and in_shape[0] > 0 else None
        lipcert = "schema" in meta
        try:
            if len(in_shape) == 4 and all(isinstance(s, int) for s in in_shape[1:]):
                self.input_shape = tuple(in_shape[1:])
            elif lipcert:
                self.input_shape = tuple(int(s) for s in json.loads(meta["input_shape"]))
            else:
                raise CheckpointError(f"{path}: its input has shape {in_shape}; lipcert needs (N, C, H, W) images "
                                      "of a fixed size")
            if len(out_shape) == 2 and isinstance(out_shape[1], int):
                self.num_classes = out_shape[1]
            else:
                self.num_classes = int(meta["num_classes"]) if lipcert else None
            self.model_name = meta.get("model", self.path.name)
            self.model_kwargs = json.loads(meta.get("model_kwargs", "{}"))
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: incomplete or malformed lipcert metadata in the ONNX model "
                                  f"({type(e).__name__}: {e})") from None
        count = self.num_classes or 0
        self.class_names = [str(n) for n in names] if isinstance(names, list) else [str(i) for i in range(count)]
        self.head_kind = getattr(bounds, "head_kind", None)
        self.head = getattr(bounds, "head", None)
        self.certificate = getattr(bounds, "certificate", "global")
        self.mean = getattr(bounds, "mean", None)
        self.std = getattr(bounds, "std", None)
        if bounds is not None and (tuple(bounds.input_shape) != self.input_shape
                                   or int(bounds.num_classes) != self.num_classes):
            raise CheckpointError(f"{path}: the graph's input {self.input_shape} and {self.num_classes} outputs do not "
                                  f"match its lipcert metadata ({tuple(bounds.input_shape)}, {bounds.num_classes})")
        self.checkpoint_metadata = {k: _maybe_json(v) for k, v in meta.items()} if lipcert else {}

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, model={self.model_name!r}, bound_source={self.bound_source!r})"

    # nn.Module-like no-ops, so code written for models works unchanged
    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise ConfigError("an exported ONNX model cannot be trained")
        return self

    def to(self, *args, **kwargs) -> OnnxModel:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> OnnxModel:
        return self

    def parameters(self):
        return iter(())

    def buffers(self):
        return iter(())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), got {shape}")
        n = x.shape[0]
        if n == 0:
            return torch.zeros(0, self.num_classes or 0, device=x.device, dtype=x.dtype)
        if x.dtype == torch.float64 and self.evaluates_float64:
            # the verified graph's function in float64 arithmetic: the rebuilt model runs the
            # same ops on the same float32 weights (for a float64 re-check of float32 margins)
            with torch.no_grad():
                return self._bounds(x.to("cpu")).to(x.device)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self._fixed_batch or n
        outs = []
        for i in range(0, n, step):  # a graph with a fixed batch size runs in chunks of it, the last padded
            chunk = arr[i:i + step]
            if chunk.shape[0] < step:
                pad = np.zeros((step - chunk.shape[0], *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.session.run([self.output_name], {self.input_name: chunk})[0])
        out = np.concatenate(outs)[:n]
        return torch.from_numpy(out).to(x.device)

    forward = __call__

    @property
    def evaluates_float64(self) -> bool:
        """Whether a float64 batch is evaluated in float64 (only a verified graph, through the
        model rebuilt from it; onnxruntime runs the graph in float32)."""
        return isinstance(self._bounds, BakedLipNet)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise ExportError("an exported ONNX model gives logits only, not features")

    def _need_bounds(self):
        if self._bounds is None:
            raise NotLipschitzError(f"{self.path}: no Lipschitz bound for this ONNX model; pass one you vouch for "
                                    "(--lipschitz L)")
        return self._bounds

    def lipschitz_bound(self) -> float:
        return float(self._need_bounds().lipschitz_bound())

    def feature_lipschitz_bound(self) -> float:
        if self.certificate != "pairwise":
            raise ExportError(f"{self.path}: a feature bound exists for LLN heads only")
        return float(self._need_bounds().feature_lipschitz_bound())

    def layer_bounds(self) -> list[LayerBound]:
        return list(self._need_bounds().layer_bounds())


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The lipcert metadata of an exported ONNX model (needs only the ``onnx`` package)."""
    onnx = require("onnx", "reading ONNX metadata")
    path = Path(path)
    _check_input_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    _validate_meta(meta, path)
    return meta


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a model file")


def _validate_meta(meta: dict[str, str], path: Path) -> None:
    if "schema" not in meta:
        raise CheckpointError(f"{path}: an ONNX model without lipcert metadata (not written by `lipcert export`)")
    if meta["schema"] != SCHEMA:
        raise CheckpointError(f"{path}: unknown schema version {meta['schema']!r}; this lipcert reads {SCHEMA!r}")


def load_onnx_model(path: str | Path, device: str | torch.device = "cpu", bound: str = "verify") -> OnnxModel:
    """Open an ONNX model for certification through onnxruntime.

    ``bound`` says where its Lipschitz bound comes from:

    - ``"verify"`` (default): the file must be a graph :func:`export_onnx` wrote; the baked model
      is rebuilt from its layer plan and initializers, the graph is checked to be exactly the one
      lipcert writes for it (:func:`verify_onnx_graph`), onnxruntime's logits are checked
      against the rebuilt model's, and the bounds are computed from the rebuilt model. Anything
      else raises :class:`CheckpointError` naming what differs. Bounds stored in the metadata are
      ignored.
    - ``"trust"``: as ``"verify"``, but a file that fails verification is certified with the
      bounds its lipcert metadata stores, reported as :data:`BOUND_TRUSTED`.
    - ``"none"``: no bound is taken from the file, for a caller that supplies one
      (``Certifier(model, lipschitz=L)``); any ONNX model with one (N, C, H, W) image input and a
      logits output loads.

    Needs ``onnx`` and ``onnxruntime``. ``device`` picks onnxruntime's CUDA provider when it is
    installed (``onnxruntime-gpu``), else the CPU; inputs may live on any torch device. The
    session runs the very bytes that were verified (the file is read once).
    """
    if bound not in BOUND_MODES:
        raise ConfigError(f"unknown ONNX bound mode {bound!r}; choose from {BOUND_MODES}")
    ort = require("onnxruntime", "running an exported ONNX model")
    onnx = require("onnx", "checking an exported ONNX model")
    path = Path(path)
    _check_input_file(path)
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
        session = _ort_session(ort, data, device)
    except LipcertError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if bound == "none":
        if "schema" in meta:
            _validate_meta(meta, path)
        return OnnxModel(session, path, meta)
    try:
        baked = verify_onnx_graph(proto, path)
        _cross_check(session, baked, path)
    except CheckpointError as e:
        if bound == "verify" and "schema" not in meta:
            # another tool's graph: translated op for op, checked against onnxruntime, bounded from its
            # own initializers (certify.foreign_onnx); refused naming the first op it cannot bound
            from .foreign_onnx import foreign_onnx_model

            foreign = foreign_onnx_model(proto, session, path)
            return OnnxModel(session, path, meta, foreign, foreign.bound_source)
        if bound == "verify":
            stored = "lipschitz_bound" in meta
            trust = "--trust-onnx-bound to certify with the bound the file stores, or " if stored else ""
            raise CheckpointError(f"{e}. lipcert computes an ONNX model's bound only from a graph it verifies as its "
                                  f"own; pass {trust}--lipschitz L for a bound you vouch for (the report then says "
                                  "so)") from None
        return OnnxModel(session, path, meta, _StoredBounds(meta, path), BOUND_TRUSTED)
    return OnnxModel(session, path, meta, baked, BOUND_VERIFIED)
