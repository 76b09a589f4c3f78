"""One resolution of a checkpoint's data for every command (issue 14 item 8).

A checkpoint trained with a non-default ``--seed`` (the data seed stays 0) on a synthetic pool of a
non-default size: ``certify``, ``attack`` and the demo must look at the validation images that
training validated on, and those must be disjoint from the training images.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

import certify.data
from certify.loading import load
from certify.cli import cli
from certify.data import dataset_for_checkpoint, load_dataset
from certify.errors import CheckpointError

TINY = dict(model="lipconvnet5", width=2, synthetic_size=60, batch_size=16, power_iters=1, epochs=1,
            device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained with seed 1 (initialisation, order) and data seed 0 (split, images)."""
    from certify.train import TrainConfig, train

    out = tmp_path_factory.mktemp("seed1") / "run"
    train(TrainConfig(**TINY, seed=1, output=str(out)), verbose=False, progress=False)
    return out / "best.safetensors"


def _image_keys(ds) -> set[bytes]:
    return {img.numpy().tobytes() for img in ds.images}


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_the_checkpoint_records_what_the_test_relies_on(trained):
    meta = load(trained).checkpoint_metadata
    assert meta["seed"] == 1 and meta["data_seed"] == 0 and meta["synthetic_size"] == 60


def test_validation_images_are_the_recorded_ones_and_disjoint_from_training(trained):
    model = load(trained)
    meta = model.checkpoint_metadata
    val = dataset_for_checkpoint(model, "val")
    train = dataset_for_checkpoint(model, "train")
    assert val.fingerprint == meta["val_fingerprint"] and val.matches_training is True
    assert train.fingerprint == meta["dataset_fingerprint"] and train.matches_training is True
    assert len(val) + len(train) == 60  # the recorded synthetic size, not the default 4000
    assert not _image_keys(val) & _image_keys(train)
    # The training seed does not split the data: with it, the "validation" images are others.
    wrong = load_dataset("synthetic", "val", seed=meta["seed"], val_split=meta["val_split"], size=60)
    assert wrong.fingerprint != val.fingerprint


def test_certify_and_attack_see_the_same_images(trained, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["certify", str(trained), "--device", "cpu", "--output", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["attack", str(trained), "--device", "cpu", "--attack", "pgd", "--steps", "1",
                            "--output", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    certified = [(row["index"], row["label"]) for row in _csv(tmp_path / "c" / "samples.csv")]
    attacked = [(row["index"], row["label"]) for row in _csv(tmp_path / "a" / "samples.csv")]
    val = dataset_for_checkpoint(load(trained), "val")
    assert certified == attacked == [(str(i), str(int(y))) for i, y in enumerate(val.labels)]
    c_summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    a_config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert c_summary["dataset"]["fingerprint"] == a_config["fingerprint"] == val.fingerprint
    assert a_config["split_seed"] == c_summary["config"]["seed"] == 0


def test_a_limit_picks_the_same_subset_in_both_commands(trained, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["certify", str(trained), "--device", "cpu", "--limit", "3", "--format", "json"])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(cli, ["attack", str(trained), "--device", "cpu", "--limit", "3", "--attack", "pgd",
                             "--steps", "1", "--format", "json"])
    assert r2.exit_code == 0, r2.output
    assert json.loads(r.stdout)["dataset"]["fingerprint"] == json.loads(r2.stdout)["config"]["fingerprint"]


def test_overrides_that_change_the_split_are_flagged(trained):
    model = load(trained)
    other = dataset_for_checkpoint(model, "val", seed=5)
    assert other.seed == 5 and other.matches_training is False
    four = dataset_for_checkpoint(model, "val", limit=4)
    assert four.matches_training is True  # checked on the full split, before the subset
    val_split = model.checkpoint_metadata["val_split"]  # the subset is load_dataset's (training's --val-limit)
    assert four.fingerprint == load_dataset("synthetic", "val", seed=0, val_split=val_split, size=60, limit=4).fingerprint
    assert dataset_for_checkpoint(model, "test").matches_training is None  # nothing recorded to compare
    r = CliRunner().invoke(cli, ["certify", str(trained), "--device", "cpu", "--seed", "5", "--format", "json"])
    assert r.exit_code == 0 and "differ from the ones recorded at training time" in r.stderr


def test_an_export_resolves_the_same_images(trained):
    """An exported model keeps the training config (not the top-level data_seed): same images."""
    meta = load(trained).checkpoint_metadata
    passthrough = {k: meta[k] for k in ("class_names", "dataset", "dataset_fingerprint", "seed", "config")}
    ds = dataset_for_checkpoint(passthrough, "val", input_shape=(3, 32, 32))
    assert ds.fingerprint == meta["val_fingerprint"]


def test_a_different_dataset_does_not_inherit_the_recorded_split(trained):
    spec = certify.data.checkpoint_data_spec({"dataset": "synthetic", "data_seed": 3, "val_split": 7,
                                              "synthetic_size": 50}, "val", dataset="cifar10")
    assert spec.name == "cifar10" and spec.seed == 0 and spec.val_split is None and spec.size is None
    assert not spec.recorded


@pytest.mark.parametrize("key, value", [("data_seed", "abc"), ("data_seed", 1.5), ("val_split", "x"),
                                        ("val_split", float("inf")), ("synthetic_size", -3)])
def test_malformed_recorded_values_are_refused(key, value):
    with pytest.raises(CheckpointError, match=key):
        certify.data.checkpoint_data_spec({"dataset": "synthetic", key: value}, "val")


def test_no_recorded_dataset_is_a_usage_error_in_both_commands(tmp_path):
    from certify.checkpoint import save
    from certify.models import create_model

    path = save(tmp_path / "nodata.safetensors", create_model("lipconvnet5", width=2))
    for command in ("certify", "attack"):
        r = CliRunner().invoke(cli, [command, str(path)])
        assert r.exit_code == 2 and "--dataset" in r.output


def test_the_demo_certifies_the_images_certify_sees(tmp_path, monkeypatch):
    import certify.cli.train as cli_train

    monkeypatch.setattr(cli_train, "DEMO_CONFIG", dict(cli_train.DEMO_CONFIG, width=2, synthetic_size=40,
                                                        batch_size=12, power_iters=1))
    seen = []
    real = certify.data.dataset_for_checkpoint

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds.fingerprint)
        return ds

    monkeypatch.setattr(certify.data, "dataset_for_checkpoint", spy)
    runner = CliRunner()
    r = runner.invoke(cli, ["demo", "--epochs", "1", "--seed", "1", "--device", "cpu", "--no-progress",
                            "--output", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    ckpt = tmp_path / "demo" / "best.safetensors"
    r = runner.invoke(cli, ["certify", str(ckpt), "--device", "cpu", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert len(seen) == 2 and seen[0] == seen[1] == load(ckpt).checkpoint_metadata["val_fingerprint"]
    assert json.loads(r.stdout)["dataset"]["samples"] == 4
