"""The conformance suite: every registered layer type, through its own ``examples()``, must keep
the promises of the layer protocol (certify/layers/protocol.py). A new layer gets all of these
by registering; no test code is needed (docs/adding-a-layer.md).

For each example instance (a layer and an input shape), in eval mode, on every evaluation path it
has (``taylor``, ``fast``, ``fast`` with dense operators):

- the bound is at least the exact l2 operator norm of the dense float64 Jacobian (a linear layer:
  its norm; a nonlinear one: at several random points), at initialisation and again after a few
  optimiser steps with a large learning rate;
- ``output_size`` and ``output_channels`` describe the forward's output;
- ``bake()`` gives a registered module with the same outputs (1e-5) and a sound bound of its
  own; its ``config()`` rebuilds it (``from_config`` + its state dict) exactly;
- the baked module's ONNX translation gives the same outputs in onnxruntime (1e-5);
- heads: the pairwise row distances bound the Jacobian's row differences; a curvature head's
  radius is not beaten by random and gradient steps inside it.
"""

from __future__ import annotations

import copy

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from certify.layers import all_layers, layer_info
from certify.layers.protocol import Head, LipschitzLayer
from certify.layers.registry import KINDS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "example_layer.py"


def _import_example() -> None:
    """The guide's example layer (docs/example_layer.py) registers itself: the suite runs it."""
    spec = importlib.util.spec_from_file_location("lipcert_docs_example_layer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_import_example()

SLACK = 1 + 1e-9  # the Jacobian's own float64 rounding


def _cases():
    out = []
    for info in all_layers():
        for i in range(len(info.cls.examples())):
            out.append(pytest.param(info.name, i, id=f"{info.name}-{i}"))
    return out


CASES = _cases()


def _example(name: str, i: int):
    torch.manual_seed(1000 + i)
    layer, shape = layer_info(name).cls.examples()[i]
    return layer.eval(), tuple(shape)


def _jacobian_norm(fn, shape, points: int, seed: int) -> float:
    """Largest spectral norm of the float64 Jacobian of ``fn`` at ``points`` random inputs."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x0 = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), x0.flatten(),
                                                 vectorize=True)
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    return best


def _size(shape):
    return tuple(shape[1:]) if len(shape) == 3 else None


def _bound(layer, shape) -> float:
    return float(layer.lipschitz_bound(_size(shape))) if isinstance(layer, LipschitzLayer) else float(
        layer.lipschitz_bound())


def _paths(layer) -> list[dict]:
    """The evaluation paths to check: the layer's own, or taylor, fast and fast with dense operators."""
    if not layer.set_evaluation("taylor"):
        return [{}]
    return [dict(mode="taylor"), dict(mode="fast"), dict(mode="fast", images=10**9)]


def _check_bound(layer, shape, what: str, seed: int):
    if isinstance(layer, Head) and layer.certificate == "curvature":
        return  # no norm bound: the curvature certificate is checked below
    exact = _jacobian_norm(layer, shape, points=1 if layer.is_linear else 4, seed=seed)
    bound = _bound(layer, shape)
    assert exact <= bound * SLACK, f"{what}: bound {bound!r} < Jacobian norm {exact!r}"


def _optimiser_steps(layer, shape, steps: int = 3, lr: float = 1.0, amp: bool = False):
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        return False
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(7)
    layer.train()
    for _ in range(steps):
        x = torch.randn((4, *shape), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # `lipcert train --amp`
            out = layer(x)
        assert torch.isfinite(out).all()
        loss = -(out.float() * torch.randn(out.shape, generator=gen)).sum()  # a push in a random direction
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        opt.step()
    layer.eval()
    return True


def test_every_registered_layer_has_examples_a_kind_and_a_bound():
    for info in all_layers():
        assert info.kind in KINDS
        assert info.bound.strip(), f"{info.name}: say what the bound is made of"
        assert info.cls.__doc__ and info.cls.__doc__.strip(), f"{info.name}: needs a docstring"
        assert info.cls.examples(), f"{info.name}: give at least one example for the conformance suite"
        assert info.cls.layer_type == info.name


def test_the_guide_shows_the_example_the_suite_runs():
    guide = (ROOT / "docs" / "adding-a-layer.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in guide
    assert "example_scaled_1x1" in [info.name for info in all_layers()]


@pytest.mark.parametrize("name,i", CASES)
def test_bound_is_at_least_the_jacobian_norm_on_every_path_before_and_after_training(name, i):
    layer, shape = _example(name, i)
    for path in _paths(layer):
        if path:
            layer.set_evaluation(**path)
        _check_bound(layer, shape, f"{name} {path} at initialisation", seed=i)
    if _optimiser_steps(layer, shape):
        for path in _paths(layer):
            if path:
                layer.set_evaluation(**path)
            _check_bound(layer, shape, f"{name} {path} after large optimiser steps", seed=i + 100)


@pytest.mark.parametrize("name,i", CASES)
def test_trains_under_bfloat16_autocast_and_its_bound_still_holds(name, i):
    # --amp trains under autocast; the certificate is computed afterwards in float32/float64
    layer, shape = _example(name, i)
    if _optimiser_steps(layer, shape, steps=2, lr=0.1, amp=True):
        assert all(p.dtype == torch.float32 for p in layer.parameters())
        for path in _paths(layer):
            if path:
                layer.set_evaluation(**path)
            _check_bound(layer, shape, f"{name} {path} after bfloat16 training steps", seed=i + 200)


@pytest.mark.parametrize("name,i", CASES)
def test_a_float64_input_is_evaluated_in_float64(name, i):
    # the certifier re-checks float32 rounding by feeding float64 inputs to the float32 model, or,
    # where the model refuses them (RuntimeError), to a float64 copy; never silently in float32
    layer, shape = _example(name, i)
    x = torch.randn((2, *shape), dtype=torch.float64)
    try:
        out = layer(x)
    except RuntimeError:
        out = copy.deepcopy(layer).double()(x)
    assert out.dtype == torch.float64
    assert torch.allclose(out, layer(x.float()).double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,i", CASES)
def test_a_layer_that_says_it_is_linear_is_affine(name, i):
    layer, shape = _example(name, i)
    if not layer.is_linear:
        pytest.skip("nonlinear: its bound is checked at several points")
    gen = torch.Generator().manual_seed(i)
    x, y = (torch.randn((2, *shape), generator=gen, dtype=torch.float64) for _ in range(2))
    zero = torch.zeros_like(x)
    with torch.no_grad():
        f0 = layer(zero)
        lhs = layer(x + 2 * y) - f0
        rhs = (layer(x) - f0) + 2 * (layer(y) - f0)
    assert torch.allclose(lhs, rhs, atol=1e-5 * (1 + float(rhs.abs().max())))


@pytest.mark.parametrize("name,i", CASES)
def test_output_shape_is_what_the_layer_says(name, i):
    layer, shape = _example(name, i)
    with torch.no_grad():
        y = layer(torch.randn((2, *shape)))
    if isinstance(layer, Head):
        assert y.shape == (2, layer.num_classes)
        return
    if len(shape) == 1:  # a dense layer: (N, features)
        assert y.shape == (2, layer.output_channels(shape[0]))
        return
    c, h, w = shape
    assert y.shape == (2, layer.output_channels(c), *layer.output_size((h, w)))


@pytest.mark.parametrize("name,i", CASES)
def test_fast_path_keeps_the_outputs(name, i):
    layer, shape = _example(name, i)
    if not layer.set_evaluation("taylor"):
        pytest.skip("one evaluation path")
    x = torch.randn((3, *shape))
    with torch.no_grad():
        ref = layer(x)
        for path in _paths(layer)[1:]:
            layer.set_evaluation(**path)
            assert torch.allclose(layer(x), ref, atol=1e-5), path
            assert layer.evaluation_settings()  # the certifier's fingerprint sees the path


@pytest.mark.parametrize("name,i", CASES)
def test_bake_keeps_the_outputs_and_bounds_itself(name, i):
    layer, shape = _example(name, i)
    _optimiser_steps(layer, shape, lr=0.1)  # not an initialisation
    x = torch.randn((3, *shape))
    baked = layer.bake()
    assert baked.layer_type, "a baked module must be registered (its plan names it)"
    assert not any(p.requires_grad for p in baked.parameters())
    with torch.no_grad():
        assert torch.allclose(baked(x), layer(x), atol=1e-5)
    _check_bound(baked, shape, f"{name} baked", seed=i)
    # the plan round trip: config() -> from_config() -> state dict gives the same module
    again = type(baked).from_config(baked.config())
    again.load_state_dict(baked.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), baked(x))


@pytest.mark.parametrize("name,i", CASES)
def test_onnx_translation_keeps_the_outputs(name, i):
    ort = pytest.importorskip("onnxruntime")
    from certify.errors import ExportError
    from certify.onnx_graph import layer_model

    layer, shape = _example(name, i)
    baked = layer.bake()
    try:
        proto = layer_model(baked, shape)
    except ExportError as e:
        pytest.skip(f"no ONNX translation: {e}")
    buf = io.BytesIO(proto.SerializeToString())
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn((3, *shape))
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = baked(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)


@pytest.mark.parametrize("name,i", [c for c in CASES if issubclass(layer_info(c.values[0]).cls, Head)])
def test_head_certificates_hold(name, i):
    head, shape = _example(name, i)
    if head.certificate == "pairwise":
        (features,) = shape
        x0 = torch.randn(1, features, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: head(v.view(1, -1)).flatten(), x0.flatten())
        exact = torch.cdist(jac, jac)
        assert (exact <= head.pairwise_row_distances() * SLACK).all()
    elif head.certificate == "curvature":
        gen = torch.Generator().manual_seed(i)
        feats = torch.randn((16, *shape), generator=gen) * 3
        with torch.no_grad():
            logits = head(feats)
        pred = logits.argmax(1)
        radius = head.curvature_certifier(1.0)(feats, pred=pred).float()
        for _ in range(8):
            d = torch.randn(feats.shape, generator=gen)
            d = d / d.norm(dim=1, keepdim=True)
            with torch.no_grad():
                moved = head(feats + 0.999 * radius[:, None] * d).argmax(1)
            assert torch.equal(moved[radius > 0], pred[radius > 0])
    else:
        assert head.certificate == "global"
