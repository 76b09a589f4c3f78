"""Export a lipcert model for deployment: ONNX (run by onnxruntime) or a baked safetensors file.

Both formats start from :func:`certify.baked.bake` (the parametrisations evaluated once) and are
checked before anything is written: the exported artefact is run on a random batch and its logits
are compared with the original model's; an export whose maximum absolute logit difference exceeds
the tolerance fails with :class:`~certify.errors.ExportError` and leaves no file behind.

- ONNX: ``torch.onnx.export(dynamo=True)`` (the TorchScript exporter only if dynamo fails), with a
  dynamic batch axis, validated by ``onnx.checker`` and run by onnxruntime. An ONNX graph does not
  let lipcert recompute a sound bound, so the bound is computed from the baked weights at export
  and stored in the model's ``metadata_props`` with how it was computed, the certificate method
  and (LLN head) the feature bound and the row-distance matrix. :func:`load_onnx_model` turns the
  file back into an object that :class:`~certify.certificates.Certifier` certifies through
  onnxruntime, with ``bound_source = "stored at export"``.
- safetensors: the baked model's tensors with its layer plan; :func:`certify.checkpoint.load`
  rebuilds it with no training code, and the bound is recomputed from those tensors as usual.

Needs the ``export`` extra (onnx, onnxscript, onnxruntime) for ONNX only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .baked import BakedLipNet, bake
from .checkpoint import SCHEMA, atomic_write_bytes
from .errors import CheckpointError, ConfigError, ExportError, LipcertError
from .lipschitz import LayerBound

EXTRA_INSTALL = "pip install 'lipcert[export]'"
FORMATS = ("onnx", "safetensors")
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"

BOUND_METHOD = (
    "product of per-layer rigorous upper bounds computed from the baked weights at export time: "
    "3x3 SOC 1 + a^K/K! with a from the float64 eigenvalues of the filter's DFT blocks on the real "
    "feature-map size; 1x1 SOC (one matrix exp(A)) and LLN head the float64 spectral norm of the "
    "stored matrix; activations and pooling 1; input normalisation 1/min(std)"
)

# Metadata of the source checkpoint that describes the model rather than the file: copied into
# the export so that a deployed model still says what it was trained on.
_PASSTHROUGH = ("class_names", "dataset", "dataset_fingerprint", "seed", "epoch", "config")


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


def _certificate(head_kind: str) -> str:
    return {"lln": "pairwise", "mlp": "curvature"}.get(head_kind, "global")


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
    :func:`certify.checkpoint.load` without training code), after checking that the file, read
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
    head = baked.head_kind
    return ExportReport(
        path=path, format="safetensors", exporter="safetensors", opset=None,
        max_abs_logit_diff=diff, baked_max_abs_logit_diff=baked_diff, tolerance=tolerance,
        lipschitz_bound=None if head == "mlp" else again.lipschitz_bound(),
        original_lipschitz_bound=None if head == "mlp" else float(model.lipschitz_bound()),
        certificate=_certificate(head), check_batch=batch_size,
        seconds=time.perf_counter() - start, size_bytes=len(data),
    )


# ---- ONNX -------------------------------------------------------------------------------------


def _torch_export_onnx(baked: BakedLipNet, x: torch.Tensor, out: Path, opset: int | None) -> tuple[str, list[str]]:
    """Write ``baked`` to ``out`` as ONNX; dynamo first, the TorchScript exporter as a fallback.

    Returns the exporter used and the notes of a failed first attempt. The exporters print
    progress on stdout, which is for results: it goes to stderr instead.
    """
    notes: list[str] = []
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                baked, (x,), str(out), dynamo=True, verbose=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), external_data=False, optimize=True,
                custom_translation_table=_custom_translations(),
            )
            return "dynamo", notes
        except Exception as e:  # the exporters raise many types; keep the reason, try the fallback
            notes.append(f"dynamo exporter failed: {_first_line(e)}")
        try:
            kwargs = {} if opset is None else {"opset_version": opset}
            torch.onnx.export(
                baked, (x,), str(out), dynamo=False, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs,
            )
            return "torchscript", notes
        except Exception as e:
            notes.append(f"TorchScript exporter failed: {_first_line(e)}")
    raise ExportError("ONNX export failed: " + "; ".join(notes))


def _custom_translations() -> dict:
    """ONNX translations of ops the dynamo exporter lacks: ``hypot`` (the apex branch of Lip
    pooling) as ``sqrt(a*a + b*b)``; equal to hypot up to rounding for the magnitudes that occur
    in a network (no overflow below 1e19)."""
    from onnxscript import opset18 as op

    def hypot(a, b):
        return op.Sqrt(op.Add(op.Mul(a, a), op.Mul(b, b)))

    table = {}
    for overload in (getattr(torch.ops.prims, "hypot", None), getattr(torch.ops.aten, "hypot", None)):
        if overload is not None:
            table[overload.default] = hypot
    return table


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
    head = baked.head_kind
    meta: dict[str, str] = {"head_kind": head, "certificate": _certificate(head)}
    if head == "mlp":
        return meta
    bounds = baked.layer_bounds()
    meta["lipschitz_bound"] = repr(float(baked.lipschitz_bound()))
    meta["lipschitz_bound_method"] = BOUND_METHOD
    meta["layer_bounds"] = json.dumps([
        {"name": b.name, "kind": b.kind, "input_size": None if b.input_size is None else list(b.input_size),
         "bound": b.bound} for b in bounds])
    if head == "lln":
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
    """Bake ``model``, export it to ONNX and check it with onnx.checker and onnxruntime.

    The ONNX model has one input ``images`` (N, C, H, W) in [0, 1] with a dynamic batch axis and
    one output ``logits`` (N, classes); normalisation is inside the graph. onnxruntime runs it on
    ``batch_size`` random images and on a single image (a second batch size, which checks the
    dynamic axis); if any logit differs from the original model's by more than ``tolerance``
    the export fails and nothing is written. The lipcert metadata, the Lipschitz bound computed
    at export included, is stored in ``metadata_props``.
    """
    start = time.perf_counter()
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    ort = require("onnxruntime", "checking the exported ONNX model")
    path, tolerance = Path(path), _tolerance(tolerance)
    _check_output(path, overwrite, source)
    model, baked = _prepare(model, one_by_one)
    if baked.head_kind == "mlp":
        raise ExportError("ONNX export of a model with an MLP head is not supported: its curvature "
                          "certificate needs the head's weights and the features, which the ONNX "
                          "graph does not expose; export it with --format safetensors")
    x = _check_batch(baked, batch_size, seed)
    want = _logits(model, x)
    baked_diff = _max_diff(want, _logits(baked, x))

    with tempfile.TemporaryDirectory(prefix="lipcert-export-") as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        exporter, notes = _torch_export_onnx(baked, x, tmp_file, opset)
        try:
            proto = onnx.load(str(tmp_file))
        except Exception as e:
            raise ExportError(f"the exporter wrote an unreadable ONNX file ({_first_line(e)})") from None
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {_first_line(e)}") from None
    graph_bytes = proto.SerializeToString()
    try:
        session = _ort_session(ort, graph_bytes)
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        got_one = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x[:1].numpy()})[0])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(e)}") from None
    diff = max(_max_diff(want, got), _max_diff(want[:1], got_one))
    if not diff <= tolerance:
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} (tolerance "
                          f"{tolerance:g}); nothing written")

    opset_used = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta = {
        "schema": SCHEMA,
        "format": "onnx",
        "model": getattr(model, "model_name", type(model).__name__),
        "model_kwargs": json.dumps(getattr(model, "model_kwargs", {}), sort_keys=True),
        "num_classes": str(int(baked.num_classes)),
        "input_shape": json.dumps(list(baked.input_shape)),
        "mean": json.dumps(list(baked.mean)),
        "std": json.dumps(list(baked.std)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "exporter": exporter,
        "opset": str(opset_used),
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
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.producer_version = "lipcert", __version__
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return ExportReport(
        path=path, format="onnx", exporter=exporter, opset=opset_used, max_abs_logit_diff=diff,
        baked_max_abs_logit_diff=baked_diff, tolerance=tolerance,
        lipschitz_bound=float(meta["lipschitz_bound"]),
        original_lipschitz_bound=float(model.lipschitz_bound()),
        certificate=meta["certificate"], check_batch=batch_size,
        seconds=time.perf_counter() - start, size_bytes=len(data), extra={"notes": notes},
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


class _StoredLLNHead:
    """The LLN head of an ONNX model: only what the pairwise certificate needs, as stored."""

    kind = "lln"

    def __init__(self, distances: torch.Tensor, bound: float | None) -> None:
        self._distances, self._bound = distances, bound

    def pairwise_row_distances(self) -> torch.Tensor:
        return self._distances.clone()

    def lipschitz_bound(self, input_size=None) -> float:
        if self._bound is None:
            raise ExportError("no bound of the LLN head is stored in the ONNX metadata")
        return self._bound


class OnnxModel:
    """An exported ONNX model run by onnxruntime, usable like a lipcert model by
    :class:`~certify.certificates.Certifier`: callable on a float image batch (any torch device;
    logits come back on the same device), with the certification attributes read from the
    metadata. Its bounds are the ones stored at export (``bound_source``), not recomputed.
    """

    bound_source = "stored at export"
    training = False

    def __init__(self, session, meta: dict[str, str], path: Path) -> None:
        self.session, self.path = session, path
        self.metadata = dict(meta)
        try:
            self.model_name = meta.get("model", "?")
            self.model_kwargs = json.loads(meta.get("model_kwargs", "{}"))
            self.num_classes = int(meta["num_classes"])
            self.input_shape = tuple(int(s) for s in json.loads(meta["input_shape"]))
            self.mean = tuple(float(v) for v in json.loads(meta["mean"]))
            self.std = tuple(float(v) for v in json.loads(meta["std"]))
            self.head_kind = meta.get("head_kind", "ortho")
            self.certificate = meta.get("certificate", "global")
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
            self.class_names = [str(n) for n in names] if isinstance(names, list) else [
                str(i) for i in range(self.num_classes)]
            self._bound = float(meta["lipschitz_bound"]) if "lipschitz_bound" in meta else None
            self._layer_bounds = [
                LayerBound(b["name"], b["kind"], None if b["input_size"] is None else tuple(b["input_size"]),
                           float(b["bound"])) for b in json.loads(meta.get("layer_bounds", "[]"))]
            self.head = None
            if self.head_kind == "lln":
                self._feature_bound = float(meta["feature_lipschitz_bound"])
                dist = torch.tensor(json.loads(meta["pairwise_row_distances"]), dtype=torch.float64)
                if dist.shape != (self.num_classes, self.num_classes):
                    raise ValueError(f"pairwise_row_distances has shape {tuple(dist.shape)}")
                head_bound = next((b.bound for b in self._layer_bounds if b.name == "head"), None)
                self.head = _StoredLLNHead(dist, head_bound)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: incomplete or malformed lipcert metadata in the ONNX model "
                                  f"({type(e).__name__}: {e})") from None
        self.input_name = meta.get("input_name", session.get_inputs()[0].name)
        self.output_name = meta.get("output_name", session.get_outputs()[0].name)
        self.checkpoint_metadata = {k: _maybe_json(v) for k, v in meta.items()}

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, model={self.model_name!r}, head={self.head_kind!r})"

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
        if x.shape[0] == 0:
            return torch.zeros(0, self.num_classes, device=x.device)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)

    forward = __call__

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise ExportError("an exported ONNX model gives logits only, not features")

    def lipschitz_bound(self) -> float:
        if self._bound is None:
            raise ExportError(f"{self.path}: no Lipschitz bound stored in the ONNX metadata")
        return self._bound

    def feature_lipschitz_bound(self) -> float:
        if self.head_kind != "lln":
            raise ExportError(f"{self.path}: a feature bound is stored for LLN heads only")
        return self._feature_bound

    def layer_bounds(self) -> list[LayerBound]:
        return list(self._layer_bounds)


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
        raise CheckpointError(f"{path}: an ONNX model without lipcert metadata; lipcert certifies only "
                              "ONNX models written by `lipcert export` (which store the Lipschitz bound)")
    if meta["schema"] != SCHEMA:
        raise CheckpointError(f"{path}: unknown schema version {meta['schema']!r}; this lipcert reads {SCHEMA!r}")


def load_onnx_model(path: str | Path, device: str | torch.device = "cpu") -> OnnxModel:
    """Open an ONNX model written by :func:`export_onnx` for certification through onnxruntime.

    Only ``onnxruntime`` is needed. ``device`` picks onnxruntime's CUDA provider when it is
    installed (``onnxruntime-gpu``), else the CPU; inputs may live on any torch device.
    """
    ort = require("onnxruntime", "running an exported ONNX model")
    path = Path(path)
    _check_input_file(path)
    try:
        session = _ort_session(ort, str(path), device)
    except LipcertError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    _validate_meta(meta, path)
    return OnnxModel(session, meta, path)
