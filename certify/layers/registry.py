"""The layer registry: every layer type by name, with what its bound is made of.

``@register_layer("name", kind=..., bound=...)`` on a :class:`~certify.layers.protocol.LipschitzLayer`
or :class:`~certify.layers.protocol.Head` subclass records it; :func:`make_layer` builds one by
name (model builders take their layers from here), :func:`layer_class` looks one up (baked plans
name their layers by registered name), :func:`list_layers` lists them (``lipcert layers``).

Kinds: ``convolution`` (input (N, C, H, W)) and ``dense`` (input (N, features)) for trainable
layers, ``activation``, ``pooling``, ``reshape`` (isometries and projections such as channel
padding), ``head``, ``input`` (normalisation) and ``baked`` (the fixed-tensor form a trained
layer bakes to).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .protocol import Head, LipschitzLayer

KINDS = ("convolution", "dense", "activation", "pooling", "reshape", "head", "input", "baked")


@dataclass(frozen=True)
class LayerInfo:
    """A registered layer type: its name, kind, class, how its bound is computed, and the paper."""

    name: str
    kind: str
    cls: type
    bound: str
    reference: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
                "bound": self.bound, "reference": self.reference}


_LAYERS: dict[str, LayerInfo] = {}


def register_layer(name: str, *, kind: str, bound: str, reference: str = "") -> Callable[[type], type]:
    """Register a layer class under ``name``. ``bound``: one line saying what its sound bound is
    made of (shown by ``lipcert layers``); ``reference``: the paper it implements."""
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose from {KINDS}")

    def wrap(cls: type) -> type:
        if not (issubclass(cls, LipschitzLayer) or issubclass(cls, Head)):
            raise TypeError(f"{cls.__name__} must subclass LipschitzLayer or Head to be registered")
        if name in _LAYERS and _LAYERS[name].cls is not cls:
            raise ValueError(f"a layer named {name!r} is already registered ({_LAYERS[name].cls.__name__})")
        if issubclass(cls, Head) != (kind == "head") and kind != "baked":
            raise TypeError(f"{cls.__name__}: kind 'head' is for Head subclasses, and only for them")
        cls.layer_type = name
        _LAYERS[name] = LayerInfo(name, kind, cls, bound, reference)
        return cls

    return wrap


def _load_builtin() -> None:
    """Import every module of this package: each built-in layer family registers itself on import,
    so a new family is one new file here (nothing else to edit)."""
    import importlib
    import pkgutil

    from . import __name__ as package, __path__ as path

    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


def layer_info(name: str) -> LayerInfo:
    _load_builtin()
    try:
        return _LAYERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_LAYERS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `lipcert layers`"
        raise ConfigError(f"unknown layer {name!r}{hint}") from None


def layer_class(name: str) -> type:
    return layer_info(name).cls


def make_layer(name: str, *args, kind: str | None = None, **kwargs):
    """Build a registered layer by name; ``kind`` (optional) checks it is of that kind, so that a
    model builder asking for an activation cannot get a convolution."""
    info = layer_info(name)
    if kind is not None and info.kind != kind:
        choices = ", ".join(list_layers(kind))
        raise ConfigError(f"{name!r} is a {info.kind} layer, not a {kind} one; choose from {choices}")
    return info.cls(*args, **kwargs)


def list_layers(kind: str | None = None) -> list[str]:
    """Registered layer names (of one kind), as :func:`all_layers` orders them."""
    return [info.name for info in all_layers() if kind is None or info.kind == kind]


def all_layers() -> list[LayerInfo]:
    """Every registered layer type, by kind (in the order of :data:`KINDS`), then by name."""
    _load_builtin()
    return sorted(_LAYERS.values(), key=lambda info: (KINDS.index(info.kind), info.name))
