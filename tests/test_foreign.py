"""certify.foreign: sound Lipschitz bounds of modules lipcert did not build (torch.fx graph walk).

Every accepted model: the bound is >= the exact float64 Jacobian spectral norm at random points.
Every op that cannot be bounded soundly is refused with a message naming the node and the op.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certify.errors import NotLipschitzError
from certify.foreign import GELU_LIPSCHITZ, bound_module
from certify.layers.norms import conv_norm_lower


def jacobian_norm(model: nn.Module, shape, points: int = 4, seed: int = 0) -> float:
    """max over random points of ||J(x)||_2, float64, by the dense Jacobian."""
    m = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(m, x)
        mat = jac.reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(mat, ord=2)))
    return best


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.05)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval()


def plain_cnn():
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(8 * 4 * 4, 10)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        out = x + self.c2(torch.relu(self.c1(x)))
        out = F.relu(out)
        return self.head(out.mean((2, 3)))


class Geometry(nn.Module):
    """Strided, dilated, grouped, functional convs and average pools."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.w = nn.Parameter(torch.randn(6, 8, 1, 1) * 0.3)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.gpool = nn.AdaptiveAvgPool2d((3, 2))
        self.fc = nn.Linear(6 * 3 * 2, 4)

    def forward(self, x):
        x = F.gelu(self.a(x))
        x = torch.tanh(self.b(x)) * 0.5
        x = F.conv2d(x, self.w, None, 1, 0)
        x = self.gpool(self.pool(x))
        return self.fc(x.view(x.size(0), -1))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)  # overlapping windows: factor 3
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), torch.sigmoid(self.b(x))], dim=1)
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("build, shape", [(plain_cnn, (3, 8, 8)), (Residual, (4, 6, 6)),
                                          (Geometry, (3, 9, 9)), (Branches, (3, 6, 6))],
                         ids=["conv-bn-relu-pool", "residual", "stride-dilation-groups-avgpool", "cat-maxpool"])
def test_bound_is_above_the_exact_jacobian_norm(build, shape):
    torch.manual_seed(1)
    model = build().eval()
    result = bound_module(model, shape)
    exact = jacobian_norm(model, shape)
    assert result.method == "fx-graph"
    assert result.lipschitz >= exact
    assert result.layers and all(b.bound > 0 for b in result.layers)
    print(f"{build.__name__}: bound {result.lipschitz:.4g}, exact at random points {exact:.4g}, "
          f"ratio {result.lipschitz / exact:.3g}")


def test_a_folded_conv_bn_is_bounded_nearly_exactly():
    """One linear layer: the Jacobian is the map itself, so the bound is its norm up to the conv
    bound's circular embedding (a product over several layers is looser: ||AB|| <= ||A|| ||B||)."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Flatten()))
    result = bound_module(model, (2, 8, 8))
    exact = jacobian_norm(model, (2, 8, 8), points=1)
    assert exact <= result.lipschitz <= 1.3 * exact
    print(f"folded conv+BN: bound / exact = {result.lipschitz / exact:.4f}")


def test_batchnorm_folding_is_tighter_than_the_product_and_still_sound():
    model = plain_cnn()
    folded = bound_module(model, (3, 8, 8))
    unfolded = bound_module(model, (3, 8, 8), fold_batchnorm=False)
    exact = jacobian_norm(model, (3, 8, 8))
    assert exact <= folded.lipschitz <= unfolded.lipschitz
    assert [b.kind for b in folded.layers].count("Conv2d+BatchNorm2d") == 2
    assert "BatchNorm2d" in [b.kind for b in unfolded.layers]
    print(f"folded {folded.lipschitz:.4g} unfolded {unfolded.lipschitz:.4g} exact {exact:.4g}")


def test_pool_and_activation_factors():
    result = bound_module(Branches().eval(), (3, 6, 6))
    kinds = {b.kind: b.bound for b in result.layers}
    assert kinds["MaxPool2d"] == pytest.approx(3.0)  # a pixel is in 3 x 3 windows
    assert kinds["sigmoid"] == 0.25
    res = bound_module(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), (1, 4, 4))
    assert res.lipschitz == pytest.approx(1.0)  # non-overlapping windows


def test_gelu_constant_is_the_sup_of_its_derivative():
    x = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(F.gelu(x).sum(), x)
    assert float(grad.abs().max()) <= GELU_LIPSCHITZ < float(grad.abs().max()) + 1e-6
    assert GELU_LIPSCHITZ == pytest.approx(1.1289, abs=1e-4)


def test_spectral_norm_underestimates_a_convolution_and_the_bound_does_not():
    """Spectral normalisation divides a conv weight by the norm of its (out, in k k) reshape (by
    power iteration): the conv operator's true norm is larger, so a product of 1s is no bound."""
    torch.manual_seed(0)
    sn = torch.nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(sn(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), sn(nn.Conv2d(8, 8, 3, padding=1)),
                          nn.ReLU(), nn.Flatten(), sn(nn.Linear(8 * 6 * 6, 5)))
    model.train()
    with torch.no_grad():
        for _ in range(50):  # converge the power iterations
            model(torch.randn(2, 3, 6, 6))
    model.eval()
    with pytest.raises(NotLipschitzError, match="training mode"):
        bound_module(copy.deepcopy(model).train(), (3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    result = bound_module(model, (3, 6, 6))
    assert torch.equal(model(x), before)  # the user's (parametrized) module still works, unchanged
    true_conv = conv_norm_lower(model[2].weight.detach(), (6, 6), padding=1)  # from below
    assert true_conv > 1.05  # the "1-Lipschitz" conv is not
    exact = jacobian_norm(model, (3, 6, 6))
    assert result.lipschitz >= exact
    assert result.lipschitz > 1.0
    assert torch.nn.utils.parametrize.is_parametrized(model[0])  # the user's module is untouched
    print(f"SN conv true norm >= {true_conv:.3f}; bound {result.lipschitz:.3f}, exact {exact:.3f}")


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.softmax(x, dim=-1))


class Opaque(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=-1).values  # a GroupSort-like op lipcert does not recognise


class MatMul(nn.Module):
    def forward(self, x):
        return torch.matmul(x, x)  # (N, 2, 4, 4) @ (N, 2, 4, 4)


class InPlaceShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.c(x)
        z = F.relu(y, inplace=True)
        return y + z


class BatchMix(nn.Module):
    def forward(self, x):
        return x.flatten(0)


@pytest.mark.parametrize("model, match", [
    (Softmaxed(), r"cannot bound node 'softmax' \(call_function softmax\) soundly; lipcert refuses to guess"),
    (Opaque(), r"node 'sort' \(call_function sort\)"),
    (MatMul(), r"node 'matmul' \(call_function matmul\)"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), r"node '1' \(call_module 1 \(LayerNorm\)\)"),
    (InPlaceShared(), "in place on a tensor that other nodes read"),
    (BatchMix(), "does not keep the batch"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
], ids=["softmax", "opaque", "matmul", "layernorm", "inplace-shared", "batch-mix", "reflect-pad"])
def test_refusals_name_the_node_and_op(model, match):
    shape = (2, 4, 4) if not isinstance(model, (Softmaxed, nn.Sequential)) or "Conv" in str(model) else (3, 4)
    if isinstance(model, nn.Sequential) and "Linear" in str(model):
        shape = (4,)
    with pytest.raises(NotLipschitzError, match=match):
        bound_module(model.eval(), shape)


def test_batchnorm_in_training_mode_or_without_running_stats_is_refused():
    model = plain_cnn().train()
    with pytest.raises(NotLipschitzError, match="training mode"):
        bound_module(model, (3, 8, 8))
    assert model.training  # untouched
    no_stats = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(NotLipschitzError, match="without running statistics"):
        bound_module(no_stats, (3, 4, 4))


def test_forward_hooks_and_untraceable_control_flow_are_refused():
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 100)
    with pytest.raises(NotLipschitzError, match="forward hooks"):
        bound_module(model, (3,))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(NotLipschitzError, match="torch.fx cannot trace"):
        bound_module(Branchy(), (3,))


def test_the_users_module_is_not_modified():
    model = plain_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bound_module(model, (3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert math.isfinite(bound_module(model, (3, 8, 8)).lipschitz)


# ---- `lipcert certify --module` ------------------------------------------------------------------

FOREIGN_SOURCE = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 16 * 16, 10))


def opaque():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.Softmax(dim=1))
'''


@pytest.fixture
def foreign_pkg(tmp_path, monkeypatch):
    import sys

    (tmp_path / "someones_model.py").write_text(FOREIGN_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("someones_model", None)


def _certify(*args):
    from click.testing import CliRunner

    from certify.cli import cli

    return CliRunner().invoke(cli, ["certify", *map(str, args)])


def test_cli_certifies_a_module_built_elsewhere_with_its_computed_bound(foreign_pkg):
    import json

    from safetensors.torch import save_file

    from certify.foreign import load_module
    from certify.lipschitz import empirical_lower_bound

    trained = load_module("someones_model:make", input_shape=(3, 32, 32)).module
    with torch.no_grad():  # weights that are not the factory's: --weights must be what is certified
        for p in trained.parameters():
            p.mul_(3.0)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(foreign_pkg / "w.safetensors"))
    r = _certify("--module", "someones_model:make", "--weights", foreign_pkg / "w.safetensors", "--input-shape",
                 "3,32,32", "--mean", "0.5", "--std", "0.25", "--dataset", "synthetic", "--limit", "12", "--format",
                 "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    bound = summary["certificate"]["lipschitz_upper_bound"]
    assert "torch.fx" in summary["certificate"]["bound_source"]
    model = load_module("someones_model:make", foreign_pkg / "w.safetensors", (3, 32, 32), [0.5], [0.25])
    assert bound == pytest.approx(model.lipschitz_bound(), rel=1e-12)
    # the normalisation's 1/std multiplies the module's bound, and the result bounds the whole map
    assert bound == pytest.approx(4 * bound_module(model.module, (3, 32, 32)).lipschitz, rel=1e-12)
    assert empirical_lower_bound(model, torch.rand(4, 3, 32, 32), iters=8) <= bound


@pytest.mark.parametrize("args, code, message", [
    (["--module", "someones_model:opaque", "--input-shape", "3,32,32", "--dataset", "synthetic"], 1, "refuses to guess"),
    (["--module", "someones_model:nothing", "--dataset", "synthetic"], 1, "has no 'nothing'"),
    (["--module", "someones_model", "--dataset", "synthetic"], 1, "package.module:factory"),
    (["--module", "someones_model:make", "--input-shape", "3,32,32"], 2, "records no dataset"),
    (["--dataset", "synthetic"], 2, "MODEL_FILE or --module"),
    (["--module", "someones_model:make", "--input-shape", "3,32,32", "--mean", "0.5", "--dataset", "synthetic"], 1,
     "both --mean and --std"),
])
def test_cli_refusals_for_modules_built_elsewhere(foreign_pkg, args, code, message):
    r = _certify(*args, "--device", "cpu")
    assert r.exit_code == code and message in r.output, r.output


def test_the_audit_attacks_a_module_built_elsewhere_inside_its_radii(foreign_pkg):
    import json

    from click.testing import CliRunner

    from certify.cli import cli

    r = CliRunner().invoke(cli, ["attack", "--module", "someones_model:make", "--dataset", "synthetic", "--limit",
                                 "10", "--audit", "--steps", "5", "--format", "json", "--device", "cpu"])
    assert r.exit_code == 0, r.output  # exit 3 would be a violation
    assert json.loads(r.stdout)["audit"]["violations"] == 0
    r = CliRunner().invoke(cli, ["attack", "--dataset", "synthetic"])
    assert r.exit_code == 2 and "MODEL_FILE or --module" in r.output


def test_a_final_dense_layer_gives_the_pairwise_certificate():
    from certify.certificates import Certifier
    from certify.foreign import ForeignModel

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    dense = nn.Sequential(*body, nn.Linear(4 * 8 * 8, 6))
    b = bound_module(dense, (3, 8, 8))
    assert b.final_weight is not None and b.feature_lipschitz == pytest.approx(bound_module(body, (3, 8, 8)).lipschitz)
    assert bound_module(nn.Sequential(*dense, nn.ReLU()), (3, 8, 8)).final_weight is None  # not the output
    model = ForeignModel(dense, (3, 8, 8))
    assert model.certificate == "pairwise"
    x = torch.rand(16, 3, 8, 8)
    pair = Certifier(model)
    glob = Certifier(model, method="global")
    assert pair.method == "pairwise" and glob.method == "global"
    r_pair, r_glob = pair(x)[3], glob(x)[3]
    # both sound; pairwise uses ||w_y - w_j|| <= sqrt(2) ||W||: never looser than the global one here
    assert (r_pair >= r_glob * (1 - 1e-9)).all() and (r_pair > r_glob).any()
    # soundness against the exact margin geometry: no sample's class changes inside its radius
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            d = torch.randn(x.shape, generator=gen)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            moved = model(x + 0.999 * r_pair.float().view(-1, 1, 1, 1) * d).argmax(1)
            assert torch.equal(moved[r_pair > 0], pair(x)[1][r_pair > 0])


# ---- ONNX graphs built elsewhere ------------------------------------------------------------------


def _export(model, path, shape=(3, 16, 16)):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.rand(1, *shape), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


def _foreign_cnn(side: int = 16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(6 * (side // 8) ** 2, 10)).eval()


def test_a_foreign_onnx_graph_is_translated_checked_and_bounded(tmp_path):
    pytest.importorskip("onnxruntime")
    from certify.loading import load_any

    torch_model = _foreign_cnn()
    with torch.no_grad():
        torch_model[1].running_var.uniform_(0.5, 2.0)  # a BatchNorm that is not the identity
    path = _export(torch_model, tmp_path / "theirs.onnx")
    model = load_any(path)
    assert "ONNX graph built elsewhere" in model.bound_source and model.certificate == "pairwise"
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), torch_model(x), atol=1e-5)
    # the bound of the graph's own weights bounds the exact Jacobian of the function it computes
    exact = 0.0
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: torch_model.double()(v.view(1, 3, 16, 16)).flatten(),
                                                 x[i].double().flatten())
        exact = max(exact, float(torch.linalg.matrix_norm(jac, ord=2)))
    torch_model.float()
    head_norm = float(torch.linalg.matrix_norm(torch_model[-1].weight.detach().double(), ord=2))
    assert exact <= model.feature_lipschitz_bound() * head_norm * (1 + 1e-6)
    assert model.layer_bounds()


def test_cli_certifies_a_foreign_onnx_file_and_refuses_ops_it_cannot_bound(tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    path = _export(_foreign_cnn(32), tmp_path / "theirs.onnx", (3, 32, 32))
    r = _certify(path, "--dataset", "synthetic", "--limit", "10", "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "translated op for op" in json.loads(r.stdout)["certificate"]["bound_source"]
    soft = _export(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.Softmax(dim=1)), tmp_path / "soft.onnx",
                   (3, 32, 32))
    r = _certify(soft, "--dataset", "synthetic", "--limit", "10", "--device", "cpu")
    assert r.exit_code == 1 and "Softmax" in r.output and "refuses to guess" in r.output


def test_a_parametrisation_that_moves_in_every_forward_is_frozen_for_certification():
    """A parametrisation with state updated in every forward (as a power iteration in eval mode):
    the certified model is a copy with the weights fixed, so its outputs and bound do not drift."""
    from torch.nn.utils import parametrize as P

    from certify.foreign import ForeignModel

    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, w):
            self.calls += 1
            return w * (1 + 0.1 * self.calls)

    torch.manual_seed(0)
    user = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    P.register_parametrization(user[1], "weight", Drifting())
    model = ForeignModel(user, (3, 8, 8))
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    w = model.module[1].weight.detach().double()
    assert model.feature_lipschitz_bound() == pytest.approx(1.0)  # Flatten only before the dense layer
    assert float(torch.linalg.matrix_norm(w, 2)) <= model.head.lipschitz_bound() <= float(torch.linalg.matrix_norm(w, 2)) * (1 + 1e-6)
    assert isinstance(user[1].weight, torch.Tensor)  # the user's module is untouched and still works


def test_the_graph_walk_is_cached_per_weight_state_and_redone_after_a_change():
    from certify.foreign import ForeignModel

    torch.manual_seed(0)
    model = ForeignModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)), (3, 4, 4))
    first = model.foreign_bound()
    assert model.foreign_bound() is first  # the same weights: no second walk
    with torch.no_grad():
        model.module[1].weight.mul_(2.0)  # an in-place edit bumps the version counter
    again = model.foreign_bound()
    assert again is not first and model.head.lipschitz_bound() == pytest.approx(
        2 * linear_norm(first.final_weight), rel=1e-6)  # the walk's weight is a copy: still the old one


def linear_norm(w):
    return float(torch.linalg.matrix_norm(w.double(), 2))
