"""Model registry: named builders, as in timm and torchvision.

``@register_model`` records a builder under its function name (or an explicit name), optionally
with a ``facts`` function; ``create_model(name, **kwargs)`` builds one, dropping ``None`` kwargs
so that unset CLI options keep each builder's defaults; ``list_models(pattern)`` lists names
matching an fnmatch pattern; ``model_facts(name, **kwargs)`` describes one without building it.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from certify.errors import ConfigError, DuplicateModelError, UnknownModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FACTS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   facts: Callable[..., dict[str, Any]] | None = None):
    """Register a model builder; usable as ``@register_model`` or ``@register_model(name=...)``.

    ``facts(**kwargs)``, when given, returns the static facts of ``builder(**kwargs)`` (at least
    ``parameters``, ``input_shape``, ``head``, ``num_classes``) from the configuration alone, so
    that listing models costs nothing; without it :func:`model_facts` builds the model on the
    meta device.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise DuplicateModelError(f"a model named {key!r} is already registered")
        _MODELS[key] = f
        if facts is not None:
            _FACTS[key] = facts
        return f

    return wrap(fn) if fn is not None else wrap


def is_model(name: str) -> bool:
    return name in _MODELS


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, in natural order (5 before 10)."""
    names = [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]

    def natural(n: str):
        import re

        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]

    return sorted(names, key=natural)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `lipcert models`"
        raise UnknownModelError(f"unknown model {name!r}{hint}")


def model_facts(name: str, **kwargs) -> dict[str, Any]:
    """What a registered model is, without its weights: ``name``, ``description`` (the builder's
    docstring, first line) and the builder's static facts for ``kwargs`` (``None`` dropped, as in
    :func:`create_model`): parameter count, input shape, head, classes, and for LipConvnets the
    family, depth, width, activation, pooling and certificate. A builder registered without
    ``facts`` is built on the meta device (shapes only, no memory; its constructor still runs)."""
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    doc = (_MODELS[name].__doc__ or "").strip().splitlines()
    head = {"name": name, "description": doc[0].strip() if doc else ""}
    try:
        if name in _FACTS:
            return {**head, **_FACTS[name](**kwargs)}
        import torch

        with torch.device("meta"):
            model = _MODELS[name](**kwargs)
    except TypeError as e:  # an option the builder does not take
        raise ConfigError(f"model {name!r}: {e}") from None
    return {**head, "head": getattr(model, "head_kind", None), "num_classes": getattr(model, "num_classes", None),
            "input_shape": list(getattr(model, "input_shape", ())) or None,
            "parameters": sum(p.numel() for p in model.parameters())}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``None`` kwargs are dropped so the builder's defaults apply.

    The returned model records ``model_name`` and ``model_kwargs`` so that a checkpoint can
    rebuild it exactly.
    """
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as e:  # an option the builder does not take
        raise ConfigError(f"model {name!r}: {e}") from None
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model
