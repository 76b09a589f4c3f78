"""``lipcert models``: the table lists every depth from static facts (nothing is built), the
facts match built models, JSON and CSV are valid, and ``--bound`` carries the sound bound.

With ``--bound`` models are built at width 4 (``--width 4``) so the command runs in seconds.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from click.testing import CliRunner

from certify.cli import cli
from certify.models import create_model, list_models, model_facts

DEPTHS = (5, 10, 15, 20, 25, 30, 35, 40)


def _run(*args):
    return CliRunner().invoke(cli, ["models", *args], catch_exceptions=False)


def test_table_lists_all_depths():
    # COLUMNS keeps rich from truncating names in a narrow, non-terminal console.
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", "lipconvnet*", "--width", "4"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for d in DEPTHS:
        assert any(f" lipconvnet{d} " in line for line in lines), f"lipconvnet{d} missing"
    assert "parameters" in result.output and "3x32x32" in result.output


def test_json_is_valid_and_ordered_by_depth():
    result = _run("lipconvnet*", "--format", "json", "--width", "4")
    assert result.exit_code == 0
    rows = json.loads(result.output)  # stdout holds the JSON only
    assert [r["name"] for r in rows] == list_models("lipconvnet*")
    by_name = {r["name"]: r for r in rows}
    for d in DEPTHS:
        row = by_name[f"lipconvnet{d}"]
        assert row["input_shape"] == [3, 32, 32] and row["head"] == "ortho" and row["depth"] == d
        assert isinstance(row["parameters"], int) and row["parameters"] > 0
    counts = [by_name[f"lipconvnet{d}"]["parameters"] for d in DEPTHS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # deeper: more parameters
    assert all("lipschitz_upper_bound" not in r for r in rows)  # the bound is opt-in


def test_bound_is_sound_at_initialisation():
    result = _run("lipconvnet5*", "--format", "json", "--width", "4", "--bound")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert 1 / 0.2507 <= rows["lipconvnet5"]["lipschitz_upper_bound"] <= 1 / 0.2507 * (1 + 1e-3)
    # certified by curvature: no global bound, and a note saying so
    assert rows["lipconvnet5_mlp"]["lipschitz_upper_bound"] is None and rows["lipconvnet5_mlp"]["note"]
    table = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", "lipconvnet5", "--width", "4", "--bound"])
    assert "bound at init" in table.output and "3.98" in table.output


def test_pattern_filters_and_no_match():
    rows = json.loads(_run("lipconvnet1?", "--format", "json", "--width", "4").output)
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


def test_listing_the_full_registry_builds_nothing(monkeypatch):
    """The README tour's first command: every registered model at width 32, from its config.
    Building a model or computing a bound fails the test (they cost minutes for the registry)."""
    import certify.lipschitz
    import certify.layers.soc

    def forbidden(*args, **kwargs):
        raise AssertionError("lipcert models built a model or computed a bound without --bound")

    real_init = certify.layers.soc.SOC.__init__

    def meta_only(self, *args, **kwargs):
        # a shapes-only build on the meta device (no values, no power iteration) is allowed
        if torch.empty(0).device.type != "meta":
            forbidden()
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(certify.layers.soc.SOC, "__init__", meta_only)
    monkeypatch.setattr(certify.lipschitz.LipschitzNet, "lipschitz_bound", forbidden)
    for fmt in ("table", "json", "csv"):
        result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", "--format", fmt], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        for name in list_models():
            assert name in result.output
    rows = json.loads(_run("--format", "json").output)
    assert all(r["width"] == 32 and r["input_shape"] == [3, 32, 32] for r in rows if r["family"] == "LipConvnet")
    assert {r["width"] for r in rows if r["family"] == "ConvNet"} == {16, 32, 64, 128}
    assert {r["certificate"] for r in rows} == {"global", "curvature", "pairwise"}  # liresnet: LLN head
    assert {r["layer"] for r in rows} == {"soc", "liresnet"}


def test_csv_has_one_row_per_model():
    rows = list(csv.DictReader(io.StringIO(_run("lipconvnet5*", "--format", "csv").output)))
    assert [r["name"] for r in rows] == ["lipconvnet5", "lipconvnet5_mlp"]
    assert rows[0]["input_shape"] == "3x32x32" and int(rows[0]["parameters"]) > 0
    assert "lipschitz_upper_bound" not in rows[0]


@pytest.mark.parametrize("name", list_models())
def test_static_facts_match_the_built_model(name):
    width = 4 if name.startswith("convnet") else 2  # a ConvNet's width holds its 3 input channels
    with torch.random.fork_rng():
        model = create_model(name, width=width)
    facts = model_facts(name, width=width)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["input_shape"] == list(model.input_shape) and facts["head"] == model.head_kind
    assert facts["depth"] == model.depth and facts["num_classes"] == model.num_classes


@pytest.mark.parametrize("name, kwargs", [
    ("lipconvnet10", dict(activation="hh1", pooling="lip", head="lln")),
    ("lipconvnet5_mlp", dict(activation="hh2", pooling="lip", in_channels=1, input_size=28, num_classes=7,
                             mlp_hidden=9)),
    ("lipconvnet5", dict(head="lln", input_size=[40, 70], num_classes=3)),
])
def test_static_facts_of_every_layer_kind(name, kwargs):
    with torch.random.fork_rng():
        model = create_model(name, width=4, **kwargs)
    facts = model_facts(name, width=4, **kwargs)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["input_shape"] == list(model.input_shape)


def test_static_facts_refuse_what_the_builder_refuses():
    from certify.errors import ConfigError

    for kwargs in (dict(width=3), dict(activation="relu"), dict(pooling="avg"), dict(colour=1)):
        with pytest.raises(ConfigError):
            model_facts("lipconvnet5", **kwargs)
    with pytest.raises(ConfigError, match="MLP head"):
        model_facts("lipconvnet5_mlp", head="ortho")
