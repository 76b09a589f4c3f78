"""Checkpoints: one ``.safetensors`` file holding the state dict and lipcert's metadata.

No pickle: tensors are the state dict, ``__metadata__`` holds strings only (JSON where a value is
structured; floats go through ``repr`` inside ``json.dumps`` and round-trip exactly). Reading
(:func:`read_checkpoint`) validates the schema and refuses non-finite tensors; a training model is
rebuilt from the registry (:func:`build_from_metadata`) and loaded strictly, with every mismatch
explained (:func:`finish_loading`). :func:`certify.loading.load` picks the model builder for a
file (registry or baked plan). The Lipschitz bound is never stored here: it is recomputed from
the weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, ConfigError, LipcertError

SCHEMA = "lipcert/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _metadata(model: nn.Module, **info: Any) -> dict[str, str]:
    name = getattr(model, "model_name", None)
    if name is None:
        raise CheckpointError("only models built by certify.models.create_model can be saved")
    meta = {
        "schema": SCHEMA,
        "model": name,
        "model_kwargs": json.dumps(getattr(model, "model_kwargs", {}), sort_keys=True),
        "num_classes": str(int(model.num_classes)),
        "input_shape": json.dumps(list(model.input_shape)),
        "mean": json.dumps(list(model.mean)),
        "std": json.dumps(list(model.std)),
        "lipcert_version": __version__,
        "torch_version": torch.__version__,
    }
    for key, value in info.items():
        if value is None:
            continue
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def save(path: str | os.PathLike, model: nn.Module, **info: Any) -> Path:
    """Save ``model`` to a ``.safetensors`` checkpoint, atomically.

    ``info`` adds metadata entries (strings stored as is, anything else as JSON): for example
    ``class_names``, ``dataset``, ``dataset_fingerprint``, ``seed``, ``epoch``, ``config``.
    """
    from safetensors.torch import save as st_save

    meta = _metadata(model, **info)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, validated as a lipcert checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled checkpoints can run arbitrary code and are refused; "
            "lipcert reads .safetensors files (pass allow_pickle=True / --allow-pickle to override)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if "schema" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without lipcert metadata (no 'schema' entry)")
    if meta["schema"] != SCHEMA:
        raise CheckpointError(f"{path}: unknown schema version {meta['schema']!r}; this lipcert reads {SCHEMA!r}")
    return meta


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _json(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise CheckpointError(f"{path}: metadata lacks {key!r}") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON") from None


def build_from_metadata(meta: dict[str, str], path: Path | str = "<checkpoint>") -> nn.Module:
    """Rebuild the (untrained) model that a checkpoint's metadata describes, from the registry."""
    from certify.models import create_model

    path = Path(path)
    kwargs = _json(meta, "model_kwargs", path)
    try:
        return create_model(meta.get("model", ""), **kwargs)
    except LipcertError as e:
        raise CheckpointError(f"{path}: cannot rebuild the model: {e}") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """``load_state_dict(strict=True)`` with a one-line explanation of every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit model {getattr(model, 'model_name', '?')}: "
                              + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a checkpoint file, validated: a lipcert safetensors file (or,
    with ``allow_pickle``, a pickled ``{'state_dict', 'metadata'}``), no non-finite tensor."""
    path = Path(path)
    if allow_pickle and path.suffix.lower() in PICKLE_SUFFIXES:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "state_dict" not in blob or "metadata" not in blob:
            raise CheckpointError(f"{path}: a pickled checkpoint must hold {{'state_dict', 'metadata'}}")
        meta, state = dict(blob["metadata"]), blob["state_dict"]
    else:
        from safetensors.torch import load_file

        meta = read_metadata(path)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read its tensors ({_first_line(e)})") from None
    bad = [k for k, t in state.items() if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in {shown}; refusing to load")
    return meta, state


def finish_loading(model: nn.Module, meta: dict[str, str], state: dict[str, torch.Tensor], path,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Load ``state`` into ``model`` strictly, attach the decoded metadata (``checkpoint_metadata``,
    ``class_names``), move it to ``device`` and return it in eval mode."""
    load_state_strict(model, state, path)
    decoded = {k: _maybe_json(v) for k, v in meta.items()}
    model.checkpoint_metadata = decoded
    names = decoded.get("class_names")
    model.class_names = list(names) if isinstance(names, list) else [str(i) for i in range(model.num_classes)]
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"cannot move the model to {device}: {_first_line(e)}") from None
    return model.eval()


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value
