"""Isometries and projections between layers: zero channel padding, keeping the first channels,
space-to-depth. Each has Lipschitz constant exactly 1 (an isometric embedding, an orthogonal
projection, a permutation), so each bound is 1, exact; they have no parameters (their baked form
is themselves)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ExportError
from .protocol import LipschitzLayer
from .registry import register_layer


def _positive(name: str, **values: int) -> None:
    for key, v in values.items():
        if int(v) < 1:
            raise ConfigError(f"{name}: {key} must be >= 1, got {v}")


@register_layer("channel_pad", kind="reshape", bound="1, exact (zero channels appended: an isometric embedding)")
class ChannelPad(LipschitzLayer):
    """(N, C, H, W) -> (N, channels, H, W) by appending zero channels (as the CVPR'24 comparison's
    ConvNet widens its 3-channel input)."""

    is_linear = True

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        _positive("channel_pad", in_channels=in_channels, channels=channels)
        if channels < in_channels:
            raise ConfigError(f"channel_pad widens: {in_channels} -> {channels} channels is not a padding")
        self.in_channels, self.channels = int(in_channels), int(channels)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "channels": self.channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def output_channels(self, channels: int) -> int:
        return self.channels

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0

    def to_onnx(self, g, prefix, x, c, h, w):
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        return g.op("Pad", x, g.i64([0, 0, 0, 0, 0, self.channels - c, 0, 0])), self.channels, h, w

    @classmethod
    def examples(cls):
        return [(cls(3, 8), (3, 4, 4)), (cls(4, 4), (4, 2, 3))]


@register_layer("first_channels", kind="reshape", bound="1, exact (an orthogonal projection onto the first channels)")
class FirstChannels(LipschitzLayer):
    """(N, C, H, W) -> (N, channels, H, W): the first ``channels`` channels (the CVPR'24
    comparison's ConvNet halves its channels so before each space-to-depth)."""

    is_linear = True

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        _positive("first_channels", in_channels=in_channels, channels=channels)
        if channels > in_channels:
            raise ConfigError(f"first_channels keeps {channels} of {in_channels} channels: too many")
        self.in_channels, self.channels = int(in_channels), int(channels)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "channels": self.channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.channels]

    def output_channels(self, channels: int) -> int:
        return self.channels

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0

    def to_onnx(self, g, prefix, x, c, h, w):
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        return g.channel_slice(x, 0, self.channels), self.channels, h, w

    @classmethod
    def examples(cls):
        return [(cls(8, 3), (8, 3, 3)), (cls(4, 4), (4, 2, 2))]


@register_layer("space_to_depth", kind="reshape", bound="1, exact (pixel_unshuffle permutes the entries)")
class SpaceToDepth(LipschitzLayer):
    """``F.pixel_unshuffle(x, factor)``: (N, C, H, W) -> (N, C f^2, H / f, W / f)."""

    is_linear = True

    def __init__(self, in_channels: int, factor: int = 2) -> None:
        super().__init__()
        _positive("space_to_depth", in_channels=in_channels, factor=factor)
        self.in_channels, self.factor = int(in_channels), int(factor)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "factor": self.factor}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def output_size(self, size):
        h, w = size
        if h % self.factor or w % self.factor:
            raise ConfigError(f"space_to_depth by {self.factor} needs sizes divisible by it, got {tuple(size)}")
        return (h // self.factor, w // self.factor)

    def output_channels(self, channels: int) -> int:
        return channels * self.factor**2

    def lipschitz_bound(self, input_size=None) -> float:
        return 1.0

    def to_onnx(self, g, prefix, x, c, h, w):
        return g.pixel_unshuffle(x, c, h, w, self.factor)

    @classmethod
    def examples(cls):
        return [(cls(3, 2), (3, 4, 6)), (cls(2, 3), (2, 3, 3))]
