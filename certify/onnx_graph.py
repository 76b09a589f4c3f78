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
from .baked import BakedLipNet
from .errors import ExportError

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
        # after a dense layer the values are (N, features): per-channel tensors broadcast as (1, C)
        self.flat = False

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

    # ---- helpers the layers' translations share (``to_onnx`` of certify.layers) ---------------

    def pixel_unshuffle(self, x: str, c: int, h: int, w: int, s: int):
        """``F.pixel_unshuffle``: output channel ``c*s*s + i*s + j`` holds pixel (s*y + i, s*x + j)."""
        if h % s or w % s:
            raise ExportError(f"layer {self.scope!r}: stride {s} needs sizes divisible by it, got {(h, w)}")
        x = self.op("Reshape", x, self.i64([-1, c, h // s, s, w // s, s]))
        x = self.op("Transpose", x, perm=[0, 1, 3, 5, 2, 4])
        return self.op("Reshape", x, self.i64([-1, c * s * s, h // s, w // s])), c * s * s, h // s, w // s

    def channel_slice(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.i64([start]), self.i64([end]), self.i64([1]))

    def per_channel(self, key: str) -> str:
        """A (C,) tensor broadcast over (N, C, H, W), as ``view(1, -1, 1, 1)``; over (N, C) after a
        dense layer (:attr:`flat`)."""
        return self.op("Unsqueeze", self.tensor(key), self.i64([0] if self.flat else [0, 2, 3]))

    def atan2(self, y: str, x: str) -> str:
        """``torch.atan2(y, x)`` in (-pi, pi]: atan(y/x), +-pi where x < 0, +-pi/2 or 0 where x == 0
        (the division's inf or NaN there is never selected)."""
        r = self.op("Atan", self.op("Div", y, x))
        zero = self.f32(0.0)
        left = self.op("Add", r, self.op("Where", self.op("GreaterOrEqual", y, zero), self.f32(math.pi),
                                         self.f32(-math.pi)))
        on_axis = self.op("Mul", self.op("Sign", y), self.f32(math.pi / 2))
        return self.op("Where", self.op("Greater", x, zero), r, self.op("Where", self.op("Less", x, zero), left, on_axis))

    def remainder(self, x: str, m: float) -> str:
        """``torch.remainder(x, m)`` for m > 0: ``fmod``, plus m where it is negative."""
        mod = self.op("Mod", x, self.f32(m), fmod=1)
        return self.op("Where", self.op("Less", mod, self.f32(0.0)), self.op("Add", mod, self.f32(m)), mod)




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
    x, c, h, w = baked.normalize.to_onnx(g, "normalize.", INPUT_NAME, c, h, w)
    ph, pw = baked.padded_size
    if (ph, pw) != (h, w):
        if ph < h or pw < w:
            raise ExportError(f"padded size {(ph, pw)} is smaller than the input {(h, w)}")
        g.scope = "pad"
        x = g.op("Pad", x, g.i64([0, 0, 0, 0, 0, 0, ph - h, pw - w]))
        h, w = ph, pw
    for name, (key, layer) in zip(baked.layer_names, baked.body.items()):
        g.scope = name
        x, c, h, w = layer.to_onnx(g, f"body.{key}.", x, c, h, w)
    g.scope = "head"
    x = g.op("Flatten", x, axis=1)
    if baked.head.features != c * h * w:
        raise ExportError(f"the head expects {baked.head.features} features, gets {c * h * w}")
    baked.head.to_onnx(g, x)
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


def layer_model(layer, input_shape: tuple[int, ...], opset: int = OPSET) -> onnx.ModelProto:
    """One baked layer (a :class:`~certify.layers.protocol.LipschitzLayer`, input (N, C, H, W))
    or head (a :class:`~certify.layers.protocol.Head`, input (N, features)) alone as an ONNX model,
    through its own ``to_onnx``: how the conformance suite checks each layer's translation."""
    from .layers.protocol import Head

    head = isinstance(layer, Head)
    prefix = "head." if head else "layer."
    g = _Graph({prefix + k: v for k, v in layer.state_dict().items()})
    g.scope = "layer"
    if head:
        layer.to_onnx(g, INPUT_NAME)
        out_shape = ["batch", int(layer.num_classes)]
    else:
        # a dense layer (input (N, features)) is given c = features, h = w = 1 and returns (N, out)
        c, h, w = (int(v) for v in input_shape) if len(input_shape) == 3 else (int(input_shape[0]), 1, 1)
        g.flat = len(input_shape) != 3
        y, c, h, w = layer.to_onnx(g, prefix, INPUT_NAME, c, h, w)
        g.op("Identity", y, output=OUTPUT_NAME)
        out_shape = ["batch", c, h, w] if len(input_shape) == 3 else ["batch", c]
    graph = helper.make_graph(
        g.nodes, "lipcert-layer",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *map(int, input_shape)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, out_shape)],
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
