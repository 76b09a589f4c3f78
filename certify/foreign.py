"""Sound Lipschitz upper bounds for PyTorch modules that lipcert did not build.

:func:`bound_module` traces a deep copy of the module with ``torch.fx.symbolic_trace`` (eval mode),
propagates shapes (``ShapeProp``) from a zeros input so that every node knows its real input size,
and walks the graph in execution order, giving every node an upper bound L(node) on the l2
Lipschitz constant of its output as a function of the input:

- placeholder: 1; parameters (``get_attr``) are constants (L = 0), allowed only as conv/linear
  weights and biases, additive shifts and elementwise scales;
- conv2d (zero padding): :func:`~certify.layers.norms.conv_norm_bound` on the node's real input
  size; a conv whose output feeds only an eval BatchNorm2d is bounded with the BN folded in
  (output channels scaled), which is tighter than the product; linear:
  :func:`~certify.layers.norms.linear_norm_bound`; BatchNorm: max_c |gamma_c| / sqrt(var_c + eps)
  (exact for a diagonal map);
- elementwise activations: the sup of |derivative| (Jacobian diagonal): ReLU, ReLU6, Hardtanh,
  Tanh, Softplus, abs, neg 1; Sigmoid 1/4; LeakyReLU max(1, |slope|); ELU max(1, |alpha|); GELU
  (exact erf form) :data:`GELU_LIPSCHITZ`;
- max pooling: sqrt(M), M the most windows any pixel belongs to (|max_W x - max_W y| <=
  ||(x - y)_W||, summed over windows); average pooling: the exact norm of the per-axis averaging
  matrices (the 2-D map is their Kronecker product on each channel); mean over non-batch dims:
  1/sqrt(n);
- a + b, a - b: L(a) + L(b) (triangle); cat: sqrt(L(a)^2 + L(b)^2), sound for inputs that depend
  on the same x, since ||cat(da, db)||^2 = ||da||^2 + ||db||^2 <= (L(a)^2 + L(b)^2) ||dx||^2;
  scaling by a constant c: max |c|;
- shape ops (view, reshape, flatten, Flatten, Identity, Dropout in eval, contiguous, zero pad): 1.

Anything else raises :class:`~certify.errors.NotLipschitzError` naming the node and the op: a
bound is never returned for a graph with an op that was not handled. Guards: the traced graph
must reproduce the module's output; every activation keeps the batch as dim 0 (shapes propagated
at batch 1 and 2), so no op mixes samples; broadcasting that duplicates an activation is refused;
in-place ops are accepted only when nothing else reads the mutated tensor.

The bound is for x -> module(x) (eval mode), in float64 arithmetic from the stored weights; every
combination of node bounds is rounded up.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from .errors import ConfigError, NotLipschitzError
from .layers.norms import FLOAT64_SLACK, conv_norm_bound, linear_norm_bound, matrix_norm_bound
from .lipschitz import LayerBound, check_finite
from .numerics import ieee_float32

# sup_x d/dx [x Phi(x)] = sup [Phi(x) + x phi(x)]; the second derivative phi(x) (2 - x^2) vanishes
# at x = sqrt(2), so the sup is Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = (1 + erf(1)) / 2 + exp(-1) /
# sqrt(pi) = 1.12891...; the derivative lies in (-0.17, 1.129), so this also bounds its modulus.
GELU_LIPSCHITZ = ((1 + math.erf(1.0)) / 2 + math.exp(-1.0) / math.sqrt(math.pi)) * (1 + FLOAT64_SLACK)

METHOD = "fx-graph"


@dataclass(frozen=True)
class ForeignBound:
    """A module's Lipschitz upper bound and the per-node factors it combines (conv, linear, BN,
    pooling, activations and scales other than 1). Along a chain the bound is their product; at an
    add it is the sum and at a cat the root-sum-square of the branches, so for a residual network
    ``lipschitz`` is not the product of ``layers``."""

    lipschitz: float
    layers: list[LayerBound]
    method: str
    #: when the output is a dense layer ``W phi + b`` (nn.Linear or F.linear with stored weights): a
    #: sound bound of phi's Lipschitz constant and W itself, for the pairwise certificate
    feature_lipschitz: float | None = None
    final_weight: torch.Tensor | None = None


def _up(x: float) -> float:
    """Round a float64 sum or product of bounds up by one ulp (it was off by at most half)."""
    return math.nextafter(x, math.inf)


_TRAINING_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _check_module(module: nn.Module) -> None:
    """Refuse what fx would silently ignore (forward hooks) and training-mode behaviour."""
    gmod = nn.modules.module
    if gmod._global_forward_hooks or gmod._global_forward_pre_hooks:
        raise NotLipschitzError("global forward hooks are registered; their effect is not in the traced "
                                "graph, lipcert refuses to guess")
    for name, m in module.named_modules():
        label = name or type(module).__name__
        if m._forward_hooks or m._forward_pre_hooks:
            raise NotLipschitzError(f"module {label!r} ({type(m).__name__}) has forward hooks (e.g. the old "
                                    "torch.nn.utils.spectral_norm); lipcert cannot see their effect and refuses "
                                    "to guess (use torch.nn.utils.parametrizations instead)")
        sensitive = isinstance(m, _TRAINING_SENSITIVE) or parametrize.is_parametrized(m)
        if sensitive and m.training:
            raise NotLipschitzError(f"module {label!r} ({type(m).__name__}) is in training mode, where it "
                                    "depends on the batch or changes per call; call module.eval() first")


def _bake_parametrizations(model: nn.Module) -> None:
    """Replace each parametrized tensor of the copy by its current value (as the eval forward
    uses it). Not ``remove_parametrizations``: it deletes the property from the Parametrized*
    class, which a deep copy shares with the user's module, and would break the original."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            values = {name: getattr(m, name).detach().clone() for name in m.parametrizations.keys()}
            m.__class__ = type(m).__bases__[0]  # the class before parametrize.register_parametrization
            del m._modules["parametrizations"]
            for name, v in values.items():
                m._parameters[name] = nn.Parameter(v, requires_grad=False)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict, skip: int = 0) -> dict:
    """Map a call's positional and keyword arguments onto ``names`` (after ``skip``), or refuse."""
    args = node.args[skip:]
    if len(args) > len(names):
        raise _refusal(node, "with unexpected arguments")
    out = dict(defaults)
    out.update(zip(names, args))
    for k, v in node.kwargs.items():
        if k not in names:
            raise _refusal(node, f"with argument {k}=")
        out[k] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise _refusal(node, f"without {missing[0]}")
    return out


def _op_label(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
    return f"{node.op} {name}"


def _node_label(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _refusal(node: fx.Node, detail: str = "") -> NotLipschitzError:
    what = _op_label(node) + (f" {detail}" if detail else "")
    return NotLipschitzError(f"cannot bound node {_node_label(node)!r} ({what}) soundly; lipcert refuses to guess")


# ---- pooling geometry --------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_windows(n, out, k, s, p, d):
    """Per axis, each output's (image indices, pre-clip window length up to n + p)."""
    wins = []
    for j in range(out):
        start = j * s - p
        idx = [start + d * t for t in range(k)]
        wins.append(([i for i in idx if 0 <= i < n], min(start + d * (k - 1) + 1, n + p) - start))
    return wins


def _adaptive_windows(n, out):
    return [(list(range((j * n) // out, -(-((j + 1) * n) // out))), None) for j in range(out)]


def _avg_matrix(wins, n, count_include_pad):
    a = torch.zeros(len(wins), n, dtype=torch.float64)
    for j, (idx, padded_len) in enumerate(wins):
        if idx:
            a[j, idx] = 1.0 / (padded_len if count_include_pad and padded_len else len(idx))
    return a


def _check_pool(node, fn, x, expected):
    """The geometry above must reproduce PyTorch's pooling on a random single-channel map."""
    got = fn(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-12, atol=1e-12):
        raise _refusal(node, "whose windows lipcert's geometry does not reproduce")


def _pool_bound(node, m, size, out_size):
    """Lipschitz bound of a 2-D pooling module on an (h, w) map with (oh, ow) output."""
    (h, w), (oh, ow) = size, out_size
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        wins = [_adaptive_windows(h, oh), _adaptive_windows(w, ow)]
    else:
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        p = _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1))
        wins = [_pool_windows(h, oh, k[0], s[0], p[0], d[0]), _pool_windows(w, ow, k[1], s[1], p[1], d[1])]
    x = torch.randn(1, 1, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        if m.return_indices:
            raise _refusal(node, "with return_indices")
        rows = torch.stack([x[0, 0, idx].amax(0) for idx, _ in wins[0]])  # (oh, w)
        ref = torch.stack([rows[:, idx].amax(1) for idx, _ in wins[1]], dim=1)
        _check_pool(node, m, x, ref.view(1, 1, oh, ow))
        most = [max(sum(i in idx for idx, _ in ws) for i in range(n)) for ws, n in zip(wins, (h, w))]
        return math.sqrt(most[0] * most[1]) * (1 + FLOAT64_SLACK)
    include = getattr(m, "count_include_pad", False)
    mats = [_avg_matrix(ws, n, include) for ws, n in zip(wins, (h, w))]
    scale = 1.0
    if getattr(m, "divisor_override", None):
        mats = [(a != 0).to(torch.float64) for a in mats]
        scale = 1.0 / m.divisor_override
    ref = scale * mats[0] @ x[0, 0] @ mats[1].T
    _check_pool(node, m, x, ref.view(1, 1, oh, ow))
    # The 2-D average is the Kronecker product of the per-axis ones: norms multiply.
    return _up(_up(matrix_norm_bound(mats[0]) * matrix_norm_bound(mats[1])) * scale)


# ---- the graph walk ----------------------------------------------------------------------------

_ACT_MODULES = {nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Hardtanh: 1.0, nn.Tanh: 1.0, nn.Softplus: 1.0,
                nn.Sigmoid: 0.25}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Dropout)
_ACT_FUNCS = {F.relu: 1.0, torch.relu: 1.0, F.relu6: 1.0, F.hardtanh: 1.0, torch.tanh: 1.0, F.tanh: 1.0,
              torch.sigmoid: 0.25, F.sigmoid: 0.25, torch.abs: 1.0, operator.abs: 1.0, operator.neg: 1.0,
              torch.neg: 1.0, F.softplus: 1.0, torch.clamp: 1.0}
_ACT_METHODS = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "abs": 1.0, "neg": 1.0, "clamp": 1.0}
_ALIAS_METHODS = ("view", "reshape", "flatten", "contiguous")
_META_METHODS = ("size", "dim")
_ADD = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1, "add": 1, "sub": -1}
_MUL = {operator.mul: False, torch.mul: False, operator.truediv: True, torch.div: True, "mul": False,
        "div": True}


class _Walk:
    def __init__(self, gm: fx.GraphModule, shapes: dict, fold: bool):
        self.gm, self.shapes, self.fold = gm, shapes, fold
        self.lip: dict[fx.Node, float] = {}
        self.const: set[fx.Node] = set()
        self.meta: set[fx.Node] = set()
        self.alias_of: dict[fx.Node, fx.Node] = {}
        self.folded: set[fx.Node] = set()
        self.layers: list[LayerBound] = []

    # -- helpers
    def L(self, node, arg) -> float:
        if not isinstance(arg, fx.Node) or arg not in self.lip:
            raise _refusal(node, "on an argument that is not the input's activation")
        return self.lip[arg]

    def size_of(self, node, arg) -> tuple[int, int]:
        shape = self.shapes.get(arg)
        if shape is None or len(shape) != 4:
            raise _refusal(node, "on a tensor that is not (N, C, H, W)")
        return tuple(shape[2:])

    def const_value(self, node, arg):
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return _fetch(self.gm, arg.target)
        raise _refusal(node, "whose weight is not a stored parameter")

    def record(self, node, kind, size, bound):
        self.layers.append(LayerBound(_node_label(node), kind, size, float(bound)))

    def mutate(self, node, src):
        """An in-place op on ``src``: nothing else may read the tensor it mutates."""
        while True:
            if not isinstance(src, fx.Node) or len(src.users) != 1 or src.op == "get_attr":
                raise _refusal(node, "in place on a tensor that other nodes read")
            if src not in self.alias_of:
                return
            src = self.alias_of[src]

    def scale(self, node, factor, src, kind, size=None, alias=False):
        if factor != 1.0:
            self.record(node, kind, size, factor)
        if alias:
            self.alias_of[node] = src
        self.lip[node] = _up(factor * self.L(node, src))

    # -- nodes
    def run(self) -> float:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotLipschitzError(f"the module's forward takes {len(placeholders)} inputs; lipcert bounds "
                                    "modules of one input")
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.lip[node] = 1.0
            elif node.op == "get_attr":
                self.const.add(node)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or out not in self.lip:
                    raise _refusal(node, "returning something other than one tensor of the input")
                self.final_linear(out)
                return self.lip[out]
            elif node.op == "call_module":
                self.module(node, self.gm.get_submodule(node.target))
            elif node.op == "call_function":
                self.function(node, node.target)
            elif node.op == "call_method":
                self.method(node, node.target)
            else:
                raise _refusal(node)
        raise NotLipschitzError("the traced graph has no output")

    def final_linear(self, out) -> None:
        """Record (phi's bound, W) when the output node is a dense layer W phi + b."""
        self.feature_lipschitz = self.final_weight = None
        weight, x = None, out.args[0] if out.args else None
        if out.op == "call_module" and type(self.gm.get_submodule(out.target)) is nn.Linear:
            weight = self.gm.get_submodule(out.target).weight
        elif out.op == "call_function" and out.target is F.linear and len(out.args) >= 2:
            w = out.args[1]
            weight = _fetch(self.gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if weight is not None and isinstance(x, fx.Node) and x in self.lip:
            self.feature_lipschitz, self.final_weight = self.lip[x], weight.detach().clone()

    def conv(self, node, x, weight, bias, stride, padding, dilation, groups, kind):
        if isinstance(bias, fx.Node) and bias.op != "get_attr":
            raise _refusal(node, "whose bias is not a stored parameter")
        size = self.size_of(node, x)
        w = weight.detach().to(torch.float64)
        users = list(node.users)
        bn = self.gm.get_submodule(users[0].target) if (
            self.fold and len(users) == 1 and users[0].op == "call_module") else None
        if type(bn) is nn.BatchNorm2d and bn.running_var is not None:
            w = w * _bn_scale(bn).view(-1, 1, 1, 1)
            self.folded.add(users[0])
            kind = f"{kind}+BatchNorm2d"
        bound = conv_norm_bound(w, size, stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.scale(node, bound, x, kind, size)

    def module(self, node, m):
        t = type(m)
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            raise _refusal(node, f"({t.__name__}) with other than one input")
        if t is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise _refusal(node, f"(Conv2d) with padding_mode={m.padding_mode!r}")
            self.conv(node, x, m.weight, None, m.stride, m.padding, m.dilation, m.groups, "Conv2d")
        elif t is nn.Linear:
            self.scale(node, linear_norm_bound(m.weight), x, "Linear")
        elif t in (nn.BatchNorm1d, nn.BatchNorm2d):
            if m.running_var is None:
                raise _refusal(node, f"({t.__name__}) without running statistics (it uses batch statistics)")
            if node in self.folded:
                self.lip[node] = self.L(node, x)  # already in the folded conv's bound
            else:
                bound = float(_bn_scale(m).abs().max()) * (1 + FLOAT64_SLACK)
                self.scale(node, bound, x, t.__name__)
        elif t in _ACT_MODULES:
            self.activation(node, x, _ACT_MODULES[t], t.__name__, getattr(m, "inplace", False))
        elif t is nn.LeakyReLU:
            self.activation(node, x, max(1.0, abs(m.negative_slope)), "LeakyReLU", m.inplace)
        elif t is nn.ELU:
            self.activation(node, x, max(1.0, abs(m.alpha)), "ELU", m.inplace)
        elif t is nn.GELU:
            if m.approximate != "none":
                raise _refusal(node, f"(GELU approximate={m.approximate!r})")
            self.activation(node, x, GELU_LIPSCHITZ, "GELU", False)
        elif t in _ALIAS_MODULES:
            self.scale(node, 1.0, x, t.__name__, alias=True)
        elif t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
            size = self.size_of(node, x)
            out = self.shapes[node]
            self.scale(node, _pool_bound(node, m, size, tuple(out[2:])), x, t.__name__, size)
        else:
            raise _refusal(node, f"({t.__name__})")

    def activation(self, node, x, factor, kind, inplace):
        if inplace:
            self.mutate(node, x)
        self.scale(node, factor, x, kind, alias=bool(inplace))

    def combine(self, node, a, b, alpha=1.0):
        """a +- alpha b: the triangle inequality; a constant operand adds nothing."""
        out_shape = self.shapes.get(node)
        total = 0.0
        for arg, coef in ((a, 1.0), (b, alpha)):
            if isinstance(arg, (int, float)) or (isinstance(arg, fx.Node) and arg in self.const):
                continue
            if self.shapes.get(arg) != out_shape:
                raise _refusal(node, "broadcasting an activation (it would be duplicated)")
            total = _up(total + _up(abs(coef) * self.L(node, arg)))
        if total == 0.0:
            raise _refusal(node, "on constants only")
        self.lip[node] = total

    def multiply(self, node, a, b, divide):
        """An activation times (or over) a constant: a diagonal map, its largest |entry|."""
        act = [v for v in (a, b) if isinstance(v, fx.Node) and v in self.lip]
        if len(act) != 1 or (divide and act[0] is not a):
            raise _refusal(node, "of an activation by something other than a constant")
        c = b if act[0] is a else a
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            v = torch.tensor(float(c), dtype=torch.float64).abs()
        elif isinstance(c, fx.Node) and c in self.const:
            v = _fetch(self.gm, c.target).detach().to(torch.float64).abs()
            if self.shapes.get(act[0]) != self.shapes.get(node):
                raise _refusal(node, "broadcasting an activation (it would be duplicated)")
        else:
            raise _refusal(node, "of an activation by something other than a constant")
        factor = float((1.0 / v if divide else v).max()) * (1 + FLOAT64_SLACK)
        if not math.isfinite(factor):
            raise _refusal(node, "by a non-finite constant (or zero divisor)")
        self.scale(node, factor, act[0], "scale")

    def function(self, node, f):
        if f in _ADD:
            a = _bind(node, ("input", "other", "alpha"), {"alpha": 1})
            self.combine(node, a["input"], a["other"], float(a["alpha"]))
        elif f in _MUL:
            a = _bind(node, ("input", "other"), {})
            self.multiply(node, a["input"], a["other"], _MUL[f])
        elif f in (F.conv2d, torch.conv2d):
            a = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                      {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
            self.conv(node, a["input"], self.const_value(node, a["weight"]), a["bias"], a["stride"],
                      a["padding"], a["dilation"], a["groups"], "conv2d")
        elif f is F.linear:
            a = _bind(node, ("input", "weight", "bias"), {"bias": None})
            if isinstance(a["bias"], fx.Node) and a["bias"].op != "get_attr":
                raise _refusal(node, "whose bias is not a stored parameter")
            self.scale(node, linear_norm_bound(self.const_value(node, a["weight"])), a["input"], "linear")
        elif f in _ACT_FUNCS:
            # F.relu, F.relu6 and F.hardtanh take inplace positionally too.
            inplace = node.kwargs.get("inplace", False) is True or (
                f in (F.relu, F.relu6, F.hardtanh) and any(a is True for a in node.args[1:]))
            if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                raise _refusal(node, "with tensor arguments")
            self.activation(node, node.args[0], _ACT_FUNCS[f], f.__name__, inplace)
        elif f is F.leaky_relu:
            a = _bind(node, ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False})
            self.activation(node, a["input"], max(1.0, abs(a["negative_slope"])), "leaky_relu", a["inplace"])
        elif f is F.elu:
            a = _bind(node, ("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False})
            self.activation(node, a["input"], max(1.0, abs(a["alpha"])), "elu", a["inplace"])
        elif f is F.gelu:
            a = _bind(node, ("input", "approximate"), {"approximate": "none"})
            if a["approximate"] != "none":
                raise _refusal(node, f"approximate={a['approximate']!r}")
            self.activation(node, a["input"], GELU_LIPSCHITZ, "gelu", False)
        elif f is F.dropout:
            a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
            if a["training"] is not False:
                raise _refusal(node, "in training mode")
            self.scale(node, 1.0, a["input"], "dropout", alias=True)
        elif f is torch.flatten:
            self.scale(node, 1.0, node.args[0], "flatten", alias=True)
        elif f is F.pad:
            a = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
            if a["mode"] != "constant" or isinstance(a["value"], fx.Node):
                raise _refusal(node, f"mode={a['mode']!r}")
            self.scale(node, 1.0, a["input"], "pad")  # a constant pad embeds (or crops) the map
        elif f is F.adaptive_avg_pool2d:
            a = _bind(node, ("input", "output_size"), {})
            m = nn.AdaptiveAvgPool2d(a["output_size"])
            size = self.size_of(node, a["input"])
            self.scale(node, _pool_bound(node, m, size, tuple(self.shapes[node][2:])), a["input"],
                       "adaptive_avg_pool2d", size)
        elif f is torch.mean:
            self.mean(node, _bind(node, ("input", "dim", "keepdim"), {"keepdim": False}))
        elif f is torch.cat:
            self.cat(node, _bind(node, ("tensors", "dim"), {"dim": 0}))
        elif f is getattr and len(node.args) == 2 and node.args[1] == "shape":
            self.meta.add(node)
        elif f is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0] in self.meta:
            self.meta.add(node)
        else:
            raise _refusal(node)

    def method(self, node, name):
        self_arg = node.args[0]
        if name in _META_METHODS:
            self.meta.add(node)
        elif name in _ALIAS_METHODS:
            for a in list(node.args[1:]) + list(node.kwargs.values()):
                if isinstance(a, fx.Node) and a not in self.meta:
                    raise _refusal(node, "with a shape computed from data")
            self.scale(node, 1.0, self_arg, name, alias=True)
        elif name.rstrip("_") in _ACT_METHODS and (len(node.args) == 1 or name.rstrip("_") == "clamp"):
            if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                raise _refusal(node, "with tensor arguments")
            self.activation(node, self_arg, _ACT_METHODS[name.rstrip("_")], name, name.endswith("_"))
        elif name in _ADD and len(node.args) == 2 and not node.kwargs:
            self.combine(node, node.args[0], node.args[1], 1.0)
        elif name in _MUL and len(node.args) == 2 and not node.kwargs:
            self.multiply(node, node.args[0], node.args[1], _MUL[name])
        elif name == "mean":
            self.mean(node, _bind(node, ("dim", "keepdim"), {"keepdim": False}, skip=1) | {"input": self_arg})
        else:
            raise _refusal(node)

    def mean(self, node, a):
        shape = self.shapes.get(a["input"])
        dims = a["dim"] if isinstance(a["dim"], (tuple, list)) else (a["dim"],)
        if shape is None or not all(isinstance(d, int) for d in dims):
            raise _refusal(node, "over unknown dims")
        dims = {d % len(shape) for d in dims}
        if 0 in dims:
            raise _refusal(node, "over the batch")
        n = math.prod(shape[d] for d in dims)
        # Each output averages its own n entries: the norm of (1/n) 1^T is 1/sqrt(n).
        self.scale(node, (1 + FLOAT64_SLACK) / math.sqrt(n), a["input"], "mean")

    def cat(self, node, a):
        parts = a["tensors"]
        if not isinstance(parts, (list, tuple)):
            raise _refusal(node, "of something other than a list of tensors")
        total = 0.0
        for p in parts:
            if isinstance(p, fx.Node) and p in self.const:
                continue
            total = _up(total + _up(self.L(node, p) ** 2))
        self.lip[node] = _up(math.sqrt(total) * (1 + FLOAT64_SLACK))


def _bn_scale(bn) -> torch.Tensor:
    """The float64 per-channel scale gamma / sqrt(var + eps) of an eval BatchNorm."""
    var = bn.running_var.detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    if not torch.isfinite(scale).all():
        raise NotLipschitzError("a BatchNorm has a non-finite scale (running_var + eps <= 0?)")
    return scale


def _shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict:
    ShapeProp(gm).propagate(x)
    out = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        out[n] = tuple(tm.shape) if hasattr(tm, "shape") else None
    return out


@torch.no_grad()
def bound_module(module: nn.Module, input_shape, *, fold_batchnorm: bool = True) -> ForeignBound:
    """A sound upper bound on the l2 Lipschitz constant of x -> module(x) for inputs of shape
    ``(N, *input_shape)`` (eval mode), by walking the module's torch.fx graph (see the module
    docstring); raises :class:`NotLipschitzError` for any op it cannot bound.

    ``fold_batchnorm=False`` bounds a conv and the BatchNorm after it separately (for comparison).
    """
    try:
        input_shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not input_shape or min(input_shape) < 1:
        raise ConfigError(f"input_shape must be non-empty and positive, got {input_shape!r}")
    _check_module(module)
    model = copy.deepcopy(module).eval()
    _bake_parametrizations(model)
    check_finite(model, type(module).__name__)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow, untraceable calls
        raise NotLipschitzError(f"torch.fx cannot trace {type(module).__name__} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); lipcert refuses to guess") from e
    ref = next(iter(list(model.parameters()) + list(model.buffers())), torch.zeros(()))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    kw = {"dtype": dtype, "device": ref.device}
    with ieee_float32():
        try:
            shapes2 = _shapes(gm, torch.zeros(2, *input_shape, **kw))
            shapes = _shapes(gm, torch.zeros(1, *input_shape, **kw))
            x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(**kw)
            got, want = gm(x), model(x)
        except Exception as e:
            raise NotLipschitzError(f"{type(module).__name__} fails on inputs of shape (N, "
                                    f"{', '.join(map(str, input_shape))}): {type(e).__name__}: {e}") from e
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape or \
            not torch.allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max()))):
        raise NotLipschitzError("the traced graph does not reproduce the module's output (in-place aliasing, "
                                "hooks or untraced behaviour); lipcert refuses to guess")
    walk = _Walk(gm, shapes, fold_batchnorm)
    for n in gm.graph.nodes:
        if n.op == "get_attr" or shapes[n] is None:
            continue
        if shapes[n][0] != 1 or shapes2[n] is None or shapes2[n][0] != 2 or shapes2[n][1:] != shapes[n][1:]:
            raise _refusal(n, "that does not keep the batch as dim 0 (it would mix samples)")
    lip = walk.run()
    return ForeignBound(float(lip), walk.layers, METHOD, walk.feature_lipschitz, walk.final_weight)


# ---- a foreign module as a model lipcert certifies -----------------------------------------------


class ForeignModel(nn.Module):
    """A PyTorch module built elsewhere, wrapped so that :class:`certify.certificates.Certifier`
    certifies it with a bound it computes itself: ``lipschitz_bound()`` walks the module's fx graph
    (:func:`bound_module`) from its weights as they are at the call (the certifier recomputes it
    when they change). When the module ends in a dense layer ``W phi(x) + b`` the pairwise
    certificate applies (``certificate = "pairwise"``: radius ``min_j (f_y - f_j) / (L_phi
    ||w_y - w_j||)``, with ``L_phi`` the sound bound of everything before W and the exact float64
    row distances of W, as for an LLN head); otherwise the global one. ``mean``/``std``: an input
    normalisation to put in front, for a module that expects normalised images (radii are then in
    [0, 1] pixel units)."""

    head_kind = None
    bound_source = "computed from the weights (torch.fx graph of a module built elsewhere)"

    def __init__(self, module: nn.Module, input_shape, mean=None, std=None, name: str = "module") -> None:
        super().__init__()
        from .layers.normalize import Normalize

        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ConfigError(f"the input shape must be C,H,W, got {input_shape}")
        if (mean is None) != (std is None):
            raise ConfigError("give both --mean and --std, or neither")
        c = self.input_shape[0]
        if mean is not None:
            mean, std = [float(v) for v in mean], [float(v) for v in std]
            mean, std = (mean * c, std * c) if len(mean) == 1 and len(std) == 1 else (mean, std)
            if len(mean) != c or len(std) != c:
                raise ConfigError(f"--mean/--std need 1 or {c} values each, got {len(mean)}/{len(std)}")
        self.normalize = Normalize(mean, std) if mean is not None else None
        # a private copy with parametrised weights fixed at their current values: the function
        # certified is then exactly the one bounded (a parametrisation may update its state in
        # every forward, e.g. a power iteration, and move the weights after a bound was taken)
        module = copy.deepcopy(module).eval()
        _bake_parametrizations(module)
        self.module = module
        self.model_name = name
        with torch.no_grad():
            out = self(torch.zeros(2, *self.input_shape))
        if out.ndim != 2 or out.shape[1] < 2:
            raise ConfigError(f"{name} maps (N, {', '.join(map(str, self.input_shape))}) images to shape "
                              f"{tuple(out.shape)}; lipcert certifies classifiers with (N, classes) logits")
        self.num_classes = int(out.shape[1])
        self.class_names = [str(i) for i in range(self.num_classes)]
        self.checkpoint_metadata = {}
        final = self.foreign_bound().final_weight
        self.certificate = "pairwise" if final is not None and final.shape[0] == self.num_classes else "global"
        self.head = _FinalDense(self) if self.certificate == "pairwise" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.normalize(x) if self.normalize is not None else x)

    def float64_model(self) -> nn.Module:
        """The same function in float64 arithmetic, for the certifier's re-check of float32 rounding
        (the weights are fixed already: libraries' parametrisations need not run in float64)."""
        return copy.deepcopy(self).double().eval()

    def foreign_bound(self) -> ForeignBound:
        """The graph walk of the module as its weights are now: computed once per state of the
        weights (the certificate reads it three times: feature bound, row distances, head norm; a
        walk of a ResNet-18 takes seconds), recomputed after any change to a parameter or buffer."""
        from .certificates import state_fingerprint

        key = state_fingerprint(self.module)
        cached = getattr(self, "_walk", None)
        if cached is None or cached[0] != key:
            cached = (key, bound_module(self.module, self.input_shape))
            self._walk = cached
        return cached[1]

    def _input_factor(self) -> float:
        # the normalisation's bound is exact (1/min std) and multiplies the module's
        return self.normalize.lipschitz_bound() if self.normalize is not None else 1.0

    def lipschitz_bound(self) -> float:
        return _up(self.foreign_bound().lipschitz * self._input_factor())

    def layer_bounds(self) -> list[LayerBound]:
        """The graph walk's factors other than 1 (see :class:`ForeignBound`)."""
        return list(self.foreign_bound().layers)

    def feature_lipschitz_bound(self) -> float:
        """Of x -> phi(x), the input of the final dense layer (pairwise certificate)."""
        bound = self.foreign_bound()
        if bound.feature_lipschitz is None:
            raise NotLipschitzError(f"{self.model_name} does not end in a dense layer: no pairwise certificate")
        return _up(bound.feature_lipschitz * self._input_factor())


class _FinalDense:
    """The final dense layer of a :class:`ForeignModel`, as the pairwise certificate reads it."""

    def __init__(self, model: ForeignModel) -> None:
        self._model = model

    @torch.no_grad()
    def pairwise_row_distances(self) -> torch.Tensor:
        """``D[y, j] >= ||w_y - w_j||``: exact float64 differences (not the Gram identity, which
        loses precision for nearly equal rows), inflated by rounding slack, as for the LLN head."""
        w = self._model.foreign_bound().final_weight.to(torch.float64)
        return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * (1 + FLOAT64_SLACK)

    def lipschitz_bound(self, input_size=None) -> float:
        """||W||, for the report's global bound (feature bound times this)."""
        return linear_norm_bound(self._model.foreign_bound().final_weight)


def load_module(spec: str, weights=None, input_shape=(3, 32, 32), mean=None, std=None) -> ForeignModel:
    """``package.module:factory`` (a callable returning an ``nn.Module``, imported with the current
    folder on the path), optionally with a ``.safetensors`` state dict loaded strictly, as a
    :class:`ForeignModel`. Raises :class:`ConfigError` / :class:`CheckpointError` with one line."""
    import importlib
    import os
    import sys

    from .errors import CheckpointError

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"--module takes package.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except ImportError as e:
        raise ConfigError(f"cannot import {mod_name!r}: {e}") from None
    except AttributeError:
        raise ConfigError(f"module {mod_name!r} has no {attr!r}") from None
    module = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{spec} gave a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        from safetensors.torch import load_file

        from .checkpoint import load_state_strict

        try:
            state = load_file(str(weights), device="cpu")
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        bad = [k for k, t in state.items() if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{weights}: non-finite values (NaN or inf) in {', '.join(bad[:4])}; refusing to load")
        load_state_strict(module, state, weights)
    return ForeignModel(module, input_shape, mean, std, name=spec)
