"""ONNX graphs built elsewhere: translated op for op to a PyTorch module, checked against
onnxruntime, then bounded by :func:`certify.foreign.bound_module`.

The translation covers the ops of plain CNNs (``Conv``, ``Gemm``, ``MatMul`` by a constant,
``BatchNormalization``, ``Relu``, ``LeakyRelu``, ``Sigmoid``, ``Tanh``, ``Abs``, ``MaxPool``,
``AveragePool``, ``GlobalAveragePool``, ``Flatten``, a ``Reshape`` that flattens, ``Add``/``Sub``
of activations or constants, ``Mul``/``Div`` by constants, ``Concat`` along channels, ``Identity``,
``Dropout``, ``Constant``) with each op's ONNX semantics (pads begin/end, ``Gemm``'s alpha, beta
and transB, ``count_include_pad``, ``ceil_mode``); anything else, and any attribute value it does
not translate, is refused naming the node. Nodes whose inputs are all constants (an exporter's
unfolded weight parametrisation) are evaluated once by onnxruntime and become constants. The
translated module must reproduce onnxruntime's
outputs on random inputs (a guard against a translation mistake; the bound is computed from the
graph's own initializers, in the module that reproduces it).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, NotLipschitzError


def _refuse(node, why: str = "") -> NotLipschitzError:
    name = node.name or node.output[0]
    return NotLipschitzError(f"cannot bound ONNX node {name!r} ({node.op_type}{': ' + why if why else ''}) "
                             "soundly; lipcert refuses to guess")


class _Graph(nn.Module):
    """The translated graph: ``steps`` run in order on a dict of named values (traceable by fx: the
    loop is over a fixed list)."""

    def __init__(self, input_name: str, output_name: str) -> None:
        super().__init__()
        self.input_name, self.output_name = input_name, output_name
        self.mods = nn.ModuleDict()
        self.steps: list[tuple] = []
        self._n = 0

    def const(self, array) -> str:
        name = f"c{self._n}"
        self._n += 1
        self.register_buffer(name, torch.as_tensor(np.array(array), dtype=torch.float32))
        return name

    def add_module_step(self, module: nn.Module, src: str, dst: str) -> None:
        key = f"m{len(self.mods)}"
        self.mods[key] = module
        self.steps.append(("module", key, (src,), dst))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}

        def value(name):
            return env[name] if name in env else getattr(self, name)

        for kind, what, srcs, dst in self.steps:
            if kind == "module":
                env[dst] = self.mods[what](env[srcs[0]])
            elif kind == "binary":
                env[dst] = what(value(srcs[0]), value(srcs[1]))
            elif kind == "unary":
                env[dst] = what(env[srcs[0]])
            elif kind == "cat":
                env[dst] = torch.cat([value(s) for s in srcs], dim=1)
            else:  # "alias"
                env[dst] = env[srcs[0]]
        return env[self.output_name]


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(node, pads, rank: int = 2):
    """ONNX pads (begin..., end...) as symmetric (ph, pw), or None when asymmetric."""
    pads = list(pads or [0] * (2 * rank))
    begin, end = pads[:rank], pads[rank:]
    return tuple(begin) if begin == end else None


def _fold_constants(proto, inits: dict) -> set[str]:
    """Evaluate, with onnxruntime, every node whose inputs are all constants (an exporter's
    unfolded weight parametrisation: a normalisation, a reshape of a weight), adding its outputs
    to ``inits``; returns the names of the nodes folded (the translation skips them)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    known, folded, outputs = set(inits), set(), []
    for node in proto.graph.node:
        if node.input and all((not n) or n in known for n in node.input) and node.op_type != "Constant":
            folded.add(node.name or node.output[0])
            known.update(node.output)
            outputs += list(node.output)
        elif node.op_type == "Constant":
            known.update(node.output)
    if not outputs:
        return folded
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=np.float32)
    for name, value in zip(outputs, sess.run(outputs, feed)):
        inits[name] = np.asarray(value).astype(np.float64)
    return folded


def translate(proto) -> tuple[_Graph, tuple[int, int, int]]:
    """A PyTorch module computing ``proto``'s graph (one (N, C, H, W) input, one output), and the
    input shape (C, H, W)."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                inits[node.output[0]] = numpy_helper.to_array(value.t).astype(np.float64)
    folded = _fold_constants(proto, inits)
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CheckpointError(f"an ONNX graph with {len(inputs)} inputs and {len(graph.output)} outputs; lipcert "
                              "certifies graphs with one image input and one logits output")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is None or d < 1 for d in dims[1:]):
        raise CheckpointError(f"the ONNX input has shape {dims}; lipcert needs (N, C, H, W) with fixed C, H, W")
    input_shape = tuple(int(d) for d in dims[1:])
    g = _Graph(inputs[0].name, graph.output[0].name)
    consts: dict[str, str] = {}  # ONNX name -> buffer name

    def const_of(name):
        if name in consts:
            return consts[name]
        if name in inits:
            consts[name] = g.const(inits[name])
            return consts[name]
        return None

    for node in graph.node:
        if (node.name or node.output[0]) in folded:
            continue
        a, op, ins, out = _attrs(node), node.op_type, list(node.input), node.output[0]
        if op == "Constant":
            if "value" not in a:
                raise _refuse(node, "a constant other than a tensor")
            inits[out] = numpy_helper.to_array(a["value"]).astype(np.float64)
            continue
        if op == "Conv":
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(a.get("kernel_shape", [0, 0])) != 2:
                raise _refuse(node, "auto_pad or a non-2-D kernel")
            w = inits.get(ins[1])
            if w is None:
                raise _refuse(node, "a weight that is not an initializer")
            b = inits.get(ins[2]) if len(ins) > 2 and ins[2] else None
            groups = int(a.get("group", 1))
            conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", (1, 1))),
                             padding=0, dilation=tuple(a.get("dilations", (1, 1))), groups=groups, bias=b is not None)
            sym = _pads(node, a.get("pads"))
            with torch.no_grad():
                conv.weight.copy_(torch.as_tensor(w))
                if b is not None:
                    conv.bias.copy_(torch.as_tensor(b))
            if sym is None:
                p = list(a["pads"])  # (top, left, bottom, right) -> F.pad's (left, right, top, bottom)
                conv = nn.Sequential(nn.ZeroPad2d((p[1], p[3], p[0], p[2])), conv)
            else:
                conv.padding = sym
            g.add_module_step(conv, ins[0], out)
        elif op in ("Gemm", "MatMul"):
            if op == "Gemm" and int(a.get("transA", 0)):
                raise _refuse(node, "transA")
            w = inits.get(ins[1])
            if w is None or w.ndim != 2:
                raise _refuse(node, "a second operand that is not a constant matrix")
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            weight = alpha * (w if op == "Gemm" and int(a.get("transB", 0)) else w.T)
            c = inits.get(ins[2]) if op == "Gemm" and len(ins) > 2 and ins[2] else None
            if c is not None and c.size != weight.shape[0]:
                raise _refuse(node, "a bias C that is not one value per output")
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=c is not None)
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(weight))
                if c is not None:
                    lin.bias.copy_(torch.as_tensor(beta * c.reshape(-1)))
            g.add_module_step(lin, ins[0], out)
        elif op == "BatchNormalization":
            scale, bias, mean, var = (inits.get(n) for n in ins[1:5])
            if any(t is None for t in (scale, bias, mean, var)) or int(a.get("training_mode", 0)):
                raise _refuse(node, "statistics that are not constants, or training mode")
            bn = nn.BatchNorm2d(scale.size, eps=float(a.get("epsilon", 1e-5))).eval()
            with torch.no_grad():
                for t, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
                    t.copy_(torch.as_tensor(v))
            g.add_module_step(bn, ins[0], out)
        elif op == "Abs":
            g.steps.append(("unary", torch.abs, (ins[0],), out))
        elif op in ("Relu", "Sigmoid", "Tanh", "Identity", "Dropout", "LeakyRelu"):
            module = {"Relu": nn.ReLU(), "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "Identity": nn.Identity(),
                      "Dropout": nn.Identity(), "LeakyRelu": nn.LeakyReLU(float(a.get("alpha", 0.01)))}[op]
            g.add_module_step(module, ins[0], out)
        elif op in ("MaxPool", "AveragePool"):
            sym = _pads(node, a.get("pads"))
            if sym is None or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or \
                    any(d != 1 for d in a.get("dilations", (1, 1))) or len(a["kernel_shape"]) != 2:
                raise _refuse(node, "asymmetric pads, auto_pad or dilation")
            k, s = tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1)))
            ceil = bool(a.get("ceil_mode", 0))
            pool = nn.MaxPool2d(k, s, sym, ceil_mode=ceil) if op == "MaxPool" else nn.AvgPool2d(
                k, s, sym, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))
            g.add_module_step(pool, ins[0], out)
        elif op == "GlobalAveragePool":
            g.add_module_step(nn.AdaptiveAvgPool2d(1), ins[0], out)
        elif op == "Flatten":
            if int(a.get("axis", 1)) != 1:
                raise _refuse(node, "an axis other than 1")
            g.add_module_step(nn.Flatten(), ins[0], out)
        elif op == "Reshape":
            shape = inits.get(ins[1])
            if shape is None or shape.size != 2 or int(shape[0]) not in (0, -1) and int(shape[1]) != -1:
                raise _refuse(node, "a reshape other than a flattening to (N, features)")
            g.add_module_step(nn.Flatten(), ins[0], out)
        elif op in ("Add", "Sub", "Mul", "Div"):
            fn = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}[op]
            srcs = [const_of(n) or n for n in ins]
            if op in ("Mul", "Div") and const_of(ins[1]) is None:
                raise _refuse(node, "a product or quotient of two activations")
            g.steps.append(("binary", fn, tuple(srcs), out))
        elif op == "Concat":
            if int(a.get("axis", 1)) != 1 or any(const_of(n) for n in ins):
                raise _refuse(node, "an axis other than the channels, or a constant part")
            g.steps.append(("cat", None, tuple(ins), out))
        else:
            raise _refuse(node)
    return g.eval(), input_shape


def foreign_onnx_model(proto, session, path):
    """The :class:`certify.foreign.ForeignModel` of a foreign ONNX graph's translation, after
    checking that it reproduces onnxruntime's outputs on random inputs."""
    from .foreign import ForeignModel

    try:
        module, shape = translate(proto)
    except (NotLipschitzError, CheckpointError):
        raise
    except Exception as e:  # a graph outside what the translation understands: refuse, never guess
        raise CheckpointError(f"{path}: lipcert cannot translate this ONNX graph ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); refusing to bound it") from None
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *shape, generator=gen)
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    xs = x[:fixed] if fixed else x
    if fixed and xs.shape[0] < fixed:
        xs = torch.cat([xs, torch.zeros(fixed - xs.shape[0], *shape)])
    want = torch.from_numpy(session.run(None, {inp.name: xs.numpy()})[0])
    try:
        with torch.no_grad():
            got = module(xs)
    except Exception as e:
        raise CheckpointError(f"{path}: lipcert's translation of the graph fails to run ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); refusing to bound it") from None
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max()))):
        raise CheckpointError(f"{path}: lipcert's translation of the graph does not reproduce onnxruntime's outputs; "
                              "refusing to bound it")
    model = ForeignModel(module, shape, name=str(path))
    model.bound_source = ("computed from the weights (of an ONNX graph built elsewhere, translated op for op and "
                          "checked against onnxruntime)")
    return model
