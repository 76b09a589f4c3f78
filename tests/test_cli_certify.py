"""`lipcert certify` end to end with click's CliRunner: reports, the gate's exit codes, and every
bad input giving a one-line error, the right exit code and never a certificate."""

from __future__ import annotations

import json
import struct

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from certify.checkpoint import save
from certify.cli import cli
from certify.cli._common import EXIT_ERROR, EXIT_GATE, EXIT_USAGE

SYN = 60  # synthetic pool size recorded in the checkpoint: small, so loading is instant


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from certify.models import create_model

    folder = tmp_path_factory.mktemp("certify")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lipconvnet5", width=2)
    path = save(folder / "m.safetensors", model, dataset="synthetic", data_seed=3, seed=9,
                synthetic_size=SYN, val_split=20)
    return path


def run(*args):
    return CliRunner().invoke(cli, ["certify", *[str(a) for a in args]])


def one_line_error(r, code, *fragments):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # a one-line message, no traceback
    for f in fragments:
        assert f in r.stderr, r.stderr
    assert "certified accuracy" not in r.stdout  # never a certificate
    assert "Traceback" not in r.output


def test_table_output_defaults_to_the_recorded_dataset_and_split(ckpt):
    r = run(ckpt)
    assert r.exit_code == 0, r.output
    for text in ("synthetic / val, 20 images", "computed from the weights", "36/255", "72/255", "108/255",
                 "clean accuracy", "certified accuracy"):
        assert text in r.stdout, r.stdout


def test_json_output_and_report_files(ckpt, tmp_path):
    out = tmp_path / "reports"
    r = run(ckpt, "--format", "json", "--eps", "0.01", "--eps", "1/255", "--output", out, "--limit", "12")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["counts"]["total"] == 12 and data["dataset"]["name"] == "synthetic"
    assert list(data["certified_accuracy"]) == ["1/255", "0.01"]
    assert data["certificate"]["bound_source"] == "computed from the weights"
    assert data["config"]["seed"] == 3  # the checkpoint's data seed, for the same validation images
    df = pd.read_csv(out / "samples.csv")
    assert len(df) == 12 and {"certified_0.01", "certified_1/255", "radius", "margin"} <= set(df.columns)
    assert json.loads((out / "summary.json").read_text())["counts"] == data["counts"]
    assert (out / "radius_curve.png").stat().st_size > 1000
    assert "wrote" in r.stderr


def test_csv_and_markdown_formats(ckpt):
    r = run(ckpt, "--format", "csv", "--limit", "8")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("eps,eps_value,certified,total,certified_accuracy") and len(lines) == 4
    r = run(ckpt, "--format", "markdown", "--limit", "8")
    assert r.exit_code == 0 and "| 36/255 |" in r.stdout and r.stdout.startswith("### lipcert certify")


def test_gate_exit_codes(ckpt, tmp_path):
    r = run(ckpt, "--format", "json", "--eps", "0.001")
    acc = 100 * json.loads(r.stdout)["certified_accuracy"]["0.001"]
    assert 0 < acc < 100, "the tiny model should certify some but not all images at 0.001"
    r = run(ckpt, "--fail-under", f"{acc}@0.001")
    assert r.exit_code == 0, r.output
    assert "passed" in r.stderr
    out = tmp_path / "gated"
    r = run(ckpt, "--fail-under", f"{acc + 0.5}@0.001", "--fail-under", "0@36/255", "--output", out)
    assert r.exit_code == EXIT_GATE, r.output
    assert f"gate {acc + 0.5:g}@0.001 FAILED" in r.stderr and "gate 0@36/255 passed" in r.stderr
    assert "certified accuracy" in r.stdout  # results are printed first ...
    assert (out / "summary.json").exists()  # ... and written
    assert json.loads((out / "summary.json").read_text())["gates"][0]["passed"] is False


def test_gate_eps_is_added_to_the_report(ckpt):
    r = run(ckpt, "--format", "json", "--limit", "4", "--fail-under", "0@0.2")
    assert r.exit_code == 0, r.output
    assert "0.2" in json.loads(r.stdout)["certified_accuracy"]


@pytest.mark.parametrize("args,fragment", [
    (["--eps", "0"], "--eps"), (["--eps", "-1"], "--eps"), (["--eps", "abc"], "malformed eps"),
    (["--eps", "1/0"], "malformed eps"), (["--fail-under", "60"], "PCT@EPS"),
    (["--fail-under", "60@0"], "--fail-under"), (["--fail-under", "120@0.1"], "[0, 100]"),
    (["--format", "xml"], "--format"), (["--limit", "0"], "--limit"), (["--batch-size", "0"], "--batch-size"),
    (["--split", "holdout"], "--split"),
])
def test_usage_errors_exit_2(ckpt, args, fragment):
    r = run(ckpt, *args)
    assert r.exit_code == EXIT_USAGE, r.output
    assert fragment in r.stderr and "certified accuracy" not in r.stdout


def _file(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _safetensors_with(meta: dict[str, str], tensors=None):
    from safetensors.torch import save as st_save

    return st_save(tensors or {"w": torch.zeros(2)}, metadata=meta)


def test_not_a_safetensors_file(tmp_path):
    one_line_error(run(_file(tmp_path, "m.safetensors", b"this is not a model at all")), EXIT_ERROR,
                   "not a readable safetensors file")


def test_a_truncated_file(ckpt, tmp_path):
    data = ckpt.read_bytes()
    one_line_error(run(_file(tmp_path, "t.safetensors", data[: len(data) // 2])), EXIT_ERROR, "t.safetensors")
    # a header that claims more bytes than the file holds
    header = struct.unpack("<Q", data[:8])[0]
    one_line_error(run(_file(tmp_path, "h.safetensors", data[: 8 + header // 2])), EXIT_ERROR, "h.safetensors")


def test_safetensors_without_lipcert_metadata(tmp_path):
    one_line_error(run(_file(tmp_path, "plain.safetensors", _safetensors_with({}))), EXIT_ERROR,
                   "without lipcert metadata")


def test_unknown_schema_version(ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    meta["schema"] = "lipcert/99"
    p = _file(tmp_path, "s.safetensors", _safetensors_with(meta, load_file(str(ckpt))))
    one_line_error(run(p), EXIT_ERROR, "unknown schema version", "lipcert/99")


def test_model_not_in_the_registry(ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    meta["model"] = "lipconvnet6"
    p = _file(tmp_path, "u.safetensors", _safetensors_with(meta, load_file(str(ckpt))))
    one_line_error(run(p), EXIT_ERROR, "unknown model 'lipconvnet6'")


def test_weights_that_do_not_fit(ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    meta["model_kwargs"] = json.dumps({"width": 4})  # the tensors are for width 2
    p = _file(tmp_path, "w.safetensors", _safetensors_with(meta, load_file(str(ckpt))))
    one_line_error(run(p), EXIT_ERROR, "weights do not fit")


def test_a_pickle_is_refused(tmp_path):
    one_line_error(run(_file(tmp_path, "m.pt", b"\x80\x04N.")), EXIT_ERROR, "pickled checkpoints")


def test_missing_file_and_unknown_dataset(ckpt, tmp_path):
    one_line_error(run(tmp_path / "nope.safetensors"), EXIT_ERROR, "no such file")
    one_line_error(run(ckpt, "--dataset", "imagenet"), EXIT_ERROR, "unknown dataset 'imagenet'")


def _fake_cifar(root):
    """A CIFAR-10 folder in the official python-batch layout, with a few images per batch."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def test_images_of_the_wrong_size_or_channels(tmp_path):
    from certify.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lipconvnet5", width=2, in_channels=1, input_size=28)
    ckpt = save(tmp_path / "mnist.safetensors", model, dataset="mnist")
    root = _fake_cifar(tmp_path / "data")
    one_line_error(run(ckpt, "--dataset", "cifar10", "--data-dir", root, "--split", "test"), EXIT_ERROR,
                   "3x32x32", "1x28x28")


def _patch_data(monkeypatch, images, labels):
    from torch.utils.data import TensorDataset

    import certify.data

    ds = TensorDataset(images, labels)
    ds.name, ds.split, ds.num_classes, ds.fingerprint = "custom", "val", 10, "x"
    monkeypatch.setattr(certify.data, "load_dataset", lambda *a, **k: ds)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels(ckpt, monkeypatch, value):
    x = torch.rand(5, 3, 32, 32)
    x[3, 1, 2, 2] = value
    _patch_data(monkeypatch, x, torch.zeros(5, dtype=torch.long))
    one_line_error(run(ckpt), EXIT_ERROR, "sample 3", "non-finite")


def test_empty_dataset(ckpt, monkeypatch):
    _patch_data(monkeypatch, torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    one_line_error(run(ckpt), EXIT_ERROR, "empty")


def test_a_model_that_is_not_lipschitz_needs_a_user_bound(ckpt, monkeypatch):
    import certify.loading

    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    plain.input_shape, plain.num_classes = (3, 32, 32), 10
    monkeypatch.setattr(certify.loading, "load_any", lambda *a, **k: plain)
    _patch_data(monkeypatch, torch.rand(6, 3, 32, 32), torch.zeros(6, dtype=torch.long))
    one_line_error(run(ckpt, "--dataset", "synthetic"), EXIT_ERROR, "not a lipcert 1-Lipschitz model")
    r = run(ckpt, "--dataset", "synthetic", "--lipschitz", "50", "--format", "json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["certificate"]
    assert c["bound_source"] == "user-supplied" and c["lipschitz_upper_bound"] == 50.0
    assert "user-supplied" in r.stderr
    assert "--eval fast applies to SOC layers" not in r.stderr  # the default path, not asked for: no note
    r = run(ckpt, "--dataset", "synthetic", "--lipschitz", "50", "--eval", "fast")
    assert r.exit_code == 0 and "--eval fast applies to SOC layers" in r.stderr


def test_fast_evaluation_is_the_default_and_taylor_stays_available(ckpt):
    for args, expected in (([], "fast"), (["--eval", "taylor"], "taylor")):
        r = run(ckpt, "--format", "json", "--limit", "4", *args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["config"]["eval"] == expected
    help_text = " ".join(CliRunner().invoke(cli, ["certify", "--help"]).output.split())
    assert "[default: fast]" in help_text and "taylor: the paper's 15-term Taylor series" in help_text


def test_help_documents_exit_codes():
    r = CliRunner().invoke(cli, ["certify", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Exit codes: 0 success" in text and "3 a --fail-under gate failed" in text


def test_train_then_certify_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--model", "lipconvnet5", "--width", "2", "--synthetic-size", "40",
                                 "--batch-size", "12", "--epochs", "1", "--device", "cpu", "--no-progress",
                                 "--output", str(out)])
    assert r.exit_code == 0, r.output
    r = run(out / "model.safetensors", "--output", tmp_path / "rep", "--fail-under", "0@36/255")
    assert r.exit_code == 0, r.output
    assert "synthetic / val" in r.stdout
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"samples.csv", "summary.json", "radius_curve.png"}
    r = run(out / "model.safetensors", "--fail-under", "100@36/255")
    assert r.exit_code == EXIT_GATE


def test_gates_and_format_from_environment_variables(ckpt):
    r = CliRunner().invoke(cli, ["certify", str(ckpt)],
                           env={"LIPCERT_CERTIFY_FAIL_UNDER": "100@0.001 0@0.5", "LIPCERT_CERTIFY_FORMAT": "csv",
                                "LIPCERT_CERTIFY_LIMIT": "4"})
    assert r.exit_code == EXIT_GATE, r.output
    assert r.stdout.startswith("eps,") and "0.001," in r.stdout
    # each verdict is exactly one line, whatever the terminal width (CI logs are grepped)
    assert any(ln.startswith("gate 100@0.001 FAILED") and ln.endswith("required >= 100%")
               for ln in r.stderr.splitlines())


def test_curvature_quick_certificate_of_an_mlp_head(tmp_path):
    from certify.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lipconvnet5_mlp", width=2, mlp_hidden=16)
    path = save(tmp_path / "mlp.safetensors", model, dataset="synthetic", data_seed=3, seed=9,
                synthetic_size=SYN, val_split=20)
    for method in ("curvature", "curvature-quick"):
        r = run(path, "--certificate", method, "--limit", "8", "--format", "json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["certificate"]["method"] == method
    r = run(path, "--certificate", "pairwise", "--limit", "8")
    one_line_error(r, 1, "LLN head")  # a certificate the model cannot have: a runtime error, like other model misfits
