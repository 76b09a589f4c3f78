"""LipConvnet-N: the 1-Lipschitz SOC network family of Singla & Feizi (ICML 2021, NeurIPS 2022).

N in 5, 10, ..., 40 with b = N/5 SOC layers per block:

    init    SOC in->w 3x3 + activation
    block i (i = 1..4, c = w 2^(i-1)): (b-1) x [SOC c->c 3x3 + act], SOC c->4c 3x3 stride 2 + pool (4c->2c)
    block 5 SOC 16w->64w 1x1 stride 2, (b-1) x [SOC 64w->64w 1x1 + act]; the last layer ends in
            a pool (32w features) or, for the MLP head, an activation (64w features)
    head    orthogonal (1x1 SOC), LLN, or MLP

with w = 32 in the paper. ``blocks=(b1, ..., b5)`` gives each block its own number of SOC layers
(the compact variants of issue 17: layers added where the maps are small and convolutions are
cheap); its depth is then their sum, as N = 5b for the uniform family. ``down_kernel=1`` makes the
stride-2 SOC of blocks 1-4 a 1x1 SOC on the space-to-depth map (an orthogonal 2x2 stride-2
convolution): the paper's 3x3 one there costs four times a 3x3 SOC at the block's own width and
resolution. ``lipconvnet8c`` is the compact variant ``blocks=(1, 2, 2, 2, 1), down_kernel=1``.

Inputs whose side is not a multiple of 32 (MNIST's 28) are zero-padded after normalisation, an
isometric embedding that keeps the bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from certify.errors import ConfigError
from certify.layers.normalize import Normalize
from certify.layers.registry import make_layer
from certify.lipschitz import LipschitzNet

from ._registry import register_model

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2507, 0.2507, 0.2507)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
DEPTHS = (5, 10, 15, 20, 25, 30, 35, 40)
HEADS = ("ortho", "lln", "mlp")


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def input_normalisation(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
    """The per-channel mean and std of a model's input normalisation: the given ones, or CIFAR's
    for 3 channels and MNIST's otherwise; one value per channel."""
    if mean is None or std is None:
        mean, std = (CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else (MNIST_MEAN * in_channels, MNIST_STD * in_channels)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _padded(size: tuple[int, int]) -> tuple[int, int]:
    """The input size rounded up to a multiple of 32 (the zero padding after normalisation)."""
    return (-(-size[0] // 32) * 32, -(-size[1] // 32) * 32)


def _check_config(depth: int, head: str, num_classes: int, width: int, blocks=None, down_kernel: int = 3) -> None:
    if down_kernel not in (1, 3) or isinstance(down_kernel, bool):
        raise ConfigError(f"down_kernel must be 3 (the paper's) or 1, got {down_kernel!r}")
    if blocks is not None:
        _check_blocks(blocks)
    elif depth not in DEPTHS:
        raise ConfigError(f"LipConvnet depth must be one of {DEPTHS}, got {depth}")
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; choose from {HEADS}")
    if num_classes < 2:
        raise ConfigError(f"need at least 2 classes, got {num_classes}")
    if width < 2 or width % 2:
        raise ConfigError(f"width must be an even number >= 2, got {width}")


def _check_blocks(blocks) -> None:
    if (isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 5
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
        raise ConfigError(f"blocks takes five integers >= 1 (SOC layers in blocks 1-5), got {blocks!r}")


def _per_block(depth: int, blocks) -> tuple[int, ...]:
    """SOC layers in each of the five blocks: ``blocks``, or ``depth / 5`` each."""
    return tuple(blocks) if blocks is not None else (depth // 5,) * 5


def _layout(depth: int, in_channels: int, width: int, head: str, blocks=None,
            down_kernel: int = 3) -> tuple[list[tuple[str, str, Any]], int]:
    """The body of LipConvnet-``depth`` (see the module docstring), as ``(name, kind, size)`` with
    kind ``soc`` (size: in channels, out channels, kernel, stride), ``act`` or ``pool`` (size:
    channels); and the channels the head sees per 32x32 tile of the input. One description for
    the model and for its static facts (:func:`lipconvnet_facts`)."""
    per_block = _per_block(depth, blocks)
    layers: list[tuple[str, str, Any]] = [("init.conv", "soc", (in_channels, width, 3, 1)), ("init.act", "act", width)]
    c = width
    for i in range(1, 5):
        for j in range(per_block[i - 1] - 1):
            layers += [(f"block{i}.conv{j}", "soc", (c, c, 3, 1)), (f"block{i}.act{j}", "act", c)]
        layers += [(f"block{i}.down", "soc", (c, 4 * c, down_kernel, 2)), (f"block{i}.pool", "pool", 4 * c)]
        c *= 2
    wide = 4 * c
    b = per_block[4]
    layers += [("block5.conv0", "soc", (c, wide, 1, 2))]
    for j in range(1, b):
        layers += [(f"block5.act{j - 1}", "act", wide), (f"block5.conv{j}", "soc", (wide, wide, 1, 1))]
    if head == "mlp":
        return layers + [(f"block5.act{b - 1}", "act", wide)], wide
    return layers + [("block5.pool", "pool", wide)], wide // 2


class LipConvNet(LipschitzNet):
    """A LipConvnet of ``depth`` SOC layers (see the module docstring for the layout).

    Every model knows its input shape, normalisation, number of classes and how to compute its
    own Lipschitz upper bound (:meth:`lipschitz_bound`).
    """

    def __init__(
        self,
        depth: int = 5,
        activation: str = "maxmin",
        pooling: str = "max",
        head: str = "ortho",
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 32,
        width: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_terms: int | str = 6,
        eval_terms: int = 15,
        backward: str = "fast",
        eval_mode: str = "taylor",
        eval_tol: float = 1e-6,
        train_tol: float = 0.02,
        mlp_hidden: int = 4096,
        mlp_beta: float = 1.0,
        blocks: Sequence[int] | None = None,
        down_kernel: int = 3,
    ) -> None:
        super().__init__()
        _check_config(depth, head, num_classes, width, blocks, down_kernel)
        self.mean, self.std = input_normalisation(in_channels, mean, std)
        self.blocks = _per_block(depth, blocks)
        self.depth, self.num_classes, self.width = sum(self.blocks), num_classes, width
        self.input_shape = (in_channels, *_size2(input_size))
        self.padded_size = _padded(self.input_shape[1:])

        soc_kw = dict(train_terms=train_terms, eval_terms=eval_terms, backward=backward,
                      eval_mode=eval_mode, eval_tol=eval_tol, train_tol=train_tol)
        self.normalize = Normalize(self.mean, self.std)

        specs, out_c = _layout(depth, in_channels, width, head, blocks, down_kernel)
        layers: list[tuple[str, nn.Module]] = []
        for name, kind, size in specs:  # built in order: the seeded initialisation depends on it
            if kind == "soc":
                cin, cout, k, stride = size
                layers.append((name, make_layer("soc", cin, cout, k, stride=stride, kind="convolution", **soc_kw)))
            elif kind == "act":
                layers.append((name, make_layer(activation, size, kind="activation")))
            else:
                layers.append((name, make_layer(pooling, size, kind="pooling")))
        # nn.ModuleDict keys may not contain dots: the state dict reads body.block1-conv0.weight
        self.layer_names = [n for n, _ in layers]
        self.body = nn.ModuleDict({n.replace(".", "-"): m for n, m in layers})
        self.num_features = out_c * (self.padded_size[0] // 32) * (self.padded_size[1] // 32)

        head_kwargs = {"ortho": soc_kw, "lln": {}, "mlp": dict(hidden=mlp_hidden, beta=mlp_beta)}[head]
        self.head = make_layer(head, self.num_features, num_classes, kind="head", **head_kwargs)


def _create_lipconvnet(depth: int, **kwargs) -> LipConvNet:
    return LipConvNet(depth=depth, **kwargs)


# ---- static facts: what `lipcert models` lists, from the configuration alone (no weights) --------

#: Learnable parameters of each layer kind, as the layers define them (certify.layers.soc, .activations,
#: .pooling, .heads, .mlp_head); tests/test_cli_models.py checks them against built models.
_ACT_PARAMS = {"maxmin": lambda c: 0, "hh1": lambda c: c // 2, "hh2": lambda c: 3 * (c // 2)}
_POOL_PARAMS = {"max": lambda c: 0, "lip": lambda c: c // 2}
_CERTIFICATES = {"ortho": "global", "lln": "pairwise", "mlp": "curvature"}


def _soc_params(cin: int, cout: int, k: int, stride: int) -> int:
    m = max(cout, cin * stride * stride)  # SOC runs on the space-to-depth input, padded to m channels
    return m * m * k * k + cout


def lipconvnet_facts(depth: int, **kwargs) -> dict[str, Any]:
    """Static facts of ``LipConvNet(depth=depth, **kwargs)`` computed from its configuration in
    microseconds, without building it (a build runs every SOC layer's initial power iteration):
    family, depth, width, activation, pooling, head, certificate, classes, input shape and the
    exact parameter count. Invalid options raise :class:`ConfigError`, as the constructor does."""
    import inspect

    try:
        args = inspect.signature(LipConvNet).bind(depth=depth, **kwargs)
    except TypeError as e:  # an option the model does not take
        raise ConfigError(str(e)) from None
    args.apply_defaults()
    a = args.arguments
    _check_config(a["depth"], a["head"], a["num_classes"], a["width"], a["blocks"], a["down_kernel"])
    if a["activation"] not in _ACT_PARAMS:
        raise ConfigError(f"unknown activation {a['activation']!r}; choose from {sorted(_ACT_PARAMS)}")
    if a["pooling"] not in _POOL_PARAMS:
        raise ConfigError(f"unknown pooling {a['pooling']!r}; choose from {sorted(_POOL_PARAMS)}")
    input_shape = (int(a["in_channels"]), *_size2(a["input_size"]))
    specs, out_c = _layout(a["depth"], input_shape[0], a["width"], a["head"], a["blocks"], a["down_kernel"])
    count = {"soc": lambda size: _soc_params(*size), "act": _ACT_PARAMS[a["activation"]],
             "pool": _POOL_PARAMS[a["pooling"]]}
    params = sum(count[kind](size) for _, kind, size in specs)
    padded = _padded(input_shape[1:])
    features, classes = out_c * (padded[0] // 32) * (padded[1] // 32), a["num_classes"]
    if a["head"] == "ortho":
        params += _soc_params(features, classes, 1, 1)
    elif a["head"] == "lln":
        params += classes * features + classes
    else:
        hidden = a["mlp_hidden"]
        params += hidden * features + hidden + classes * hidden + classes
    return {"family": "LipConvnet", "depth": sum(_per_block(a["depth"], a["blocks"])), "width": a["width"], "layer": "soc", "activation": a["activation"],
            "pooling": a["pooling"], "head": a["head"], "certificate": _CERTIFICATES[a["head"]],
            "num_classes": classes, "input_shape": list(input_shape), "parameters": params}


def _facts(depth: int, mlp: bool = False):
    """The static facts of a registered builder (its fixed depth, and head for the _mlp ones)."""

    def facts(**kwargs) -> dict[str, Any]:
        if mlp:
            head = kwargs.pop("head", "mlp")
            if head != "mlp":
                raise ConfigError(f"lipconvnet{depth}_mlp has the MLP head; got head={head!r} (use lipconvnet{depth})")
            kwargs["head"] = "mlp"
        return lipconvnet_facts(depth, **kwargs)

    return facts


@register_model(facts=_facts(5))
def lipconvnet5(**kwargs) -> LipConvNet:
    """LipConvnet-5: one SOC per block (the budget baseline of the paper's recipe)."""
    return _create_lipconvnet(5, **kwargs)


@register_model(facts=_facts(10))
def lipconvnet10(**kwargs) -> LipConvNet:
    """LipConvnet-10: two SOC layers per block."""
    return _create_lipconvnet(10, **kwargs)


@register_model(facts=_facts(15))
def lipconvnet15(**kwargs) -> LipConvNet:
    """LipConvnet-15: three SOC layers per block (the paper's best with the MLP head)."""
    return _create_lipconvnet(15, **kwargs)


@register_model(facts=_facts(20))
def lipconvnet20(**kwargs) -> LipConvNet:
    """LipConvnet-20: four SOC layers per block."""
    return _create_lipconvnet(20, **kwargs)


@register_model(facts=_facts(25))
def lipconvnet25(**kwargs) -> LipConvNet:
    """LipConvnet-25: five SOC layers per block."""
    return _create_lipconvnet(25, **kwargs)


@register_model(facts=_facts(30))
def lipconvnet30(**kwargs) -> LipConvNet:
    """LipConvnet-30: six SOC layers per block."""
    return _create_lipconvnet(30, **kwargs)


@register_model(facts=_facts(35))
def lipconvnet35(**kwargs) -> LipConvNet:
    """LipConvnet-35: seven SOC layers per block."""
    return _create_lipconvnet(35, **kwargs)


@register_model(facts=_facts(40))
def lipconvnet40(**kwargs) -> LipConvNet:
    """LipConvnet-40: eight SOC layers per block."""
    return _create_lipconvnet(40, **kwargs)


# ---- compact variants (issue 17: certified accuracy per CPU minute) -----------------------------

#: lipconvnet8c: one SOC layer in blocks 1 and 5, two in blocks 2-4, 2x2 orthogonal downsampling
COMPACT8 = {"blocks": [1, 2, 2, 2, 1], "down_kernel": 1}


def _compact(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**COMPACT8, **kwargs}


@register_model(facts=lambda **kwargs: lipconvnet_facts(5, **_compact(kwargs)))
def lipconvnet8c(**kwargs) -> LipConvNet:
    """Compact LipConvnet-8: 8 SOC layers (blocks 1, 2, 2, 2, 1), each stride 2 an orthogonal 2x2
    convolution (1x1 SOC on the space-to-depth map); the architecture of ``--recipe budget``."""
    return _create_lipconvnet(5, **_compact(kwargs))


# ---- the MLP head with the curvature certificate (CRC-Lip, NeurIPS 2022; issue 7) ---------------


def _create_lipconvnet_mlp(depth: int, **kwargs) -> LipConvNet:
    head = kwargs.pop("head", "mlp")
    if head != "mlp":
        raise ConfigError(f"lipconvnet{depth}_mlp has the MLP head; got head={head!r} (use lipconvnet{depth})")
    return _create_lipconvnet(depth, head="mlp", **kwargs)


@register_model(facts=_facts(5, mlp=True))
def lipconvnet5_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-5 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(5, **kwargs)


@register_model(facts=_facts(10, mlp=True))
def lipconvnet10_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-10 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(10, **kwargs)


@register_model(facts=_facts(15, mlp=True))
def lipconvnet15_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-15 with the MLP head: the paper's best CRC-Lip model (79.4% clean, 67.0% at 36/255)."""
    return _create_lipconvnet_mlp(15, **kwargs)


@register_model(facts=_facts(20, mlp=True))
def lipconvnet20_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-20 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(20, **kwargs)


@register_model(facts=_facts(25, mlp=True))
def lipconvnet25_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-25 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(25, **kwargs)


@register_model(facts=_facts(30, mlp=True))
def lipconvnet30_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-30 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(30, **kwargs)


@register_model(facts=_facts(35, mlp=True))
def lipconvnet35_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-35 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(35, **kwargs)


@register_model(facts=_facts(40, mlp=True))
def lipconvnet40_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-40 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(40, **kwargs)
