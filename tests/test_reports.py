"""Reports (samples.csv, summary.json, radius_curve.png, stdout formats) and the gate."""

from __future__ import annotations

import io
import json
import sys
from fractions import Fraction

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from certify.certificates import certify_dataset
from certify.errors import ConfigError
from certify.reports import (
    Gate,
    evaluate_gates,
    parse_gate,
    rich_tables,
    to_csv,
    to_json,
    to_markdown,
    write_reports,
)


class LinearModel(nn.Module):
    """A fixed linear classifier on 1x4x4 images with its exact spectral norm as the bound."""

    input_shape = (1, 4, 4)
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 16, generator=g), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(3, generator=g), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias

    def lipschitz_bound(self) -> float:
        return float(torch.linalg.matrix_norm(self.weight.double(), 2)) * (1 + 1e-9)


@pytest.fixture(scope="module")
def result():
    model = LinearModel()
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 3
    return certify_dataset(model, TensorDataset(x, y), eps=["36/255", "0.05", "0.5"])


def test_samples_csv_and_summary_json_parse_back(result, tmp_path):
    paths, note = write_reports(result, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["radius_curve.png", "samples.csv", "summary.json"] and note is None
    df = pd.read_csv(tmp_path / "out" / "samples.csv")
    assert len(df) == 40
    assert list(df.columns) == ["index", "label", "prediction", "correct", "margin", "radius",
                                "certified_0.05", "certified_36/255", "certified_0.5"]
    pd.testing.assert_frame_equal(df, result.samples, check_dtype=False, rtol=0, atol=0)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["total"] == 40
    for label in ("36/255", "0.05", "0.5"):
        assert summary["certified_accuracy"][label] == pytest.approx(df[f"certified_{label}"].mean())
    assert summary["clean_accuracy"] == pytest.approx(df["correct"].mean())
    assert (tmp_path / "out" / "radius_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_is_optional(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    paths, note = write_reports(result, tmp_path)
    assert sorted(p.name for p in paths) == ["samples.csv", "summary.json"]
    assert "matplotlib" in note and "pip install" in note
    assert not (tmp_path / "radius_curve.png").exists()


def test_output_that_is_a_file_is_refused(result, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        write_reports(result, f)


def test_stdout_formats(result):
    csv = pd.read_csv(io.StringIO(to_csv(result.summary)))
    assert csv["eps"].tolist() == ["0.05", "36/255", "0.5"]
    assert csv["certified_accuracy"].tolist() == pytest.approx(
        [result.certified_accuracy(e) for e in ("0.05", "36/255", "0.5")])
    assert (csv["bound_source"] == "computed from the weights").all()
    data = json.loads(to_json(result.summary))
    assert data["certificate"]["method"] == "global"
    md = to_markdown(result.summary)
    assert "| 36/255 | 0.1412 |" in md and "computed from the weights" in md
    tables = rich_tables(result.summary)
    assert len(tables) == 2


def test_curve_starts_at_clean_accuracy_and_never_increases(result):
    grid = [0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 10.0]
    curve = result.curve(grid)
    assert curve[0] == pytest.approx(result.summary["clean_accuracy"])
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == 0.0


@pytest.mark.parametrize("text,pct,eps", [("60@36/255", 60, 36 / 255), ("12.5@0.5", Fraction(25, 2), 0.5),
                                          (" 0 @ 1 ", 0, 1.0), ("100%@1/2", 100, 0.5)])
def test_parse_gate(text, pct, eps):
    g = parse_gate(text)
    assert g.percent == pct and g.eps_value == eps


@pytest.mark.parametrize("bad", ["60", "@0.5", "60@", "abc@0.5", "60@0", "60@-1", "101@0.5", "-1@0.5",
                                 "60@x", "60@@0.5"])
def test_parse_gate_rejects(bad):
    with pytest.raises(ConfigError):
        parse_gate(bad)


def test_gate_comparison_is_exact(result):
    n = len(result.samples)
    k = int(result.samples["certified_0.05"].sum())
    assert 0 < k < n
    exact = Fraction(100 * k, n)
    just_above = exact + Fraction(1, 10**6)
    r_eq, r_above, r_zero = evaluate_gates(result, [Gate(exact, "0.05", 0.05), Gate(just_above, "0.05", 0.05),
                                                    Gate(Fraction(0), "0.05", 0.05)])
    assert r_eq.passed and not r_above.passed and r_zero.passed
    assert r_eq.certified == k and r_eq.total == n
    assert "FAILED" in str(r_above) and "0.05" in str(r_above)


def test_gate_at_an_eps_that_was_not_reported_is_recomputed(result):
    (g,) = evaluate_gates(result, [parse_gate("0@0.123")])
    radius = torch.tensor(result.samples["radius"].to_numpy())
    correct = torch.tensor(result.samples["correct"].to_numpy())
    assert g.certified == int(((radius > 0.123) & correct).sum())


def test_three_of_five_meets_sixty_percent():
    # 100 * 3 / 5 is 60.00000000000001 in floats; the exact comparison must not depend on that.
    model = LinearModel()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 3
    res = certify_dataset(model, TensorDataset(x, y), eps=["1e-9"])
    (g,) = evaluate_gates(res, [parse_gate("60@1e-9")])
    assert g.certified == 3 and g.passed
    (g,) = evaluate_gates(res, [parse_gate("60.001@1e-9")])
    assert not g.passed
