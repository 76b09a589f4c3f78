"""Baking and export (issue 6): baked PyTorch models and ONNX models give the original's logits
and certificates; metadata survives; bad inputs give one-line errors.

The ONNX tests share one exported model (LLN head, Lip pooling, HH2: the head with the most
metadata and the layers with the most unusual ops) in a module fixture; an ONNX export takes about
a second (lipcert's own graph), the remaining head/pooling variants run under `slow`. The
soundness of the ONNX path (edited or foreign graphs) is tested in test_onnx_soundness.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from certify.baked import BakedLipNet, bake, save_baked
from certify.layers.soc import BakedMatrix, BakedSOC
from certify.certificates import Certifier, certified_mask, certify_dataset
from certify.checkpoint import save
from certify.loading import load, load_any
from certify.cli import cli
from certify.errors import CheckpointError, ExportError, NotLipschitzError
from certify.export import BOUND_VERIFIED
from certify.lipschitz import product

SQRT2 = math.sqrt(2.0)


def make_model(head="ortho", pooling="max", activation="maxmin", seed=0, **kwargs):
    """A tiny seeded LipConvnet-5 whose angles and biases are moved off their init values, so
    that every branch of HH1/HH2/Lip pooling and nonzero biases are exercised."""
    from certify.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("lipconvnet5", width=4, head=head, pooling=pooling, activation=activation, **kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("theta", "theta0", "theta1", "theta2")):
                    p.add_(torch.randn_like(p))
                elif name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def images(n, seed=1, shape=(3, 32, 32)):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def radius_tolerance(cert: Certifier, logit_diff: float) -> float:
    """How far two radii may differ when their logits differ by at most ``logit_diff``: a margin
    (or a pairwise gap) moves by at most 2 * logit_diff, divided by the certificate's scale."""
    if cert.method == "global":
        return 2 * logit_diff / (SQRT2 * cert.lipschitz)
    dist = cert.row_distances.clone()
    dist.fill_diagonal_(math.inf)
    return 2 * logit_diff / (cert.feature_lipschitz * float(dist.min()))


def assert_radii_match(r_ref, r_new, cert_ref, logit_diff, rel=1e-5):
    tol = rel * r_ref.abs() + radius_tolerance(cert_ref, logit_diff) + 1e-12
    assert ((r_ref - r_new).abs() <= tol).all(), (r_ref - r_new).abs().max()


# ---- baking ----------------------------------------------------------------------------------

# Every head x pooling pair and every activation, in four models (all 12 under `slow`).
VARIANTS = [("ortho", "max", "maxmin"), ("ortho", "lip", "hh2"), ("lln", "max", "hh1"), ("lln", "lip", "hh2")]
ALL_VARIANTS = [(h, p, a) for h in ("ortho", "lln") for p in ("max", "lip") for a in ("maxmin", "hh1", "hh2")]


def check_bake(head, pooling, activation):
    """Bounds cost ~1 s per computation on a busy 2-core machine: each is computed once."""
    model = make_model(head, pooling, activation)
    x = images(6)
    with torch.no_grad():
        want = model(x)
    cert = Certifier(model)
    r_want = cert(x)[3]
    scale = cert.lipschitz if cert.method == "global" else cert.feature_lipschitz

    # Taylor-baked 1x1 layers: the original's own computation, bit for bit.
    exact = bake(model, one_by_one="taylor")
    with torch.no_grad():
        assert torch.equal(exact(x), want)
    cert_exact = Certifier(exact)
    assert (cert_exact.lipschitz or cert_exact.feature_lipschitz) == pytest.approx(scale, rel=1e-12)
    assert torch.allclose(cert_exact(x)[3], r_want, rtol=1e-5, atol=0)

    # Default: 1x1 layers as one matrix exp(A); bound from that matrix.
    baked = bake(model)
    with torch.no_grad():
        got = baked(x)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5
    cert_baked = Certifier(baked)
    assert (cert_baked.lipschitz or cert_baked.feature_lipschitz) == pytest.approx(scale, rel=1e-5)
    assert_radii_match(r_want, cert_baked(x)[3], cert, diff)
    return baked


@pytest.mark.parametrize("head,pooling,activation", VARIANTS)
def test_bake_matches_original(head, pooling, activation):
    check_bake(head, pooling, activation)


@pytest.mark.slow
@pytest.mark.parametrize("head,pooling,activation", ALL_VARIANTS)
def test_bake_matches_original_all_variants(head, pooling, activation):
    check_bake(head, pooling, activation)


def test_bake_mlp_head():
    pytest.importorskip("certify.layers.mlp_head", reason="the MLP head (certify/mlp_head.py) has not landed")
    model = make_model("mlp", "lip", "hh1", mlp_hidden=32)
    baked = bake(model)
    x = images(4)
    with torch.no_grad():
        assert float((baked(x) - model(x)).abs().max()) <= 1e-5
    cert, cert_baked = Certifier(model), Certifier(baked)
    assert cert_baked.method == "curvature"
    assert cert_baked.feature_lipschitz == pytest.approx(cert.feature_lipschitz, rel=1e-5)
    r_want, r_got = cert(x)[3], cert_baked(x)[3]
    assert torch.allclose(r_got, r_want, rtol=1e-5, atol=1e-7)


def test_baked_model_is_inference_only():
    model = make_model("ortho", "lip", "hh2")
    baked = bake(model)
    from certify.layers.soc import SOC

    assert not any(isinstance(m, SOC) for m in baked.modules())
    assert not any(p.requires_grad for p in baked.parameters())
    keys = list(baked.state_dict())
    assert not any(k.rsplit(".", 1)[-1] in {"u1", "v1", "u4", "v4"} for k in keys), keys  # no power-iteration state
    assert isinstance(baked.body["block5-conv0"], BakedMatrix)
    assert isinstance(baked.body["init-conv"], BakedSOC)
    # Training mode changes nothing: there is no training-time path left.
    x = images(3)
    with torch.no_grad():
        y_eval = baked(x)
        baked.train()
        y_train = baked(x)
    assert torch.equal(y_eval, y_train)
    # The original is left untouched and still trainable.
    assert all(p.requires_grad for p in model.parameters())


def test_baked_bounds_are_upper_bounds():
    """Each baked 1x1 matrix's bound covers its exact float64 spectral norm, and the baked
    model's bound covers ||J(x)^T u|| (a lower bound on its Lipschitz constant) at random points."""
    baked = bake(make_model("lln", "lip", "hh2"))
    n_matrix = 0
    for layer in baked.modules():
        if isinstance(layer, BakedMatrix):
            exact = float(torch.linalg.matrix_norm(layer.weight.double(), ord=2))
            assert exact <= layer.lipschitz_bound() <= exact * (1 + 1e-6)
            n_matrix += 1
    assert n_matrix == 1  # block 5's 1x1 SOC (the LLN head is not a SOC)
    bound = baked.lipschitz_bound()
    gen = torch.Generator().manual_seed(0)
    x = images(4).requires_grad_(True)
    u = torch.randn(4, 10, generator=gen)
    u = u / u.norm(dim=1, keepdim=True)
    (grad,) = torch.autograd.grad((baked(x) * u).sum(), x)
    lower = float(grad.flatten(1).norm(dim=1).max())
    assert 0 < lower <= bound


def test_baked_soc_refuses_an_altered_filter():
    baked = bake(make_model())
    layer = baked.body["init-conv"]
    with torch.no_grad():
        layer.skew[0, 1, 0, 0] += 1e-3  # no longer skew-symmetric: 1 + a^K/K! would be unsound
    with pytest.raises(NotLipschitzError, match="skew"):
        baked.lipschitz_bound()


# ---- baked safetensors -----------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    def make(head="lln", pooling="lip", activation="hh2", name="model.safetensors"):
        model = make_model(head, pooling, activation)
        path = tmp_path / name
        save(path, model, class_names=[f"c{i}" for i in range(10)], dataset="synthetic", seed=3)
        return path

    return make


def test_safetensors_export_round_trip(checkpoint, tmp_path):
    from certify.export import export_safetensors

    src = checkpoint("ortho", "lip", "hh1")
    model = load(src)
    out = tmp_path / "baked.safetensors"
    report = export_safetensors(model, out)
    assert report.max_abs_logit_diff <= 1e-5
    again = load_any(out)
    assert isinstance(again, BakedLipNet)
    assert again.class_names == [f"c{i}" for i in range(10)]
    assert again.checkpoint_metadata["checkpoint_kind"] == "baked"
    assert again.checkpoint_metadata["dataset"] == "synthetic"
    assert again.model_name == "lipconvnet5"
    x = images(5)
    with torch.no_grad():
        diff = float((again(x) - model(x)).abs().max())
    assert diff <= 1e-5
    cert = Certifier(model)
    assert_radii_match(cert(x)[3], Certifier(again)(x)[3], cert, diff)
    # A baked checkpoint can be saved again and reloaded unchanged.
    save_baked(tmp_path / "again.safetensors", again)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "again.safetensors")(x), again(x))


def test_loading_a_baked_checkpoint_needs_no_training_code(checkpoint, tmp_path):
    from certify.export import export_safetensors

    out = tmp_path / "baked.safetensors"
    export_safetensors(load(checkpoint("lln", "max", "maxmin")), out)
    code = (
        "import sys, torch\n"
        "from certify.loading import load\n"
        f"m = load({str(out)!r})\n"
        "m(torch.rand(2, 3, 32, 32))\n"
        "bad = [k for k in ('certify.train', 'certify.data', 'certify.attacks', 'certify.soc_train',"
        " 'certify.models.lipconvnet') if k in sys.modules]\n"
        "print(type(m).__name__, bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "BakedLipNet []"


def test_export_fails_beyond_tolerance_and_writes_nothing(checkpoint, tmp_path):
    from certify.export import export_safetensors

    model = load(checkpoint("ortho", "max", "maxmin"))
    out = tmp_path / "baked.safetensors"
    # The matrix exp(A) differs from the original's 15-term series by float rounding (> 0).
    with pytest.raises(ExportError, match="tolerance"):
        export_safetensors(model, out, tolerance=0.0)
    assert not out.exists()
    assert not list(tmp_path.glob(".baked*"))  # no temporary file left behind


# ---- CLI: bad inputs ----------------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result):
    """Exit code 1 and a single ``error:`` line (progress lines on stderr may precede it)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, lines
    return lines[-1]


def test_cli_missing_checkpoint(tmp_path):
    res = run_cli("export", str(tmp_path / "nope.safetensors"), "--format", "safetensors",
                  "-o", str(tmp_path / "out.safetensors"))
    assert "no such file" in one_line_error(res)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    res = run_cli("export", str(bad), "--format", "safetensors", "-o", str(tmp_path / "out.safetensors"))
    assert "not a readable safetensors file" in one_line_error(res)


def test_cli_refuses_to_overwrite(checkpoint, tmp_path):
    src = checkpoint("ortho", "max", "maxmin")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    for fmt in ("safetensors", "onnx"):
        res = run_cli("export", str(src), "--format", fmt, "-o", str(out))
        assert "--overwrite" in one_line_error(res)
        assert out.read_bytes() == b"keep me"
    res = run_cli("export", str(src), "--format", "safetensors", "-o", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert "max |logit difference|" in res.output
    assert isinstance(load(out), BakedLipNet)


def test_cli_refuses_to_replace_its_input(checkpoint):
    src = checkpoint("ortho", "max", "maxmin")
    before = src.read_bytes()
    res = run_cli("export", str(src), "--format", "safetensors", "-o", str(src), "--overwrite")
    assert "replace the checkpoint" in one_line_error(res)
    assert src.read_bytes() == before


@pytest.fixture
def without(monkeypatch):
    """Simulate an uninstalled package: a ``None`` entry in sys.modules makes every import of it
    (``import x`` and ``importlib.import_module``) raise ModuleNotFoundError."""

    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)

    return hide


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_cli_export_without_the_extra(checkpoint, tmp_path, without, missing):
    src = checkpoint("ortho", "max", "maxmin")
    without(missing)
    res = run_cli("export", str(src), "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    text = one_line_error(res)
    assert f"'{missing}'" in text and "pip install 'lipcert[export]'" in text
    assert not (tmp_path / "m.onnx").exists()


def test_loading_onnx_without_onnxruntime(tmp_path, without):
    from certify.export import load_onnx_model

    (tmp_path / "m.onnx").write_bytes(b"whatever")
    without("onnxruntime")
    with pytest.raises(ExportError, match=r"'onnxruntime'.*pip install 'lipcert\[export\]'"):
        load_onnx_model(tmp_path / "m.onnx")


def test_load_onnx_bad_files(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from certify.export import load_onnx_model

    with pytest.raises(CheckpointError, match="no such file"):
        load_any(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_onnx_model(corrupt)
    # A valid ONNX model that lipcert did not export, and that is not an image classifier: refused.
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    with pytest.raises(CheckpointError, match=r"\(N, C, H, W\)"):
        load_any(foreign)


# ---- ONNX ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """One checkpoint (LLN, Lip pooling, HH2) exported to ONNX through the CLI."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("onnx")
    model = make_model("lln", "lip", "hh2")
    src = folder / "model.safetensors"
    save(src, model, class_names=[f"class-{i}" for i in range(10)], dataset="synthetic", seed=3)
    out = folder / "model.onnx"
    res = run_cli("export", str(src), "--format", "onnx", "-o", str(out), "--batch-size", "4", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    return src, out, report


def test_onnx_export_report(onnx_export):
    _, out, report = onnx_export
    assert out.exists()
    assert report["format"] == "onnx" and report["exporter"] == "lipcert" and report["opset"] == 17
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["certificate"] == "pairwise"
    print(f"ONNX export: {report['exporter']}, max |logit diff| {report['max_abs_logit_diff']:.3g}, "
          f"{report['seconds']:.1f} s")


def test_onnx_metadata_survives(onnx_export):
    from certify.export import read_onnx_metadata

    src, out, _ = onnx_export
    meta = read_onnx_metadata(out)
    original = load(src)
    baked = bake(original)
    assert meta["schema"] == "lipcert/1" and meta["format"] == "onnx"
    assert meta["model"] == "lipconvnet5"
    assert json.loads(meta["model_kwargs"]) == original.model_kwargs
    assert int(meta["num_classes"]) == 10
    assert json.loads(meta["class_names"]) == [f"class-{i}" for i in range(10)]
    assert json.loads(meta["input_shape"]) == [3, 32, 32]
    assert tuple(json.loads(meta["mean"])) == original.mean and tuple(json.loads(meta["std"])) == original.std
    assert meta["dataset"] == "synthetic" and json.loads(meta["seed"]) == 3
    assert meta["certificate"] == "pairwise" and meta["head_kind"] == "lln"
    assert meta["graph_format"] == "lipcert-onnx/1" and json.loads(meta["baked_plan"]) == baked.plan
    assert "1 + a^K/K!" in meta["lipschitz_bound_method"]
    # The bounds recorded at export are exactly those computed from the baked weights (which is what
    # lipschitz_bound() and feature_lipschitz_bound() multiply, in this order).
    bounds = baked.layer_bounds()
    assert float(meta["lipschitz_bound"]) == product(bounds)
    assert float(meta["feature_lipschitz_bound"]) == product(bounds[:-1])
    stored = torch.tensor(json.loads(meta["pairwise_row_distances"]), dtype=torch.float64)
    assert torch.equal(stored, baked.head.pairwise_row_distances())
    assert [(b["name"], b["bound"]) for b in json.loads(meta["layer_bounds"])] == [(b.name, b.bound) for b in bounds]


def test_onnx_logits_and_radii_match_pytorch(onnx_export):
    src, out, _ = onnx_export
    original = load(src)
    onnx_model = load_any(out)
    assert onnx_model.bound_source == BOUND_VERIFIED
    assert onnx_model.class_names == [f"class-{i}" for i in range(10)]
    cert = Certifier(original)
    via_ort = Certifier(onnx_model)
    assert via_ort.method == "pairwise" and via_ort.bound_source == BOUND_VERIFIED
    assert via_ort.feature_lipschitz == pytest.approx(cert.feature_lipschitz, rel=1e-5)
    for n in (1, 7):  # batch sizes other than the export's: the batch axis is dynamic
        x = images(n, seed=10 + n)
        with torch.no_grad():
            want = original(x)
        got = onnx_model(x)
        diff = float((got - want).abs().max())
        assert diff <= 1e-5, diff
        assert_radii_match(cert(x)[3], via_ort(x)[3], cert, diff)
    with pytest.raises(Exception, match="expected images of shape"):
        onnx_model(torch.rand(2, 3, 16, 16))


def test_certified_accuracy_through_onnx_equals_checkpoint(onnx_export):
    """The issue's "done when": certify the same images through onnxruntime and through the
    safetensors checkpoint; every certified / not-certified decision agrees (except radii within
    1e-6 of an eps, where float rounding may decide)."""
    from torch.utils.data import TensorDataset

    src, out, _ = onnx_export
    original = load(src)
    x = images(64, seed=5)
    with torch.no_grad():
        pred = original(x).argmax(1)
    labels = torch.where(torch.arange(64) % 4 == 0, (pred + 1) % 10, pred)  # 3/4 correct
    ds = TensorDataset(x, labels)
    radii = Certifier(original)(x)[3]
    # eps at quantiles of the radii, so that each splits the correct samples
    eps = [float(q) for q in torch.quantile(radii[labels == pred], torch.tensor([0.25, 0.5, 0.75], dtype=radii.dtype))]
    a = certify_dataset(original, ds, eps=eps, batch_size=16)
    b = certify_dataset(load_any(out), ds, eps=eps, batch_size=16)
    assert b.summary["certificate"]["bound_source"] == BOUND_VERIFIED
    ra = torch.tensor(a.samples["radius"].to_numpy())
    rb = torch.tensor(b.samples["radius"].to_numpy())
    correct = torch.tensor(a.samples["correct"].to_numpy())
    assert torch.equal(correct, torch.tensor(b.samples["correct"].to_numpy()))
    for e in eps:
        near = (ra - e).abs() <= 1e-6
        ma, mb = certified_mask(ra, correct, e), certified_mask(rb, correct, e)
        assert torch.equal(ma[~near], mb[~near])
        assert 0 < int(ma.sum()) < int(correct.sum())  # the comparison is not vacuous
    if not any(((ra - e).abs() <= 1e-6).any() for e in eps):
        assert a.summary["certified_accuracy"] == b.summary["certified_accuracy"]


@pytest.mark.slow  # ~45 s: builds the synthetic dataset and certifies twice through the CLI
def test_cli_certify_onnx_end_to_end(onnx_export, tmp_path):
    """`lipcert certify model.onnx` and `lipcert certify model.safetensors` report the same
    certified accuracy, the ONNX one's bound computed from its verified graph."""
    pytest.importorskip("certify.cli.certify_cmd", reason="the certify command has not landed")
    pytest.importorskip("certify.data", reason="the data module has not landed")
    src, out, _ = onnx_export
    results = []
    for path in (src, out):
        res = CliRunner().invoke(cli, ["certify", str(path), "--dataset", "synthetic", "--split", "val",
                                       "--limit", "48", "--format", "json", "--device", "cpu",
                                       "--eps", "0.01", "--eps", "0.05"])
        assert res.exit_code == 0, res.output
        results.append(json.loads(res.stdout[res.stdout.index("{"):]))
    ref, via_ort = results
    assert via_ort["certificate"]["bound_source"] == BOUND_VERIFIED
    assert ref["clean_accuracy"] == via_ort["clean_accuracy"]
    assert ref["certified_accuracy"] == via_ort["certified_accuracy"]


def check_onnx_round_trip(tmp_path, head, pooling, activation, one_by_one="matrix", **model_kwargs):
    pytest.importorskip("onnxruntime")
    from certify.export import export_onnx, read_onnx_metadata

    model = make_model(head, pooling, activation, **model_kwargs)
    out = tmp_path / "m.onnx"
    report = export_onnx(model, out, batch_size=4, one_by_one=one_by_one)
    assert report.max_abs_logit_diff <= 1e-4
    onnx_model = load_any(out)
    assert onnx_model.bound_source == BOUND_VERIFIED
    x = images(9)
    with torch.no_grad():
        diff = float((onnx_model(x) - model(x)).abs().max())
    assert diff <= 1e-5
    cert = Certifier(model)
    assert_radii_match(cert(x)[3], Certifier(onnx_model)(x)[3], cert, diff)
    assert read_onnx_metadata(out)["head_kind"] == head


@pytest.mark.parametrize("one_by_one", ["matrix", "taylor"])  # the orthogonal head as exp(A) or as a 1x1 SOC
def test_onnx_round_trip_orthogonal_head(tmp_path, one_by_one):
    check_onnx_round_trip(tmp_path, "ortho", "max", "maxmin", one_by_one)


def test_onnx_round_trip_compact_layout(tmp_path):
    """The budget preset's layout (blocks [1,2,2,2,1], 2x2 orthogonal downsampling, LLN head)
    exports with the same logits and radii."""
    check_onnx_round_trip(tmp_path, "lln", "max", "maxmin", blocks=[1, 2, 2, 2, 1], down_kernel=1)


@pytest.mark.slow
@pytest.mark.parametrize("head,pooling,activation", [v for v in ALL_VARIANTS if v != ("ortho", "max", "maxmin")])
@pytest.mark.parametrize("one_by_one", ["matrix", "taylor"])
def test_onnx_round_trip_variants(tmp_path, head, pooling, activation, one_by_one):
    check_onnx_round_trip(tmp_path, head, pooling, activation, one_by_one)


def test_onnx_export_refuses_mlp_head(tmp_path):
    pytest.importorskip("certify.layers.mlp_head", reason="the MLP head (certify/mlp_head.py) has not landed")
    pytest.importorskip("onnxruntime")
    from certify.export import export_onnx

    with pytest.raises(ExportError, match="MLP head"):
        export_onnx(make_model("mlp", "max", "maxmin", mlp_hidden=16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
