"""`lipcert train` and `lipcert demo` end to end with click's CliRunner, on tiny models."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from certify.cli import cli

TINY = ["--model", "lipconvnet5", "--width", "2", "--synthetic-size", "40", "--batch-size", "12",
        "--power-iters", "1", "--device", "cpu", "--no-progress"]


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_train_end_to_end_then_resume_with_more_epochs(tmp_path):
    out = tmp_path / "run"
    r = run("train", *TINY, "--epochs", "1", "--loss", "offset", "--output", out)
    assert r.exit_code == 0, r.output
    assert "clean" in r.stdout and "36/255" in r.stdout and "model.safetensors" in r.stdout
    assert "epoch 1/1" in r.stderr  # logs on stderr, results on stdout
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "offset" and config["offset"] == pytest.approx(2 ** 0.5 / config["std"][0] * 36 / 255)
    # --resume takes the saved config; options given on the command line override it.
    r = run("train", "--resume", "--output", out, "--epochs", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_existing_run_folder_is_left_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    r = run("train", *TINY, "--epochs", "1", "--output", out)
    assert r.exit_code == 1
    assert "already has files" in r.stderr and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("args,code,message", [
    (["--epochs", "0"], 2, "--epochs"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--batch-size", "-3"], 2, "--batch-size"),
    (["--model", "lipconvnet6"], 1, "unknown model 'lipconvnet6'"),
    (["--dataset", "cifar11"], 1, "unknown dataset 'cifar11'"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/no-data"], 1, "--download"),
    (["--dataset", "imagefolder", "--data-dir", "{tmp}/no-folder"], 1, "does not exist"),
    (["--output", "{tmp}/file/sub"], 1, "cannot write to output folder"),
    (["--resume", "--output", "{tmp}/fresh"], 1, "nothing to resume"),
    (["--resume", "--overwrite", "--output", "{tmp}/x"], 2, "exclude each other"),
    (["--resume"], 2, "--resume needs --output"),
    (["--device", "tpu"], 1, "device"),
    (["--loss", "hinge"], 2, "--loss"),
    (["--dataset", "mnist", "--synthetic-size", "40"], 1, "only applies to --dataset synthetic"),
])
def test_bad_input(tmp_path, args, code, message):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output" not in args and args != ["--resume"]:
        args += ["--output", str(tmp_path / "out")]
    base = TINY if "--dataset" not in args else [a for a in TINY if a not in ("--synthetic-size", "40")]
    r = run("train", *base, "--epochs", "1", *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output


def test_overwrite_replaces_lipcert_files_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("old")
    (out / "notes.txt").write_text("mine")
    r = run("train", *TINY, "--epochs", "1", "--val-split", "0", "--power-iters", "0", "--overwrite", "--output", out)
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.csv").read_text() != "old"
    assert "no validation split" in r.stdout


def test_demo_writes_a_fresh_folder_and_prints_the_table(tmp_path, monkeypatch):
    import certify.cli.train as cli_train

    monkeypatch.setattr(cli_train, "DEMO_CONFIG", dict(cli_train.DEMO_CONFIG, width=2, synthetic_size=40,
                                                        batch_size=12, power_iters=1))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lipcert-demo").mkdir()
    (tmp_path / "lipcert-demo" / "keep.txt").write_text("x")  # taken: the demo must not clobber it
    r = run("demo", "--epochs", "1", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "lipcert-demo-1" / "best.safetensors").exists()
    assert [p.name for p in (tmp_path / "lipcert-demo").iterdir()] == ["keep.txt"]
    for col in ("clean", "36/255", "72/255", "108/255"):
        assert col in r.stdout
    r = run("demo", "--epochs", "1", "--output", tmp_path / "lipcert-demo-1")
    assert r.exit_code == 1 and "already has files" in r.stderr


def test_model_options_reach_the_builder_and_the_checkpoint(tmp_path):
    from certify.loading import load

    out = tmp_path / "run"
    r = run("train", "--model", "liresnet", "--width", "4", "--depth", "1", "--model-option", "features=16",
            "--model-option", "dense_layers=1", "--synthetic-size", "40", "--batch-size", "8", "--epochs", "1",
            "--device", "cpu", "--no-progress", "--output", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model_options"] == {"features": 16, "dense_layers": 1}
    model = load(out / "best.safetensors")
    assert model.model_kwargs["features"] == 16 and model.model_kwargs["dense_layers"] == 1


@pytest.mark.parametrize("args, code, message", [
    (["--model-option", "features"], 2, "KEY=VALUE"),
    (["--width", "4", "--model-option", "width=8"], 1, "given twice"),
    (["--model-option", "no_such_option=1"], 1, "no_such_option"),
])
def test_bad_model_options_are_refused(args, code, message, tmp_path):
    r = run("train", *TINY, "--epochs", "1", *args, "--output", tmp_path / "run")
    assert r.exit_code == code and message in r.output


def test_offset_as_a_multiple_of_the_margin_is_saved_as_the_number_trained_with(tmp_path):
    out = tmp_path / "run"
    r = run("train", *TINY, "--epochs", "1", "--loss", "offset", "--offset", "2x", "--output", out)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["offset"] == pytest.approx(2 * 2 ** 0.5 / config["std"][0] * 36 / 255)


@pytest.mark.parametrize("bad", ["two", "-1x", "x"])
def test_a_bad_offset_is_a_usage_error(tmp_path, bad):
    r = run("train", *TINY, "--epochs", "1", "--offset", bad, "--output", tmp_path / "run")
    assert r.exit_code == 2
    assert "offset must be a number >= 0 or a multiple of the margin such as 2x" in r.output
    assert not (tmp_path / "run").exists()
