"""lipcert's own ONNX translation of a baked model, written at export and rebuilt at load.

:func:`build_model` maps a :class:`~certify.baked.BakedLipNet` (its layer plan and tensors) to an
ONNX ``ModelProto``, deterministically: the same plan and tensors always give the same graph,
whatever the torch or onnx version. :func:`certify.export.export_onnx` writes that graph; the
loader rebuilds the baked model from the file's plan and initializers, calls :func:`build_model`
again and requires the file to be exactly that graph (:func:`model_difference`). A bound computed
from the rebuilt baked model is then a bound of the graph onnxruntime runs: nothing in the file
is taken on trust.

Why not ``torch.onnx``: its graph depends on the torch and onnxscript versions, and its optimiser
folds parameters into derived constants (``sin(theta/2)``) under generated names, so a file could
not be checked without a full re-export at every load (about 50 s for a width-4 LipConvnet-5 on
this machine's CPU).

Every baked tensor is an initializer named by its state-dict key and stored exactly as baked
(the graph reshapes it where needed, e.g. ``Unsqueeze`` of a bias); the other constants (shapes,
pads, divisors) are initializers named ``const/<n>``. Each layer is translated op for op from its
PyTorch forward, so the logits agree with PyTorch's up to float32 rounding (checked at export and
at load). ``atan2``, which ONNX lacks, is ``atan(y/x)`` with its quadrant fixed by ``Where``;
``torch.remainder`` is ``Mod(fmod=1)`` plus the divisor where the result is negative, as PyTorch
computes it; ``hypot`` is ``sqrt(a*a + b*b)`` (no overflow below 1e19).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from .baked import BakedLinearHead, BakedLipNet, BakedLLNHead, BakedMatrix, BakedSOC, BakedSOCHead
from .errors import ExportError
from .pooling import LipChannelPool, MaxChannelPool

#: Version of this translation, stored as ``graph_format`` in the metadata; bump whenever
#: :func:`build_model` writes a different graph for the same plan (old files are then refused).
GRAPH_FORMAT = "lipcert-onnx/1"
#: The default opset, and the ones written (the ops used keep their float32 semantics across them).
OPSET = 17
OPSETS = tuple(range(13, 22))
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class _Graph:
    """Nodes and initializers in creation order; node and value names are ``<layer>/<Op>_<n>``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        self.nodes: list = []
        self.initializers: list = []
        self.used: set[str] = set()
        self._consts: dict = {}
        self.scope = "model"

    def tensor(self, key: str) -> str:
        """A baked tensor as an initializer named by its state-dict key."""
        if key not in self.state:
            raise ExportError(f"the baked model has no tensor {key!r}")
        if key not in self.used:
            t = self.state[key]
            if t.dtype != torch.float32:
                raise ExportError(f"baked tensor {key!r} is {t.dtype}, expected torch.float32")
            self.used.add(key)
            self.initializers.append(numpy_helper.from_array(t.numpy(), key))
        return key

    def const(self, values, dtype) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const/{len(self._consts)}"
            self._consts[key] = name
            self.initializers.append(numpy_helper.from_array(arr, name))
        return self._consts[key]

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)

    def i64(self, values) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs) -> str:
        name = f"{self.scope}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output or name], name=name, **attrs))
        return output or name


# ---- layers: each returns the output and its (channels, height, width) -----------------------


def _pixel_unshuffle(g: _Graph, x: str, c: int, h: int, w: int, s: int):
    """``F.pixel_unshuffle``: output channel ``c*s*s + i*s + j`` holds pixel (s*y + i, s*x + j)."""
    if h % s or w % s:
        raise ExportError(f"layer {g.scope!r}: stride {s} needs sizes divisible by it, got {(h, w)}")
    x = g.op("Reshape", x, g.i64([-1, c, h // s, s, w // s, s]))
    x = g.op("Transpose", x, perm=[0, 1, 3, 5, 2, 4])
    return g.op("Reshape", x, g.i64([-1, c * s * s, h // s, w // s])), c * s * s, h // s, w // s


def _channel_slice(g: _Graph, x: str, start: int, end: int) -> str:
    return g.op("Slice", x, g.i64([start]), g.i64([end]), g.i64([1]))


def _per_channel(g: _Graph, key: str) -> str:
    """A (C,) tensor broadcast over (N, C, H, W), as ``view(1, -1, 1, 1)``."""
    return g.op("Unsqueeze", g.tensor(key), g.i64([0, 2, 3]))


def _soc(g: _Graph, prefix: str, layer: BakedSOC, x: str, c: int, h: int, w: int):
    """``BakedSOC.forward``: space-to-depth, channel padding, Horner's ``x + conv(y)/i``, slice, bias."""
    if c != layer.in_channels:
        raise ExportError(f"layer {g.scope!r} expects {layer.in_channels} channels, gets {c}")
    if layer.stride > 1:
        x, c, h, w = _pixel_unshuffle(g, x, c, h, w, layer.stride)
    if layer.channels < c:
        raise ExportError(f"layer {g.scope!r}: {c} input channels for a {layer.channels}-channel SOC")
    if layer.channels > c:
        x = g.op("Pad", x, g.i64([0, 0, 0, 0, 0, layer.channels - c, 0, 0]))
    k, skew = layer.kernel_size, g.tensor(prefix + "skew")
    p = k // 2
    y = x
    for i in range(layer.terms - 1, 0, -1):
        conv = g.op("Conv", y, skew, kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1], group=1)
        y = g.op("Add", x, g.op("Div", conv, g.f32(i)))
    c = layer.channels
    if layer.out_channels < c:
        y, c = _channel_slice(g, y, 0, layer.out_channels), layer.out_channels
    if layer.bias is not None:
        y = g.op("Add", y, _per_channel(g, prefix + "bias"))
    return y, c, h, w


def _matrix(g: _Graph, prefix: str, layer: BakedMatrix, x: str, c: int, h: int, w: int):
    """``BakedMatrix.forward``: space-to-depth, then one 1x1 convolution by the stored matrix."""
    if c != layer.in_channels:
        raise ExportError(f"layer {g.scope!r} expects {layer.in_channels} channels, gets {c}")
    if layer.stride > 1:
        x, c, h, w = _pixel_unshuffle(g, x, c, h, w, layer.stride)
    weight = g.op("Unsqueeze", g.tensor(prefix + "weight"), g.i64([2, 3]))
    inputs = [x, weight] + ([g.tensor(prefix + "bias")] if layer.bias is not None else [])
    y = g.op("Conv", *inputs, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1)
    return y, layer.out_channels, h, w


def _atan2(g: _Graph, y: str, x: str) -> str:
    """``torch.atan2(y, x)`` in (-pi, pi]: atan(y/x), +-pi where x < 0, +-pi/2 or 0 where x == 0
    (the division's inf or NaN there is never selected)."""
    r = g.op("Atan", g.op("Div", y, x))
    zero = g.f32(0.0)
    left = g.op("Add", r, g.op("Where", g.op("GreaterOrEqual", y, zero), g.f32(math.pi), g.f32(-math.pi)))
    on_axis = g.op("Mul", g.op("Sign", y), g.f32(math.pi / 2))
    return g.op("Where", g.op("Greater", x, zero), r, g.op("Where", g.op("Less", x, zero), left, on_axis))


def _remainder(g: _Graph, x: str, m: float) -> str:
    """``torch.remainder(x, m)`` for m > 0: ``fmod``, plus m where it is negative."""
    mod = g.op("Mod", x, g.f32(m), fmod=1)
    return g.op("Where", g.op("Less", mod, g.f32(0.0)), g.op("Add", mod, g.f32(m)), mod)


def _pairs(g: _Graph, x: str, c: int, cfg: dict) -> tuple[str, str]:
    if c % 2 or cfg.get("channels") != c:
        raise ExportError(f"layer {g.scope!r} is planned for {cfg.get('channels')} channels, gets {c}")
    return _channel_slice(g, x, 0, c // 2), _channel_slice(g, x, c // 2, c)


def _hh1(g: _Graph, prefix: str, a: str, b: str) -> str:
    half = g.op("Div", _per_channel(g, prefix + "theta"), g.f32(2.0))
    v1, v2 = g.op("Sin", half), g.op("Neg", g.op("Cos", half))
    d = g.op("Mul", g.f32(2.0), g.op("Relu", g.op("Add", g.op("Mul", v1, a), g.op("Mul", v2, b))))
    return g.op("Concat", g.op("Sub", a, g.op("Mul", d, v1)), g.op("Sub", b, g.op("Mul", d, v2)), axis=1)


def _hh2(g: _Graph, prefix: str, a: str, b: str) -> str:
    two_pi = 2 * math.pi
    t0 = _per_channel(g, prefix + "theta0")
    t1 = g.op("Clip", _per_channel(g, prefix + "theta1"), g.f32(0.0), g.f32(two_pi))
    t2 = g.op("Clip", _per_channel(g, prefix + "theta2"), g.f32(0.0), g.f32(two_pi))
    phi = _remainder(g, g.op("Sub", _atan2(g, b, a), g.op("Div", t0, g.f32(2.0))), two_pi)
    s1 = g.op("Less", phi, g.op("Div", t1, g.f32(2.0)))
    s2 = g.op("Less", phi, g.op("Div", g.op("Add", t1, t2), g.f32(2.0)))
    s3 = g.op("Less", phi, g.op("Add", g.f32(math.pi), g.op("Div", t2, g.f32(2.0))))
    t01 = g.op("Add", t0, t1)
    c01, s01 = g.op("Cos", t01), g.op("Sin", t01)
    c2, sn2 = g.op("Cos", t2), g.op("Sin", t2)
    c0, s0 = g.op("Cos", t0), g.op("Sin", t0)

    def mul(u, v):
        return g.op("Mul", u, v)

    refl1 = (g.op("Add", mul(a, c01), mul(b, s01)), g.op("Sub", mul(a, s01), mul(b, c01)))
    rot = (g.op("Add", mul(a, c2), mul(b, sn2)), g.op("Add", mul(g.op("Neg", a), sn2), mul(b, c2)))
    refl0 = (g.op("Add", mul(a, c0), mul(b, s0)), g.op("Sub", mul(a, s0), mul(b, c0)))
    outs = []
    for i, keep in enumerate((a, b)):
        inner = g.op("Where", s3, rot[i], refl0[i])
        outs.append(g.op("Where", s1, keep, g.op("Where", s2, refl1[i], inner)))
    return g.op("Concat", *outs, axis=1)


def _lip_pool(g: _Graph, prefix: str, a: str, b: str) -> str:
    theta = g.op("Clip", _per_channel(g, prefix + "theta"), g.f32(0.0), g.f32(math.pi))
    half = g.op("Div", theta, g.f32(2.0))
    sin, cos = g.op("Sin", half), g.op("Cos", half)
    phi = _remainder(g, _atan2(g, b, a), 2 * math.pi)
    neg_a_sin = g.op("Mul", g.op("Neg", a), sin)
    upper = g.op("Add", neg_a_sin, g.op("Mul", b, cos))
    lower = g.op("Sub", neg_a_sin, g.op("Mul", b, cos))
    in_upper = g.op("Less", phi, g.op("Div", g.op("Add", g.f32(math.pi), theta), g.f32(2.0)))
    below_lower = g.op("Less", phi, g.op("Div", g.op("Sub", g.f32(3 * math.pi), theta), g.f32(2.0)))
    in_apex = g.op("And", g.op("Not", in_upper), below_lower)
    apex = g.op("Sqrt", g.op("Add", g.op("Mul", a, a), g.op("Mul", b, b)))
    return g.op("Where", in_upper, upper, g.op("Where", in_apex, apex, lower))


def _pairwise(g: _Graph, prefix: str, layer, cfg: dict, x: str, c: int, h: int, w: int):
    a, b = _pairs(g, x, c, cfg)
    if isinstance(layer, MaxMin):
        return g.op("Concat", g.op("Max", a, b), g.op("Min", a, b), axis=1), c, h, w
    if isinstance(layer, HouseholderOrder1):
        return _hh1(g, prefix, a, b), c, h, w
    if isinstance(layer, HouseholderOrder2):
        return _hh2(g, prefix, a, b), c, h, w
    if isinstance(layer, MaxChannelPool):
        return g.op("Max", a, b), c // 2, h, w
    if isinstance(layer, LipChannelPool):
        return _lip_pool(g, prefix, a, b), c // 2, h, w
    raise ExportError(f"no ONNX translation for layer {g.scope!r} ({type(layer).__name__})")


def _head(g: _Graph, head, x: str, features: int) -> str:
    if head.features != features:
        raise ExportError(f"the head expects {head.features} features, gets {features}")
    if isinstance(head, (BakedLinearHead, BakedLLNHead)):
        inputs = [x, g.tensor("head.weight")] + ([g.tensor("head.bias")] if head.bias is not None else [])
        return g.op("Gemm", *inputs, transB=1, output=OUTPUT_NAME)
    if isinstance(head, BakedSOCHead):
        x = g.op("Reshape", x, g.i64([-1, features, 1, 1]))
        y, c, _, _ = _soc(g, "head.soc.", head.soc, x, features, 1, 1)
        return g.op("Flatten", y, axis=1, output=OUTPUT_NAME)
    raise ExportError(f"no ONNX translation for a {type(head).__name__} head (export it as safetensors)")


def build_model(baked: BakedLipNet, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX model lipcert writes for ``baked`` (metadata not included): input ``images``
    (N, C, H, W) in [0, 1] with a dynamic batch axis, output ``logits`` (N, classes)."""
    if not isinstance(baked, BakedLipNet):
        raise ExportError(f"build_model needs a baked model, got {type(baked).__name__}")
    if opset not in OPSETS:
        raise ExportError(f"lipcert writes ONNX opsets {OPSETS[0]}-{OPSETS[-1]}, not {opset}")
    g = _Graph(baked.state_dict())
    c, h, w = (int(s) for s in baked.input_shape)
    g.scope = "normalize"
    x = g.op("Div", g.op("Sub", INPUT_NAME, g.tensor("normalize.mean")), g.tensor("normalize.std"))
    ph, pw = baked.padded_size
    if (ph, pw) != (h, w):
        if ph < h or pw < w:
            raise ExportError(f"padded size {(ph, pw)} is smaller than the input {(h, w)}")
        g.scope = "pad"
        x = g.op("Pad", x, g.i64([0, 0, 0, 0, 0, 0, ph - h, pw - w]))
        h, w = ph, pw
    for cfg, (key, layer) in zip(baked.plan["layers"], baked.body.items()):
        g.scope, prefix = cfg["name"], f"body.{key}."
        if isinstance(layer, BakedSOC):
            x, c, h, w = _soc(g, prefix, layer, x, c, h, w)
        elif isinstance(layer, BakedMatrix):
            x, c, h, w = _matrix(g, prefix, layer, x, c, h, w)
        else:
            x, c, h, w = _pairwise(g, prefix, layer, cfg, x, c, h, w)
    g.scope = "head"
    x = g.op("Flatten", x, axis=1)
    _head(g, baked.head, x, c * h * w)
    unused = sorted(set(g.state) - g.used)
    if unused:
        raise ExportError(f"baked tensors with no place in the ONNX graph: {', '.join(unused)}")
    shape = [int(s) for s in baked.input_shape]
    graph = helper.make_graph(
        g.nodes, "lipcert",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", int(baked.num_classes)])],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="lipcert", producer_version=__version__,
                             ir_version=helper.find_min_ir_version_for(opsets))


# ---- comparing a file with the graph lipcert writes ---------------------------------------------


def _canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without what does not change what it computes: metadata and producer version."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.metadata_props[:]
    out.ClearField("producer_version")
    return out


def _node_text(node) -> str:
    attrs = ", ".join(f"{a.name}={helper.get_attribute_value(a)!r}" for a in node.attribute)
    return f"{node.op_type}({', '.join(node.input)}) -> {', '.join(node.output)}" + (f" [{attrs}]" if attrs else "")


def model_difference(expected: onnx.ModelProto, actual: onnx.ModelProto) -> str | None:
    """None if ``actual`` is ``expected`` apart from metadata and producer version (every node,
    attribute, initializer value, input, output, opset and any other field); else what differs
    first, in words."""
    want, got = _canonical(expected), _canonical(actual)
    if want.SerializeToString(deterministic=True) == got.SerializeToString(deterministic=True):
        return None
    for field in ("ir_version", "producer_name", "domain", "model_version", "doc_string"):
        if getattr(want, field) != getattr(got, field):
            return f"{field} is {getattr(got, field)!r}, expected {getattr(want, field)!r}"
    if list(want.opset_import) != list(got.opset_import):
        return (f"opsets {[(o.domain, o.version) for o in got.opset_import]}, expected "
                f"{[(o.domain, o.version) for o in want.opset_import]}")
    if list(got.functions) or list(got.training_info):
        return "the file defines local functions or training information, which lipcert never writes"
    gw, gg = want.graph, got.graph
    for label, a, b in (("inputs", gw.input, gg.input), ("outputs", gw.output, gg.output)):
        if list(a) != list(b):
            return f"the graph's {label} differ from the ones lipcert writes for this model"
    for i in range(max(len(gw.node), len(gg.node))):
        if i >= len(gg.node):
            return f"the graph has {len(gg.node)} nodes, expected {len(gw.node)}"
        if i >= len(gw.node):
            return f"the graph has {len(gg.node)} nodes, expected {len(gw.node)}; extra node {_node_text(gg.node[i])}"
        if gw.node[i] != gg.node[i]:
            return f"node {i} is {_node_text(gg.node[i])}, expected {_node_text(gw.node[i])}"
    want_init = {t.name: t for t in gw.initializer}
    got_init = {t.name: t for t in gg.initializer}
    if set(want_init) != set(got_init) or len(gg.initializer) != len(gw.initializer):
        extra, missing = sorted(set(got_init) - set(want_init)), sorted(set(want_init) - set(got_init))
        return f"initializers differ (unexpected: {extra or 'none'}; missing: {missing or 'none'})"
    for name, t in want_init.items():
        if t != got_init[name]:
            return f"initializer {name!r} differs from the value lipcert writes"
    if list(gw.initializer) != list(gg.initializer):
        return "the initializers are in a different order"
    return "the graph differs from the one lipcert writes for this model (value_info, sparse initializers, names)"
