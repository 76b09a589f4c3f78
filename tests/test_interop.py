"""Interoperability: certify.foreign.bound_module on models built with real 1-Lipschitz libraries
(deel-torchlip, orthogonium; ``pip install -e .[interop]``), skipped when a library is missing.

Where bound_module bounds a model, the bound must be >= the exact spectral norm of the float64
Jacobian (at a few random points; exact for linear maps); the constant the library assumes is
recorded next to it, and where it is provably below the true norm (a stale power iteration, SOC
under zero padding) the test says so. Where bound_module cannot bound an op it must refuse with a
NotLipschitzError that names the op or module: a refusal is sound, a guess is not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.errors import NotLipschitzError
from certify.foreign import bound_module

SHAPE = (3, 16, 16)


def _torchlip():
    return pytest.importorskip("deel.torchlip")


def _orthogonium():
    return pytest.importorskip("orthogonium.layers")


def _baked64(module: nn.Module) -> nn.Module:
    """An eval float64 copy with each parametrized weight replaced by its current value (the
    libraries' parametrizations, e.g. orthogonium's L2Normalize, do not run in float64). Not
    remove_parametrizations: it would edit the Parametrized* class shared with the original."""
    m = copy.deepcopy(module).eval()
    for sub in list(m.modules()):
        if parametrize.is_parametrized(sub):
            values = {n: getattr(sub, n).detach().clone() for n in sub.parametrizations.keys()}
            sub.__class__ = type(sub).__bases__[0]
            del sub._modules["parametrizations"]
            for n, v in values.items():
                sub._parameters[n] = nn.Parameter(v, requires_grad=False)
    return m.double()


def _exact_norm(module: nn.Module, shape, points: int = 3, seed: int = 0) -> float:
    """max over random x of ||J(x)||_2, the float64 Jacobian of x -> module(x) (a lower bound on the
    Lipschitz constant; exact for a linear map)."""
    m = _baked64(module)
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(int(torch.tensor(shape).prod()), generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda z: m(z.view(1, *shape)).flatten(), x)
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _check_sound(module, shape, assumed, record_property, points=3):
    module.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = module(x)
    bound = bound_module(module, shape).lipschitz
    exact = _exact_norm(module, shape, points)
    with torch.no_grad():  # bounding works on a copy: the library's module still runs (and agrees)
        assert torch.allclose(module(x), before, rtol=1e-4, atol=1e-5)
    record_property("bound", bound)
    record_property("exact", exact)
    record_property("assumed", assumed)
    print(f"bound={bound:.6f} exact={exact:.6f} assumed={assumed} bound/exact={bound / exact:.4f} "
          f"exact/assumed={exact / assumed:.4f}")
    assert bound >= exact * (1 - 1e-9)
    return bound, exact


# ---- deel-torchlip --------------------------------------------------------------------------------


def test_torchlip_spectral_net_bound_is_sound(record_property):
    tl = _torchlip()
    torch.manual_seed(0)
    model = nn.Sequential(
        tl.SpectralConv2d(3, 4, 3, padding=1), nn.ReLU(),
        tl.SpectralConv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), tl.SpectralLinear(4 * 16 * 16, 10), nn.ReLU(), tl.FrobeniusLinear(10, 1))
    bound, exact = _check_sound(model, SHAPE, 1.0, record_property)
    # the library's zero-padding correction (lconv_norm) keeps each conv below its k = 1
    assert exact <= 1.0 + 1e-6


def test_torchlip_stale_power_iteration_exceeds_assumed_constant(record_property):
    """Without Bjorck, SpectralLinear divides by torch's power-iteration estimate u^T W v <= sigma_1:
    one training step after the weights moved, the layer's true norm is above the k = 1 it assumes
    (seeds 0-3 give 1.15-1.50); bound_module computes it from the weights and stays above."""
    tl = _torchlip()
    torch.manual_seed(0)
    layer = tl.SpectralLinear(16, 16, eps_bjorck=None)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(16, 16))
    layer.train()
    layer(torch.randn(2, 16))  # one power iteration, as in one training step
    _, exact = _check_sound(layer, (16,), 1.0, record_property, points=1)
    assert exact > 1.1


@pytest.mark.parametrize("name,make,names", [
    ("GroupSort2", lambda tl: tl.GroupSort2(), "GroupSort2"),
    ("FullSort", lambda tl: tl.FullSort(), "FullSort"),
    ("MaxMin", lambda tl: tl.MaxMin(), "MaxMin"),
    ("HouseHolder", lambda tl: tl.HouseHolder(4), "HouseHolder"),
    ("LPReLU", lambda tl: tl.LPReLU(), "clamp"),
    ("ScaledL2NormPool2d", lambda tl: tl.ScaledL2NormPool2d(2), "lp_pool2d"),
    ("ScaledAvgPool2d", lambda tl: tl.ScaledAvgPool2d(2), "avg_pool2d"),
    ("ScaledAdaptiveAvgPool2d", lambda tl: tl.ScaledAdaptiveAvgPool2d((1, 1)), "'mul'"),
    ("InvertibleDownSampling", lambda tl: tl.InvertibleDownSampling(2), "pixel_unshuffle"),
])
def test_torchlip_unsupported_layers_are_refused(name, make, names):
    tl = _torchlip()
    torch.manual_seed(0)
    with pytest.raises(NotLipschitzError, match=names):
        bound_module(make(tl).eval(), (4, 16, 16))


# ---- orthogonium ----------------------------------------------------------------------------------


def test_orthogonium_zero_padded_net_bound_is_sound(record_property):
    ol = _orthogonium()
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL import AOLConv2D

    torch.manual_seed(0)
    model = nn.Sequential(
        AdaptiveOrthoConv2d(3, 8, 3, padding=1, padding_mode="zeros"), ol.Abs(),  # FastBlockConv2d (BCOP)
        AdaptiveOrthoConv2d(8, 16, 2, stride=2, padding=0, padding_mode="zeros"), ol.BatchCentering2D(16),  # RKO
        AOLConv2D(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), ol.OrthoLinear(16 * 8 * 8, 10))
    _check_sound(model, SHAPE, 1.0, record_property)


def test_orthogonium_soc_under_zero_padding_exceeds_assumed_constant(record_property):
    """AdaptiveSOCConv2d (truncated exp of a skew conv) is orthogonal under circular padding only:
    with zero padding its norm is above 1 (1.004-1.025 for seeds 0-3 on 4x8x8)."""
    _orthogonium()
    from orthogonium.layers.conv.adaptiveSOC import AdaptiveSOCConv2d

    torch.manual_seed(0)
    conv = AdaptiveSOCConv2d(4, 4, 3, padding=1, padding_mode="zeros")
    _, exact = _check_sound(conv, (4, 8, 8), 1.0, record_property, points=1)
    assert exact > 1.01


def test_orthogonium_unit_norm_linear_is_not_1_lipschitz_as_a_map(record_property):
    """UnitNormLinear makes each output 1-Lipschitz (unit rows), not the layer: with rows that are
    not orthogonal its l2 norm is above 1, and the global certificate needs that norm."""
    ol = _orthogonium()
    torch.manual_seed(0)
    layer = ol.UnitNormLinear(64, 10)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(10, 64))
    _, exact = _check_sound(nn.Sequential(nn.Flatten(), layer), (64,), 1.0, record_property, points=1)
    assert exact > 1.2


def _ortho(name):
    def make(ol):
        from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
        from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock

        return {
            "AdaptiveOrthoConv2d circular": lambda: AdaptiveOrthoConv2d(4, 8, 3),  # the default padding
            "BcopRkoConv2d": lambda: AdaptiveOrthoConv2d(4, 8, 3, stride=2, padding=1, padding_mode="zeros"),
            "MaxMin": lambda: ol.MaxMin(),
            "HouseHolder": lambda: ol.HouseHolder(4),
            "LayerCentering2D": lambda: ol.LayerCentering2D(4),
            "ChannelShuffle": lambda: ol.ChannelShuffle(2, 2),
            "SDPBasedLipschitzResBlock": lambda: SDPBasedLipschitzResBlock(4, 8, 3),
        }[name]()
    return make


@pytest.mark.parametrize("name,names", [
    ("AdaptiveOrthoConv2d circular", "pad.*circular"),
    ("BcopRkoConv2d", "BcopRkoConv2d"),
    ("MaxMin", "floordiv"),
    ("HouseHolder", "HouseHolder"),
    ("LayerCentering2D", "'sub'.*broadcasting"),
    ("ChannelShuffle", "ChannelShuffle"),
    ("SDPBasedLipschitzResBlock", "conv_transpose2d"),
])
def test_orthogonium_unsupported_layers_are_refused(name, names):
    ol = _orthogonium()
    torch.manual_seed(0)
    module = _ortho(name)(ol).eval()
    with warnings.catch_warnings(), pytest.raises(NotLipschitzError, match=names):
        warnings.simplefilter("ignore")
        bound_module(module, (4, 16, 16))


# ---- from the command line: --module, and the ONNX file exported from each -----------------------

LIBNETS = """
import torch
from torch import nn


def deel():
    import deel.torchlip as tl

    torch.manual_seed(0)
    return nn.Sequential(tl.SpectralConv2d(3, 4, 3, padding=1), nn.ReLU(), tl.SpectralConv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), tl.SpectralLinear(4 * 32 * 32, 10))


def ortho():
    import orthogonium.layers as ol
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL import AOLConv2D

    torch.manual_seed(0)
    return nn.Sequential(AdaptiveOrthoConv2d(3, 8, 3, padding=1, padding_mode="zeros"), ol.Abs(),
                         AdaptiveOrthoConv2d(8, 16, 2, stride=2, padding=0, padding_mode="zeros"),
                         ol.BatchCentering2D(16), AOLConv2D(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), ol.OrthoLinear(16 * 16 * 16, 10))
"""


@pytest.mark.parametrize("library, factory", [("deel.torchlip", "deel"), ("orthogonium.layers", "ortho")])
def test_cli_certifies_a_library_model_and_the_onnx_file_exported_from_it(library, factory, tmp_path, monkeypatch):
    import json
    import sys

    from click.testing import CliRunner

    from certify.cli import cli
    from certify.foreign import _bake_parametrizations

    pytest.importorskip(library)
    pytest.importorskip("onnxruntime")
    (tmp_path / "libnets.py").write_text(LIBNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("libnets", None)
    runner = CliRunner()
    common = ["--dataset", "synthetic", "--limit", "8", "--format", "json", "--device", "cpu"]
    r = runner.invoke(cli, ["certify", "--module", f"libnets:{factory}", *common])
    assert r.exit_code == 0, r.output
    from_module = json.loads(r.stdout)
    # the file a user deploys: the parametrised weights as they are (torch.onnx cannot trace
    # orthogonium's cached parametrisation), exported by torch.onnx
    import libnets

    model = copy.deepcopy(getattr(libnets, factory)().eval())
    _bake_parametrizations(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(1, 3, 32, 32), str(tmp_path / "m.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    r = runner.invoke(cli, ["certify", str(tmp_path / "m.onnx"), *common])
    assert r.exit_code == 0, r.output
    from_onnx = json.loads(r.stdout)
    assert from_module["certificate"]["method"] == from_onnx["certificate"]["method"] == "pairwise"
    a, b = (d["certificate"]["feature_lipschitz_upper_bound"] for d in (from_module, from_onnx))
    assert a == pytest.approx(b, rel=1e-6)  # the same weights, bounded through either door
    assert from_module["counts"] == from_onnx["counts"]
    r = runner.invoke(cli, ["attack", "--module", f"libnets:{factory}", "--audit", "--steps", "3", *common])
    assert r.exit_code == 0 and json.loads(r.stdout)["audit"]["violations"] == 0, r.output
    sys.modules.pop("libnets", None)
