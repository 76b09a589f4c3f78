"""Audit of certified radii by attack: certificates must never be wrong.

For each *certified* sample (correctly classified, certified radius r > 0), the attack ensemble of
:mod:`certify.attacks` searches the ball of radius ``r (1 - 1e-4)`` for a point where the label
stops being the strict arg-max. Any success is a **violation**: a proof (a concrete witness) that
the certificate is wrong. The 1e-4 shrink keeps float32 rounding at the sphere's surface from
being mistaken for a violation.

Every success found in float32 is re-checked in float64 (a float64 copy of the model evaluated at
the same clean and adversarial points): it is a violation only when the label also loses in
float64. Successes that vanish in float64 are float32 rounding at points whose margin is within
rounding of 0; they are counted separately (``float32_only``) and shown, but do not fail the audit.

Tightness: a minimum-norm search (:func:`certify.attacks.min_norm_search`) gives each certified
sample an empirical radius, the length of a concrete adversarial example; empirical / certified
>= 1 for every sound certificate, and its distribution says how much robustness the certificate
leaves unproven.

Lipschitz constant: every pair (x, x') an attack visits gives ||f(x') - f(x)||_2 / ||x' - x||_2,
which can never exceed the l2 Lipschitz constant of x -> logits (that is its definition, a supremum
over all pairs), so the largest ratio found is a *lower* bound to set beside the model's rigorous
upper bound. Pairs closer than :data:`certify.attacks.LIPSCHITZ_MIN_DISTANCE` are skipped, where
float32 rounding of the logits would be divided by a tiny distance. (The margin f_y - f_j changes
by at most sqrt(2) times as much, so a margin-drop ratio divided by sqrt(2) is also a lower bound,
but never larger than this one, by Cauchy-Schwarz.)
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
    largest logit-change ratio any attack saw, per sample. ``x_adv``: the audit's points.
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
    x_adv: torch.Tensor

    @property
    def tightness(self) -> torch.Tensor:
        """empirical radius / certified radius (nan where not audited or not measured)."""
        t = self.empirical_radius / self.radius
        return torch.where(self.certified, t, torch.full_like(t, math.nan))


def _float64_margins(model: nn.Module, *points: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model64 = copy.deepcopy(model).to(torch.float64)
    with attack_mode(model64), torch.no_grad():
        return [margins(model64(p.to(torch.float64)), y).cpu() for p in points]


def audit_certificates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radius: torch.Tensor,
    *,
    attacks: str | Sequence[str] = "all",
    steps: int = 50,
    restarts: int = 1,
    tightness: bool = True,
    search_steps: int = 8,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    shrink: float = AUDIT_SHRINK,
) -> AuditBatch:
    """Attack every certified sample inside its own certified radius (see the module docstring).

    Args:
        model: the torch model whose certificates ``radius`` claims to be.
        x, y: images in [0, 1] and labels.
        radius: certified radius per sample (from :class:`certify.certificates.Certifier`, or any
            claimed radii: the audit trusts nothing and is the test of them).
        attacks, steps, restarts: the attack ensemble (:func:`certify.attacks.attack_ensemble`).
        tightness: also run the minimum-norm search on the certified samples.
    """
    parse_attacks(attacks)
    if not 0 <= shrink < 1:
        raise ConfigError(f"shrink must be in [0, 1), got {shrink}")
    n = x.shape[0]
    radius = torch.as_tensor(radius, dtype=torch.float64).detach().cpu().reshape(-1)
    if radius.shape != (n,):
        raise ConfigError(f"need one radius per sample ({n}), got shape {tuple(radius.shape)}")
    if torch.isnan(radius).any():
        raise ConfigError("certified radii contain NaN")
    gen = generator or torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    with attack_mode(model), torch.no_grad():
        clean = margins(model(x), y).cpu()
    certified = (clean > 0) & (radius > 0)
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    audit_eps, adv_norm, emp = nan.clone(), nan.clone(), nan.clone()
    violation = torch.zeros(n, dtype=torch.bool)
    f32 = torch.zeros(n, dtype=torch.bool)
    adv_pred = torch.full((n,), -1, dtype=torch.long)
    lip = torch.zeros(n, dtype=torch.float64)
    x_adv = x.clone()
    sel = certified.nonzero().squeeze(1)
    if sel.numel():
        sd = sel.to(x.device)
        # An infinite radius (a constant model) is audited at the farthest point of the box.
        cap = (torch.maximum(x[sd], 1 - x[sd])).flatten(1).to(torch.float64).norm(dim=1).cpu()
        eps = torch.minimum(radius[sel] * (1 - shrink), cap)
        res: AttackResult = attack_ensemble(model, x[sd], y[sd], eps, attacks, steps=steps, restarts=restarts,
                                            generator=gen)
        audit_eps[sel], adv_norm[sel] = eps, res.norm
        adv_pred[sel] = res.adv_pred
        lip[sel] = res.lipschitz_lower
        x_adv[sd] = res.x_adv
        hit = res.success.nonzero().squeeze(1)
        if hit.numel():
            hd = hit.to(x.device)
            (m_adv,) = _float64_margins(model, res.x_adv[hd], y=y[sd][hd])
            confirmed = m_adv <= 0
            violation[sel[hit[confirmed]]] = True
            f32[sel[hit[~confirmed]]] = True
        if tightness:
            init = torch.where(torch.isfinite(radius[sel]), 2 * radius[sel], cap)
            mn = min_norm_search(model, x[sd], y[sd], attacks=attacks, init_eps=torch.minimum(init, cap),
                                 search_steps=search_steps, steps=steps, restarts=restarts, generator=gen)
            emp[sel] = mn.radius
            # A min-norm witness shorter than the audit radius is a violation found by the
            # stronger search: confirm it in float64 like the others.
            inside = (mn.radius <= eps) & ~violation[sel]
            if inside.any():
                idd = inside.nonzero().squeeze(1)
                hd = idd.to(x.device)
                (m_adv,) = _float64_margins(model, mn.x_adv[hd], y=y[sd][hd])
                confirmed = m_adv <= 0
                violation[sel[idd[confirmed]]] = True
                f32[sel[idd[~confirmed]]] = True
                for j in idd[confirmed].tolist():
                    x_adv[sd[j]] = mn.x_adv[j]
                    adv_pred[sel[j]] = mn.adv_pred[j]
                    adv_norm[sel[j]] = mn.radius[j]
            lip[sel] = torch.maximum(lip[sel], mn.lipschitz_lower)
    return AuditBatch(certified=certified, radius=radius, audit_eps=audit_eps, violation=violation,
                      float32_only=f32, adv_pred=adv_pred, adv_norm=adv_norm, empirical_radius=emp,
                      lipschitz_lower=lip, x_adv=x_adv)


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
        "tightness_not_broken": int(torch.isinf(emp).sum()) if emp.numel() else 0,
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


def _confirm_float64(model, x, x_adv, y) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    (m,) = _float64_margins(model, x_adv, y=y)
    return m <= 0


def attack_dataset(
    model: nn.Module,
    dataset,
    eps: Sequence[tuple[str, float]],
    *,
    attacks: str | Sequence[str] = "all",
    steps: int = 50,
    restarts: int = 1,
    audit: bool = False,
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
    audit the certificates and search each sample's minimal adversarial distance.

    Summary per eps: clean accuracy, certified accuracy (correct and radius > eps), empirical
    robust accuracy (no attack broke it within eps), and ``certified_but_broken``: samples
    certified at eps that an attack broke within eps, confirmed in float64 (a certificate
    violation; always 0 for a sound certificate, so empirical >= certified accuracy).
    """
    from .certificates import Certifier
    from .data import to_float

    names = parse_attacks(attacks)
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty; nothing to attack")
    if not eps:
        raise ConfigError("give at least one eps")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cert = certifier or Certifier(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = len(dataset)
    samples: list[dict] = []
    radii: list[dict] = []
    adversarials: list[tuple[str, torch.Tensor]] = []
    audits: list[AuditBatch] = []
    per_eps = {lab: {"correct": 0, "certified": 0, "robust": 0, "certified_but_broken": 0} for lab, _ in eps}
    lip_lower = 0.0
    emp_all: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        if hasattr(dataset, "batch"):
            imgs, labels = dataset.batch(idx)
            x = to_float(imgs)
        else:
            items = [dataset[int(i)] for i in idx]
            x = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a, _ in items])
            labels = torch.tensor([int(b) for _, b in items])
        x, y = x.to(device), labels.to(device)
        if not torch.isfinite(x).all():
            raise ConfigError(f"images {start}..{start + len(idx) - 1} contain NaN or infinite pixels")
        _, pred, _, radius = cert(x)
        pred, radius = pred.cpu(), radius.cpu()
        correct = pred == y.cpu()
        for lab, e in eps:
            res = attack_ensemble(model, x, y, e, names, steps=steps, restarts=restarts, generator=gen)
            lip_lower = max(lip_lower, float(res.lipschitz_lower.max()))
            certified = correct & (radius > e)
            broken_cert = certified & res.success
            if broken_cert.any():
                bd = broken_cert.nonzero().squeeze(1).to(x.device)
                broken_cert[broken_cert.clone()] = _confirm_float64(model, x[bd], res.x_adv[bd], y[bd])
            s = per_eps[lab]
            s["correct"] += int(correct.sum())
            s["certified"] += int(certified.sum())
            s["robust"] += int((~res.success).sum())
            s["certified_but_broken"] += int(broken_cert.sum())
            for j, i in enumerate(idx.tolist()):
                samples.append({
                    "index": i, "label": int(labels[j]), "clean_prediction": int(pred[j]),
                    "certified_radius": float(radius[j]), "eps": lab, "certified": bool(certified[j]),
                    "adversarial_prediction": int(res.adv_pred[j]), "perturbation_norm": float(res.norm[j]),
                    "success": bool(res.success[j]), "attack": res.attack[j],
                    "certificate_violation": bool(broken_cert[j]),
                })
                if keep_adversarials and res.success[j] and res.attack[j] != "clean":
                    adversarials.append((f"eps{lab}_{i:06d}_label{int(labels[j])}_adv{int(res.adv_pred[j])}",
                                         res.x_adv[j].detach().cpu()))
        if audit or min_norm:
            emp = torch.full((len(idx),), math.nan, dtype=torch.float64)
            ab = None
            if audit:
                ab = audit_certificates(model, x, y, radius, attacks=names, steps=steps, restarts=restarts,
                                        tightness=True, search_steps=search_steps, generator=gen)
                audits.append(ab)
                emp = ab.empirical_radius.clone()
                lip_lower = max(lip_lower, float(ab.lipschitz_lower.max()))
            if min_norm:
                rest = torch.isnan(emp).nonzero().squeeze(1)  # the audit measured the certified ones
                if rest.numel():
                    rd = rest.to(x.device)
                    mn = min_norm_search(model, x[rd], y[rd], attacks=names, search_steps=search_steps,
                                         steps=steps, restarts=restarts, generator=gen)
                    emp[rest] = mn.radius
                    lip_lower = max(lip_lower, float(mn.lipschitz_lower.max()))
            emp_all.append(emp)
            for j, i in enumerate(idx.tolist()):
                row = {"index": i, "label": int(labels[j]), "clean_prediction": int(pred[j]),
                       "certified_radius": float(radius[j]), "empirical_radius": float(emp[j]),
                       "tightness": float(emp[j] / radius[j]) if radius[j] > 0 and correct[j] else math.nan}
                if ab is not None:
                    row.update({"audited": bool(ab.certified[j]), "audit_eps": float(ab.audit_eps[j]),
                                "violation": bool(ab.violation[j]), "float32_only": bool(ab.float32_only[j]),
                                "audit_adversarial_prediction": int(ab.adv_pred[j]),
                                "audit_perturbation_norm": float(ab.adv_norm[j])})
                    if keep_adversarials and ab.violation[j]:
                        adversarials.append((f"violation_{i:06d}_label{int(labels[j])}_adv{int(ab.adv_pred[j])}",
                                             ab.x_adv[j].detach().cpu()))
                radii.append(row)
        if progress is not None:
            progress(min(n, start + batch_size), n)

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
    if audit:
        summary["audit"] = summarize_audit(audits, lipschitz_upper)
        summary["audit"]["lipschitz_lower_attack"] = lip_lower
        if lipschitz_upper and lip_lower > 0:
            summary["audit"]["lipschitz_gap"] = lipschitz_upper / lip_lower
    if emp_all:
        emp = torch.cat(emp_all)
        summary["empirical_radius"] = quantiles(emp)
    return AttackReport(samples=samples, radii=radii, summary=summary, adversarials=adversarials)
