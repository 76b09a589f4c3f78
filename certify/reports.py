"""Certification reports and the CI gate.

Turns a :class:`certify.certificates.CertificationResult` into what people and pipelines read:
a rich table, JSON, CSV or Markdown on stdout, and an output folder with ``samples.csv`` (one row
per image), ``summary.json`` and ``radius_curve.png`` (certified accuracy against eps, the curve
of paper.md section 1; matplotlib is an optional extra). The gate (``--fail-under PCT@EPS``)
compares a certified accuracy with a threshold, exactly (in rationals, so 3 of 5 meets 60%).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .certificates import CertificationResult, certified_mask, eps_label, parse_eps
from .checkpoint import atomic_write_bytes
from .errors import ConfigError

FORMATS = ("table", "json", "csv", "markdown")
SAMPLES_FILE, SUMMARY_FILE, CURVE_FILE = "samples.csv", "summary.json", "radius_curve.png"


# ---- gate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """``PCT@EPS``: certified accuracy at ``eps`` must be at least ``percent`` (in %)."""

    percent: Fraction
    eps: str
    eps_value: float

    def __str__(self) -> str:
        return f"{_pct_text(self.percent)}@{self.eps}"


def _pct_text(p: Fraction) -> str:
    return str(int(p)) if p.denominator == 1 else f"{float(p):g}"


def parse_gate(text: str) -> Gate:
    """Parse ``60@36/255`` (a percentage in [0, 100], ``@``, an eps as for ``--eps``)."""
    s = "".join(str(text).split())
    pct_text, sep, eps_text = s.partition("@")
    if not sep or not pct_text or not eps_text:
        raise ConfigError(f"malformed gate {text!r}: use PCT@EPS, e.g. 60@36/255")
    try:
        pct = Fraction(pct_text.rstrip("%"))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"malformed gate {text!r}: {pct_text!r} is not a percentage") from None
    if not 0 <= pct <= 100:
        raise ConfigError(f"gate {text!r}: the percentage must lie in [0, 100]")
    return Gate(pct, eps_label(eps_text), parse_eps(eps_text))


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    certified: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.certified / self.total

    @property
    def passed(self) -> bool:
        # Exact: 100 * certified / total >= pct  <=>  100 * certified >= pct * total.
        return 100 * self.certified >= self.gate.percent * self.total

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"gate {self.gate} {verdict}: certified accuracy at eps {self.gate.eps} is "
                f"{self.percent:.2f}% ({self.certified}/{self.total}), required >= "
                f"{_pct_text(self.gate.percent)}%")


def evaluate_gates(result: CertificationResult, gates) -> list[GateResult]:
    """Each gate's outcome, recomputed from the per-sample radii (radius > eps, strict)."""
    import torch

    from .certificates import _tensor

    radius = _tensor(result.samples["radius"].to_numpy(), torch.float64)
    correct = _tensor(result.samples["correct"].to_numpy(), torch.bool)
    return [GateResult(g, int(certified_mask(radius, correct, g.eps_value).sum()), len(radius)) for g in gates]


# ---- rendering ------------------------------------------------------------------------------------


def _fmt(x, spec: str = ".6g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def bound_text(summary: dict) -> str:
    """``L <= 3.99 (computed from the weights)``, naming which map the bound covers."""
    c = summary["certificate"]
    parts = []
    if c.get("lipschitz_upper_bound") is not None:
        parts.append(f"L <= {_fmt(c['lipschitz_upper_bound'])}")
    if c.get("feature_lipschitz_upper_bound") is not None and c["method"] != "global":
        parts.append(f"features L <= {_fmt(c['feature_lipschitz_upper_bound'])}")
    return (", ".join(parts) or "-") + f" ({c['bound_source']})"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """Key/value lines shown above the per-eps table (table and Markdown formats)."""
    d, c, r = summary["dataset"], summary["certificate"], summary["radius_correct"]
    rows = [("model", str(summary.get("model_file") or summary.get("model")))]
    ds = " / ".join(str(v) for v in (d.get("name"), d.get("split")) if v)
    rows.append(("data", f"{ds + ', ' if ds else ''}{d['samples']} images"
                         + (f" (of {d['available']})" if d.get("available", d["samples"]) != d["samples"] else "")))
    rows.append(("certificate", c["method"]))
    rows.append(("Lipschitz upper bound", bound_text(summary)))
    if c.get("lipschitz_lower_bound") is not None:
        rows.append(("empirical lower bound",
                     f"{_fmt(c['lipschitz_lower_bound'])} (Jacobian power iteration, {c['lower_bound_samples']} images)"))
    counts = summary["counts"]
    rows.append(("clean accuracy", f"{100 * summary['clean_accuracy']:.2f}% ({counts['correct']}/{counts['total']})"))
    rows.append(("radius of correct samples", f"mean {_fmt(r['mean'], '.4f')}, median {_fmt(r['median'], '.4f')}"))
    if summary.get("images_per_second"):
        rows.append(("speed", f"{summary['images_per_second']:.1f} images/s on {summary['device']} "
                              f"(bound {summary['bound_seconds']:.2f} s, once)"))
    return rows


def eps_table_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    n = summary["counts"]["total"]
    return [(row["eps"], f"{row['value']:.4f}", f"{100 * row['certified_accuracy']:.2f}%", f"{row['certified']}/{n}")
            for row in summary["eps"]]


def rich_tables(summary: dict, gates: list[GateResult] = ()):
    """The default stdout report: a key/value table and a certified-accuracy table."""
    from rich.table import Table

    info = Table(title="lipcert certify", show_header=False, title_justify="left")
    info.add_column(style="bold")
    info.add_column()
    for k, v in summary_rows(summary):
        info.add_row(k, v)
    acc = Table(title="certified accuracy (correct and radius > eps)", title_justify="left")
    for col, justify in (("eps", "left"), ("value", "right"), ("certified accuracy", "right"), ("certified", "right")):
        acc.add_column(col, justify=justify)
    for row in eps_table_rows(summary):
        acc.add_row(*row)
    out = [info, acc]
    if gates:
        gt = Table(title="gates", title_justify="left")
        for col in ("gate", "certified accuracy", "result"):
            gt.add_column(col)
        for g in gates:
            gt.add_row(str(g.gate), f"{g.percent:.2f}%", "[green]pass[/]" if g.passed else "[bold red]FAIL[/]")
        out.append(gt)
    return out


def to_markdown(summary: dict, gates: list[GateResult] = ()) -> str:
    """GitHub-flavoured Markdown (for a pull-request comment or ``$GITHUB_STEP_SUMMARY``)."""
    lines = ["### lipcert certify", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary_rows(summary)]
    lines += ["", "| eps | value | certified accuracy | certified |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in eps_table_rows(summary)]
    if gates:
        lines += ["", "| gate | certified accuracy | result |", "|---|---:|---|"]
        lines += [f"| {g.gate} | {g.percent:.2f}% | {'pass' if g.passed else '**FAIL**'} |" for g in gates]
    return "\n".join(lines) + "\n"


def to_json(summary: dict, gates: list[GateResult] = ()) -> str:
    """The summary (what ``summary.json`` holds), with the gates' outcomes when any were given."""
    data = dict(summary)
    if gates:
        data["gates"] = [{"gate": str(g.gate), "eps": g.gate.eps, "eps_value": g.gate.eps_value,
                          "required_percent": float(g.gate.percent), "percent": g.percent,
                          "certified": g.certified, "total": g.total, "passed": bool(g.passed)}
                         for g in gates]
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def to_csv(summary: dict) -> str:
    """One row per eps: ``eps, eps_value, certified, total, certified_accuracy, clean_accuracy``,
    plus the certificate method, bound and its source (per-sample rows: see ``samples.csv``)."""
    import pandas as pd

    c = summary["certificate"]
    rows = [{"eps": row["eps"], "eps_value": row["value"], "certified": row["certified"],
             "total": summary["counts"]["total"], "certified_accuracy": row["certified_accuracy"],
             "clean_accuracy": summary["clean_accuracy"], "method": c["method"],
             "lipschitz_upper_bound": c["lipschitz_upper_bound"], "bound_source": c["bound_source"]}
            for row in summary["eps"]]
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    return buf.getvalue()


# ---- files ----------------------------------------------------------------------------------------


def curve_grid(result: CertificationResult, points: int = 200) -> list[float]:
    """Radii from 0 to a little past the largest requested eps or certified radius."""
    import numpy as np

    radius = result.samples["radius"].to_numpy()
    finite = radius[np.isfinite(radius)]
    top = max([v for _, v in result.eps] + ([float(finite.max())] if finite.size else []) + [1e-3])
    return [float(x) for x in np.linspace(0.0, 1.05 * top, points)]


def plot_curve(result: CertificationResult, path: str | Path) -> Path:
    """Write ``radius_curve.png``: certified accuracy (%) against eps, the requested eps marked.

    Raises ``ModuleNotFoundError`` when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; harmless if a backend is already set
    import matplotlib.pyplot as plt

    grid = curve_grid(result)
    acc = [100 * a for a in result.curve(grid)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        ax.plot(grid, acc, lw=1.8, label="certified accuracy")
        for row in result.summary["eps"]:
            ax.plot([row["value"]], [100 * row["certified_accuracy"]], "o", color="C3")
            ax.annotate(f"{row['eps']}: {100 * row['certified_accuracy']:.1f}%",
                        (row["value"], 100 * row["certified_accuracy"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        s = result.summary
        ax.set_xlabel("l2 radius eps ([0, 1] pixel units)")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.set_title(f"{s.get('model')}: {s['certificate']['method']} certificate, "
                     f"{s['counts']['total']} images", fontsize=10)
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_reports(result: CertificationResult, out_dir: str | Path,
                  gates: list[GateResult] = ()) -> tuple[list[Path], str | None]:
    """Write ``samples.csv``, ``summary.json`` and ``radius_curve.png`` into ``out_dir``.

    Returns the paths written and a note when the plot was skipped (matplotlib missing).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output {out_dir} exists and is not a folder")
    buf = io.StringIO()
    result.samples.to_csv(buf, index=False)
    paths = [atomic_write_bytes(out_dir / SAMPLES_FILE, buf.getvalue().encode()),
             atomic_write_bytes(out_dir / SUMMARY_FILE, to_json(result.summary, gates).encode())]
    note = None
    try:
        paths.append(plot_curve(result, out_dir / CURVE_FILE))
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("matplotlib"):
            raise
        note = (f"{CURVE_FILE} not written: matplotlib is not installed "
                "(pip install matplotlib, or pip install 'lipcert[plot]')")
    return paths, note


__all__ = [
    "CURVE_FILE", "FORMATS", "Gate", "GateResult", "SAMPLES_FILE", "SUMMARY_FILE",
    "evaluate_gates", "parse_gate", "plot_curve", "rich_tables", "to_csv", "to_json",
    "to_markdown", "write_reports",
]
