"""Loading any model file lipcert can certify, one module above the formats.

:mod:`certify.checkpoint` reads and writes the safetensors format, :mod:`certify.baked` builds
baked models (and saves them as checkpoints), :mod:`certify.export` writes and verifies ONNX;
this module picks the right one for a file, so that none of them imports another in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import build_from_metadata, finish_loading, read_checkpoint


def load(path: str | os.PathLike, device: str | torch.device = "cpu", allow_pickle: bool = False) -> nn.Module:
    """Load a ``.safetensors`` checkpoint (a training checkpoint, rebuilt from the model registry,
    or a baked one, rebuilt from its layer plan) and return its model in eval mode, on ``device``.

    The model carries ``checkpoint_metadata`` (the decoded metadata) and ``class_names``.
    """
    meta, state = read_checkpoint(path, allow_pickle=allow_pickle)
    if meta.get("checkpoint_kind") == "baked":
        # An inference model written by `lipcert export --format safetensors`: rebuilt from the
        # layer plan in its metadata (certify.baked), not from the registry's training builders.
        from .baked import model_from_metadata

        model = model_from_metadata(meta, path)
    else:
        model = build_from_metadata(meta, path)
    return finish_loading(model, meta, state, path, device)


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu", allow_pickle: bool = False,
             onnx_bound: str = "verify"):
    """Load any model file lipcert can certify: a ``.safetensors`` checkpoint (training or baked),
    or an exported ``.onnx`` model (run by onnxruntime; ``onnx_bound`` is
    :func:`certify.export.load_onnx_model`'s ``bound``: by default the graph is verified as
    lipcert's and its bound computed from the graph's own weights)."""
    if Path(path).suffix.lower() == ".onnx":
        from .export import load_onnx_model  # needs the `export` extra

        return load_onnx_model(path, device=device, bound=onnx_bound)
    return load(path, device=device, allow_pickle=allow_pickle)
