"""The LiResNet model family (models/liresnet.py): layout, facts, bounds, baking, checkpoints and a
`lipcert train` + `lipcert certify` run on a tiny size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from certify.baked import bake
from certify.certificates import Certifier
from certify.cli import cli
from certify.errors import ConfigError
from certify.models import create_model, model_facts

TINY = dict(width=4, depth=2, features=8, input_size=16)


def _model(seed=0, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model("liresnet", **(TINY | kwargs))


def test_layout_is_stem_blocks_neck_dense_and_lln_head():
    model = _model()
    assert model.layer_names == ["stem.conv", "stem.act", "block1.conv", "block1.act", "block2.conv", "block2.act",
                                 "neck.down1", "neck.down2", "dense1.linear", "dense1.act", "dense2.linear",
                                 "dense2.act"]
    kinds = [type(m).__name__ for m in model.body.values()]
    assert kinds[2] == "LiResNetBlock" and kinds[0] == kinds[6] == "SOC" and kinds[8] == "CholeskyLinear"
    assert model.body["block1-conv"].tracked_size() == (8, 8)  # after the stride-2 stem
    assert model.certificate == "pairwise" and model.head.features == 8
    assert model(torch.rand(3, 3, 16, 16)).shape == (3, 10)
    assert _model(input_size=12).padded_size == (16, 16)  # padded to a multiple of 8


def test_facts_describe_the_built_model():
    facts = model_facts("liresnet", **TINY)
    model = _model()
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts | {"parameters": 0} == facts | dict(family="LiResNet", depth=2, width=4, head="lln",
                                                     certificate="pairwise", num_classes=10, input_shape=[3, 16, 16],
                                                     layer="liresnet", parameters=0)
    defaults = model_facts("liresnet")
    assert (defaults["depth"], defaults["width"]) == (6, 32)


@pytest.mark.parametrize("kwargs,message", [(dict(head="ortho"), "LLN"), (dict(depth=0), "depth"),
                                            (dict(width=5), "width"), (dict(pooling="max"), "pooling")])
def test_invalid_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model("liresnet", **(TINY | kwargs))


def _train_steps(model, opt, x, steps=3):
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(len(x)) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_after_an_epoch_refresh_the_body_is_certified_near_one_and_bakes_and_reloads_exactly():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(8, 3, 16, 16)
    _train_steps(model, opt, x)
    for m in model.modules():
        if hasattr(m, "refresh") and m is not model:
            m.refresh(5)
    model.eval()
    nominal = 1 / min(model.std)
    bounds = {b.name: b.bound for b in model.layer_bounds()}
    assert all(bounds[f"block{i}.conv"] <= 1.0 for i in (1, 2))
    assert model.feature_lipschitz_bound() <= nominal * (1 + 1e-5)
    cert = Certifier(model)
    _, _, _, radius = cert(x)
    assert torch.isfinite(radius).all()
    baked = bake(model)
    with torch.no_grad():
        assert torch.allclose(baked(x), model(x), atol=1e-5)
    assert math.isclose(baked.feature_lipschitz_bound(), model.feature_lipschitz_bound(), rel_tol=1e-6)
    again = _model(seed=1)
    again.load_state_dict(model.state_dict(), strict=True)  # fixed-shape buffers: a checkpoint fits
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_lipcert_train_then_certify_on_a_tiny_size(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--model", "liresnet", "--width", "4", "--depth", "1", "--synthetic-size",
                                 "40", "--batch-size", "12", "--epochs", "1", "--power-iters", "2", "--device", "cpu",
                                 "--no-progress", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model"] == "liresnet"
    r = CliRunner().invoke(cli, ["certify", str(out / "model.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "pairwise" in r.stdout and "36/255" in r.stdout


@pytest.mark.parametrize("activation", ["hh1", "hh2"])
def test_onnx_export_with_angle_activations_after_the_dense_layers(activation, tmp_path):
    """Per-channel parameters after a dense layer broadcast over (N, features), not (N, C, 1, 1):
    the export must agree with PyTorch (it failed in onnxruntime before)."""
    pytest.importorskip("onnxruntime")
    from certify.checkpoint import save
    from certify.export import export_onnx
    from certify.loading import load_any

    torch.manual_seed(0)
    model = create_model("liresnet", width=8, depth=1, activation=activation).eval()
    with torch.no_grad():  # angles away from their initialisation, so both branches are used
        for name, p in model.named_parameters():
            if "theta" in name:
                p.uniform_(0, 6.28)
    save(tmp_path / "m.safetensors", model)
    export_onnx(load_any(tmp_path / "m.safetensors"), tmp_path / "m.onnx")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_any(tmp_path / "m.onnx")(x), model(x), atol=1e-4)


# ---- block="bro": the BRONet backbone (Lai et al., ICML 2025) -------------------------------------

def test_bro_backbone_starts_as_bronets_quasi_residual_and_is_certified_at_one():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("liresnet", width=8, depth=2, features=16, input_size=16, block="bro")
    names = [type(m).__name__ for m in model.body.values()]
    assert names == ["SOC", "MaxMin", "BROConv2d", "MaxMin", "BROConv2d", "MaxMin", "SOC", "SOC", "CholeskyLinear",
                     "MaxMin", "CholeskyLinear", "MaxMin"]
    layer = model.body["block1-conv"]
    assert (layer.rank, layer.padding, layer.eps) == (4, "zero", 1e-7) and torch.equal(layer.bias, torch.zeros(8))
    v = layer.weight.detach()
    ident = torch.zeros_like(v)
    ident[:4, :4, 1, 1] = torch.eye(4)
    assert (v - ident).abs().max() < 2 ** -0.5 * 5 / 72  # [I; 0] on the centre tap + depth^-1/2 N(0,1)/(9w)
    model.eval()
    bounds = {b.name: b.bound for b in model.layer_bounds()}
    assert 1.0 <= bounds["block1.conv"] <= 1.0 + 1e-4  # orthogonal, up to the FFT rounding allowance
    x = torch.rand(2, 8, 8, 8)
    with torch.no_grad():  # at its start the reflector is -I on half the channels and I on the others
        y = layer(x) - layer.bias[None, :, None, None]
    assert (y[:, :4] + x[:, :4]).norm() < 0.25 * x[:, :4].norm()
    assert (y[:, 4:] - x[:, 4:]).norm() < 0.25 * x[:, 4:].norm()


def test_default_block_is_unchanged_and_bad_blocks_are_refused():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = create_model("liresnet", width=4, depth=2, features=8, input_size=16)
        torch.manual_seed(0)
        b = create_model("liresnet", width=4, depth=2, features=8, input_size=16, block="liresnet")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert model_facts("liresnet")["layer"] == "liresnet"
    with pytest.raises(ConfigError, match="unknown LiResNet block 'sll'"):
        create_model("liresnet", width=4, depth=1, block="sll")


def test_bro_backbone_trains_bakes_and_reloads_exactly(tmp_path):
    from certify.checkpoint import save
    from certify.loading import load

    model = _model(block="bro", width=8)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-2)
    x = torch.rand(8, 3, 16, 16)
    _train_steps(model, opt, x)
    model.eval()
    bounds = {b.name: b.bound for b in model.layer_bounds()}
    assert all(bounds[f"block{i}.conv"] <= 1.0 + 1e-4 for i in (1, 2))
    assert model.feature_lipschitz_bound() <= (1 / min(model.std)) * (1 + 1e-3)
    baked = bake(model)
    with torch.no_grad():
        assert torch.allclose(baked(x), model(x), atol=1e-5)
    save(tmp_path / "m.safetensors", model)
    again = load(tmp_path / "m.safetensors")  # rebuilt from the registry with block="bro"
    assert type(again.body["block1-conv"]).__name__ == "BROConv2d"
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
