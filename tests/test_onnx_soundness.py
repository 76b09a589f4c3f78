"""The ONNX path is sound (issue 14, item 7): a certificate of an .onnx file comes from a bound
computed from the graph's own initializers, after the graph is verified to be exactly the one
lipcert writes for its layer plan; nothing the file claims is taken on trust unless the user opts
in, and the report then says so.

One LLN model (Lip pooling, HH2) is exported once; each test edits a copy of the file with the
``onnx`` package, as an attacker or a careless tool would.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

from certify.baked import bake
from certify.certificates import Certifier
from certify.checkpoint import save
from certify.loading import load, load_any
from certify.cli import cli
from certify.errors import CheckpointError, NotLipschitzError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from certify.export import BOUND_TRUSTED, BOUND_VERIFIED, export_onnx  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_export import images, make_model  # noqa: E402

SYN = 60  # synthetic pool recorded in the checkpoint: the CLI loads it instantly


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint path, ONNX path, the original model) of one LLN model."""
    folder = tmp_path_factory.mktemp("onnx-soundness")
    model = make_model("lln", "lip", "hh2")
    src = save(folder / "model.safetensors", model, dataset="synthetic", data_seed=3, synthetic_size=SYN,
               val_split=20)
    out = folder / "model.onnx"
    export_onnx(load(src), out, batch_size=4)
    return src, out, load(src)


def edited(src, dst, fn):
    proto = onnx.load(str(src))
    fn(proto)
    onnx.save(proto, str(dst))
    return dst


def initializer(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def set_initializer(proto, name, fn):
    t = initializer(proto, name)
    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))


def set_meta(proto, **values):
    for p in proto.metadata_props:
        if p.key in values:
            p.value = values[p.key]


# ---- edited initializers: the bound follows the graph's tensors ------------------------------------


def test_a_scaled_weight_changes_the_bound(exported, tmp_path):
    """Scaling a SOC filter by 10 (still exactly skew) multiplies the logits' scale; the bound is
    recomputed from the edited filter, so the radii do not stay those of the original."""
    _, out, model = exported
    bad = edited(out, tmp_path / "scaled.onnx", lambda p: set_initializer(p, "body.init-conv.skew", lambda a: a * 10))
    x = images(6, seed=2)
    ref, cert = Certifier(load_any(out)), Certifier(load_any(bad))
    assert cert.bound_source == BOUND_VERIFIED
    # the bound of the baked model with the same edit, computed independently
    baked = bake(model)
    with torch.no_grad():
        baked.body["init-conv"].skew.mul_(10)
    assert cert.feature_lipschitz == baked.feature_lipschitz_bound()
    assert cert.feature_lipschitz > 100 * ref.feature_lipschitz
    r_ref, r_bad = ref(x)[3], cert(x)[3]
    assert not torch.allclose(r_ref, r_bad)


def test_an_edited_head_row_changes_the_row_distances(exported, tmp_path):
    _, out, _ = exported
    bad = edited(out, tmp_path / "head.onnx", lambda p: set_initializer(p, "head.weight", lambda a: a * 3))
    ref, cert = Certifier(load_any(out)), Certifier(load_any(bad))
    assert torch.allclose(cert.row_distances, 3 * ref.row_distances, rtol=1e-6)
    assert cert.feature_lipschitz == ref.feature_lipschitz


def test_a_filter_that_is_no_longer_skew_is_refused(exported, tmp_path):
    _, out, _ = exported

    def poke(a):
        a[0, 1, 0, 0] += 1e-3
        return a

    bad = edited(out, tmp_path / "poked.onnx", lambda p: set_initializer(p, "body.init-conv.skew", poke))
    with pytest.raises(NotLipschitzError, match="skew"):
        Certifier(load_any(bad))


# ---- edited structure: refused ----------------------------------------------------------------


def _scale_output(proto):
    last = proto.graph.node[-1]
    last.output[0] = "unscaled"
    proto.graph.initializer.append(numpy_helper.from_array(torch.tensor(10.0).numpy(), "scale"))
    proto.graph.node.append(helper.make_node("Mul", ["unscaled", "scale"], ["logits"], name="attack"))


def _shift_conv(proto):
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    pads = next(a for a in conv.attribute if a.name == "pads")
    pads.ints[:] = [2, 2, 0, 0]  # same output size, shifted map


def _divisor(proto):
    div = next(n for n in proto.graph.node if n.op_type == "Div" and n.input[0].split("/")[-1].startswith("Conv"))
    set_initializer(proto, div.input[1], lambda a: a / 10)


def _swap_inputs(proto):
    sub = next(n for n in proto.graph.node if n.op_type == "Sub")
    sub.input[0], sub.input[1] = sub.input[1], sub.input[0]


def _fewer_terms(proto):
    plan = json.loads(next(p.value for p in proto.metadata_props if p.key == "baked_plan"))
    plan["layers"][0]["terms"] -= 1
    set_meta(proto, baked_plan=json.dumps(plan))


def _extra_initializer(proto):
    proto.graph.initializer.append(numpy_helper.from_array(torch.zeros(3).numpy(), "unused"))


@pytest.mark.parametrize("edit,what", [
    (_scale_output, "node"),
    (_shift_conv, "node"),
    (_divisor, "initializer 'const/"),
    (_swap_inputs, "node"),
    (_fewer_terms, "node"),
    (_extra_initializer, "initializers differ"),
])
def test_an_edited_graph_is_refused(exported, tmp_path, edit, what):
    _, out, _ = exported
    bad = edited(out, tmp_path / "bad.onnx", edit)
    with pytest.raises(CheckpointError, match="not the graph lipcert writes") as info:
        load_any(bad)
    assert what in str(info.value) and "--trust-onnx-bound" in str(info.value)


def test_an_unchanged_file_read_and_written_by_onnx_still_verifies(exported, tmp_path):
    """The control for the refusals above: a plain onnx.load / onnx.save keeps the graph."""
    _, out, _ = exported
    same = edited(out, tmp_path / "same.onnx", lambda p: None)
    assert load_any(same).bound_source == BOUND_VERIFIED


def test_onnxruntime_is_cross_checked_against_the_rebuilt_model(exported, tmp_path, monkeypatch):
    """The second line of defence: were the graph comparison blind to an edit, onnxruntime's
    logits would differ from the rebuilt model's and the file would still be refused."""
    import certify.onnx_graph

    _, out, _ = exported
    bad = edited(out, tmp_path / "scaled-output.onnx", _scale_output)
    monkeypatch.setattr(certify.onnx_graph, "model_difference", lambda expected, actual: None)
    with pytest.raises(CheckpointError, match="onnxruntime's logits differ from the model rebuilt"):
        load_any(bad)


def test_a_verified_graph_evaluates_float64_batches_in_float64(exported, foreign):
    """For a float64 re-check of float32 margins: the verified graph's function in float64
    arithmetic (the rebuilt model), never onnxruntime's float32 answer cast up."""
    _, out, model = exported
    onnx_model = load_any(out)
    assert onnx_model.evaluates_float64
    x = images(3, seed=8)
    got64, got32 = onnx_model(x.double()), onnx_model(x)
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(got64, bake(model)(x.double()))
    assert float((got64 - got32.double()).abs().max()) < 1e-5
    assert not load_any(foreign[1], onnx_bound="none").evaluates_float64


# ---- the metadata is never the bound ------------------------------------------------------------


def test_metadata_that_claims_a_smaller_bound_is_ignored(exported, tmp_path):
    _, out, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    dist = [[d / 100 for d in row] for row in json.loads(meta["pairwise_row_distances"])]
    layers = [{**b, "bound": b["bound"] / 100} for b in json.loads(meta["layer_bounds"])]
    small = dict(lipschitz_bound=repr(float(meta["lipschitz_bound"]) / 100),
                 feature_lipschitz_bound=repr(float(meta["feature_lipschitz_bound"]) / 100),
                 pairwise_row_distances=json.dumps(dist), layer_bounds=json.dumps(layers))
    bad = edited(out, tmp_path / "claims.onnx", lambda p: set_meta(p, **small))
    x = images(5, seed=4)
    ref, cert = Certifier(load_any(out)), Certifier(load_any(bad))
    assert cert.feature_lipschitz == ref.feature_lipschitz
    assert torch.equal(cert.row_distances, ref.row_distances)
    assert torch.equal(cert(x)[3], ref(x)[3])
    # Opting in to trust changes nothing for a graph that verifies: its bound is computed.
    assert load_any(bad, onnx_bound="trust").bound_source == BOUND_VERIFIED


def test_trusting_the_stored_bound_is_an_explicit_opt_in(exported, tmp_path):
    _, out, _ = exported
    bad = edited(out, tmp_path / "bad.onnx", _shift_conv)
    model = load_any(bad, onnx_bound="trust")
    assert model.bound_source == BOUND_TRUSTED
    cert = Certifier(model)
    stored = {p.key: p.value for p in onnx.load(str(bad)).metadata_props}
    assert cert.bound_source == BOUND_TRUSTED
    assert cert.feature_lipschitz == float(stored["feature_lipschitz_bound"])


def test_an_export_of_an_older_lipcert_needs_the_opt_in(exported, tmp_path):
    """A file without lipcert's graph format (an export by torch.onnx in lipcert <= 0.x) has no
    graph lipcert can check."""
    _, out, _ = exported

    def drop_format(proto):
        keep = [p for p in proto.metadata_props if p.key != "graph_format"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(keep)

    old = edited(out, tmp_path / "old.onnx", drop_format)
    with pytest.raises(CheckpointError, match="no graph format recorded"):
        load_any(old)
    assert load_any(old, onnx_bound="trust").bound_source == BOUND_TRUSTED


# ---- a foreign graph ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A plain nn.Sequential exported by torch.onnx (fixed batch of 2, as torch.onnx writes it)."""
    from torch import nn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 10)).eval()
    path = tmp_path_factory.mktemp("foreign") / "foreign.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        for dynamo in (False, True):  # the TorchScript exporter is faster, where this torch still has it
            try:
                torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(path), dynamo=dynamo,
                                  input_names=["x"], output_names=["y"])
                break
            except Exception:
                if dynamo:
                    raise
    return net, path


def test_a_foreign_graph_is_bounded_from_its_own_weights_and_has_no_bound_to_trust(foreign):
    from certify.foreign import bound_module

    net, path = foreign
    model = load_any(path)  # translated op for op and checked against onnxruntime (certify.foreign_onnx)
    assert "ONNX graph built elsewhere" in model.bound_source and model.certificate == "pairwise"  # it ends in a dense layer
    ref = bound_module(net, (3, 32, 32))
    assert model.feature_lipschitz_bound() == pytest.approx(ref.feature_lipschitz, rel=1e-9)
    with pytest.raises(CheckpointError, match="without lipcert metadata"):
        load_any(path, onnx_bound="trust")  # it stores no bound to trust


def test_a_foreign_graph_with_a_user_bound(foreign):
    net, path = foreign
    model = load_any(path, onnx_bound="none")
    assert model.input_shape == (3, 32, 32) and model.num_classes == 10
    with pytest.raises(NotLipschitzError, match="--lipschitz"):
        Certifier(model)
    cert = Certifier(model, lipschitz=50.0)
    assert cert.bound_source == "user-supplied"
    x = images(5, seed=7)  # an odd count: the fixed batch of 2 runs in padded chunks
    logits, _, margin, radius = cert(x)
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-5)
    assert torch.allclose(radius, margin / (math.sqrt(2) * 50.0))


def run(*args):
    return CliRunner().invoke(cli, ["certify", *[str(a) for a in args]])


def test_cli_refuses_a_foreign_graph_and_marks_the_opt_ins(foreign, exported, tmp_path):
    _, path = foreign
    # another tool's graph: translated op for op, checked against onnxruntime, bounded from its own
    # weights (certify.foreign_onnx; it was refused before lipcert could bound foreign graphs)
    r = run(path, "--dataset", "synthetic", "--limit", "4", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "translated op for op" in json.loads(r.stdout)["certificate"]["bound_source"]
    r = run(path, "--dataset", "synthetic", "--limit", "4", "--lipschitz", "50", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["certificate"]["bound_source"] == "user-supplied"
    # an edited lipcert graph with --trust-onnx-bound: certified, and the report says how
    _, out, _ = exported
    bad = edited(out, tmp_path / "bad.onnx", _shift_conv)
    assert run(bad, "--limit", "4").exit_code == 1
    r = run(bad, "--limit", "4", "--trust-onnx-bound", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["certificate"]["bound_source"] == BOUND_TRUSTED
    assert "trusted from the file" in r.stderr


def test_cli_certifies_the_onnx_file_like_its_checkpoint(exported, tmp_path):
    """Checkpoint, ONNX export and baked safetensors export of the same model: same images (the
    data keys travel with the export), same certified accuracy; no note claims that a baked
    file's bound is read from the file (it is computed from its tensors)."""
    from certify.export import export_safetensors

    src, out, model = exported
    baked = tmp_path / "baked.safetensors"
    export_safetensors(model, baked)
    results = []
    for path in (src, out, baked):
        r = run(path, "--format", "json", "--eps", "0.01", "--eps", "0.05")
        assert r.exit_code == 0, r.output
        assert "read from the file" not in r.stderr and "not recomputed" not in r.stderr, r.stderr
        results.append(json.loads(r.stdout))
    ref = results[0]
    for other in results[1:]:
        assert other["counts"] == ref["counts"] and ref["counts"]["total"] == 20
        assert other["certified_accuracy"] == ref["certified_accuracy"]
    assert results[1]["certificate"]["bound_source"] == BOUND_VERIFIED


# ---- the translation itself -----------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 21])
def test_every_supported_opset_verifies(tmp_path, opset):
    model = make_model("ortho", "lip", "hh1")
    out = tmp_path / "m.onnx"
    export_onnx(model, out, batch_size=2, opset=opset)
    loaded = load_any(out)
    assert loaded.bound_source == BOUND_VERIFIED
    assert Certifier(loaded).lipschitz == pytest.approx(Certifier(bake(model)).lipschitz, rel=0)


def test_atan2_and_remainder_match_torch():
    """ONNX has no atan2: the quadrant logic must agree with torch's on signed zeros, axes, tiny
    and huge values, and the remainder with torch.remainder."""
    import onnxruntime as ort
    from onnx import TensorProto

    from certify.onnx_graph import _Graph

    g = _Graph({})
    angle = g.atan2("y", "x")
    g.op("Identity", angle, output="angle")
    g.op("Identity", g.remainder(g.op("Sub", angle, g.f32(1.25)), 2 * math.pi), output="rem")
    vals = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, 3.5, -2.25]
    grid = torch.tensor([(a, b) for a in vals for b in vals], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    pts = torch.cat([grid, torch.randn(4000, 2, generator=gen)])
    y, x = pts[:, 0].contiguous(), pts[:, 1].contiguous()
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("y", "x", "angle", "rem")]
    graph = helper.make_graph(g.nodes, "t", info[:2], info[2:], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got, rem = (torch.from_numpy(a) for a in sess.run(["angle", "rem"], {"y": y.numpy(), "x": x.numpy()}))
    want = torch.atan2(y, x)
    # At the origin every branch of HH2 and Lip pooling gives 0, so its angle does not matter
    # (torch: +-0 or +-pi by the zeros' signs). On the negative axis +-pi are the same angle.
    keep = (y != 0) | (x != 0)
    on_cut = (y == 0) & (x < 0)
    assert torch.allclose(got[keep & ~on_cut], want[keep & ~on_cut], atol=4e-7, rtol=0)
    assert torch.allclose(got[on_cut].abs(), want[on_cut].abs(), atol=4e-7, rtol=0)
    want_rem = torch.remainder(want - 1.25, 2 * math.pi)
    close = (rem - want_rem).abs() <= 1e-6
    wrapped = ((rem - want_rem).abs() - 2 * math.pi).abs() <= 1e-5  # the same angle across 0 / 2 pi
    assert (close | wrapped)[keep].all()
