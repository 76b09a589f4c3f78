"""Fixed linear layers, the baked form of every layer whose evaluation forward is one convolution
or one matrix (AOL, orthogonal dense layers, a trained layer's cached weight): bounded by the
shared sound norm tools from the tensors they apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ExportError
from .norms import conv_norm_bound, linear_norm_bound
from .protocol import LipschitzLayer
from .registry import register_layer


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_layer("conv_baked", kind="baked", bound="conv_norm_bound of the stored filter on the real input size "
                                                  "(float64 DFT blocks of a circular embedding, strides by "
                                                  "space-to-depth, rounding bounded)")
class BakedConv2d(LipschitzLayer):
    """``conv2d(x, weight, bias, stride, padding)`` with zero padding and fixed tensors."""

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = (kh, kw), _pair(stride), _pair(padding)
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise ConfigError(f"invalid baked convolution: stride {stride}, padding {padding}")
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0) -> "BakedConv2d":
        """A baked convolution holding copies of ``weight`` (out, in, kh, kw) and ``bias``."""
        out = cls(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride, padding, bias is not None)
        out.weight = weight.detach().clone().contiguous()
        if bias is not None:
            out.bias = bias.detach().clone().contiguous()
        return out.to(weight.device).eval()

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), b, stride=self.stride, padding=self.padding)

    def output_size(self, size):
        (h, w), (kh, kw), (sh, sw), (ph, pw) = size, self.kernel_size, self.stride, self.padding
        return ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("a convolution's bound needs its input size")
        return conv_norm_bound(self.weight, tuple(input_size), stride=self.stride, padding=self.padding)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        if c != self.in_channels:
            raise ExportError(f"layer {g.scope!r} expects {self.in_channels} channels, gets {c}")
        (ph, pw) = self.padding
        inputs = [x, g.tensor(prefix + "weight")] + ([g.tensor(prefix + "bias")] if self.bias is not None else [])
        y = g.op("Conv", *inputs, kernel_shape=list(self.kernel_size), pads=[ph, pw, ph, pw],
                 strides=list(self.stride), dilations=[1, 1], group=1)
        return (y, self.out_channels, *self.output_size((h, w)))

    @classmethod
    def examples(cls):
        gen = torch.Generator().manual_seed(0)
        return [(cls.of(torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, generator=gen), 1, 1), (3, 5, 5)),
                (cls.of(torch.randn(6, 2, 2, 2, generator=gen), None, 2, 0), (2, 4, 6))]


@register_layer("linear_baked", kind="baked", bound="float64 spectral norm of the stored matrix (Gram eigvalsh + "
                                                    "rounding)")
class BakedLinear(LipschitzLayer):
    """``x @ weight.T + bias`` on (N, features) inputs (a dense layer's evaluation forward)."""

    is_linear = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "BakedLinear":
        out = cls(weight.shape[1], weight.shape[0], bias is not None)
        out.weight = weight.detach().clone().contiguous()
        if bias is not None:
            out.bias = bias.detach().clone().contiguous()
        return out.to(weight.device).eval()

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), self.weight.to(x.dtype), b)

    def output_channels(self, channels: int) -> int:
        return self.out_features

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return linear_norm_bound(self.weight)

    def to_onnx(self, g, prefix: str, x: str, c: int, h: int, w: int):
        if c * h * w != self.in_features:
            raise ExportError(f"layer {g.scope!r} expects {self.in_features} features, gets {c * h * w}")
        x = g.op("Flatten", x, axis=1)
        g.flat = True  # from here on the values are (N, features)
        inputs = [x, g.tensor(prefix + "weight")] + ([g.tensor(prefix + "bias")] if self.bias is not None else [])
        return g.op("Gemm", *inputs, transB=1), self.out_features, 1, 1

    @classmethod
    def examples(cls):
        gen = torch.Generator().manual_seed(0)
        return [(cls.of(torch.randn(5, 7, generator=gen), torch.randn(5, generator=gen)), (7,))]


@register_layer("conv", kind="convolution", bound="conv_norm_bound of the weight on the real input size (NOT "
                                                  "1-Lipschitz: an unconstrained convolution, bounded soundly)")
class Conv2d(LipschitzLayer):
    """An unconstrained zero-padded "same" convolution (``nn.Conv2d``'s default initialisation):
    the speed reference of the layer comparison, and a layer whose bound is simply its operator
    norm. Nothing keeps it 1-Lipschitz, so a network of them is certified with a bound far above 1
    (the certificate is sound, and small)."""

    is_linear = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"conv needs an odd kernel size for 'same' padding, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        ref = torch.nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.weight, self.bias = ref.weight, ref.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), b, padding=self.kernel_size // 2)

    def output_channels(self, channels: int) -> int:
        return self.out_channels

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        if input_size is None:
            raise ConfigError("a convolution's bound needs its input size")
        return conv_norm_bound(self.weight, tuple(input_size), padding=self.kernel_size // 2)

    def decay_parameters(self):
        yield self.weight

    def bake(self, **options) -> LipschitzLayer:
        return BakedConv2d.of(self.weight, self.bias, 1, self.kernel_size // 2)

    @classmethod
    def examples(cls):
        return [(cls(3, 4), (3, 5, 5)), (cls(4, 2, 1), (4, 3, 3))]
