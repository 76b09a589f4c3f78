"""IEEE float32 arithmetic for everything a certificate depends on.

PyTorch may run float32 convolutions and matrix products with reduced internal precision: TF32
(a 10-bit mantissa) in cuDNN convolutions by default on CUDA, and TF32 or bfloat16 in cuBLAS and
oneDNN (mkldnn) matrix products when ``torch.set_float32_matmul_precision("high"|"medium")`` is
in force. That moves logits by about 1e-3 of their size, far more than the float32 rounding a
certificate tolerates, so certification, attacks and audits run inside :func:`ieee_float32`,
which turns every reduced-precision switch off and restores the caller's settings afterwards.

PyTorch >= 2.9 has per-backend ``fp32_precision`` switches and refuses reads of the legacy
``allow_tf32`` flags once the two APIs are mixed, so only the new API is used where it exists.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# The per-backend switches of PyTorch >= 2.9, as (module path, attribute) pairs.
_LEAVES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def precision_switch(path: str):
    """The per-backend float32 precision switch at ``torch.backends.<path>`` (torch >= 2.9), or None."""
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if hasattr(obj, "fp32_precision") else None


def _new_api_leaves() -> dict[str, object]:
    leaves = {p: precision_switch(p) for p in _LEAVES}
    return {p: leaf for p, leaf in leaves.items() if leaf is not None}


def reduced_precision_state() -> dict[str, str | bool]:
    """The current float32 precision switches, by name (for reports and tests)."""
    state: dict[str, str | bool] = {"matmul_precision": torch.get_float32_matmul_precision()}
    leaves = _new_api_leaves()
    if leaves:
        state.update({p: leaf.fp32_precision for p, leaf in leaves.items()})
    else:  # torch < 2.9
        state["cuda.matmul.allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        state["cudnn.allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    return state


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with IEEE float32 convolutions and matrix products (no TF32, no bf16), then
    restore the caller's settings, also when the block raises. Re-entrant."""
    saved_precision = torch.get_float32_matmul_precision()
    leaves = _new_api_leaves()
    saved_leaves = {p: leaf.fp32_precision for p, leaf in leaves.items()}
    legacy = None
    if not leaves:
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        if leaves:
            for leaf in leaves.values():
                leaf.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        for p, leaf in leaves.items():
            leaf.fp32_precision = saved_leaves[p]
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


def ieee_float32_call(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`ieee_float32`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ieee_float32():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def no_autocast(device: torch.device):
    """A context that leaves autocast (``lipcert train --amp``) on ``device``: for the parts of a
    layer that must run in float32 (a norm estimate, FFTs and matrix inverses, which bfloat16
    either cannot run or would make too coarse to stay near orthogonal)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
