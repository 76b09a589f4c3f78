"""bench/layers_compared.py: its options, the commands it runs, and the report it rebuilds from rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch



@pytest.fixture(scope="module")
def lc(bench_script):
    return bench_script("layers_compared")


def _fake_row(out: Path, layer: str, *, images: int, budget_minutes: float = 15.0, violations: int = 0,
              environment: str | None = "one core", clean: float = 0.5) -> None:
    """A finished row as run_row leaves it: run folder, certify summary, audit log, row.json."""
    run = out / layer / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"budget_minutes": budget_minutes, "steps_per_epoch": 10,
                                                 "batch_size": 4}))
    (run / "metrics.csv").write_text("epoch,budget_used_s\n1,10.0\n")
    torch.save({"iteration": images // 4 * 10}, run / "train_state.pt")  # images/s = images
    (out / layer / "certify").mkdir()
    (out / layer / "certify" / "summary.json").write_text(json.dumps({
        "parameters": 100, "clean_accuracy": clean,
        "certified_accuracy": {"36/255": 0.3, "72/255": 0.2, "108/255": 0.1},
        "certificate": {"lipschitz_upper_bound": 2.0}, "images_per_second": 50.0}))
    audit = {"audit": {"violations": violations, "certified_audited": 40}}
    (out / layer / "log.txt").write_text("$ lipcert attack ...\n" + json.dumps(audit, indent=1) + "\n")
    row = {"layer": layer, "train_exit": 0, "train_wall_s": 1.0, "train_peak_mib": 10.0, "certify_exit": 0,
           "audit_exit": 3 if violations else 0}
    if environment is not None:
        row.update(environment=environment, core=1, command="python bench/layers_compared.py --layers " + layer)
    (out / layer / "row.json").write_text(json.dumps(row))


def test_report_only_rebuilds_the_table_from_the_rows(lc, tmp_path, capsys):
    _fake_row(tmp_path, "conv", images=400)
    _fake_row(tmp_path, "aol", images=100, environment=None)  # a row of an earlier version: no environment
    (tmp_path / "reading.md").write_text("hand-written\n")
    assert lc.main(["--report-only", "--output", str(tmp_path), "--budget-minutes", "20"]) == 0
    md = (tmp_path / "layers_compared.md").read_text()
    # the budget comes from the rows' run configs, not from this invocation's (default) flag
    assert "15 minutes of training each" in md and "20 minutes" not in md
    aol = next(line for line in md.splitlines() if line.startswith("| aol |"))
    assert "| 100 | 0.25 |" in aol and "| 0 / 40 |" in aol  # train img/s and its ratio to conv
    assert "`aol`: not recorded" in md and "`conv`: one core" in md
    assert "[reading.md](reading.md)" in md
    assert (tmp_path / "reading.md").read_text() == "hand-written\n"  # the reading is never overwritten
    assert "aol" in (tmp_path / "layers_compared.csv").read_text()
    # a fresh clone has no checkpoints (they are not committed): the rows' summaries suffice
    for state in tmp_path.glob("*/run/train_state.pt"):
        state.unlink()
    assert lc.main(["--report-only", "--output", str(tmp_path), "--budget-minutes", "20"]) == 0
    assert (tmp_path / "layers_compared.md").read_text() == md


def test_report_only_fails_on_an_audit_violation_and_on_mixed_budgets(lc, tmp_path):
    _fake_row(tmp_path, "conv", images=400)
    _fake_row(tmp_path, "soc", images=100, violations=1, budget_minutes=70)
    assert lc.main(["--report-only", "--output", str(tmp_path)]) == 1
    md = (tmp_path / "layers_compared.md").read_text()
    assert "15 / 70 minutes of training (rows differ!)" in md and "| 1 / 40 |" in md


def test_bad_invocations_are_refused(lc, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lc.main(["--report-only", "--output", str(tmp_path / "empty")])
    assert e.value.code == 2 and "holds no rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        lc.main(["--one-core", "0", "--parallel", "2", "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "does not combine" in capsys.readouterr().err
    _fake_row(tmp_path / "full", "aol", images=100)
    with pytest.raises(SystemExit) as e:  # a finished row is never overwritten
        lc.main(["--layers", "aol", "--output", str(tmp_path / "full")])
    assert e.value.code == 2 and "already holds rows" in capsys.readouterr().err


def test_row_commands_carry_the_shape_and_the_row_options(lc, tmp_path):
    args = lc.argparse.Namespace(size="xs", layers_per_block=1, budget_minutes=0.5, seed=3, synthetic=True,
                                 data_dir="d", train_args="--lr 0.05", row_args=["conv=--lr 0.01"], audit_limit=7)
    steps = dict(lc.row_commands("conv", args, tmp_path))
    train = steps["train"]
    assert train[train.index("--model-option") + 1] == "layers_per_block=1"
    assert train[-4:] == ["--lr", "0.05", "--lr", "0.01"]  # the row's option comes last, so it wins
    assert "--limit" in steps["audit"] and "7" in steps["audit"]
    assert dict(lc.row_commands("aol", args, tmp_path))["train"][-2:] == ["--lr", "0.05"]
    args.row_args = ["conv"]
    with pytest.raises(SystemExit, match="LAYER=ARGS"):
        lc.row_commands("conv", args, tmp_path)


@pytest.mark.slow
def test_a_synthetic_comparison_runs_end_to_end(lc, tmp_path):
    out = tmp_path / "out"
    code = lc.main(["--budget-minutes", "0.05", "--synthetic", "--layers", "aol,conv", "--layers-per-block", "1",
                    "--audit-limit", "5", "--one-core", "0", "--output", str(out)])
    assert code == 0
    rows = {r["layer"]: r for r in (json.loads((out / d / "row.json").read_text()) for d in ("aol", "conv"))}
    assert all(r["train_exit"] == 0 and r["core"] == 0 for r in rows.values())
    assert "| aol |" in (out / "layers_compared.md").read_text()
