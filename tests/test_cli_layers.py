"""``lipcert layers``: every registered layer type with its kind and how its bound is made."""

from __future__ import annotations

import json

from click.testing import CliRunner

from certify.cli import cli
from certify.layers import all_layers


def test_json_lists_every_registered_layer_with_kind_and_bound():
    res = CliRunner().invoke(cli, ["layers", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == [info.name for info in all_layers()]
    by_name = {r["name"]: r for r in rows}
    for name, kind in (("soc", "convolution"), ("hh2", "activation"), ("lip", "pooling"), ("lln", "head"),
                       ("mlp", "head"), ("normalize", "input"), ("soc_matrix", "baked")):
        assert by_name[name]["kind"] == kind
        assert by_name[name]["bound"]


def test_kind_filter_pattern_and_csv():
    runner = CliRunner()
    res = runner.invoke(cli, ["layers", "--kind", "head", "--format", "csv"])
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert lines[0] == "name,kind,bound,reference"
    assert {line.split(",")[0] for line in lines[1:]} >= {"ortho", "lln", "mlp"}
    assert all(",head," in line for line in lines[1:])
    res = runner.invoke(cli, ["layers", "hh*", "--format", "json"])
    assert [r["name"] for r in json.loads(res.output)] == ["hh1", "hh2"]


def test_table_and_an_empty_match():
    runner = CliRunner()
    res = runner.invoke(cli, ["layers"])
    assert res.exit_code == 0 and "soc" in res.output
    res = runner.invoke(cli, ["layers", "nothing-like-this"])
    assert res.exit_code == 0 and "no layer matches" in res.output


def test_an_unknown_kind_is_a_usage_error():
    res = CliRunner().invoke(cli, ["layers", "--kind", "transformer"])
    assert res.exit_code == 2
