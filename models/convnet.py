"""The ConvNet family of "1-Lipschitz Layers Compared: Memory, Speed, and Certifiable Robustness"
(Prach, Brau, Buttazzo & Lampert, CVPR 2024): one architecture in which every 1-Lipschitz layer
type is trained and compared, with the layer type as an argument.

For base width w (XS 16, S 32, M 64, L 128) on 32x32 inputs:

    stem    zero channels up to w; layer w->w 1x1 + MaxMin
    block i (i = 0..4, c = w 2^i, on a 32/2^i map): 5 x [layer c->c k x k + MaxMin], the first c/2
            channels kept, space-to-depth by 2 (c/2 -> 2c channels); k = 3, and 1 in the last
            block (its 2x2 map)
    head    after block 4: 32w channels on a 1x1 map; a 1x1 layer 32w->32w of the same type, the
            first num_classes outputs kept (``head="layer"``, the paper's), or LLN (``head="lln"``)

Every piece is a registered layer (certify.layers): the stem's padding, the channel projection
and the space-to-depth are isometries or projections (bound 1, exact), so the network's bound is
the product of its layers' sound bounds. Inputs smaller than 32x32 are zero-padded after
normalisation (an isometric embedding); larger ones are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from certify.errors import ConfigError
from certify.layers.normalize import Normalize
from certify.layers.registry import layer_info, make_layer
from certify.lipschitz import LipschitzNet

from ._registry import register_model
from .lipconvnet import _size2, input_normalisation

#: base width of each size (the paper's DEFAULT_MODELS)
SIZES = {"xs": 16, "s": 32, "m": 64, "l": 128}
BLOCKS, LAYERS_PER_BLOCK = 5, 5
HEADS = ("layer", "lln")


def _layout(width: int, in_channels: int, kernel_size: int, layers_per_block: int):
    """``(name, kind, args)`` of the body: kind ``conv`` (in, out, kernel), ``act`` (channels),
    ``pad``/``first`` (in, out channels) or ``s2d`` (channels)."""
    out: list[tuple[str, str, Any]] = [("stem.pad", "pad", (in_channels, width)), ("stem.conv", "conv", (width, width, 1)),
                                       ("stem.act", "act", width)]
    c = width
    for i in range(BLOCKS):
        k = kernel_size if i < BLOCKS - 1 else 1  # the last block's 2x2 map: 1x1 filters (as the paper)
        for j in range(layers_per_block):
            out += [(f"block{i}.conv{j}", "conv", (c, c, k)), (f"block{i}.act{j}", "act", c)]
        out += [(f"block{i}.first", "first", (c, c // 2)), (f"block{i}.s2d", "s2d", c // 2)]
        c *= 2
    return out, c


class ConvNet(LipschitzNet):
    """The CVPR'24 comparison's ConvNet (see the module docstring) with any registered
    convolution ``layer`` (``lipcert layers --kind convolution``); ``layer_options`` go to every
    layer of that type (e.g. ``{"eval_terms": 10}`` for SOC)."""

    def __init__(
        self,
        width: int = 16,
        layer: str = "soc",
        activation: str = "maxmin",
        head: str = "layer",
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        kernel_size: int = 3,
        layers_per_block: int = LAYERS_PER_BLOCK,
        layer_options: dict | None = None,
    ) -> None:
        super().__init__()
        _check(width, layer, head, num_classes, in_channels, input_size, layers_per_block)
        self.mean, self.std = input_normalisation(in_channels, mean, std)
        self.width, self.layer, self.num_classes = width, layer, num_classes
        self.depth = 1 + BLOCKS * layers_per_block  # convolutions before the head
        self.input_shape = (in_channels, *_size2(input_size))
        self.padded_size = (32, 32)
        self.normalize = Normalize(self.mean, self.std)
        options = dict(layer_options or {})
        specs, features = _layout(width, in_channels, kernel_size, layers_per_block)
        layers: list[tuple[str, nn.Module]] = []
        for name, kind, args in specs:  # built in order: the seeded initialisation depends on it
            if kind == "conv":
                layers.append((name, make_layer(layer, *args, kind="convolution", **options)))
            elif kind == "act":
                layers.append((name, make_layer(activation, args, kind="activation")))
            elif kind == "pad":
                layers.append((name, make_layer("channel_pad", *args)))
            elif kind == "first":
                layers.append((name, make_layer("first_channels", *args)))
            else:
                layers.append((name, make_layer("space_to_depth", args, 2)))
        self.layer_names = [n for n, _ in layers]
        self.body = nn.ModuleDict({n.replace(".", "-"): m for n, m in layers})
        self.num_features = features
        if head == "layer":
            self.head = make_layer("layer_head", features, num_classes, layer=layer, kind="head", **options)
        else:
            self.head = make_layer("lln", features, num_classes, kind="head")


def _check(width, layer, head, num_classes, in_channels, input_size, layers_per_block) -> None:
    if width < 2 or width % 2:
        raise ConfigError(f"width must be an even number >= 2, got {width}")
    if layer_info(layer).kind != "convolution":
        raise ConfigError(f"{layer!r} is a {layer_info(layer).kind} layer; the ConvNet needs a convolution "
                          "(see `lipcert layers --kind convolution`)")
    if head not in HEADS:
        raise ConfigError(f"unknown ConvNet head {head!r}; choose from {HEADS}")
    if num_classes < 2 or num_classes > width * 2**BLOCKS:
        raise ConfigError(f"need 2 to {width * 2**BLOCKS} classes at width {width}, got {num_classes}")
    if in_channels < 1 or in_channels > width:
        raise ConfigError(f"the ConvNet pads {in_channels} input channels up to its width {width}: too many")
    h, w = _size2(input_size)
    if not (1 <= h <= 32 and 1 <= w <= 32):
        raise ConfigError(f"the ConvNet takes inputs up to 32x32, got {h}x{w}")
    if layers_per_block < 1:
        raise ConfigError(f"layers_per_block must be >= 1, got {layers_per_block}")


def _builder(size: str):
    def build(**kwargs) -> ConvNet:
        kwargs.setdefault("width", SIZES[size])
        return ConvNet(**kwargs)

    build.__name__ = f"convnet_{size}"
    build.__doc__ = (f"ConvNet-{size.upper()} of the CVPR'24 layer comparison (base width {SIZES[size]}), any "
                     "registered convolution as `layer`")
    return build


def _facts(size: str):
    def facts(**kwargs) -> dict[str, Any]:
        kwargs.setdefault("width", SIZES[size])
        import inspect

        try:
            args = inspect.signature(ConvNet).bind(**kwargs)
        except TypeError as e:
            raise ConfigError(str(e)) from None
        args.apply_defaults()
        a = args.arguments
        _check(a["width"], a["layer"], a["head"], a["num_classes"], a["in_channels"], a["input_size"],
               a["layers_per_block"])
        with torch.device("meta"):  # shapes only: every layer type, no memory
            model = ConvNet(**kwargs)
        return {"family": "ConvNet", "size": size.upper(), "depth": model.depth, "width": a["width"],
                "layer": a["layer"],
                "activation": a["activation"], "head": a["head"], "certificate": model.certificate,
                "num_classes": a["num_classes"], "input_shape": list(model.input_shape),
                "parameters": sum(p.numel() for p in model.parameters())}

    return facts


for _size in SIZES:
    register_model(_builder(_size), name=f"convnet_{_size}", facts=_facts(_size))
