"""LiResNet: the linear residual network of Hu, Zhang, Wang & Fredrikson ("Unlocking Deterministic
Robustness Certification on ImageNet", NeurIPS 2023) with the CHORD dense layers of Hu, Leino,
Wang & Fredrikson ("A Recipe for Improved Certifiable Robustness", ICLR 2024), as the authors'
code (hukkai/liresnet) builds it:

    stem    SOC in->w 3x3 stride 2 (space-to-depth) + activation        (map: P/2)
    body    depth x [LiResNet block w->w 3x3 + activation]
    neck    2 x SOC w->w 1x1 stride 2 (space-to-depth, then an orthogonal projection to w
            channels)                                                     (map: P/8)
    dense   CHORD (Cholesky-orthogonalised) dense w (P/8)^2 -> features + activation, then
            (dense_layers - 1) x [CHORD features -> features + activation]
    head    LLN (pairwise certificate)

with P the input side zero-padded to a multiple of 8 after normalisation (an isometric embedding).
Paper default (CIFAR-10, ICLR 2024 config): depth 12, width 512, features 2048, dense_layers 9
(the neck's dense layer and the 8-layer LiResMLP); the defaults here (depth 6, width 32,
features 512, dense_layers 2) train on a CPU.

Choices where lipcert's registered layers replace the authors' GloRo-normalised ones:
- stem: the authors' 5x5 stride-2 convolution becomes a SOC on the space-to-depth input (stride 2
  as theirs, orthogonal: its bound is 1 up to the Taylor error, where a normalised plain
  convolution would be certified at its own norm bound, above 1);
- neck: the authors' Map2Vec applies a CHORD-orthogonalised 4x4 stride-4 kernel, i.e.
  space-to-depth by 4 and a (w, 16 w) matrix with orthonormal rows at every pixel; two 1x1 SOC
  layers of stride 2 are that same kind of map (space-to-depth, then the first w rows of an
  orthogonal matrix), certified at 1;
- blocks: ``normalize="block"`` (see :mod:`certify.layers.residual`): the GloRo-trained block as a
  nominally 1-Lipschitz layer, residual scale depth^-1/2 as the ICLR code. The authors' centring
  (running means subtracted in training) is left out.

``block="bro"`` swaps the body for the backbone of BRONet (Lai, Huang, Kung & Chen, "Enhancing
Certified Robustness via Block Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025;
code ntuaislab/BRONet, ``backbone_type: bro``): depth x [BRO convolution w->w 3x3 + activation],
no residual connection, each a block reflector of rank w/2 per frequency (their
``backbone_weight_rank_ratio`` 0.5) on the zero-padded map (their ``zero_padding``), with their
regularisation eps 1e-7, and started where their quasi-residual parametrisation starts:
V = [I; 0] on the centre tap + depth^-1/2 N(0, 1)/(9w) (a fixed reflector, -I on half the
channels, I on the others), bias 0. V is the trained parameter itself here; theirs is
V = [I; 0] + depth^-1/2 gamma W with W and a per-channel gamma trained, so their optimiser steps
on V are about depth^-1/2 of these (Adam-type steps do not depend on the gradient's scale).
Their centring is left out here too. Stem, neck, dense layers and head are the LiResNet's above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from certify.errors import ConfigError
from certify.layers.normalize import Normalize
from certify.layers.registry import make_layer
from certify.lipschitz import LipschitzNet

from ._registry import register_model
from .lipconvnet import _size2, input_normalisation

#: the side of the padded input must be a multiple of this (stem stride 2, neck stride 4)
REDUCTION = 8
HEADS = ("lln",)
#: the body's block: LiResNet blocks (Hu et al.) or BRONet's BRO convolutions (Lai et al.)
BLOCKS = ("liresnet", "bro")
#: BRONet's backbone BRO layers regularise V^H V with this relative eps (their dense/neck BRO: 1e-5)
BRO_BACKBONE_EPS = 1e-7


def _padded(size: tuple[int, int]) -> tuple[int, int]:
    return (-(-size[0] // REDUCTION) * REDUCTION, -(-size[1] // REDUCTION) * REDUCTION)


def _check(depth: int, width: int, features: int, dense_layers: int, head: str, num_classes: int,
           block: str = "liresnet") -> None:
    if block not in BLOCKS:
        raise ConfigError(f"unknown LiResNet block {block!r}; choose from {', '.join(BLOCKS)}")
    if depth < 1:
        raise ConfigError(f"LiResNet depth must be >= 1, got {depth}")
    if width < 2 or width % 2:
        raise ConfigError(f"width must be an even number >= 2, got {width}")
    if features < 2 or features % 2:
        raise ConfigError(f"features must be an even number >= 2, got {features}")
    if dense_layers < 1:
        raise ConfigError(f"dense_layers must be >= 1, got {dense_layers}")
    if head not in HEADS:
        raise ConfigError(f"LiResNet has the LLN head (pairwise certificate); got head={head!r}")
    if num_classes < 2:
        raise ConfigError(f"need at least 2 classes, got {num_classes}")


def _layout(depth: int, in_channels: int, width: int, features: int, dense_layers: int,
            padded: tuple[int, int]) -> list[tuple[str, str, Any]]:
    """The body as ``(name, kind, args)``: kind ``soc`` (in, out, kernel, stride), ``block``
    (channels, input size), ``act`` (channels) or ``dense`` (in, out features)."""
    half = (padded[0] // 2, padded[1] // 2)
    out: list[tuple[str, str, Any]] = [("stem.conv", "soc", (in_channels, width, 3, 2)), ("stem.act", "act", width)]
    for i in range(1, depth + 1):
        out += [(f"block{i}.conv", "block", (width, half)), (f"block{i}.act", "act", width)]
    out += [("neck.down1", "soc", (width, width, 1, 2)), ("neck.down2", "soc", (width, width, 1, 2))]
    flat = width * (padded[0] // REDUCTION) * (padded[1] // REDUCTION)
    for j in range(1, dense_layers + 1):
        out += [(f"dense{j}.linear", "dense", (flat if j == 1 else features, features)),
                (f"dense{j}.act", "act", features)]
    return out


class LiResNet(LipschitzNet):
    """A LiResNet of ``depth`` LiResNet blocks (see the module docstring for the layout).

    Args:
        depth, width: blocks and their channels (paper: 12, 512).
        features, dense_layers: the CHORD dense part (paper: 2048, 9).
        activation: a registered activation (MaxMin, the authors').
        head: ``"lln"`` (the only one).
        block: ``"liresnet"`` (LiResNet blocks) or ``"bro"`` (BRONet's BRO convolutions; see the
            module docstring).
        block_scale: the blocks' residual scale (default depth^-1/2, the ICLR code's); with
            ``block="bro"`` the scale of V's initial deviation from [I; 0] (their quasi-residual scale).
        block_normalize: the LiResNet blocks' ``normalize`` (``"block"`` or ``"residual"``).
        train_terms, eval_terms, backward, eval_mode, eval_tol: the SOC layers' options.
    """

    def __init__(
        self,
        depth: int = 6,
        width: int = 32,
        features: int = 512,
        dense_layers: int = 2,
        activation: str = "maxmin",
        head: str = "lln",
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        block_scale: float | None = None,
        block_normalize: str = "block",
        block: str = "liresnet",
        train_terms: int = 6,
        eval_terms: int = 15,
        backward: str = "fast",
        eval_mode: str = "taylor",
        eval_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        _check(depth, width, features, dense_layers, head, num_classes, block)
        self.mean, self.std = input_normalisation(in_channels, mean, std)
        self.depth, self.width, self.num_classes = depth, width, num_classes
        self.input_shape = (in_channels, *_size2(input_size))
        self.padded_size = _padded(self.input_shape[1:])
        self.normalize = Normalize(self.mean, self.std)

        soc_kw = dict(train_terms=train_terms, eval_terms=eval_terms, backward=backward, eval_mode=eval_mode,
                      eval_tol=eval_tol)
        scale = depth**-0.5 if block_scale is None else float(block_scale)
        layers: list[tuple[str, nn.Module]] = []
        for name, kind, args in _layout(depth, in_channels, width, features, dense_layers, self.padded_size):
            if kind == "soc":  # built in order: the seeded initialisation depends on it
                cin, cout, k, stride = args
                layers.append((name, make_layer("soc", cin, cout, k, stride=stride, kind="convolution", **soc_kw)))
            elif kind == "block" and block == "bro":
                c, size = args
                layers.append((name, _bro_block(c, size, scale)))
            elif kind == "block":
                c, size = args
                layers.append((name, make_layer("liresnet", c, c, 3, scale=scale, normalize=block_normalize,
                                                input_size=size, kind="convolution")))
            elif kind == "act":
                layers.append((name, make_layer(activation, args, kind="activation")))
            else:
                layers.append((name, make_layer("cholesky", *args, kind="dense")))
        # nn.ModuleDict keys may not contain dots: the state dict reads body.block1-conv.weight
        self.layer_names = [n for n, _ in layers]
        self.body = nn.ModuleDict({n.replace(".", "-"): m for n, m in layers})
        self.num_features = features
        self.head = make_layer("lln", features, num_classes, kind="head")


def _bro_block(channels: int, size: tuple[int, int], scale: float) -> nn.Module:
    """One BRONet backbone layer: a rank-c/2 BRO convolution on the zero-padded map, started as
    BRONet's quasi-residual parametrisation starts (V = [I; 0] on the centre tap plus
    ``scale`` N(0, 1)/(9c), bias 0)."""
    layer = make_layer("bro", channels, channels, 3, rank=channels // 2, padding="zero", eps=BRO_BACKBONE_EPS,
                       input_size=size, kind="convolution")
    with torch.no_grad():
        v = layer.weight  # (c, rank, 3, 3)
        noise = torch.randn(v.shape, dtype=v.dtype, device=v.device) * (scale / (9 * channels))
        v.copy_(noise)
        rank = v.shape[1]
        v[:rank, :rank, 1, 1] += torch.eye(rank, dtype=v.dtype, device=v.device)
        layer.bias.zero_()
    return layer


def liresnet_facts(**kwargs) -> dict[str, Any]:
    """Static facts of ``LiResNet(**kwargs)``: built on the meta device (shapes only, no memory),
    so the parameter count is the model's own."""
    import inspect

    try:
        args = inspect.signature(LiResNet).bind(**kwargs)
    except TypeError as e:  # an option the model does not take
        raise ConfigError(str(e)) from None
    args.apply_defaults()
    a = args.arguments
    _check(a["depth"], a["width"], a["features"], a["dense_layers"], a["head"], a["num_classes"], a["block"])
    with torch.device("meta"):
        model = LiResNet(**kwargs)
    return {"family": "LiResNet", "depth": a["depth"], "width": a["width"], "features": a["features"],
            "dense_layers": a["dense_layers"], "layer": a["block"], "activation": a["activation"], "head": a["head"],
            "certificate": model.certificate, "num_classes": a["num_classes"], "input_shape": list(model.input_shape),
            "parameters": sum(p.numel() for p in model.parameters())}


@register_model(facts=liresnet_facts)
def liresnet(**kwargs) -> LiResNet:
    """LiResNet (NeurIPS 2023) with CHORD dense layers (ICLR 2024): SOC stem, LiResNet blocks (or BRONet's BRO
    convolutions: ``block="bro"``), LLN head."""
    return LiResNet(**kwargs)
