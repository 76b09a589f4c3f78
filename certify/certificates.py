"""Deterministic l2 robustness certificates (Singla & Feizi, NeurIPS 2022, section 1 of paper.md).

- Global: r(x) = m(x) / (sqrt(2) L), m the margin between the top logit and the runner-up, L an
  upper bound on the Lipschitz constant of x -> logits.
- Pairwise, for a last linear layer W on features with Lipschitz bound L_f (the LLN head):
  r(x) = min over ALL j != y of (f_y - f_j) / (L_f ||w_y - w_j||).

A sample is certified at eps when it is correctly classified and r(x) > eps (strict); ties in the
logits give a margin of 0, hence a radius of 0. Margins are taken in float64 from the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError, DataError
from torch import nn

from .lipschitz import check_finite, empirical_lower_bound

if TYPE_CHECKING:
    import pandas as pd

SQRT2 = math.sqrt(2.0)
STANDARD_EPS = ("36/255", "72/255", "108/255")


def parse_eps(text: str | float) -> float:
    """Parse an l2 radius written as a fraction (``36/255``) or a decimal (``0.5``); must be > 0."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"malformed eps {text!r}: use a fraction like 36/255 or a decimal like 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"eps must be a positive finite number, got {text!r}")
    return value


def predictions_and_margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class and margin f_y - max_{j != y} f_j (>= 0; 0 on a tie), in float64."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ConfigError(f"logits must have shape (N, C>=2), got {tuple(logits.shape)}")
    z = logits.detach().to(torch.float64)
    top2 = z.topk(2, dim=1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]


def global_radius(logits: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """r = margin / (sqrt(2) L) for an upper bound L on the Lipschitz constant of the logits."""
    if not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise ConfigError(f"the Lipschitz bound must be positive and finite, got {lipschitz}")
    _, margin = predictions_and_margins(logits)
    return margin / (SQRT2 * float(lipschitz))


def pairwise_radius(logits: torch.Tensor, feature_lipschitz: float, row_distances: torch.Tensor) -> torch.Tensor:
    """r = min_{j != y} (f_y - f_j) / (L_f ||w_y - w_j||), over ALL other classes.

    ``row_distances[y, j]`` is an upper bound on ||w_y - w_j||. A pair with identical rows can
    never swap order (f_y - f_j is the constant bias difference), so it imposes no limit.
    """
    if not (feature_lipschitz > 0 and math.isfinite(feature_lipschitz)):
        raise ConfigError(f"the feature Lipschitz bound must be positive and finite, got {feature_lipschitz}")
    pred, margin = predictions_and_margins(logits)
    z = logits.detach().to(torch.float64)
    dist = row_distances.to(device=z.device, dtype=torch.float64)[pred]  # (N, C)
    gaps = z.gather(1, pred[:, None]) - z  # f_y - f_j >= 0
    radius = gaps / (float(feature_lipschitz) * dist)
    radius = torch.where(dist > 0, radius, torch.full_like(radius, math.inf))
    radius.scatter_(1, pred[:, None], math.inf)  # j = y is not a competitor
    radius = radius.amin(dim=1)
    return torch.where(margin > 0, radius, torch.zeros_like(radius))


def certified_mask(radius: torch.Tensor, correct: torch.Tensor, eps: float) -> torch.Tensor:
    """Certified at eps: correctly classified and radius strictly greater than eps."""
    return correct & (radius > eps)


CERTIFICATE_METHODS = ("auto", "global", "pairwise", "curvature", "curvature-quick")
PRECISIONS = ("confirm", "float64", "float32")

# Radii within this relative distance of a certification threshold are confirmed by a float64
# evaluation (precision="confirm"). Measured float32 radius errors of lipcert's networks are about
# 1e-6 relative; the band is 1000x that, and a batch whose measured float32 error reaches a tenth
# of the band is evaluated in float64 throughout.
CONFIRM_BAND = 1e-3


def state_fingerprint(model) -> tuple:
    """What the bound depends on: every parameter and buffer (identity, storage and in-place
    version counter) and the evaluation settings of layers that have them. Any optimizer step,
    ``load_state_dict``, ``.data`` assignment, in-place edit or eval-mode switch changes it."""
    if not hasattr(model, "named_parameters"):
        return ()
    tensors = tuple((name, id(t), t.data_ptr(), t._version, t.dtype, str(t.device), tuple(t.shape))
                    for name, t in list(model.named_parameters()) + list(model.named_buffers()))
    settings = tuple((name, m.evaluation_settings()) for name, m in model.named_modules()
                     if hasattr(m, "evaluation_settings"))
    return tensors + settings


class Certifier:
    """Certified radii for one model: the bounds are computed once, then each batch costs one
    evaluation forward pass.

    The certifier certifies exactly the function it bounds: it puts the model in eval mode (the
    bounds hold for the evaluation forward), refuses non-finite parameters, recomputes its bounds
    when the model's weights, buffers or evaluation settings change after it was built
    (:func:`state_fingerprint`), and runs with IEEE float32 arithmetic (no TF32,
    :func:`certify.numerics.ieee_float32`).

    Args:
        model: a lipcert model (``lipschitz_bound()``, ``head_kind``), or any callable model when
            ``lipschitz`` is given.
        method: ``auto`` picks the tightest sound certificate for the head (pairwise for LLN,
            curvature for MLP, global otherwise); ``global``, ``pairwise`` or ``curvature`` force one;
            ``curvature-quick`` is the closed-form curvature certificate (sound, looser, cheaper
            than the tight dual one that ``curvature`` computes).
        lipschitz: a user-supplied Lipschitz bound of the whole model, for models that are not
            1-Lipschitz by construction; reports then say the bound is user-supplied.
        precision: how the float32 rounding of the forward pass is covered. ``confirm`` (default):
            the first batch is evaluated in float32 and in float64 (the same function: the
            float32 weights and evaluation plans applied in float64 arithmetic), which measures
            the float32 error; later, radii within ``CONFIRM_BAND`` (relative) of a threshold
            passed to ``__call__``, and radii near 0, are recomputed in float64, and the smaller
            radius and margin are kept. Where a measured float32 error exceeds a tenth of the
            band, every later sample is evaluated in float64. ``float64``: every sample is evaluated in float64.
            ``float32``: no re-check (the rounding of the forward pass is then not covered).
    """

    def __init__(self, model, method: str = "auto", lipschitz: float | None = None,
                 precision: str = "confirm") -> None:
        if method not in CERTIFICATE_METHODS:
            raise ConfigError(f"unknown certificate {method!r}; choose from {CERTIFICATE_METHODS}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        if lipschitz is not None:
            if method not in ("auto", "global"):
                raise ConfigError("a user-supplied Lipschitz bound only supports the global certificate")
            if not (lipschitz > 0 and math.isfinite(lipschitz)):
                raise ConfigError(f"--lipschitz must be positive and finite, got {lipschitz}")
        self.model = model
        self.requested_method, self.user_lipschitz, self.precision = method, lipschitz, precision
        self.rechecked = 0  # samples recomputed in float64 so far
        self.max_float32_error = 0.0  # largest relative |r32 - r64| measured (_relative_error)
        self.calibrated = False  # the first batch was measured in float64 throughout
        self.escalated = False  # float32 error too large for the band: float64 throughout
        self._compute_bounds()

    def _compute_bounds(self) -> None:
        from .lipschitz import upper_bound
        from .numerics import ieee_float32

        model, method = self.model, self.requested_method
        if hasattr(model, "eval"):
            model.eval()  # the bounds hold for the evaluation forward (SOC: more terms, no power iteration)
        if isinstance(model, nn.Module):
            check_finite(model)
        self.curvature_mode = "tight"
        self.lipschitz = None
        self._model64 = None
        if self.user_lipschitz is not None:
            self.method, self.lipschitz, self.bound_source = "global", float(self.user_lipschitz), "user-supplied"
            self._fingerprint = state_fingerprint(model)
            return
        head = getattr(model, "head_kind", None)
        # what the head supports (certify.layers.protocol.Head.certificate); "global" for others
        supported = getattr(model, "certificate", None) or getattr(getattr(model, "head", None), "certificate",
                                                                   "global")
        if method == "auto":
            method = supported
        if method == "curvature-quick":
            self.curvature_mode = "quick"
        method = "curvature" if method == "curvature-quick" else method
        if method == "pairwise" and supported != "pairwise":
            raise ConfigError(f"the pairwise certificate needs an LLN head; this model's head is {head!r}")
        if method == "curvature" and supported != "curvature":
            raise ConfigError(f"the curvature certificate needs an MLP head; this model's head is {head!r}")
        if method == "global" and supported == "curvature":
            raise ConfigError(f"a {head} head has no global Lipschitz bound; use the curvature certificate")
        self.method = method
        self.bound_source = getattr(model, "bound_source", "computed from the weights")
        with ieee_float32():
            if method == "global":
                self.lipschitz = upper_bound(model)
            else:
                self.feature_lipschitz = float(model.feature_lipschitz_bound())
                if method == "pairwise":
                    self.row_distances = model.head.pairwise_row_distances()
                else:
                    self.curvature = model.head.curvature_certifier(self.feature_lipschitz, mode=self.curvature_mode)
        self._fingerprint = state_fingerprint(model)

    def refresh(self) -> bool:
        """Recompute the bounds if the model changed since they were computed; True if it did."""
        model = self.model
        if hasattr(model, "modules") and any(m.training for m in model.modules()):
            model.eval()
        if state_fingerprint(model) == self._fingerprint:
            return False
        self._compute_bounds()
        return True

    @property
    def name(self) -> str:
        """The certificate as the user names it (``curvature-quick`` for the quick curvature one)."""
        return "curvature-quick" if self.method == "curvature" and self.curvature_mode == "quick" else self.method

    def _evaluate(self, x: torch.Tensor, pred: torch.Tensor | None = None):
        """(logits, pred, margin, radius) of one evaluation of the model at ``x``'s dtype."""
        model = self._float64_model(x) if x.dtype == torch.float64 else self.model
        if self.method == "curvature":
            feats = model.features(x)
            # the float64 features of a float32 head: the head certifies in float64 from its own
            # float64 copies of the weights; its logits here only decide the prediction
            logits = model.head(feats.to(model.head.fc1.weight.dtype))
            own_pred, margin = predictions_and_margins(logits)
            pred = own_pred if pred is None else pred
            radius = self.curvature(feats, pred=pred)
        else:
            logits = model(x)
            own_pred, margin = predictions_and_margins(logits)
            if pred is not None and not torch.equal(own_pred, pred.to(own_pred.device)):
                # a float64 re-evaluation that disagrees with the float32 prediction: no certificate
                margin = torch.where(own_pred == pred.to(own_pred.device), margin, torch.zeros_like(margin))
            pred = own_pred if pred is None else pred
            if self.method == "global":
                radius = global_radius(logits, self.lipschitz)
            else:
                radius = pairwise_radius(logits, self.feature_lipschitz, self.row_distances)
        if not torch.isfinite(logits).all():
            raise ConfigError("the model produced non-finite logits; refusing to certify")
        # one rule for every certificate kind: a tie (margin 0) certifies nothing
        radius = torch.where(margin > 0, radius, torch.zeros_like(radius))
        return logits, pred, margin, radius

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, thresholds=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, predictions, margins (float64) and certified radii (float64) of a batch.

        ``thresholds``: the radii (eps) at which the caller will decide "certified"; with
        ``precision="confirm"`` the samples near one of them are re-checked in float64.
        """
        from .numerics import ieee_float32

        self.refresh()
        with ieee_float32():
            if not self._float64_capable():
                return self._evaluate(x)
            if self.precision == "float64" or self.escalated:
                self.rechecked += x.shape[0]
                return self._evaluate(x.to(torch.float64))
            logits, pred, margin, radius = self._evaluate(x)
            if self.precision == "float32":
                return logits, pred, margin, radius
            # The first batch is evaluated in float64 throughout: it measures the float32 error
            # that the band must dominate. Later batches re-check the samples near a threshold.
            idx = (torch.arange(x.shape[0], device=radius.device) if not self.calibrated
                   else self._near(radius, thresholds).nonzero().flatten())
            if idx.numel() == 0:
                return logits, pred, margin, radius
            _, _, margin64, radius64 = self._evaluate(x[idx].to(torch.float64), pred[idx])
            self.rechecked += int(idx.numel())
            self.calibrated = True
            self.max_float32_error = max(self.max_float32_error,
                                         self._relative_error(radius[idx], radius64, thresholds))
            radius, margin = radius.clone(), margin.clone()
            radius[idx] = torch.minimum(radius[idx], radius64)
            margin[idx] = torch.minimum(margin[idx], margin64)
            if self.max_float32_error > CONFIRM_BAND / 10 and idx.numel() < x.shape[0]:
                # float32 is not accurate enough for the band to be safe: all in float64 from now on
                self.escalated = True
                self.rechecked += x.shape[0] - int(idx.numel())
                _, _, margin64, radius64 = self._evaluate(x.to(torch.float64), pred)
                radius, margin = torch.minimum(radius, radius64), torch.minimum(margin, margin64)
            elif self.max_float32_error > CONFIRM_BAND / 10:
                self.escalated = True
        return logits, pred, margin, radius

    def _relative_error(self, r32: torch.Tensor, r64: torch.Tensor, thresholds) -> float:
        """Largest |r32 - r64| relative to the radius, the nearest threshold, or a thousandth of
        the largest radius (so that radii near 0 do not count as large relative errors)."""
        if r64.numel() == 0:
            return 0.0
        floor = CONFIRM_BAND * float(r64.max().clamp_min(0))
        scale = torch.maximum(r64, self._nearest_threshold(r64, thresholds)).clamp_min(max(floor, 1e-300))
        return float(((r32 - r64).abs() / scale).max())

    def _float64_model(self, x: torch.Tensor):
        """The model that evaluates the certified function in float64 arithmetic: the model
        itself where it takes float64 inputs (lipcert's layers apply their float32 weights and
        evaluation plans to them), else a float64 copy of it (the same weights, exactly)."""
        if self._model64 is None:
            maker = getattr(self.model, "float64_model", None)  # a model that knows its float64 form
            if maker is not None:
                self._model64 = maker()
                return self._model64
            try:
                self.model(x[:1])
                self._model64 = self.model
            except RuntimeError:
                import copy

                self._model64 = copy.deepcopy(self.model).double().eval()
                try:
                    self._model64(x[:1])
                except RuntimeError as e:
                    raise ConfigError(f"this model cannot be evaluated in float64 for the re-check of float32 "
                                      f"rounding ({str(e).splitlines()[0]}); --precision float32 skips the "
                                      "re-check (rounding then not covered)") from None
        return self._model64

    def _float64_capable(self) -> bool:
        # a torch model evaluates its float32 weights on float64 inputs (the same function in
        # float64 arithmetic); a verified ONNX model does so through its rebuilt torch model

        return isinstance(self.model, nn.Module) or bool(getattr(self.model, "evaluates_float64", False))

    @staticmethod
    def _nearest_threshold(radius: torch.Tensor, thresholds) -> torch.Tensor:
        if not thresholds:
            return torch.zeros_like(radius)
        t = torch.tensor([float(e) for e in thresholds], dtype=torch.float64, device=radius.device)
        return t[(radius[:, None] - t[None, :]).abs().argmin(dim=1)]

    def _near(self, radius: torch.Tensor, thresholds) -> torch.Tensor:
        """Samples whose decision at some threshold, or whose non-zero radius, float32 rounding
        could change: radius within the band of a threshold, or a tiny positive radius."""
        near = (radius > 0) & (radius <= CONFIRM_BAND * float(radius.max().clamp_min(0)))
        for e in thresholds:
            near |= (radius - float(e)).abs() <= CONFIRM_BAND * float(e)
        return near


# ---- certifying a whole dataset -----------------------------------------------------------------


def eps_label(text: str | float) -> str:
    """The label an eps is reported under: a fraction as typed (``36/255``), a number as ``repr``."""
    if isinstance(text, (int, float)):
        return repr(float(text))
    return "".join(str(text).split())


def parse_eps_list(values) -> list[tuple[str, float]]:
    """``[(label, value), ...]`` sorted by value, duplicates (same value) dropped."""
    seen: dict[float, str] = {}
    for v in values:
        value = parse_eps(v)
        seen.setdefault(value, eps_label(v))
    if not seen:
        raise ConfigError("need at least one eps")
    return [(label, value) for value, label in sorted((v, lab) for v, lab in seen.items())]


def _tensor(values, dtype) -> torch.Tensor:
    """A tensor from a tensor, a numpy array (read-only ones included: copied) or a list."""
    if isinstance(values, torch.Tensor):
        return values.to(dtype)
    import numpy as np

    return torch.from_numpy(np.array(values)).to(dtype)


def certified_accuracy(radius, correct, eps: float) -> float:
    """Share of samples certified at eps (correct and radius > eps, strictly)."""
    radius, correct = _tensor(radius, torch.float64), _tensor(correct, torch.bool)
    if radius.numel() == 0:
        raise ConfigError("certified accuracy of an empty set is undefined")
    return float(certified_mask(radius, correct, float(eps)).sum()) / radius.numel()


@dataclass
class CertificationResult:
    """What :func:`certify_dataset` returns.

    Attributes:
        samples: one row per image: ``index, label, prediction, correct, margin, radius`` and one
            boolean ``certified_<eps>`` column per eps (``<eps>`` as typed, e.g. ``certified_36/255``).
        summary: JSON-serialisable dict: counts, clean and certified accuracies (fractions in
            [0, 1]), radius statistics of correctly classified samples, the certificate method, the
            Lipschitz upper bound and its source, the optional empirical lower bound, timings.
        eps: the ``(label, value)`` pairs certified, sorted by value.
    """

    samples: "pd.DataFrame"
    summary: dict
    eps: list = field(default_factory=list)

    def certified_accuracy(self, eps: str | float) -> float:
        """Certified accuracy at any eps, recomputed from the per-sample radii."""
        return certified_accuracy(self.samples["radius"].to_numpy(), self.samples["correct"].to_numpy(),
                                  parse_eps(eps))

    def curve(self, grid) -> list[float]:
        """Certified accuracy at each radius of ``grid`` (eps = 0 gives the clean accuracy)."""
        radius = _tensor(self.samples["radius"].to_numpy(), torch.float64)
        correct = _tensor(self.samples["correct"].to_numpy(), torch.bool)
        n = max(radius.numel(), 1)
        out = []
        for e in grid:
            # eps = 0: every correct sample counts (radius >= 0 always); otherwise strict.
            mask = correct if float(e) <= 0 else certified_mask(radius, correct, float(e))
            out.append(float(mask.sum()) / n)
        return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _check_images(x: torch.Tensor, start: int, expected: tuple[int, ...] | None, model_name: str) -> None:
    """Refuse images the certificate would be meaningless for (the radius is in [0, 1] pixel units)."""
    if x.ndim != 4:
        raise DataError(f"expected batches of images (N, C, H, W), got shape {tuple(x.shape)}")
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        got, want = "x".join(map(str, x.shape[1:])), "x".join(map(str, expected))
        raise DataError(f"images are {got} (CxHxW) but model {model_name} expects {want}; "
                        "use a dataset of the model's image size and channels")
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        bad = start + int((~finite).nonzero()[0, 0])
        raise DataError(f"sample {bad} has non-finite pixel values (NaN or inf); refusing to certify")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"pixel values must lie in [0, 1] (the model normalises inside), got range "
                        f"[{lo:.4g}, {hi:.4g}]; pass unnormalised images")


def _upper_bounds(cert: Certifier) -> tuple[float | None, float | None]:
    """(L of x -> logits, L of x -> features) as the report shows them; None where undefined."""
    feature = getattr(cert, "feature_lipschitz", None)
    if cert.method == "global":
        return cert.lipschitz, feature
    head = getattr(cert.model, "head", None)
    if cert.method == "pairwise" and head is not None and hasattr(head, "lipschitz_bound"):
        # Product of sound bounds: features, then the LLN head's exact spectral norm (+ slack).
        return feature * float(head.lipschitz_bound()), feature
    return None, feature


@dataclass
class CertifiedSamples:
    """Per-sample results of :func:`certify_batches`, on the CPU: labels, predictions, margins
    (float64) and certified radii (float64)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels


def certify_batches(cert: Certifier, batches, thresholds=(), device=None, progress=None) -> CertifiedSamples:
    """The certification loop: ``cert`` over ``(images, labels)`` batches (float images in
    [0, 1]), each moved to ``device`` as float32; ``thresholds`` are the eps the caller decides
    at (``Certifier``'s float64 re-check band). ``progress(done)`` after each batch. Used by
    :func:`certify_dataset`, training's validation, the demo and the audit alike."""
    labels, preds, margins, radii = [], [], [], []
    done = 0
    for x, y in batches:
        if x.shape[0] == 0:
            continue
        if device is not None:
            x = x.to(device)
        _, pred, margin, radius = cert(x.to(torch.float32), thresholds=thresholds)
        labels.append(torch.as_tensor(y).long().view(-1).cpu())
        preds.append(pred.cpu())
        margins.append(margin.cpu())
        radii.append(radius.cpu())
        done += x.shape[0]
        if progress is not None:
            progress(done)
    if not labels:
        empty = torch.zeros(0)
        return CertifiedSamples(empty.long(), empty.long(), empty.double(), empty.double())
    return CertifiedSamples(torch.cat(labels), torch.cat(preds), torch.cat(margins), torch.cat(radii))


def certify_dataset(
    model,
    dataset,
    eps=STANDARD_EPS,
    method: str = "auto",
    lipschitz: float | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    limit: int | None = None,
    progress=None,
    lower_bound: bool = False,
    lower_bound_samples: int = 8,
    precision: str = "confirm",
    seed: int = 0,
    certifier: Certifier | None = None,
) -> CertificationResult:
    """Certified l2 radii of every sample of ``dataset`` (paper.md section 1).

    The Lipschitz bound is computed once from the weights (:class:`Certifier`); each batch then
    costs one evaluation forward pass. A sample is certified at eps when it is correctly classified
    and its radius is strictly greater than eps.

    Args:
        model: a lipcert model (put in eval mode here: its bound holds for the evaluation forward),
            or any model when ``lipschitz`` is given.
        dataset: indexable, yielding ``(image CxHxW float in [0, 1], int label)``.
        eps: radii to report certified accuracy at (fractions like ``"36/255"`` or numbers).
        method: ``auto``, ``global``, ``pairwise`` or ``curvature`` (see :class:`Certifier`).
        lipschitz: a user-supplied bound for a model that is not 1-Lipschitz by construction.
        device: where to run; default the model's device.
        limit: certify only the first ``limit`` samples.
        progress: called as ``progress(done, total)`` after every batch.
        lower_bound: also compute an empirical lower bound on L (Jacobian power iteration on the
            first ``lower_bound_samples`` images) to show how tight the upper bound is.
        precision: how the float32 rounding of the forward pass is covered (see :class:`Certifier`).
        certifier: a :class:`Certifier` already built for ``model`` (its bounds are then reused,
            e.g. to certify several datasets with one bound computation); ``method`` and
            ``lipschitz`` are ignored.

    Raises:
        NotLipschitzError: no sound bound exists and none was given.
        DataError: empty dataset, wrong image size/channels, non-finite or out-of-range pixels,
            labels outside the model's classes.
        ConfigError: bad eps, batch size, limit or method.
    """
    import time

    import pandas as pd

    from . import __version__

    eps_items = parse_eps_list([eps] if isinstance(eps, (str, int, float)) else eps)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    try:
        total = len(dataset)
    except TypeError:
        raise DataError("the dataset must have a length (an indexable dataset)") from None
    if total == 0:
        name = getattr(dataset, "name", None)
        raise DataError(f"the dataset{' ' + repr(name) if name else ''} is empty: nothing to certify")
    n = min(total, limit) if limit is not None else total

    device = torch.device(device) if device is not None else _model_device(model)
    if hasattr(model, "to"):
        model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()  # SOC's evaluation series (more terms) is the one the bound covers

    t0 = time.perf_counter()
    if certifier is not None:
        if certifier.model is not model:
            raise ConfigError("the certifier was built for another model")
        cert = certifier
    else:
        cert = Certifier(model, method=method, lipschitz=lipschitz, precision=precision)
    bound_seconds = time.perf_counter() - t0
    rechecked_before = cert.rechecked
    expected_shape = getattr(model, "input_shape", None)
    num_classes = getattr(model, "num_classes", None)
    model_name = getattr(model, "model_name", type(model).__name__)

    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, range(n)) if n < total else dataset, batch_size=batch_size,
                        shuffle=False, num_workers=0)

    def checked_batches():
        done = 0
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise DataError("the dataset must yield (image, label) pairs")
            x, y = batch[0], torch.as_tensor(batch[1]).long().view(-1)
            if not torch.is_floating_point(x):
                raise DataError(f"images must be float tensors in [0, 1], got dtype {x.dtype}")
            _check_images(x, done, expected_shape, model_name)
            if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise DataError(f"labels must lie in 0..{num_classes - 1} for this model, "
                                f"got {int(y.min())}..{int(y.max())}")
            done += x.shape[0]
            yield x, y

    t1 = time.perf_counter()
    out = certify_batches(cert, checked_batches(), thresholds=[value for _, value in eps_items], device=device,
                          progress=None if progress is None else lambda done: progress(done, n))
    seconds = time.perf_counter() - t1
    label_t, pred_t, margin_t, radius_t = out.labels, out.predictions, out.margins, out.radii
    correct_t = pred_t == label_t
    samples = pd.DataFrame({
        "index": range(n),
        "label": label_t.numpy(),
        "prediction": pred_t.numpy(),
        "correct": correct_t.numpy(),
        "margin": margin_t.numpy(),
        "radius": radius_t.numpy(),
    })
    eps_rows = []
    for label, value in eps_items:
        mask = certified_mask(radius_t, correct_t, value)
        samples[f"certified_{label}"] = mask.numpy()
        eps_rows.append({"eps": label, "value": value, "certified": int(mask.sum()),
                         "certified_accuracy": int(mask.sum()) / n})

    upper, feature_upper = _upper_bounds(cert)
    lower = None
    k = 0
    if lower_bound:
        lower, k = _lower_bound(cert, dataset, n, lower_bound_samples, device, seed)
    good = radius_t[correct_t]
    n_correct = int(correct_t.sum())
    summary = {
        "lipcert_version": __version__,
        "torch_version": torch.__version__,
        "model": model_name,
        "dataset": {
            "name": getattr(dataset, "name", None),
            "split": getattr(dataset, "split", None),
            "fingerprint": getattr(dataset, "fingerprint", None),
            "samples": n,
            "available": total,
        },
        "certificate": {
            "method": cert.name,
            "lipschitz_upper_bound": _finite_or_none(upper),
            "feature_lipschitz_upper_bound": _finite_or_none(feature_upper),
            "bound_source": cert.bound_source,
            "lipschitz_lower_bound": lower,
            "lower_bound_samples": k if lower_bound else None,
            "strict": "certified at eps means correct and radius > eps",
            "precision": cert.precision,
            "float64_rechecked": cert.rechecked - rechecked_before,
            "float32_max_relative_error": cert.max_float32_error if cert.rechecked > rechecked_before else None,
            "float64_throughout": cert.precision == "float64" or cert.escalated,
        },
        "counts": {"total": n, "correct": n_correct,
                   "certified": {row["eps"]: row["certified"] for row in eps_rows}},
        "clean_accuracy": n_correct / n,
        "certified_accuracy": {row["eps"]: row["certified_accuracy"] for row in eps_rows},
        "eps": eps_rows,
        "radius_correct": {
            "mean": _finite_or_none(float(good.mean())) if n_correct else None,
            "median": _finite_or_none(float(good.median())) if n_correct else None,
            "max": _finite_or_none(float(good.max())) if n_correct else None,
        },
        "device": str(device),
        "bound_seconds": bound_seconds,
        "certify_seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    }
    return CertificationResult(samples=samples, summary=summary, eps=eps_items)


# The batched power iteration lives in certify.lipschitz; kept importable here for callers.
empirical_lipschitz_lower_bound = empirical_lower_bound


def _lower_bound(cert: Certifier, dataset, n: int, samples: int, device, seed: int) -> tuple[float, int]:
    """Empirical lower bound on the Lipschitz constant the report's upper bound covers."""
    from torch import nn

    model = cert.model
    if not isinstance(model, nn.Module):
        raise ConfigError("the empirical lower bound needs a torch model (not available for ONNX models)")
    # Curvature: only the features have a Lipschitz upper bound; compare like with like.
    fn = model.features if cert.method == "curvature" else model
    k = max(1, min(int(samples), n))
    xs = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(k)]).to(device=device, dtype=torch.float32)
    return empirical_lipschitz_lower_bound(fn, xs, seed=seed), k
