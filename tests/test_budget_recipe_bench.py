"""bench/budget_recipe.py: its rows (recipes and --row candidates), the commands it runs, its report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def br(bench_script):
    return bench_script("budget_recipe")


def _args(br, **kw):
    base = dict(minutes=70.0, seed=0, synthetic=False, data_dir="/data", workers=2, custom={})
    base.update(kw)
    return SimpleNamespace(**base)


def test_a_custom_row_is_trained_with_its_options_and_the_protocol(br, tmp_path):
    custom = br.custom_rows(["budget-auto=--recipe budget --train-terms auto"])
    assert custom == {"budget-auto": ["--recipe", "budget", "--train-terms", "auto"]}
    cmd = br.train_command("budget-auto", _args(br, custom=custom), tmp_path / "budget-auto")
    tail = cmd[cmd.index("train") + 1:]
    assert tail[:4] == ["--recipe", "budget", "--train-terms", "auto"]
    for option, value in [("--budget-minutes", "70.0"), ("--val-split", "5000"), ("--data-seed", "0"),
                          ("--seed", "0"), ("--output", str(tmp_path / "budget-auto"))]:
        assert tail[tail.index(option) + 1] == value
    # a recipe row is still `--recipe ROW` with the same protocol
    recipe = br.train_command("budget", _args(br), tmp_path / "budget-auto")
    assert recipe[recipe.index("train") + 1:][:2] == ["--recipe", "budget"]
    assert recipe[recipe.index("train") + 3:] == tail[4:]


@pytest.mark.parametrize("item, message", [
    ("budget-auto", "NAME=ARGS"),
    ("../x=--recipe budget", "plain folder name"),
    ("budget=--recipe budget --width 4", "already taken"),
    ("x=", "no lipcert train options"),
    ("x=--recipe budget --seed 3", "--seed belong to the protocol"),
    ("x=--recipe budget --budget-minutes=5", "--budget-minutes belong to the protocol"),
    ("x=--recipe budget -o runs/x", "-o belong to the protocol"),
    ("x=--recipe 'budget", "--row 'x': No closing quotation"),
])
def test_bad_row_definitions_are_refused(br, item, message):
    with pytest.raises(ValueError, match=message):
        br.custom_rows([item])


def test_two_rows_of_one_name_are_refused(br):
    with pytest.raises(ValueError, match="already taken"):
        br.custom_rows(["a=--recipe budget", "a=--recipe budget --width 4"])


@pytest.mark.parametrize("rows", ["nope", "budget,budget", ","])
def test_bad_rows_selection_exits_with_a_usage_error(br, tmp_path, rows, capsys):
    with pytest.raises(SystemExit) as e:
        br.main(["--rows", rows, "--output", str(tmp_path), "--report-only"])
    assert e.value.code == 2
    assert "--rows must name distinct rows" in capsys.readouterr().err


def test_training_refuses_an_output_that_holds_its_rows(br, tmp_path, capsys):
    (tmp_path / "budget").mkdir()
    with pytest.raises(SystemExit) as e:
        br.main(["--rows", "budget", "--output", str(tmp_path)])
    assert e.value.code == 2 and "already holds run folders" in capsys.readouterr().err


def _fake_run(folder: Path, *, clean: float, cert36: float, width: int = 8) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": "lipconvnet5", "width": width, "loss": "offset",
                                                    "schedule": "cosine", "steps_per_epoch": 10,
                                                    "batch_size": 4}))
    fields = ["epoch", "val_clean_acc", "val_cert_36_255", "val_cert_72_255", "val_cert_108_255",
              "budget_used_s", "epoch_seconds"]
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow(dict(epoch=1, val_clean_acc=clean, val_cert_36_255=cert36, val_cert_72_255=cert36 / 2,
                        val_cert_108_255=cert36 / 4, budget_used_s=10.0, epoch_seconds=11.0))
    torch.save({"iteration": 25}, folder / "train_state.pt")


def test_report_only_lists_every_row_command_and_audits_every_candidate(br, tmp_path, monkeypatch):
    _fake_run(tmp_path / "paper", clean=0.4, cert36=0.2, width=32)
    _fake_run(tmp_path / "budget", clean=0.6, cert36=0.45)
    _fake_run(tmp_path / "budget-auto", clean=0.62, cert36=0.47)
    audited = []
    monkeypatch.setattr(br, "audit", lambda run_dir, args: audited.append(run_dir.name) or f"audit of {run_dir.name}")
    assert br.main(["--report-only", "--output", str(tmp_path), "--rows", "paper,budget,budget-auto",
                    "--row", "budget-auto=--recipe budget --train-terms auto"]) == 0
    assert audited == ["budget", "budget-auto"]  # the paper baseline is not a candidate
    md = (tmp_path / "budget_recipe.md").read_text()
    assert "| budget-auto | lipconvnet5 | 8 | offset | 62.00% | 47.00% | 23.50% | 11.75% | 2.50 | 10 |" in md
    assert "- row budget-auto: `lipcert train --recipe budget --train-terms auto --budget-minutes 70.0" in md
    assert "paper.log, budget.log, budget-auto.log" in md
    assert "Audit of the budget-auto model" in md and "audit of budget-auto" in md
    rows = list(csv.DictReader(open(tmp_path / "budget_recipe.csv")))
    assert [r["row"] for r in rows] == ["paper", "budget", "budget-auto"]


def test_report_only_refuses_a_row_that_never_finished(br, tmp_path, capsys):
    _fake_run(tmp_path / "budget", clean=0.6, cert36=0.45)
    (tmp_path / "budget-auto").mkdir()
    with pytest.raises(SystemExit) as e:
        br.main(["--report-only", "--output", str(tmp_path), "--row", "budget-auto=--recipe budget",
                 "--rows", "budget,budget-auto"])
    assert e.value.code == 2 and "no finished run folder for ['budget-auto']" in capsys.readouterr().err


@pytest.mark.slow
def test_a_custom_row_end_to_end_on_synthetic_data(br, tmp_path):
    """Trains, certifies and audits a tiny candidate row for real (a few seconds of budget)."""
    assert br.main(["--synthetic", "--minutes", "0.05", "--rows", "tiny", "--audit-limit", "4",
                    "--row", "tiny=--recipe budget --width 4 --eval-every 1", "--output", str(tmp_path)]) == 0
    md = (tmp_path / "budget_recipe.md").read_text()
    assert "| tiny | lipconvnet5 | 4 |" in md
    assert "Audit of the tiny model" in md and "exit 0" in md
