"""``lipcert models``: the table lists every depth, JSON is valid and carries the sound bound.

Models are built at width 4 (``--width 4``) so the command runs in seconds.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from certify.cli import cli
from certify.models import list_models

DEPTHS = (5, 10, 15, 20, 25, 30, 35, 40)


def _run(*args):
    return CliRunner().invoke(cli, ["models", *args], catch_exceptions=False)


def test_table_lists_all_depths():
    # COLUMNS keeps rich from truncating names in a narrow, non-terminal console.
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", "lipconvnet*", "--width", "4", "--no-bound"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for d in DEPTHS:
        assert any(f" lipconvnet{d} " in line for line in lines), f"lipconvnet{d} missing"
    assert "parameters" in result.output and "3x32x32" in result.output


def test_json_is_valid_and_bounded():
    result = _run("lipconvnet*", "--format", "json", "--width", "4")
    assert result.exit_code == 0
    rows = json.loads(result.output)  # stdout holds the JSON only
    assert [r["name"] for r in rows] == list_models("lipconvnet*")
    by_name = {r["name"]: r for r in rows}
    for d in DEPTHS:
        row = by_name[f"lipconvnet{d}"]
        assert row["input_shape"] == [3, 32, 32] and row["head"] == "ortho"
        assert isinstance(row["parameters"], int) and row["parameters"] > 0
        bound = row["lipschitz_upper_bound"]
        assert 1 / 0.2507 <= bound <= 1 / 0.2507 * (1 + 1e-3)
    counts = [by_name[f"lipconvnet{d}"]["parameters"] for d in DEPTHS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # deeper: more parameters
    for row in rows:
        if row["head"] == "mlp":  # certified by curvature: no global bound, and a note saying so
            assert row["lipschitz_upper_bound"] is None and row["note"]


def test_pattern_filters_and_no_match():
    rows = json.loads(_run("lipconvnet1?", "--format", "json", "--width", "4", "--no-bound").output)
    assert [r["name"] for r in rows] == ["lipconvnet10", "lipconvnet15"]
    assert all("lipschitz_upper_bound" not in r for r in rows)
    assert json.loads(_run("nothing*", "--format", "json").output) == []
    result = _run("nothing*")
    assert result.exit_code == 0 and "no model matches" in result.output


def test_bad_format_is_a_usage_error():
    result = CliRunner().invoke(cli, ["models", "--format", "xml"])
    assert result.exit_code == 2


def test_width_is_validated():
    result = CliRunner().invoke(cli, ["models", "lipconvnet5", "--width", "3"])
    assert result.exit_code == 1 and "width" in result.output
