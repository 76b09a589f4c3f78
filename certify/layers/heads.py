"""Last layers ("heads") that map 1-Lipschitz features to logits.

- :class:`OrthoHead`: a 1x1 SOC from features to classes (Singla & Feizi, ICML 2021); orthogonal,
  certified with the global certificate.
- :class:`LLNHead`: last layer normalisation (Singla, Singla & Feizi, ICLR 2022): a linear layer
  whose rows are normalised to unit norm in every forward, free bias; certified pairwise with
  ``||w_y - w_j||`` (see :mod:`certify.certificates`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExportError
from .norms import FLOAT64_SLACK, matrix_norm_bound
from .protocol import Head
from .registry import register_layer
from .soc import SOC, BakedSOC


@register_layer("ortho", kind="head", reference="Singla & Feizi, Skew Orthogonal Convolutions, ICML 2021",
                bound="the 1x1 SOC's bound on a 1x1 map (global certificate)")
class OrthoHead(Head):
    """Orthogonal head: a 1x1 SOC over the feature vector, first ``num_classes`` outputs kept."""

    is_linear = True

    kind = "ortho"
    certificate = "global"

    def __init__(self, features: int, num_classes: int, **soc_kwargs) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.soc = SOC(features, num_classes, kernel_size=1, **soc_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.soc(x.view(x.shape[0], -1, 1, 1)).flatten(1)

    def lipschitz_bound(self, input_size=None) -> float:
        return self.soc.lipschitz_bound((1, 1))

    def bake(self, one_by_one: str = "matrix", **options) -> Head:
        """One matrix ``exp(A)[:C, :F]`` (``"matrix"``) or the SOC's own Taylor series (``"taylor"``)."""
        soc = self.soc.bake(one_by_one=one_by_one)
        if isinstance(soc, BakedSOC):
            out = BakedSOCHead(self.features, self.num_classes, soc.channels, soc.terms, soc.bias is not None)
            out.soc = soc
        else:
            out = BakedLinearHead(self.features, self.num_classes, soc.bias is not None)
            out.weight, out.bias = soc.weight, soc.bias
        return out.eval()

    @classmethod
    def examples(cls):
        return [(cls(8, 3), (8,)), (cls(3, 5), (3,))]


@register_layer("lln", kind="head", reference="Singla, Singla & Feizi, Improved deterministic l2 robustness on "
                                              "CIFAR-10 and CIFAR-100 (last layer normalisation), ICLR 2022",
                bound="float64 spectral norm of the normalised rows; pairwise certificate by the float64 row "
                      "distances ||w_y - w_j||")
class LLNHead(Head):
    """Linear layer with unit-norm rows (re-normalised in every forward) and a free bias."""

    is_linear = True

    kind = "lln"
    certificate = "pairwise"

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.weight = nn.Parameter(torch.randn(num_classes, features) / math.sqrt(features))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.normalized_weight().to(x.dtype), self.bias.to(x.dtype))

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        """Exact spectral norm of the normalised weight, in float64, plus rounding slack."""
        w = self.normalized_weight().detach().to(torch.float64)
        return float(torch.linalg.matrix_norm(w, ord=2)) * (1 + FLOAT64_SLACK)

    @torch.no_grad()
    def pairwise_row_distances(self) -> torch.Tensor:
        """``D[y, j] = ||w_y - w_j||`` in float64 (exact differences, not sqrt(2 - 2 w_y.w_j),
        which loses precision when two rows nearly coincide), inflated by rounding slack."""
        w = self.normalized_weight().detach().to(torch.float64)
        return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * (1 + FLOAT64_SLACK)

    def bake(self, **options) -> Head:
        out = BakedLLNHead(self.features, self.num_classes)
        out.weight = self.normalized_weight().detach().clone()
        out.bias = self.bias.detach().clone()
        return out.to(self.weight.device).eval()

    def to_onnx(self, g, x: str) -> str:
        raise ExportError("export the baked LLN head (bake() normalises its rows once)")

    @classmethod
    def examples(cls):
        return [(cls(8, 3), (8,)), (cls(3, 5), (3,))]


# ---- baked heads ---------------------------------------------------------------------------------


def _gemm(g, head, x: str) -> str:
    from ..onnx_graph import OUTPUT_NAME

    inputs = [x, g.tensor("head.weight")] + ([g.tensor("head.bias")] if head.bias is not None else [])
    return g.op("Gemm", *inputs, transB=1, output=OUTPUT_NAME)


@register_layer("ortho_matrix", kind="baked", bound="float64 spectral norm of the stored matrix (global certificate)")
class BakedLinearHead(Head):
    """The orthogonal head baked to one matrix: ``logits = Q phi + b``, ``Q = exp(A)[:C, :F]``."""

    is_linear = True

    kind = "ortho"
    certificate = "global"

    def __init__(self, features: int, num_classes: int, bias: bool) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.register_buffer("weight", torch.zeros(num_classes, features))
        self.register_buffer("bias", torch.zeros(num_classes) if bias else None)

    def config(self) -> dict:
        return {"features": self.features, "num_classes": self.num_classes, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x.flatten(1), self.weight.to(x.dtype), b)

    @torch.no_grad()
    def lipschitz_bound(self, input_size=None) -> float:
        return matrix_norm_bound(self.weight.detach().to(torch.float64))

    def to_onnx(self, g, x: str) -> str:
        return _gemm(g, self, x)

    @classmethod
    def examples(cls):
        return [(OrthoHead(8, 3).bake(), (8,))]


@register_layer("ortho_soc_baked", kind="baked", bound="the baked 1x1 SOC's 1 + a^K/K! (global certificate)")
class BakedSOCHead(Head):
    """The orthogonal head kept as a 1x1 Taylor-series SOC (``bake(..., one_by_one="taylor")``)."""

    is_linear = True

    kind = "ortho"
    certificate = "global"

    def __init__(self, features: int, num_classes: int, channels: int, terms: int, bias: bool) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.soc = BakedSOC(features, num_classes, 1, 1, channels, terms, bias)

    def config(self) -> dict:
        return {"features": self.features, "num_classes": self.num_classes, "channels": self.soc.channels,
                "terms": self.soc.terms, "bias": self.soc.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.soc(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)

    def lipschitz_bound(self, input_size=None) -> float:
        return self.soc.lipschitz_bound((1, 1))

    def to_onnx(self, g, x: str) -> str:
        from ..onnx_graph import OUTPUT_NAME

        x = g.op("Reshape", x, g.i64([-1, self.features, 1, 1]))
        y, _, _, _ = self.soc.to_onnx(g, "head.soc.", x, self.features, 1, 1)
        return g.op("Flatten", y, axis=1, output=OUTPUT_NAME)

    @classmethod
    def examples(cls):
        return [(OrthoHead(8, 3).bake(one_by_one="taylor"), (8,))]


@register_layer("lln_baked", kind="baked", bound="as the LLN head, on the stored (already normalised) rows")
class BakedLLNHead(LLNHead):
    """The LLN head with its rows normalised once; the bound and the pairwise row distances are
    :class:`LLNHead`'s own code, run on the stored (already normalised) rows."""

    def __init__(self, features: int, num_classes: int) -> None:
        Head.__init__(self)  # no trainable parameters: buffers only
        self.features, self.num_classes = features, num_classes
        self.register_buffer("weight", torch.zeros(num_classes, features))
        self.register_buffer("bias", torch.zeros(num_classes))

    def normalized_weight(self) -> torch.Tensor:
        # The rows were normalised at bake time; normalising again would change their last bits
        # and make the baked logits differ from the original's.
        return self.weight

    def bake(self, **options) -> Head:
        return super(LLNHead, self).bake()

    def to_onnx(self, g, x: str) -> str:
        return _gemm(g, self, x)

    @classmethod
    def examples(cls):
        return [(LLNHead(8, 3).bake(), (8,))]


# ---- a head made of any registered convolution ----------------------------------------------------


@register_layer("layer_head", kind="head", reference="Prach, Brau, Buttazzo & Lampert, 1-Lipschitz Layers Compared, "
                                                     "CVPR 2024 (the ConvNet head)",
                bound="the wrapped 1x1 layer's own bound on a 1x1 map (keeping the first classes is a projection; "
                      "global certificate)")
class LayerHead(Head):
    """features -> a 1x1 layer of any registered convolution type on (N, features, 1, 1), its
    first ``num_classes`` outputs kept: the CVPR'24 comparison's head, in the network's own layer
    type (for SOC it is the orthogonal head)."""

    kind = "layer"
    certificate = "global"

    def __init__(self, features: int, num_classes: int, layer: str = "soc", **layer_options) -> None:
        super().__init__()
        from .registry import make_layer

        if num_classes > features:
            raise ConfigError(f"a layer head keeps {num_classes} of {features} features: too few features")
        self.features, self.num_classes = features, num_classes
        self.inner = make_layer(layer, features, features, 1, kind="convolution", **layer_options)
        self.is_linear = self.inner.is_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)[:, : self.num_classes]

    def lipschitz_bound(self, input_size=None) -> float:
        return float(self.inner.lipschitz_bound((1, 1)))

    def bake(self, **options) -> Head:
        inner = self.inner.bake(**options)
        out = BakedLayerHead(self.features, self.num_classes, {"type": inner.layer_type, **inner.config()})
        out.inner, out.is_linear = inner, inner.is_linear
        return out.eval()

    @classmethod
    def examples(cls):
        return [(cls(8, 3), (8,)), (cls(4, 4, layer="soc", eval_mode="fast"), (4,))]


@register_layer("layer_head_baked", kind="baked", bound="the baked 1x1 layer's own bound (global certificate)")
class BakedLayerHead(Head):
    """:class:`LayerHead` with its layer baked; the plan entry names the inner layer's type."""

    kind = "layer"
    certificate = "global"

    def __init__(self, features: int, num_classes: int, inner: dict) -> None:
        super().__init__()
        from .registry import layer_class

        cfg = dict(inner)
        self.features, self.num_classes = features, num_classes
        self.inner = layer_class(cfg.pop("type")).from_config(cfg)
        self.is_linear = self.inner.is_linear

    def config(self) -> dict:
        return {"features": self.features, "num_classes": self.num_classes,
                "inner": {"type": self.inner.layer_type, **self.inner.config()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)[:, : self.num_classes]

    def lipschitz_bound(self, input_size=None) -> float:
        return float(self.inner.lipschitz_bound((1, 1)))

    def to_onnx(self, g, x: str) -> str:
        from ..onnx_graph import OUTPUT_NAME

        x = g.op("Reshape", x, g.i64([-1, self.features, 1, 1]))
        y, _, _, _ = self.inner.to_onnx(g, "head.inner.", x, self.features, 1, 1)
        y = g.op("Flatten", y, axis=1)
        return g.op("Slice", y, g.i64([0]), g.i64([self.num_classes]), g.i64([1]), output=OUTPUT_NAME)

    @classmethod
    def examples(cls):
        return [(LayerHead(8, 3).bake(), (8,)), (LayerHead(6, 2).bake(one_by_one="taylor"), (6,))]
