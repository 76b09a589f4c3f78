"""Input normalisation inside the model, so that radii are in [0, 1] pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .protocol import LipschitzLayer
from .registry import register_layer


@register_layer("normalize", kind="input", bound="1 / min_c std_c, exact (a diagonal map), from the stored float32 std")
class Normalize(LipschitzLayer):
    """``(x - mean) / std`` per channel, inside the model so radii are in [0, 1] pixel units.

    Its Lipschitz constant is exactly 1/min_c(std_c) (a diagonal map), not 1/max(std).
    """

    is_linear = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def lipschitz_bound(self, input_size=None) -> float:
        # 1/std in float64 from the stored float32 std, the value the forward divides by.
        return float(1.0 / self.std.detach().to(torch.float64).min())

    def output_size(self, size):
        return size

    def config(self) -> dict:
        return {"mean": [float(m) for m in self.mean.flatten()], "std": [float(s) for s in self.std.flatten()]}

    def to_onnx(self, g, prefix, x, c, h, w):
        return g.op("Div", g.op("Sub", x, g.tensor(prefix + "mean")), g.tensor(prefix + "std")), c, h, w

    @classmethod
    def examples(cls):
        return [(cls([0.5, 0.4, 0.3], [0.25, 0.5, 2.0]), (3, 4, 4)), (cls([0.1], [0.3081]), (1, 3, 3))]
