"""The GPU recipe ``bronet-cifar`` (BRONet's published CIFAR configuration) and the training options it
needs: NAdam, Lookahead, learning-rate warmup, EMMA's eps ramp and logit annealing on EMMA's
logits (``emma_la``). Tiny scales on a CPU; the recipe itself is for GPUs and is not measured here."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from certify.cli import cli
from certify.errors import ConfigError
from certify.losses import per_sample_loss
from certify.models import model_facts
from certify.optim import Lookahead, build_optimizer
from certify.recipes import recipe_defaults
from certify.train import TrainConfig, learning_rate, scheduled_lr, train, training_eps

#: The recipe at a size a loaded CPU trains in seconds: its options, but width 8, depth 2, 16 features.
TINY_RECIPE = ["train", "--recipe", "bronet-cifar", "--dataset", "synthetic", "--synthetic-size", "40",
               "--batch-size", "12", "--epochs", "2", "--width", "8", "--depth", "2", "--model-option", "features=16",
               "--model-option", "dense_layers=2", "--power-iters", "1", "--no-progress"]
TINY = dict(model="lipconvnet5", width=2, dataset="synthetic", synthetic_size=40, batch_size=12, epochs=2,
            power_iters=2, lr=0.05)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- the recipe ---------------------------------------------------------------------------------

def test_the_recipe_is_bronets_published_cifar_configuration():
    """ntuaislab/BRONet bronet/configs/benchmark_reproduce/cifar10.yaml, option by option."""
    r = recipe_defaults("bronet-cifar")
    assert (r["model"], r["depth"], r["width"], r["activation"]) == ("liresnet", 12, 512, "maxmin")
    assert r["model_options"] == {"block": "bro", "features": 2048, "dense_layers": 9}  # the neck's + 8 linear
    assert (r["batch_size"], r["epochs"], r["warmup_epochs"], r["lr"], r["weight_decay"]) == (256, 800, 20, 1e-3, 4e-5)
    assert r["decay_all"] and r["grad_clip"] == 3 and r["optimizer"] == "nadam" and r["lookahead"] == 6
    assert (r["loss"], r["train_eps"], r["train_eps_ramp"]) == ("emma_la", 0.1411764705882353, (0.1, 3.0))
    assert (r["la_alpha"], r["la_beta"], r["offset"], r["temperature"]) == (1.0, 5.0, 2.0, 0.75)
    TrainConfig(**r).validate()
    facts = model_facts("liresnet", depth=12, width=512, **r["model_options"])  # the full size, on the meta device
    assert facts["layer"] == "bro" and facts["dense_layers"] == 9 and 70e6 < facts["parameters"] < 80e6


def test_the_recipe_trains_at_a_tiny_size_and_certifies(tmp_path):
    out = tmp_path / "run"
    r = run(*TINY_RECIPE, "--device", "auto", "--output", out)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "bronet-cifar" and config["width"] == 8 and config["epochs"] == 2
    # --model-option overrides one key of the recipe's model options, not all of them
    assert config["model_options"] == {"block": "bro", "features": 16, "dense_layers": 2}
    assert (config["optimizer"], config["lookahead"], config["loss"], config["la_beta"]) == ("nadam", 6, "emma_la", 5.0)
    # the recipe's 20 warmup epochs are longer than this 2-epoch run: the lr only rises (step i of 60: i/60 lr)
    assert "the learning rate rises to 0.0001, not to --lr 0.001" in r.stderr
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [float(row["lr"]) for row in rows] == pytest.approx([1e-3 * 3 / 60, 1e-3 * 6 / 60])
    from certify.devices import resolve_device

    assert config["resolved_device"] == str(resolve_device("auto"))
    from certify.loading import load

    model = load(out / "model.safetensors")
    assert [type(m).__name__ for m in model.body.values()][2] == "BROConv2d"
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    r = run("certify", out / "model.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "pairwise" in r.stdout


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_the_recipe_runs_unchanged_under_torchrun(tmp_path):
    """Two CPU processes (gloo) train the recipe's tiny run as one process does (NAdam,
    Lookahead, warmup, emma_la, BRO blocks): the same weights up to the order of sums."""
    lipcert = [sys.executable, "-c", "from certify.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = TINY_RECIPE + ["--warmup-epochs", "1", "--lookahead", "2", "--device", "cpu"]
    ddp = subprocess.run(_torchrun() + ["--nproc_per_node", "2", "--no-python"] + lipcert + args
                         + ["--output", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    r = run(*args, "--output", tmp_path / "one")
    assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert len(rows) == 2 and rows[-1]["val_clean_acc"] != ""


# ---- losses -------------------------------------------------------------------------------------

def test_la_alpha_and_beta():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    ce = F.cross_entropy((logits - 0.5 * F.one_hot(y, 3)) / 0.75, y, reduction="none")
    p = torch.exp(-ce)
    got = per_sample_loss(logits, y, "la", offset=0.5, temperature=0.75, la_alpha=1.0, la_beta=5.0)
    assert torch.allclose(got, 0.75 * (1 - p) ** 5 * ce)
    default = per_sample_loss(logits, y, "la", offset=0.5, temperature=0.75)
    assert torch.equal(default, 0.75 * 0.25 * (1 - p).pow(2.0) * ce)  # the LipConvnet defaults, as before


def test_emma_la_is_logit_annealing_on_emmas_logits_with_bronets_floor():
    logits = torch.tensor([[3.0, 1.0, 2.9], [0.0, 2.0, -1.0]])
    y = torch.tensor([0, 0])
    k, eps = 2.0, 0.5
    got = per_sample_loss(logits, y, "emma_la", pair_lipschitz=k, eps=eps, offset=1.0, temperature=0.5,
                          la_alpha=1.0, la_beta=5.0)
    # sample 0: margins 2.0, 0.1 -> lifted by min(m/K, eps) K = 1.0, 0.1 (as EMMA)
    # sample 1: class 1 is ahead: the lift keeps 1% of eps (0.01 * 0.5 * 2 = 0.01), class 2 as EMMA (1.0)
    lifted = torch.tensor([[3.0, 2.0, 3.0], [0.0, 2.01, 0.0]])
    ce = F.cross_entropy((lifted - 1.0 * F.one_hot(y, 3)) / 0.5, y, reduction="none")
    assert torch.allclose(got, 0.5 * (1 - torch.exp(-ce)) ** 5 * ce)
    emma = per_sample_loss(logits, y, "emma", pair_lipschitz=k, eps=eps)  # EMMA itself has no floor
    assert torch.allclose(emma[1], F.cross_entropy(torch.tensor([[0.0, 2.0, 0.0]]), y[1:]))


# ---- schedules ----------------------------------------------------------------------------------

def test_warmup_then_the_schedule_over_the_other_steps():
    cfg = TrainConfig(lr=1e-3, schedule="cosine")
    w, total = 10, 110
    lrs = [scheduled_lr(cfg, it, total, warmup=w) for it in range(total)]
    # step i = it + 1 gets lr i / W below W (the LiResNet/BRONet scheduler), then cosine from lr
    assert lrs[:9] == pytest.approx([1e-3 * i / 10 for i in range(1, 10)])
    assert lrs[9] == pytest.approx(1e-3) and lrs[59] == pytest.approx(0.5e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[-2] > 0  # step T: the end of the cosine, as theirs
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert [learning_rate(cfg, it, total) for it in range(total)] == [scheduled_lr(cfg, it, total, 0)
                                                                     for it in range(total)]
    step = TrainConfig(lr=0.1, schedule="step")
    assert scheduled_lr(step, 9, 110, warmup=10) == pytest.approx(0.1)
    assert scheduled_lr(step, 9 + 50, 110, warmup=10) == pytest.approx(0.01)  # 50% of the 100 steps after warmup


def test_train_eps_ramp():
    cfg = TrainConfig(train_eps=0.2, train_eps_ramp=(0.1, 3.0))
    assert training_eps(cfg, 0.0) == pytest.approx(0.02)
    assert training_eps(cfg, 0.25) == pytest.approx(0.2 * (0.1 + 2.9 * 0.5))
    assert training_eps(cfg, 0.5) == training_eps(cfg, 0.9) == pytest.approx(0.6)
    default = TrainConfig()
    assert training_eps(default, 0.0) == training_eps(default, 0.7) == 36 / 255  # exactly the old constant


# ---- optimisers ---------------------------------------------------------------------------------

def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]


def _quadratic_steps(opt, params, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
        opt.step()


def test_lookahead_moves_slow_weights_every_k_steps():
    params = _params()
    start = [p.detach().clone() for p in params]
    base = torch.optim.SGD([{"params": params, "weight_decay": 0.0}], lr=0.1)
    la = Lookahead(base, k=3, alpha=0.5)
    # the fast weights after 3 plain SGD steps from the start
    ref = [torch.nn.Parameter(s.clone()) for s in start]
    _quadratic_steps(torch.optim.SGD(ref, lr=0.1), ref, 3)
    _quadratic_steps(la, params, 3)
    for p, s, f in zip(params, start, ref):
        assert torch.allclose(p, s + 0.5 * (f - s)), "slow = start + alpha (fast - start), fast restarts from it"
    la.sync()  # one more update now: the slow and fast weights agree, so nothing moves
    for p, s, f in zip(params, start, ref):
        assert torch.allclose(p, s + 0.5 * (f - s))


def test_lookahead_with_k1_alpha1_is_the_base_optimizer():
    a, b = _params(), _params()
    _quadratic_steps(Lookahead(torch.optim.NAdam(a, lr=0.01), k=1, alpha=1.0), a, 5)
    _quadratic_steps(torch.optim.NAdam(b, lr=0.01), b, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_lookahead_state_resumes_bit_for_bit_and_refuses_a_mismatch():
    a = _params()
    opt = build_optimizer([{"params": a, "weight_decay": 1e-3}], "nadam", lr=0.01, lookahead=4)
    _quadratic_steps(opt, a, 6)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in a], "opt": opt.state_dict()}, buf)  # as train_state.pt
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _quadratic_steps(opt, a, 7, seed=2)
    b = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    again = build_optimizer([{"params": b, "weight_decay": 1e-3}], "nadam", lr=0.01, lookahead=4)
    again.load_state_dict(saved["opt"])
    _quadratic_steps(again, b, 7, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match="k=4"):
        build_optimizer([{"params": b}], "nadam", lr=0.01, lookahead=5).load_state_dict(saved["opt"])
    with pytest.raises(ConfigError, match="without --lookahead"):
        build_optimizer([{"params": b}], "sgd", lr=0.01, lookahead=4).load_state_dict(
            torch.optim.SGD(b, lr=0.01).state_dict())


@pytest.mark.parametrize("kwargs,message", [(dict(k=0), "k >= 1"), (dict(k=2.5), "k >= 1"), (dict(alpha=0), "alpha"),
                                            (dict(alpha=1.5), "alpha")])
def test_lookahead_refuses_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Lookahead(torch.optim.SGD(_params(), lr=0.1), **kwargs)


def test_build_optimizer():
    p = _params()
    sgd = build_optimizer([{"params": p, "weight_decay": 5e-4}], lr=0.1, momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9  # the default, as before
    nadam = build_optimizer([{"params": p, "weight_decay": 4e-5}], "nadam", lr=1e-3)
    assert type(nadam) is torch.optim.NAdam and nadam.param_groups[0]["weight_decay"] == 4e-5
    assert isinstance(build_optimizer([{"params": p}], "nadam", lr=1e-3, lookahead=6), Lookahead)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        build_optimizer([{"params": p}], "adam", lr=1e-3)


# ---- the training loop with the new options ----------------------------------------------------

def test_nadam_lookahead_warmup_run_resumes_bit_identically(tmp_path):
    kw = dict(TINY, optimizer="nadam", lr=1e-3, schedule="cosine", lookahead=2, warmup_epochs=1.0, loss="emma_la",
              head="lln",
              train_eps_ramp=(0.1, 3.0), la_alpha=1.0, la_beta=5.0, grad_clip=3.0, decay_all=True)
    full = train(TrainConfig(**kw, output=str(tmp_path / "full")), verbose=False)
    # 3 steps an epoch: warmup over epoch 1 (its last step gets lr), then cosine to 0 at step 6
    assert [r["lr"] for r in full.metrics] == pytest.approx([1e-3, 0.0], abs=1e-12)

    class Killed(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(**kw, output=str(tmp_path / "cut")), verbose=False, on_epoch_end=stop)
    train(TrainConfig(**kw, output=str(tmp_path / "cut"), resume=True), verbose=False)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="optimizer 'nadam' -> 'sgd'"):
        train(TrainConfig(**{**kw, "optimizer": "sgd"}, output=str(tmp_path / "cut"), resume=True), verbose=False)


@pytest.mark.parametrize("bad", [dict(optimizer="adam"), dict(lookahead=-1), dict(lookahead=True),
                                 dict(lookahead_alpha=0.0), dict(lookahead_alpha=1.5), dict(warmup_epochs=-1.0),
                                 dict(warmup_epochs=float("nan")), dict(train_eps=0.0),
                                 dict(train_eps=float("inf")), dict(train_eps_ramp=(0.1,)),
                                 dict(train_eps_ramp=(-0.1, 1.0)), dict(la_alpha=0.0), dict(la_beta=-1.0)])
def test_config_refuses_bad_new_options(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad).validate()


def test_cli_accepts_the_new_options(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--model", "lipconvnet5", "--width", "2", "--head", "lln", "--synthetic-size", "40",
            "--batch-size", "12", "--epochs", "2", "--power-iters", "1", "--device", "cpu", "--no-progress",
            "--optimizer", "nadam", "--lr", "0.001", "--lookahead", "3", "--lookahead-alpha", "0.8",
            "--warmup-epochs", "0.5", "--loss", "emma_la", "--train-eps", "72/255", "--train-eps-ramp", "0.5", "2",
            "--la-alpha", "1", "--la-beta", "5", "--output", out)
    assert r.exit_code == 0, r.output
    c = json.loads((out / "config.json").read_text())
    assert (c["optimizer"], c["lookahead"], c["lookahead_alpha"], c["warmup_epochs"]) == ("nadam", 3, 0.8, 0.5)
    assert (c["loss"], c["train_eps"], c["train_eps_ramp"]) == ("emma_la", 72 / 255, [0.5, 2.0])
    assert (c["la_alpha"], c["la_beta"]) == (1.0, 5.0)


@pytest.mark.parametrize("args,message", [
    (["--optimizer", "adam"], "--optimizer"),
    (["--lookahead", "-1"], "--lookahead"),
    (["--lookahead-alpha", "0"], "--lookahead-alpha"),
    (["--lookahead-alpha", "1.5"], "--lookahead-alpha"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--train-eps", "abc"], "malformed eps"),
    (["--train-eps", "0"], "eps must be a positive"),
    (["--train-eps-ramp", "-1", "1"], "--train-eps-ramp"),
    (["--train-eps-ramp", "1"], "--train-eps-ramp"),
    (["--la-alpha", "0"], "--la-alpha"),
    (["--la-beta", "-1"], "--la-beta"),
    (["--loss", "emma-la"], "--loss"),
    (["--recipe", "bronet"], "--recipe"),
])
def test_cli_refuses_bad_values_with_a_usage_error(args, message):
    r = run("train", "--synthetic-size", "40", "--epochs", "1", "--device", "cpu", *args)
    assert r.exit_code == 2 and message in r.output, r.output
