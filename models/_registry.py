"""Model registry: named builders, as in timm and torchvision.

``@register_model`` records a builder under its function name (or an explicit name);
``create_model(name, **kwargs)`` builds one, dropping ``None`` kwargs so that unset CLI options
keep each builder's defaults; ``list_models(pattern)`` lists names matching an fnmatch pattern.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

from certify.errors import ConfigError, DuplicateModelError, UnknownModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a model builder; usable as ``@register_model`` or ``@register_model(name=...)``."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise DuplicateModelError(f"a model named {key!r} is already registered")
        _MODELS[key] = f
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


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``None`` kwargs are dropped so the builder's defaults apply.

    The returned model records ``model_name`` and ``model_kwargs`` so that a checkpoint can
    rebuild it exactly.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `lipcert models`"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as e:  # an option the builder does not take
        raise ConfigError(f"model {name!r}: {e}") from None
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model
