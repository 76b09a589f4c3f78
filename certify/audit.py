"""Audit of certified radii by attack: certificates must never be wrong.

For each *certified* sample (correctly classified, certified radius r > 0), the attack ensemble of
:mod:`certify.attacks` searches the ball of radius ``r (1 - 1e-4)`` for a point where the label
stops being the strict arg-max. Any success is a **violation**: a proof (a concrete witness) that
the certificate is wrong. The 1e-4 shrink keeps float32 rounding at the sphere's surface from
being mistaken for a violation.

Every success found in float32 is re-checked in float64 (the certified function in float64
arithmetic, as :class:`certify.certificates.Certifier` re-checks radii: a copy of the model, the
same float32 weights and evaluation plans, applied to float64 inputs): it is a violation only when
the label also loses in float64. Successes that vanish in float64 are float32 rounding at points whose margin is within
rounding of 0; they are counted separately (``float32_only``) and shown, but do not fail the audit.

Tightness (optional, ``tightness=True``; about ``search_steps + 2`` times the audit's cost): a
minimum-norm search (:func:`certify.attacks.min_norm_search`) gives each certified sample an
empirical radius, the length of a concrete adversarial example; empirical / certified >= 1 for
every sound certificate, and its distribution says how much robustness the certificate leaves
unproven. A witness shorter than the audit radius is a violation, confirmed like the others.

Lipschitz constant: every pair (x, x') an attack visits gives ||f(x') - f(x)||_2 / ||x' - x||_2,
which can never exceed the l2 Lipschitz constant of x -> logits (that is its definition, a supremum
over all pairs), so the largest ratio found is a *lower* bound to set beside the model's rigorous
upper bound. Pairs closer than :data:`certify.attacks.LIPSCHITZ_MIN_DISTANCE` are skipped, where
float32 rounding of the logits would be divided by a tiny distance. (The margin f_y - f_j changes
by at most sqrt(2) times as much, so a margin-drop ratio divided by sqrt(2) is also a lower bound,
but never larger than this one, by Cauchy-Schwarz.)

Cost: one attack ensemble per certified sample (attacks x steps x restarts forward and backward
passes, fewer for a sample broken early), the certified samples attacked together, in the fewest
batches of at most ``batch_size``, each with its own eps. The audit attacks the model as it is given, which must be
the function that was certified; the SOC layers' fast evaluation path
(:func:`certify.layers.soc.set_eval_mode`, certified with its own bound) makes every step cheaper.
Everything runs with IEEE float32 arithmetic (:func:`certify.numerics.ieee_float32`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attacks import (AttackResult, attack_ensemble, attack_mode, margins, min_norm_search,
                      parse_attacks)
from .errors import ConfigError
from .numerics import ieee_float32_call

#: The audit attacks at radius * (1 - AUDIT_SHRINK).
AUDIT_SHRINK = 1e-4

QUANTILES = (("min", 0.0), ("q05", 0.05), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q95", 0.95),
             ("max", 1.0))


@dataclass
class AuditBatch:
    """Per-sample audit outcome (all tensors on the CPU, shape (N,)).

    ``certified``: correct and r > 0, the samples audited. ``audit_eps``: r (1 - 1e-4) (nan where
    not audited). ``violation``: confirmed in float64. ``float32_only``: broken in float32 only.
    ``adv_pred``/``adv_norm``: the attack's point. ``empirical_radius``: min-norm witness length
    (nan when tightness was not measured, inf when nothing was found). ``lipschitz_lower``: the
    largest logit-change ratio any attack saw, per sample. ``x_adv``: the audit's points (None
    where not kept: :func:`attack_dataset` keeps only the violations' points).
    """

    certified: torch.Tensor
    radius: torch.Tensor
    audit_eps: torch.Tensor
    violation: torch.Tensor
    float32_only: torch.Tensor
    adv_pred: torch.Tensor
    adv_norm: torch.Tensor
    empirical_radius: torch.Tensor
    lipschitz_lower: torch.Tensor
    x_adv: torch.Tensor | None = None

    @classmethod
    def unaudited(cls, radius: torch.Tensor, x_adv: torch.Tensor | None = None) -> "AuditBatch":
        """One entry per radius, none of them audited yet."""
        n = radius.shape[0]
        nan = torch.full((n,), math.nan, dtype=torch.float64)
        return cls(certified=torch.zeros(n, dtype=torch.bool), radius=radius, audit_eps=nan.clone(),
                   violation=torch.zeros(n, dtype=torch.bool), float32_only=torch.zeros(n, dtype=torch.bool),
                   adv_pred=torch.full((n,), -1, dtype=torch.long), adv_norm=nan.clone(),
                   empirical_radius=nan.clone(), lipschitz_lower=torch.zeros(n, dtype=torch.float64), x_adv=x_adv)

    @property
    def tightness(self) -> torch.Tensor:
        """empirical radius / certified radius (nan where not audited or not measured)."""
        t = self.empirical_radius / self.radius
        return torch.where(self.certified, t, torch.full_like(t, math.nan))


def _even_chunks(idx: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``idx`` in the fewest chunks of at most ``batch_size``, of nearly equal sizes (81 at 64:
    41 + 40, not 64 + 17, whose small batch costs more per sample)."""
    return torch.tensor_split(idx, -(-idx.numel() // batch_size)) if idx.numel() else ()


class _Float64Model:
    """The model's function in float64 arithmetic, for confirming successes (built on first use,
    then reused): a copy of the model, so that its float64 evaluation plans never evict the
    float32 ones that the attacks use, evaluated on float64 inputs (lipcert's layers then apply the
    certified float32 weights and plans in float64). A model that refuses float64 inputs (plain
    torch layers) is converted to float64, which is exact for its weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._copy: nn.Module | None = None

    @torch.no_grad()
    def margins(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x64 = x.detach().to(torch.float64)
        if self._copy is None:
            m = copy.deepcopy(self.model).eval()
            try:
                m(x64[:1])
            except RuntimeError:
                m = m.to(torch.float64)
            self._copy = m
        return margins(self._copy(x64), y).cpu()


@ieee_float32_call
def audit_certificates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radius: torch.Tensor,
    *,
    attacks: str | Sequence[str] = "all",
    steps: int = 50,
    restarts: int = 1,
    tightness: bool = False,
    search_steps: int = 8,
    batch_size: int = 256,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    shrink: float = AUDIT_SHRINK,
    _float64: _Float64Model | None = None,
) -> AuditBatch:
    """Attack every certified sample inside its own certified radius (see the module docstring).

    Args:
        model: the torch model whose certificates ``radius`` claims to be.
        x, y: images in [0, 1] and labels.
        radius: certified radius per sample (from :class:`certify.certificates.Certifier`, or any
            claimed radii: the audit trusts nothing and is the test of them).
        attacks, steps, restarts: the attack ensemble (:func:`certify.attacks.attack_ensemble`).
        tightness: also run the minimum-norm search on the certified samples (off by default: it
            costs about ``search_steps + 2`` audits).
        batch_size: certified samples attacked together (memory grows with it).
    """
    names = parse_attacks(attacks)
    if not 0 <= shrink < 1:
        raise ConfigError(f"shrink must be in [0, 1), got {shrink}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    radius = torch.as_tensor(radius, dtype=torch.float64).detach().cpu().reshape(-1)
    if radius.shape != (n,):
        raise ConfigError(f"need one radius per sample ({n}), got shape {tuple(radius.shape)}")
    if torch.isnan(radius).any():
        raise ConfigError("certified radii contain NaN")
    gen = generator or torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    f64 = _float64 or _Float64Model(model)
    with attack_mode(model), torch.no_grad():
        parts = [margins(model(xc), yc).cpu() for xc, yc in zip(x.split(batch_size), y.split(batch_size))]
    clean = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    certified = (clean > 0) & (radius > 0)
    out = AuditBatch.unaudited(radius, x_adv=x.clone())
    out.certified = certified
    for sel in _even_chunks(certified.nonzero().squeeze(1), batch_size):
        _audit_selected(model, x, y, sel, out, f64, names, steps=steps, restarts=restarts, tightness=tightness,
                        search_steps=search_steps, generator=gen, shrink=shrink)
    return out


def _confirm(out: AuditBatch, sel: torch.Tensor, hit: torch.Tensor, x_pts: torch.Tensor, y_sel: torch.Tensor,
             f64: _Float64Model) -> torch.Tensor:
    """Re-check the float32 successes ``hit`` (positions in ``sel``) in float64; record violations
    and float32-only flips; return the confirmed mask over ``hit``."""
    hd = hit.to(x_pts.device)
    confirmed = f64.margins(x_pts[hd], y_sel[hd]) <= 0
    out.violation[sel[hit[confirmed]]] = True
    out.float32_only[sel[hit[confirmed]]] = False  # a violation, not rounding
    out.float32_only[sel[hit[~confirmed]]] = True
    return confirmed


def _audit_selected(model, x, y, sel, out: AuditBatch, f64, names, *, steps, restarts, tightness, search_steps,
                    generator, shrink) -> None:
    """Audit the certified samples ``sel`` (CPU indices into x) together, writing into ``out``."""
    sd = sel.to(x.device)
    xs, ys, r = x[sd], y[sd], out.radius[sel]
    # An infinite radius (a constant model) is audited at the farthest point of the box.
    cap = torch.maximum(xs, 1 - xs).flatten(1).to(torch.float64).norm(dim=1).cpu()
    eps = torch.minimum(r * (1 - shrink), cap)
    res: AttackResult = attack_ensemble(model, xs, ys, eps, names, steps=steps, restarts=restarts,
                                        generator=generator)
    out.audit_eps[sel], out.adv_norm[sel], out.adv_pred[sel] = eps, res.norm, res.adv_pred
    out.lipschitz_lower[sel] = res.lipschitz_lower
    out.x_adv[sd] = res.x_adv
    hit = res.success.nonzero().squeeze(1)
    if hit.numel():
        _confirm(out, sel, hit, res.x_adv, ys, f64)
    if not tightness:
        return
    init = torch.minimum(torch.where(torch.isfinite(r), 2 * r, cap), cap)
    # the audit's attack failed at eps: the bisection starts there instead of re-attacking inside it
    lower = torch.where(res.success, torch.zeros_like(eps), eps)
    mn = min_norm_search(model, xs, ys, attacks=names, init_eps=init, lower=lower, search_steps=search_steps,
                         steps=steps, restarts=restarts, generator=generator)
    out.empirical_radius[sel] = mn.radius
    out.lipschitz_lower[sel] = torch.maximum(out.lipschitz_lower[sel], mn.lipschitz_lower)
    # A min-norm witness shorter than the audit radius is a violation found by the stronger
    # search: confirm it in float64 like the others.
    inside = ((mn.radius <= eps) & ~out.violation[sel]).nonzero().squeeze(1)
    if inside.numel():
        confirmed = _confirm(out, sel, inside, mn.x_adv, ys, f64)
        for j in inside[confirmed].tolist():
            out.x_adv[sd[j]] = mn.x_adv[j]
            out.adv_pred[sel[j]] = mn.adv_pred[j]
            out.adv_norm[sel[j]] = mn.radius[j]


def quantiles(values: torch.Tensor) -> dict[str, float]:
    """min, q05, q25, median, q75, q95, max and mean of the finite values (empty dict if none)."""
    v = values[torch.isfinite(values)].to(torch.float64)
    if v.numel() == 0:
        return {}
    out = {name: float(torch.quantile(v, q)) for name, q in QUANTILES}
    out["mean"] = float(v.mean())
    return out


def summarize_audit(batches: Sequence[AuditBatch], lipschitz_upper: float | None = None) -> dict:
    """One summary over batches: counts, violations, tightness quantiles, Lipschitz bounds."""
    cat = {k: torch.cat([getattr(b, k) for b in batches]) if batches else torch.empty(0)
           for k in ("certified", "violation", "float32_only", "empirical_radius", "lipschitz_lower")}
    tight = torch.cat([b.tightness for b in batches]) if batches else torch.empty(0, dtype=torch.float64)
    certified = cat["certified"].bool()
    emp = cat["empirical_radius"][certified] if certified.any() else torch.empty(0, dtype=torch.float64)
    lower = float(cat["lipschitz_lower"].max()) if cat["lipschitz_lower"].numel() else 0.0
    summary = {
        "samples": int(certified.numel()),
        "certified_audited": int(certified.sum()),
        "violations": int(cat["violation"].sum()),
        "violation_indices": cat["violation"].nonzero().squeeze(1).tolist(),
        "float32_only_flips": int(cat["float32_only"].sum()),
        "tightness_measured": int(torch.isfinite(emp).sum()) if emp.numel() else 0,
        # None: no tightness search ran (it is optional)
        "tightness_not_broken": int(torch.isinf(emp).sum()) if (~torch.isnan(emp)).any() else None,
        "tightness": quantiles(tight[certified]) if certified.any() else {},
        "lipschitz_upper": lipschitz_upper,
        "lipschitz_lower_attack": lower,
        "lipschitz_gap": (lipschitz_upper / lower) if (lipschitz_upper and lower > 0) else None,
    }
    summary["passed"] = summary["violations"] == 0
    return summary


# ---- a whole dataset ------------------------------------------------------------------------------


@dataclass
class AttackReport:
    """What :func:`attack_dataset` found: ``samples`` (one dict per image and eps), ``radii``
    (one dict per image when the audit or the min-norm search ran), ``summary`` (a JSON-ready
    dict) and ``adversarials`` (``(name, image tensor)`` pairs for saving as pictures)."""

    samples: list[dict]
    radii: list[dict]
    summary: dict
    adversarials: list[tuple[str, torch.Tensor]]


def _load(dataset, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] on ``device`` and CPU labels of the dataset's items ``idx``."""
    from .data import to_float

    if hasattr(dataset, "batch"):
        imgs, labels = dataset.batch(idx)
        x = to_float(imgs)
    else:
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a, _ in items])
        labels = torch.tensor([int(b) for _, b in items])
    return x.to(device), labels


@ieee_float32_call
def attack_dataset(
    model: nn.Module,
    dataset,
    eps: Sequence[tuple[str, float]],
    *,
    attacks: str | Sequence[str] = "all",
    steps: int = 50,
    restarts: int = 1,
    audit: bool = False,
    tightness: bool = False,
    min_norm: bool = False,
    search_steps: int = 8,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    seed: int = 0,
    certifier=None,
    keep_adversarials: bool = False,
    progress=None,
) -> AttackReport:
    """Attack every image of ``dataset`` at each ``(label, eps)``; certify it beside; optionally
    audit the certificates (with ``tightness``, also their empirical / certified radius) and
    search each sample's minimal adversarial distance (``min_norm``).

    Summary per eps: clean accuracy, certified accuracy (correct and radius > eps), empirical
    robust accuracy (no attack broke it within eps), and ``certified_but_broken``: samples
    certified at eps that an attack broke within eps, confirmed in float64 (a certificate
    violation; always 0 for a sound certificate, so empirical >= certified accuracy).

    Order of work: every image is certified first (the eps are the certifier's thresholds), then
    attacked at each eps batch by batch, then the certified images are audited together, in the
    fewest batches of at most ``batch_size`` (not the certified part of each batch). ``progress(done, total)``
    counts images attacked, audited and searched.
    """
    from .certificates import Certifier, certify_batches

    names = parse_attacks(attacks)
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty; nothing to attack")
    if not eps:
        raise ConfigError("give at least one eps")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cert = certifier or Certifier(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    f64 = _Float64Model(model)
    n = len(dataset)
    batches = list(torch.arange(n).split(batch_size))
    samples: list[dict] = []
    radii: list[dict] = []
    adversarials: list[tuple[str, torch.Tensor]] = []
    per_eps = {lab: {"correct": 0, "certified": 0, "robust": 0, "certified_but_broken": 0} for lab, _ in eps}
    lip_lower = 0.0

    # 1. certificates of every image (before any attack: the certifier's float64 re-checks then do
    #    not alternate with the attacks' float32 passes)
    def finite_batches():
        for idx in batches:
            x, lab = _load(dataset, idx, device)
            if not torch.isfinite(x).all():
                raise ConfigError(f"images {int(idx[0])}..{int(idx[-1])} contain NaN or infinite pixels")
            yield x, lab

    res = certify_batches(cert, finite_batches(), thresholds=[e for _, e in eps])
    labels, pred, radius, correct = res.labels, res.predictions, res.radii, res.correct
    to_audit = (correct & (radius > 0)).nonzero().squeeze(1) if audit else torch.zeros(0, dtype=torch.long)
    total = n + to_audit.numel() + (n - to_audit.numel() if min_norm else 0)
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    # 2. attacks at each eps
    for idx in batches:
        x, _ = _load(dataset, idx, device)
        y = labels[idx].to(device)
        for lab, e in eps:
            res = attack_ensemble(model, x, y, e, names, steps=steps, restarts=restarts, generator=gen)
            lip_lower = max(lip_lower, float(res.lipschitz_lower.max()))
            certified = correct[idx] & (radius[idx] > e)
            broken_cert = certified & res.success
            if broken_cert.any():
                bd = broken_cert.nonzero().squeeze(1)
                broken_cert[bd] = f64.margins(res.x_adv[bd.to(x.device)], y[bd.to(y.device)]) <= 0
            s = per_eps[lab]
            s["correct"] += int(correct[idx].sum())
            s["certified"] += int(certified.sum())
            s["robust"] += int((~res.success).sum())
            s["certified_but_broken"] += int(broken_cert.sum())
            for j, i in enumerate(idx.tolist()):
                samples.append({
                    "index": i, "label": int(labels[i]), "clean_prediction": int(pred[i]),
                    "certified_radius": float(radius[i]), "eps": lab, "certified": bool(certified[j]),
                    "adversarial_prediction": int(res.adv_pred[j]), "perturbation_norm": float(res.norm[j]),
                    "success": bool(res.success[j]), "attack": res.attack[j],
                    "certificate_violation": bool(broken_cert[j]),
                })
                if keep_adversarials and res.success[j] and res.attack[j] != "clean":
                    adversarials.append((f"eps{lab}_{i:06d}_label{int(labels[i])}_adv{int(res.adv_pred[j])}",
                                         res.x_adv[j].detach().cpu()))
        advance(len(idx))

    # 3. the audit: the certified images together, in the fewest batches of at most batch_size
    ab = None
    if audit:
        ab = AuditBatch.unaudited(radius.to(torch.float64))
        for idx in _even_chunks(to_audit, batch_size):
            x, _ = _load(dataset, idx, device)
            part = audit_certificates(model, x, labels[idx].to(device), radius[idx], attacks=names, steps=steps,
                                      restarts=restarts, tightness=tightness or min_norm, search_steps=search_steps,
                                      batch_size=batch_size, generator=gen, _float64=f64)
            for k in ("certified", "audit_eps", "violation", "float32_only", "adv_pred", "adv_norm",
                      "empirical_radius", "lipschitz_lower"):
                getattr(ab, k)[idx] = getattr(part, k)
            lip_lower = max(lip_lower, float(part.lipschitz_lower.max()))
            if keep_adversarials:
                for j in part.violation.nonzero().squeeze(1).tolist():
                    i = int(idx[j])
                    adversarials.append((f"violation_{i:06d}_label{int(labels[i])}_adv{int(part.adv_pred[j])}",
                                         part.x_adv[j].detach().cpu()))
            advance(len(idx))

    # 4. the min-norm search on the images the audit did not measure
    emp = ab.empirical_radius.clone() if ab is not None else torch.full((n,), math.nan, dtype=torch.float64)
    if min_norm:
        for idx in _even_chunks(torch.isnan(emp).nonzero().squeeze(1), batch_size):
            x, _ = _load(dataset, idx, device)
            mn = min_norm_search(model, x, labels[idx].to(device), attacks=names, search_steps=search_steps,
                                 steps=steps, restarts=restarts, generator=gen)
            emp[idx] = mn.radius
            lip_lower = max(lip_lower, float(mn.lipschitz_lower.max()))
            advance(len(idx))
    if audit or min_norm:
        for i in range(n):
            row = {"index": i, "label": int(labels[i]), "clean_prediction": int(pred[i]),
                   "certified_radius": float(radius[i]), "empirical_radius": float(emp[i]),
                   "tightness": float(emp[i] / radius[i]) if radius[i] > 0 and correct[i] else math.nan}
            if ab is not None:
                row.update({"audited": bool(ab.certified[i]), "audit_eps": float(ab.audit_eps[i]),
                            "violation": bool(ab.violation[i]), "float32_only": bool(ab.float32_only[i]),
                            "audit_adversarial_prediction": int(ab.adv_pred[i]),
                            "audit_perturbation_norm": float(ab.adv_norm[i])})
            radii.append(row)

    lipschitz_upper = getattr(cert, "lipschitz", None)
    if lipschitz_upper is None:  # pairwise certificate: the whole model still has a bound (LLN)
        from .lipschitz import upper_bound

        try:
            lipschitz_upper = upper_bound(model)
        except Exception:  # an MLP head has none (curvature certificate)
            lipschitz_upper = None
    summary: dict = {
        "samples": n,
        "attacks": list(names), "steps": steps, "restarts": restarts, "seed": int(seed),
        "certificate": getattr(cert, "method", None),
        "lipschitz_upper": lipschitz_upper,
        "lipschitz_lower_attack": lip_lower,
        "eps": [],
    }
    for lab, e in eps:
        s = per_eps[lab]
        summary["eps"].append({
            "eps": lab, "eps_value": e, "clean_accuracy": s["correct"] / n,
            "certified_accuracy": s["certified"] / n, "empirical_robust_accuracy": s["robust"] / n,
            "certified_but_broken": s["certified_but_broken"],
        })
    if ab is not None:
        summary["audit"] = summarize_audit([ab], lipschitz_upper)
        summary["audit"]["lipschitz_lower_attack"] = lip_lower
        if lipschitz_upper and lip_lower > 0:
            summary["audit"]["lipschitz_gap"] = lipschitz_upper / lip_lower
    if audit or min_norm:
        summary["empirical_radius"] = quantiles(emp)
    return AttackReport(samples=samples, radii=radii, summary=summary, adversarials=adversarials)
