"""The model registry and every registered model, at width 4 (a few hundred thousand parameters).

For every name in ``list_models()``: the sound upper bound (``model.lipschitz_bound()``, or for an
MLP-head model the feature extractor's bound) is at least the largest ||f(x) - f(y)|| / ||x - y||
over random pairs and at least the empirical (Jacobian power-iteration) lower bound, and for an
orthogonal network it is 1/min(std) up to the Taylor remainders (1e-3 relative).

Why the lower bound of a whole LipConvnet is not close to 1/min(std) at initialisation: the first
SOC embeds 3 input channels into ``width`` channels, and every later layer keeps only part of its
orthogonal output (channel pooling keeps one value per pair, the heads keep 10 of the features),
so the network's Jacobian is a product of an embedding and partial isometries whose norm is
usually below 1 (measured about 3.45 against 3.99 at width 4). Where nothing is dropped, the lower
bound does meet the upper bound; that is tested on SOC/MaxMin stacks in test_lipschitz.py.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from certify.errors import ConfigError, DuplicateModelError, NotLipschitzError, UnknownModelError
from certify.lipschitz import empirical_lower_bound, upper_bound
from certify.models import LipConvNet, create_model, is_model, list_models, model_facts, register_model
from certify.models import _registry

ACTS = ("maxmin", "hh1", "hh2")
POOLS = ("max", "lip")
HEADS = ("ortho", "lln")
CONVNET_HEADS = ("layer", "lln")
DEPTHS = (5, 10, 15, 20, 25, 30, 35, 40)
CIFAR_INV_STD = 1 / 0.2507


def variant(name: str) -> dict:
    """A different (activation, pooling, head) for each registered model, so that across the
    registry every option is built and bounded at least once (checked by test_variants_cover_all)."""
    i = list_models().index(name)
    if name.startswith("convnet"):  # the CVPR'24 ConvNet: no pooling option, its own heads
        return {"activation": ACTS[i % 3], "head": CONVNET_HEADS[(i // 2) % 2]}
    if name == "liresnet":  # LiResNet: no pooling option, the LLN head only
        return {"activation": ACTS[i % 3]}
    kw = {"activation": ACTS[i % 3], "pooling": POOLS[(i // 3) % 2]}
    if not name.endswith("_mlp"):
        kw["head"] = HEADS[(i // 2) % 2]
    return kw


@functools.lru_cache(maxsize=None)
def built(name: str, **kwargs) -> torch.nn.Module:
    """Each model is built once per session (construction runs 50 power-iteration steps per
    layer); tests must not change the cached model's weights or mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(name, width=4, **kwargs)
    if name == "liresnet":
        # LiResNet blocks take their scale from their sound bound at the after-epoch refresh (at
        # construction it is a short power estimate, so the body certifies slightly above 1)
        from certify.layers.protocol import refresh_layers

        refresh_layers(model, 1)
    return model.eval()


def _bound(model) -> float:
    """The model's sound upper bound; for the MLP head (certified by curvature, no global
    bound) that of the feature extractor."""
    if getattr(model, "head_kind", None) == "mlp":
        return model.feature_lipschitz_bound()
    return upper_bound(model)


class _Features(torch.nn.Module):
    """x -> features(x) of an MLP-head model, as a module (empirical_lower_bound needs one)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def _fn(model):
    return _Features(model) if getattr(model, "head_kind", None) == "mlp" else model


def _images(seed: int, n: int, shape=(3, 32, 32)) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


# ---- registry -------------------------------------------------------------------------------


def test_all_depths_registered_in_natural_order():
    names = list_models("lipconvnet[0-9]")  + list_models("lipconvnet[0-9][0-9]")
    assert sorted(names, key=lambda n: int(n[10:])) == [f"lipconvnet{d}" for d in DEPTHS]
    listed = [n for n in list_models() if n in names]
    assert listed == [f"lipconvnet{d}" for d in DEPTHS]  # 5 before 10 (natural, not lexical)
    assert all(is_model(n) for n in names) and not is_model("lipconvnet7")


def test_list_models_patterns():
    assert list_models("lipconvnet?") == ["lipconvnet5"]
    assert list_models("lipconvnet[1-4]0") == ["lipconvnet10", "lipconvnet20", "lipconvnet30", "lipconvnet40"]
    assert list_models("nothing*") == []
    assert set(list_models("*")) == set(list_models())
    assert list_models("LIPCONVNET5") == []  # case-sensitive, as timm


def test_duplicate_name_raises():
    with pytest.raises(DuplicateModelError, match="lipconvnet5"):
        register_model(lambda **kw: None, name="lipconvnet5")

    @register_model(name="_test_dup_model")
    def first(**kwargs):
        return torch.nn.Identity()

    try:
        assert "_test_dup_model" in list_models("_test*")
        with pytest.raises(DuplicateModelError):
            @register_model(name="_test_dup_model")
            def second(**kwargs):
                return torch.nn.Identity()
        assert _registry._MODELS["_test_dup_model"] is first  # the first one is kept
    finally:
        _registry._MODELS.pop("_test_dup_model", None)


def test_register_model_by_function_name():
    def _test_fn_named(**kwargs):
        return torch.nn.Identity()

    try:
        assert register_model(_test_fn_named) is _test_fn_named
        assert is_model("_test_fn_named")
        model = create_model("_test_fn_named")
        assert model.model_name == "_test_fn_named" and model.model_kwargs == {}
    finally:
        _registry._MODELS.pop("_test_fn_named", None)


@pytest.mark.parametrize("typo,suggestion", [("lipconvnet_5", "lipconvnet5"), ("lipconvent10", "lipconvnet10"),
                                             ("LipConvNet40", "lipconvnet40")])
def test_unknown_model_suggests_close_matches(typo, suggestion):
    with pytest.raises(UnknownModelError) as info:
        create_model(typo)
    assert suggestion in str(info.value) and "did you mean" in str(info.value)
    assert isinstance(info.value, KeyError)  # dict-like lookups can catch it too
    assert not str(info.value).startswith("'")  # a clear message, not KeyError's quoting


def test_unknown_model_without_close_match_points_to_the_list():
    with pytest.raises(UnknownModelError, match="lipcert models"):
        create_model("zzzz")


def test_create_model_drops_none_kwargs():
    model = create_model("lipconvnet5", width=4, activation=None, pooling=None, head=None, num_classes=None)
    assert model.model_kwargs == {"width": 4}
    assert model.model_name == "lipconvnet5"
    assert model.num_classes == 10 and model.head_kind == "ortho"  # the builder's defaults


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="lipconvnet5"):
        create_model("lipconvnet5", width=4, not_an_option=1)


@pytest.mark.parametrize("kwargs", [dict(depth=7), dict(head="mlp2"), dict(width=3), dict(num_classes=1),
                                    dict(activation="relu"), dict(pooling="avg"),
                                    dict(in_channels=1, mean=(0.5, 0.5), std=(0.2, 0.2))])
def test_bad_model_options(kwargs):
    kwargs.setdefault("width", 4)
    with pytest.raises(ConfigError):
        LipConvNet(**kwargs)


# ---- every registered model ---------------------------------------------------------------


def test_variants_cover_all_options():
    seen = {"activation": set(), "pooling": set(), "head": set()}
    for name in list_models():
        for k, v in variant(name).items():
            seen[k].add(v)
    assert seen == {"activation": set(ACTS), "pooling": set(POOLS), "head": set(HEADS) | set(CONVNET_HEADS)}


@pytest.mark.parametrize("name", list_models())
def test_every_model_is_bounded(name):
    model = built(name, **variant(name))
    x = _images(0, 4)
    # random pairs: two far, two near
    y = torch.cat([_images(1, 2), x[2:] + 1e-2 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))])
    with torch.no_grad():
        fx, fy = _fn(model)(x), _fn(model)(y)
        logits = model.head(fx) if model.head_kind == "mlp" else fx
    assert logits.shape == (4, model.num_classes) and torch.isfinite(logits).all()
    bound = _bound(model)
    # 1/min(std) up to the SOC Taylor remainders (LLN: times the exact norm of the 10 x F
    # row-normalised matrix, which lies in [1, sqrt(10)])
    head_norm = model.layer_bounds()[-1].bound if model.head_kind == "lln" else 1.0
    assert 1.0 <= head_norm <= 10**0.5 * (1 + 1e-6)
    assert bound == pytest.approx(CIFAR_INV_STD * head_norm, rel=1e-3)
    if name != "liresnet":  # orthogonal (SOC) layers: 1 plus remainders; LiResNet's may contract below 1
        assert bound >= CIFAR_INV_STD * head_norm
    ratio = (fx - fy).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound
    assert float(ratio.min()) > 0  # the network is not constant


@pytest.mark.parametrize("name", [n for n in list_models() if n[10:].split("_")[0] in ("5", "10")])
def test_empirical_lower_bound_below_upper_bound(name):
    model = built(name, **variant(name))
    lower = empirical_lower_bound(_fn(model), _images(3, 1), iters=3)
    upper = _bound(model)
    assert 0.05 * upper < lower <= upper


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_empirical_lower_bound_below_upper_bound_every_model(name):
    model = built(name, **variant(name))
    lower = empirical_lower_bound(_fn(model), _images(4, 2), iters=6)
    assert 0.05 * _bound(model) < lower <= _bound(model)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("pooling", POOLS)
@pytest.mark.parametrize("head", HEADS)
def test_every_option_combination(activation, pooling, head):
    model = built("lipconvnet5", activation=activation, pooling=pooling, head=head)
    bound = upper_bound(model)
    lower = empirical_lower_bound(model, _images(5, 2), iters=4)
    assert lower <= bound
    x, y = _images(6, 8), _images(7, 8)
    with torch.no_grad():
        ratio = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound


def test_layout_matches_the_paper():
    """Stage outputs at width w: init w@32, block i 2^i w @ 32/2^i (after pooling), block 5 32w@1
    before the head; b = N/5 SOC layers in each of the five blocks (as in the reference, the
    init SOC and the head come on top)."""
    w = 4
    model = built("lipconvnet10")
    shapes = {}
    x = model.normalize(_images(0, 1))
    with torch.no_grad():
        for name, layer in zip(model.layer_names, model.body.values()):
            x = layer(x)
            shapes[name] = tuple(x.shape[1:])
    assert shapes["init.act"] == (w, 32, 32)
    for i in range(1, 5):
        assert shapes[f"block{i}.conv0"] == (w * 2 ** (i - 1), 32 // 2 ** (i - 1), 32 // 2 ** (i - 1))
        assert shapes[f"block{i}.down"] == (4 * w * 2 ** (i - 1), 32 // 2**i, 32 // 2**i)
        assert shapes[f"block{i}.pool"] == (w * 2**i, 32 // 2**i, 32 // 2**i)
    assert shapes["block5.conv0"] == (64 * w, 1, 1)
    assert shapes["block5.pool"] == (32 * w, 1, 1)
    socs = [n for n in model.layer_names if n.startswith("block") and (".conv" in n or ".down" in n)]
    assert len(socs) == 10  # N = 5 b SOC layers in the five blocks, plus the init SOC and the head
    assert model.num_features == 32 * w


@pytest.mark.slow
def test_parameter_count_at_paper_width():
    """About 17.8M parameters for LipConvnet-5 with the orthogonal head (paper.md section 5)."""
    n = sum(p.numel() for p in create_model("lipconvnet5").parameters())
    assert 17.0e6 < n < 18.6e6


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ConfigError, match="3, 32, 32"):
        built("lipconvnet5")(torch.rand(1, 3, 28, 28))


def test_mnist_shaped_models():
    """Single-channel 28x28 inputs: normalised by MNIST's std, zero-padded to 32x32 (an
    isometric embedding), bounded by 1/0.3081."""
    model = built("lipconvnet5", in_channels=1, input_size=28, pooling="lip", head="ortho")
    assert model.input_shape == (1, 28, 28)
    x, y = _images(8, 4, (1, 28, 28)), _images(9, 4, (1, 28, 28))
    with torch.no_grad():
        fx, fy = model(x), model(y)
    assert fx.shape == (4, 10)
    bound = upper_bound(model)
    assert bound == pytest.approx(1 / 0.3081, rel=1e-3) and bound >= 1 / 0.3081
    assert float(((fx - fy).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max()) <= bound
    assert empirical_lower_bound(model, x[:1], iters=2) <= bound
    lln = built("lipconvnet10", in_channels=1, input_size=28, head="lln", num_classes=3)
    assert lln(x).shape == (4, 3)
    assert upper_bound(lln) >= empirical_lower_bound(lln, x[:1], iters=2)


def test_non_uniform_std_uses_the_smallest():
    """The normalisation factor is 1/min(std) (the reference's 1/max(std) is unsound)."""
    model = built("lipconvnet5", mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.2))
    assert model.layer_bounds()[0].bound == pytest.approx(5.0, rel=1e-6)
    assert upper_bound(model) == pytest.approx(5.0, rel=1e-3) and upper_bound(model) >= 5.0


def test_mlp_head_model_has_no_global_bound():
    names = list_models("*_mlp")
    if not names:
        pytest.skip("no MLP-head model registered")
    model = built(names[0], **variant(names[0]))
    with pytest.raises(NotLipschitzError):
        model.lipschitz_bound()


def test_float64_model():
    model = create_model("lipconvnet5", width=4, head="lln").double().eval()
    x = _images(10, 2).double()
    out = model(x)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert empirical_lower_bound(model, x[:1], iters=2) <= upper_bound(model)


def test_training_step_fast_and_exact_agree_on_input_gradients():
    """The fast backward changes only the filter gradient: a training step's loss and input
    gradient are the same as with autograd, filter gradients close, all finite."""
    grads = {}
    for mode in ("fast", "exact"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_model("lipconvnet5", width=4, backward=mode).train()
        x = _images(11, 4).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        w = model.body["block1-down"].weight.grad
        grads[mode] = (float(loss.detach()), x.grad.clone(), w.clone())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    (lf, xf, wf), (le, xe, we) = grads["fast"], grads["exact"]
    assert lf == pytest.approx(le, rel=1e-6)
    assert torch.allclose(xf, xe, rtol=1e-4, atol=1e-7)
    assert float((wf - we).norm() / we.norm()) < 0.3


def test_json_roundtrip_of_model_kwargs():
    """model_kwargs must be JSON-serialisable so a checkpoint can rebuild the model."""
    model = create_model("lipconvnet5", width=4, activation="hh1", input_size=(28, 28), in_channels=1)
    again = create_model(model.model_name, **json.loads(json.dumps(model.model_kwargs)))
    assert again.input_shape == model.input_shape == (1, 28, 28)


# ---- per-block depths (compact variants, issue 17) ------------------------------------------


def test_blocks_put_layers_where_asked_and_stay_bounded():
    """``blocks=(1, 1, 2, 3, 2)``: one extra SOC layer in block 3, two in block 4, one 1x1 in
    block 5; the depth is their sum, the static facts match, and the bound still holds on pairs."""
    blocks = (1, 1, 2, 3, 2)
    with torch.random.fork_rng():
        model = create_model("lipconvnet5", width=4, head="lln", blocks=list(blocks))
    socs = [n for n in model.layer_names if n.startswith("block") and (".conv" in n or ".down" in n)]
    assert model.depth == sum(blocks) == len(socs)
    assert [sum(n.startswith(f"block{i}.") for n in socs) for i in range(1, 6)] == list(blocks)
    assert {"block3.conv0", "block4.conv0", "block4.conv1", "block5.conv1"} <= set(socs)
    facts = model_facts("lipconvnet5", width=4, head="lln", blocks=list(blocks))
    assert facts["depth"] == model.depth and facts["parameters"] == sum(p.numel() for p in model.parameters())
    x, y = _images(20, 4), _images(21, 4)
    with torch.no_grad():
        ratio = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= _bound(model)
    # the uniform family is the special case blocks = (N/5,) * 5, weight for weight
    with torch.random.fork_rng():
        a = create_model("lipconvnet10", width=4)
    with torch.random.fork_rng():
        b = create_model("lipconvnet5", width=4, blocks=[2] * 5)
    assert a.layer_names == b.layer_names and a.depth == b.depth == 10
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("blocks", [[1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1.5, 1, 1], "11111", [True] * 5, 5])
def test_bad_blocks_are_a_config_error(blocks):
    with pytest.raises(ConfigError, match="blocks"):
        LipConvNet(width=4, blocks=blocks)
    with pytest.raises(ConfigError, match="blocks"):
        model_facts("lipconvnet5", width=4, blocks=blocks)


def test_down_kernel_1_downsamples_by_2x2_patches():
    """``down_kernel=1``: the stride-2 SOC of blocks 1-4 is 1x1 on the space-to-depth map (a 2x2,
    stride-2 orthogonal convolution); shapes as the paper's layout, bound holds on pairs, facts match."""
    with torch.random.fork_rng():
        model = create_model("lipconvnet5", width=4, head="lln", down_kernel=1, blocks=[2, 2, 1, 1, 1])
    downs = [model.body[f"block{i}-down"] for i in range(1, 5)]
    assert all(d.kernel_size == 1 and d.stride == 2 for d in downs)
    assert model.body["block1-conv0"].kernel_size == 3  # the other layers keep 3x3 filters
    facts = model_facts("lipconvnet5", width=4, head="lln", down_kernel=1, blocks=[2, 2, 1, 1, 1])
    assert facts["parameters"] == sum(p.numel() for p in model.parameters()) and facts["depth"] == 7
    x, y = _images(22, 4), _images(23, 4)
    with torch.no_grad():
        fx, fy = model(x), model(y)
    assert fx.shape == (4, 10)
    assert float(((fx - fy).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max()) <= _bound(model)
    for bad in (2, 5, True, "1"):
        with pytest.raises(ConfigError, match="down_kernel"):
            LipConvNet(width=4, down_kernel=bad)


def test_lipconvnet8c_is_the_compact_layout_weight_for_weight():
    """The registered compact variant is LipConvnet with blocks [1,2,2,2,1] and down_kernel=1, the
    same layers and the same seeded initial weights; its options can still be overridden."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a = create_model("lipconvnet8c", width=4, head="lln")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        b = create_model("lipconvnet5", width=4, head="lln", blocks=[1, 2, 2, 2, 1], down_kernel=1)
    assert a.layer_names == b.layer_names and a.depth == 8
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert model_facts("lipconvnet8c", width=4)["depth"] == 8
    with torch.random.fork_rng():
        c = create_model("lipconvnet8c", width=4, blocks=[1, 1, 1, 1, 1], down_kernel=3)
    assert c.depth == 5 and c.body["block1-down"].kernel_size == 3
