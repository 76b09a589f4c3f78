"""The CVPR'24 comparison's ConvNet family (models/convnet.py): every registered convolution in
the same network, sound bounds, baking and export, the static facts `lipcert models` lists."""

from __future__ import annotations

import json

import pytest
import torch

from certify.errors import ConfigError
from certify.layers import list_layers
from certify.lipschitz import empirical_lower_bound
from certify.models import create_model, model_facts


def _tiny(layer="soc", head="layer", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("convnet_xs", width=4, layer=layer, head=head, **kw)


def test_the_layout_is_the_papers():
    m = _tiny()
    names = m.layer_names
    assert names[:3] == ["stem.pad", "stem.conv", "stem.act"]
    assert sum(n.startswith("block0.conv") for n in names) == 5 and len([n for n in names if ".conv" in n]) == 26
    # 4 -> 8 -> 16 -> 32 -> 64 -> 128 channels, 32x32 -> 1x1: the head sees 32 w features
    assert m.num_features == 128
    assert m.body["block4-conv0"].kernel_size == 1 and m.body["block3-conv0"].kernel_size == 3
    x = torch.rand(3, 3, 32, 32)
    assert m.eval()(x).shape == (3, 10)


@pytest.mark.parametrize("head", ["layer", "lln"])
def test_bound_is_sound_and_the_certificate_follows_the_head(head):
    from certify.certificates import Certifier

    m = _tiny(head=head).eval()
    cert = Certifier(m)
    assert cert.method == ("global" if head == "layer" else "pairwise")
    x = torch.rand(4, 3, 32, 32)
    lower = empirical_lower_bound(m if head == "layer" else m.features, x, iters=5)
    upper = m.lipschitz_bound() if head == "layer" else m.feature_lipschitz_bound()
    assert lower <= upper * (1 + 1e-6)


def test_facts_match_the_built_model_and_are_cheap():
    f = model_facts("convnet_xs", width=4, layer="soc")
    m = _tiny()
    assert f["parameters"] == sum(p.numel() for p in m.parameters())
    assert (f["family"], f["size"], f["layer"], f["certificate"]) == ("ConvNet", "XS", "soc", "global")
    assert model_facts("convnet_m")["width"] == 64


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="convolution"):
        _tiny(layer="maxmin")
    with pytest.raises(ConfigError, match="unknown layer"):
        _tiny(layer="nope")
    with pytest.raises(ConfigError, match="32x32"):
        _tiny(input_size=64)
    with pytest.raises(ConfigError, match="head"):
        _tiny(head="mlp")


def test_bake_and_onnx_keep_the_logits(tmp_path):
    pytest.importorskip("onnxruntime")
    from certify.baked import bake
    from certify.checkpoint import save
    from certify.export import export_onnx
    from certify.loading import load_any

    m = _tiny().eval()
    x = torch.rand(4, 3, 32, 32)
    baked = bake(m)
    with torch.no_grad():
        assert torch.allclose(baked(x), m(x), atol=1e-5)
    path = tmp_path / "m.safetensors"
    save(path, m)
    export_onnx(load_any(path), tmp_path / "m.onnx")
    onnx_model = load_any(tmp_path / "m.onnx")
    assert torch.allclose(onnx_model(x), m(x), atol=1e-4)
    assert onnx_model.lipschitz_bound() == pytest.approx(baked.lipschitz_bound(), rel=1e-12)


@pytest.mark.parametrize("layer", [n for n in list_layers("convolution") if not n.startswith("example")])
def test_every_registered_convolution_trains_in_the_convnet(layer):
    """A few SGD steps of the same network with each layer type on one batch: finite loss and
    gradients, a falling loss, a sound bound after (the comparison trains every layer in this network)."""
    m = _tiny(layer=layer)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    losses = []
    for _ in range(8):  # a few steps on one batch: the loss must go down (gradients reach the layers)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[1:]) < losses[0], losses  # (momentum may overshoot later: BRO does at this lr)
    m.eval()
    assert empirical_lower_bound(m, x[:2], iters=3) <= m.lipschitz_bound() * (1 + 1e-6)


def _cli(*args):
    from click.testing import CliRunner

    from certify.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _end_to_end(layer: str, tmp_path):
    """`lipcert train` -> `certify` -> `attack --audit` -> `export` (ONNX) -> `certify` the ONNX file."""
    run = tmp_path / "run"
    r = _cli("train", "--model", "convnet_xs", "--width", "4", "--layer", layer, "--head", "lln", "--dataset",
             "synthetic", "--synthetic-size", "48", "--val-split", "16", "--batch-size", "16", "--epochs", "1",
             "--power-iters", "0", "--device", "cpu", "--no-progress", "-o", run)
    assert r.exit_code == 0, r.output
    ckpt = run / "best.safetensors"
    r = _cli("certify", ckpt, "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["certificate"]["method"] == "pairwise"
    r = _cli("attack", ckpt, "--audit", "--steps", "3", "--limit", "8", "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output  # exit 3 would be a certificate violation
    assert json.loads(r.stdout)["audit"]["violations"] == 0
    pytest.importorskip("onnxruntime")
    r = _cli("export", ckpt, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    r = _cli("certify", tmp_path / "m.onnx", "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    onnx_summary = json.loads(r.stdout)
    assert onnx_summary["counts"] == summary["counts"]


def test_a_non_soc_layer_trains_certifies_audits_and_exports_from_the_cli(tmp_path):
    _end_to_end("aol", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [n for n in list_layers("convolution") if not n.startswith("example")])
def test_every_layer_trains_certifies_audits_and_exports_from_the_cli(layer, tmp_path):
    _end_to_end(layer, tmp_path)
