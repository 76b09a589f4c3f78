"""``lipcert attack`` end to end on a tiny checkpoint (LipConvnet-5 at width 2) and few images."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

import certify.certificates
import certify.data
from certify.checkpoint import save
from certify.cli import cli
from certify.cli._common import EXIT_GATE
from certify.data import ImageDataset

FAST = ["--attack", "apgd-ce", "--steps", "2", "--search-steps", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from certify.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lipconvnet5", width=2, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save(path, model, dataset="synthetic", seed=0)
    return path


def run(*args):
    result = CliRunner().invoke(cli, ["attack", *map(str, args)])
    return result


def test_table_json_csv_and_output_files(ckpt, tmp_path):
    out = tmp_path / "out"
    r = run(ckpt, "--limit", 4, "--eps", "36/255", "--eps", "2.0", *FAST, "--output", out)
    assert r.exit_code == 0, r.output
    assert "empirical robust" in r.output and "certified" in r.output
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert len(rows) == 8  # one per image and eps
    for col in ("index", "label", "clean_prediction", "adversarial_prediction", "perturbation_norm",
                "success", "certified_radius", "eps", "certified"):
        assert col in rows[0]
    for row in rows:
        eps = 36 / 255 if row["eps"] == "36/255" else 2.0
        assert float(row["perturbation_norm"]) <= eps
    summary = json.load(open(out / "summary.json"))
    assert [e["eps"] for e in summary["eps"]] == ["36/255", "2.0"]
    for e in summary["eps"]:  # certified <= empirical robust <= clean, always
        assert e["certified_accuracy"] <= e["empirical_robust_accuracy"] <= e["clean_accuracy"]
    assert json.load(open(out / "config.json"))["dataset"] == "synthetic"  # from the checkpoint

    j = run(ckpt, "--limit", 2, *FAST, "--format", "json")
    assert j.exit_code == 0, j.output
    data = json.loads(j.stdout)
    assert data["eps"][0]["eps"] == "36/255" and data["samples"] == 2

    c = run(ckpt, "--limit", 2, *FAST, "--format", "csv")
    assert c.exit_code == 0, c.output
    lines = c.stdout.strip().splitlines()
    assert lines[0].startswith("eps,") and len(lines) == 2


def test_fast_evaluation_is_the_default(ckpt):
    r = run(ckpt, "--limit", 2, *FAST, "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["eval"] == "fast"
    assert "[default: fast]" in " ".join(CliRunner().invoke(cli, ["attack", "--help"]).output.split())


def _labels_from_predictions(ckpt, n=6):
    """A dataset the model classifies perfectly (labels = its predictions), so every image with a
    positive margin is certified and audited."""
    from certify.loading import load

    model = load(ckpt)
    imgs, _ = certify.data.make_synthetic(n, (3, 32, 32), seed=3)
    with torch.no_grad():
        labels = model(imgs.float() / 255).argmax(1)
    return ImageDataset("synthetic", "val", imgs, labels, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("eval_path", ["taylor", "fast"])
def test_audit_passes_and_reports_tightness(ckpt, monkeypatch, eval_path):
    ds = _labels_from_predictions(ckpt)
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: ds)
    r = run(ckpt, *FAST, "--audit", "--tightness", "--format", "json", "--eval", eval_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["eval"] == eval_path
    audit = json.loads(r.stdout)["audit"]
    assert audit["certified_audited"] > 0 and audit["violations"] == 0 and audit["passed"]
    assert audit["tightness"]["min"] >= 1
    assert 0 < audit["lipschitz_lower_attack"] <= audit["lipschitz_upper"]


def test_audit_without_tightness_says_so(ckpt, monkeypatch):
    """The tightness search is opt-in (--tightness): without it the audit attacks inside every
    certified radius and the report says that the empirical radius was not measured."""
    ds = _labels_from_predictions(ckpt)
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: ds)
    r = run(ckpt, *FAST, "--audit", "--format", "json")
    assert r.exit_code == 0, r.output
    audit = json.loads(r.stdout)["audit"]
    assert audit["certified_audited"] > 0 and audit["passed"]
    assert audit["tightness"] == {} and audit["tightness_not_broken"] is None
    t = run(ckpt, *FAST, "--audit")
    assert t.exit_code == 0, t.output
    assert "not measured (--tightness)" in t.output


def test_audit_exits_3_on_inflated_certificates(ckpt, monkeypatch, tmp_path):
    ds = _labels_from_predictions(ckpt)
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: ds)

    class Liar(certify.certificates.Certifier):
        def __call__(self, x, thresholds=()):
            logits, pred, margin, radius = super().__call__(x, thresholds)
            return logits, pred, margin, radius * 1000

    monkeypatch.setattr(certify.certificates, "Certifier", Liar)
    pngs = tmp_path / "png"
    r = run(ckpt, *FAST, "--audit", "--save-adversarials", pngs, "--output", tmp_path / "o")
    assert r.exit_code == EXIT_GATE, r.output
    assert "violation" in r.output
    rows = list(csv.DictReader(open(tmp_path / "o" / "radii.csv")))
    assert any(row["violation"] == "True" for row in rows)
    assert list(pngs.glob("violation_*.png"))


def test_save_adversarials_refuses_a_non_empty_folder(ckpt, tmp_path):
    folder = tmp_path / "adv"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    r = run(ckpt, "--limit", 2, *FAST, "--save-adversarials", folder)
    assert r.exit_code == 1
    assert "not empty" in r.output and len(r.output.strip().splitlines()) == 1
    assert (folder / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args, code, text", [
    (["--eps", "0"], 2, "eps"),
    (["--eps", "-1/255"], 2, "eps"),
    (["--eps", "abc"], 2, "eps"),
    (["--attack", "fgsm"], 2, "fgsm"),
    (["--steps", "0"], 2, "steps"),
])
def test_usage_errors(ckpt, args, code, text):
    r = run(ckpt, *args)
    assert r.exit_code == code and text in r.output


def test_missing_and_corrupt_files(tmp_path):
    r = run(tmp_path / "nope.safetensors")
    assert r.exit_code == 1 and "no such file" in r.output and len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    r = run(bad, "--dataset", "synthetic")
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_wrong_shape_empty_and_nan_data(ckpt, monkeypatch):
    small = ImageDataset("synthetic", "val", torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                         torch.zeros(2, dtype=torch.long), [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: small)
    r = run(ckpt, *FAST)
    assert r.exit_code == 1 and "16x16" in r.output and len(r.output.strip().splitlines()) == 1

    empty = ImageDataset("synthetic", "val", torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                         torch.zeros(0, dtype=torch.long), [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: empty)
    r = run(ckpt, *FAST)
    assert r.exit_code == 1 and "empty" in r.output

    class NaNData(torch.utils.data.Dataset):
        input_shape, num_classes, name = (3, 32, 32), 10, "nan"

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((3, 32, 32), float("nan")), 0

    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: NaNData())
    r = run(ckpt, *FAST)
    assert r.exit_code == 1 and "NaN" in r.output


def test_no_dataset_recorded_is_a_usage_error(tmp_path):
    from certify.models import create_model

    path = tmp_path / "nodata.safetensors"
    save(path, create_model("lipconvnet5", width=2))
    r = run(path, *FAST)
    assert r.exit_code == 2 and "--dataset" in r.output
