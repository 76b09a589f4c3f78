"""LipConvnet-N: the 1-Lipschitz SOC network family of Singla & Feizi (ICML 2021, NeurIPS 2022).

N in 5, 10, ..., 40 with b = N/5 SOC layers per block:

    init    SOC in->w 3x3 + activation
    block i (i = 1..4, c = w 2^(i-1)): (b-1) x [SOC c->c 3x3 + act], SOC c->4c 3x3 stride 2 + pool (4c->2c)
    block 5 SOC 16w->64w 1x1 stride 2, (b-1) x [SOC 64w->64w 1x1 + act]; the last layer ends in
            a pool (32w features) or, for the MLP head, an activation (64w features)
    head    orthogonal (1x1 SOC), LLN, or MLP

with w = 32 in the paper. Inputs whose side is not a multiple of 32 (MNIST's 28) are zero-padded
after normalisation, an isometric embedding that keeps the bound.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certify.activations import make_activation
from certify.errors import ConfigError
from certify.heads import LLNHead, OrthoHead
from certify.lipschitz import LipschitzNet, Normalize
from certify.pooling import make_pooling
from certify.soc import SOC

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
        train_terms: int = 6,
        eval_terms: int = 15,
        backward: str = "fast",
        eval_mode: str = "taylor",
        eval_tol: float = 1e-6,
        mlp_hidden: int = 4096,
        mlp_beta: float = 1.0,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"LipConvnet depth must be one of {DEPTHS}, got {depth}")
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; choose from {HEADS}")
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes, got {num_classes}")
        if width < 2 or width % 2:
            raise ConfigError(f"width must be an even number >= 2, got {width}")
        if mean is None or std is None:
            mean, std = (CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else (
                MNIST_MEAN * in_channels, MNIST_STD * in_channels)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
        self.depth, self.num_classes, self.width = depth, num_classes, width
        self.input_shape = (in_channels, *_size2(input_size))
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.head_kind = head
        h, w = self.input_shape[1:]
        self.padded_size = (-(-h // 32) * 32, -(-w // 32) * 32)

        soc_kw = dict(train_terms=train_terms, eval_terms=eval_terms, backward=backward,
                      eval_mode=eval_mode, eval_tol=eval_tol)
        b = depth // 5
        self.normalize = Normalize(self.mean, self.std)

        layers: list[tuple[str, nn.Module]] = [
            ("init.conv", SOC(in_channels, width, 3, **soc_kw)),
            ("init.act", make_activation(activation, width)),
        ]
        c = width
        for i in range(1, 5):
            for j in range(b - 1):
                layers += [(f"block{i}.conv{j}", SOC(c, c, 3, **soc_kw)),
                           (f"block{i}.act{j}", make_activation(activation, c))]
            layers += [(f"block{i}.down", SOC(c, 4 * c, 3, stride=2, **soc_kw)),
                       (f"block{i}.pool", make_pooling(pooling, 4 * c))]
            c *= 2
        wide = 4 * c
        layers += [("block5.conv0", SOC(c, wide, 1, stride=2, **soc_kw))]
        for j in range(1, b):
            layers += [(f"block5.act{j - 1}", make_activation(activation, wide)),
                       (f"block5.conv{j}", SOC(wide, wide, 1, **soc_kw))]
        if head == "mlp":
            layers += [(f"block5.act{b - 1}", make_activation(activation, wide))]
            out_c = wide
        else:
            layers += [("block5.pool", make_pooling(pooling, wide))]
            out_c = wide // 2
        # nn.ModuleDict keys may not contain dots: the state dict reads body.block1-conv0.weight
        self.layer_names = [n for n, _ in layers]
        self.body = nn.ModuleDict({n.replace(".", "-"): m for n, m in layers})
        spatial = (self.padded_size[0] // 32) * (self.padded_size[1] // 32)
        self.num_features = out_c * spatial

        if head == "ortho":
            self.head = OrthoHead(self.num_features, num_classes, **soc_kw)
        elif head == "lln":
            self.head = LLNHead(self.num_features, num_classes)
        else:
            from certify.mlp_head import MLPHead  # the curvature-certified head (issue 7)

            self.head = MLPHead(self.num_features, num_classes, hidden=mlp_hidden, beta=mlp_beta)


def _create_lipconvnet(depth: int, **kwargs) -> LipConvNet:
    return LipConvNet(depth=depth, **kwargs)


@register_model
def lipconvnet5(**kwargs) -> LipConvNet:
    """LipConvnet-5: one SOC per block (the budget baseline of the paper's recipe)."""
    return _create_lipconvnet(5, **kwargs)


@register_model
def lipconvnet10(**kwargs) -> LipConvNet:
    """LipConvnet-10: two SOC layers per block."""
    return _create_lipconvnet(10, **kwargs)


@register_model
def lipconvnet15(**kwargs) -> LipConvNet:
    """LipConvnet-15: three SOC layers per block (the paper's best with the MLP head)."""
    return _create_lipconvnet(15, **kwargs)


@register_model
def lipconvnet20(**kwargs) -> LipConvNet:
    """LipConvnet-20: four SOC layers per block."""
    return _create_lipconvnet(20, **kwargs)


@register_model
def lipconvnet25(**kwargs) -> LipConvNet:
    """LipConvnet-25: five SOC layers per block."""
    return _create_lipconvnet(25, **kwargs)


@register_model
def lipconvnet30(**kwargs) -> LipConvNet:
    """LipConvnet-30: six SOC layers per block."""
    return _create_lipconvnet(30, **kwargs)


@register_model
def lipconvnet35(**kwargs) -> LipConvNet:
    """LipConvnet-35: seven SOC layers per block."""
    return _create_lipconvnet(35, **kwargs)


@register_model
def lipconvnet40(**kwargs) -> LipConvNet:
    """LipConvnet-40: eight SOC layers per block."""
    return _create_lipconvnet(40, **kwargs)


# ---- the MLP head with the curvature certificate (CRC-Lip, NeurIPS 2022; issue 7) ---------------


def _create_lipconvnet_mlp(depth: int, **kwargs) -> LipConvNet:
    head = kwargs.pop("head", "mlp")
    if head != "mlp":
        raise ConfigError(f"lipconvnet{depth}_mlp has the MLP head; got head={head!r} (use lipconvnet{depth})")
    return _create_lipconvnet(depth, head="mlp", **kwargs)


@register_model
def lipconvnet5_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-5 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(5, **kwargs)


@register_model
def lipconvnet10_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-10 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(10, **kwargs)


@register_model
def lipconvnet15_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-15 with the MLP head: the paper's best CRC-Lip model (79.4% clean, 67.0% at 36/255)."""
    return _create_lipconvnet_mlp(15, **kwargs)


@register_model
def lipconvnet20_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-20 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(20, **kwargs)


@register_model
def lipconvnet25_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-25 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(25, **kwargs)


@register_model
def lipconvnet30_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-30 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(30, **kwargs)


@register_model
def lipconvnet35_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-35 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(35, **kwargs)


@register_model
def lipconvnet40_mlp(**kwargs) -> LipConvNet:
    """LipConvnet-40 with the MLP head certified by curvature (CRC-Lip)."""
    return _create_lipconvnet_mlp(40, **kwargs)
