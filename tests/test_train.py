"""Training library: losses, schedule, run folder, checkpoints, determinism, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from certify.checkpoint import read_metadata
from certify.loading import load
from certify.errors import ConfigError, RunFolderError
from certify.losses import per_sample_loss, true_class_margin
from certify.train import EPS_COLUMNS, METRIC_COLUMNS, TrainConfig, learning_rate, parameter_groups, train

#: A run small enough for a loaded 2-core machine: ~36 training and 4 validation images.
TINY = dict(model="lipconvnet5", width=2, dataset="synthetic", synthetic_size=40, batch_size=12,
            epochs=2, power_iters=2, lr=0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted 2-epoch tiny run, shared by the tests that inspect or compare with it."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return train(tiny(out), verbose=False), out


def tiny(out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw}, output=str(out))


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- pieces -------------------------------------------------------------------------------------

def test_losses():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(true_class_margin(logits, y), torch.tensor([1.5, -2.0]))
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(per_sample_loss(logits, y, "ce"), ce)
    cr = per_sample_loss(logits, y, "cr", gamma=0.5, lipschitz=2.0)
    # CE - gamma * relu(margin) / (sqrt(2) L); the misclassified sample gets no bonus.
    assert torch.allclose(cr, ce - 0.5 * torch.tensor([1.5 / (math.sqrt(2) * 2), 0.0]))
    off = per_sample_loss(logits, y, "offset", offset=1.0, temperature=0.5)
    shifted = logits - torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert torch.allclose(off, torch.nn.functional.cross_entropy(shifted / 0.5, y, reduction="none"))
    assert (off > per_sample_loss(logits, y, "ce", temperature=0.5)).all()  # the offset makes it harder


def test_step_and_cosine_schedules():
    cfg = TrainConfig(lr=0.1, schedule="step")
    assert [learning_rate(cfg, i, 100) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = TrainConfig(lr=0.2, schedule="cosine")
    assert learning_rate(cos, 0, 10) == pytest.approx(0.2) and learning_rate(cos, 5, 10) == pytest.approx(0.1)
    assert learning_rate(cos, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_only_on_soc_filters(tiny_model):
    from certify.layers.soc import SOC

    model = tiny_model(activation="hh1", width=2)
    decay, rest = parameter_groups(model, 5e-4)
    soc_weights = {id(m.weight) for m in model.modules() if isinstance(m, SOC)}
    assert {id(p) for p in decay["params"]} == soc_weights and decay["weight_decay"] == 5e-4
    assert rest["weight_decay"] == 0 and len(rest["params"]) > 0  # biases and HH1 angles
    assert len(parameter_groups(model, 5e-4, decay_all=True)) == 1


def test_config_validation():
    for bad in (dict(epochs=0), dict(batch_size=0), dict(lr=0), dict(loss="hinge"), dict(schedule="linear"),
                dict(momentum=1.0), dict(resume=True, overwrite=True)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


# ---- a run end to end -----------------------------------------------------------------------------

def test_run_folder_checkpoints_and_reload(reference_run):
    result, run = reference_run
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.csv", "model.safetensors",
                                              "best.safetensors", "train_state.pt"}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and list(rows[0]) == list(METRIC_COLUMNS)
    for r in rows:
        assert 0 <= float(r["val_clean_acc"]) <= 1 and float(r[EPS_COLUMNS[0]]) <= float(r["val_clean_acc"])
        assert float(r["lipschitz_bound"]) >= 1 / 0.3  # at least 1/std of the synthetic data
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "lipconvnet5" and config["train_images"] == 36 and config["val_images"] == 4

    meta = read_metadata(run / "model.safetensors")
    assert meta["dataset"] == "synthetic" and meta["epoch"] == "2" and meta["seed"] == "0"
    assert len(meta["dataset_fingerprint"]) == 16 and json.loads(meta["class_names"])[0] == "h-stripes"
    assert json.loads(meta["config"])["epochs"] == 2
    # best.safetensors is the epoch with the best validation certified accuracy at 36/255.
    best_epoch = int(read_metadata(run / "best.safetensors")["epoch"])
    assert result.best["epoch"] == best_epoch
    key = [(float(r[EPS_COLUMNS[0]]), float(r["val_clean_acc"])) for r in rows]
    assert key[best_epoch - 1] == max(key)

    # The checkpoint gives the same logits as the in-memory model.
    loaded = load(run / "model.safetensors")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert loaded.class_names[:2] == ["h-stripes", "v-stripes"]


def test_same_seed_same_weights_and_resume_is_bit_identical(tmp_path, reference_run):
    a, a_dir = reference_run
    b = train(tiny(tmp_path / "b"), verbose=False)
    ta, tb = tensors(a_dir / "model.safetensors"), tensors(tmp_path / "b" / "model.safetensors")
    assert same_tensors(ta, tb)
    assert a.metrics[-1]["train_loss"] == b.metrics[-1]["train_loss"]

    class Killed(Exception):
        pass

    def kill_after_first_epoch(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(tiny(tmp_path / "c"), verbose=False, on_epoch_end=kill_after_first_epoch)
    assert int(read_metadata(tmp_path / "c" / "model.safetensors")["epoch"]) == 1
    assert not same_tensors(ta, tensors(tmp_path / "c" / "model.safetensors"))
    # A stray temporary file from a write killed half-way must not matter.
    (tmp_path / "c" / ".train_state.pt.abc.tmp").write_bytes(b"partial")
    resumed = train(tiny(tmp_path / "c", resume=True), verbose=False)
    assert resumed.epochs_completed == 2
    assert same_tensors(ta, tensors(tmp_path / "c" / "model.safetensors"))
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "c" / "metrics.csv"))] == ["1", "2"]


def test_resume_of_a_finished_run_does_nothing(tmp_path, reference_run):
    import shutil

    _, a_dir = reference_run
    shutil.copytree(a_dir, tmp_path / "copy")
    before = (tmp_path / "copy" / "model.safetensors").read_bytes()
    r = train(tiny(tmp_path / "copy", resume=True), verbose=False)
    assert r.epochs_completed == 2 and len(r.metrics) == 2
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == before


def test_resume_refuses_a_different_model_or_data(tmp_path, reference_run):
    import shutil

    _, a_dir = reference_run
    shutil.copytree(a_dir, tmp_path / "a")
    with pytest.raises(ConfigError, match="width 2 -> 4"):
        train(tiny(tmp_path / "a", resume=True, width=4), verbose=False)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train(tiny(tmp_path / "empty", resume=True), verbose=False)
    (tmp_path / "a" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="not a readable lipcert training state"):
        train(tiny(tmp_path / "a", resume=True), verbose=False)


def test_existing_or_unwritable_run_folder(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="already has files.*--resume.*--overwrite"):
        train(tiny(run), verbose=False)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunFolderError, match="cannot write to output folder"):
        train(tiny(blocker / "sub"), verbose=False)


def test_losses_train_without_validation_split(tmp_path):
    # CR loss, no validation split (val_split=0): no best.safetensors, metrics without val columns.
    r = train(tiny(tmp_path / "a", loss="cr", epochs=1, val_split=0, power_iters=0, schedule="cosine",
                   grad_clip=1.0), verbose=False)
    assert r.best is None and not (tmp_path / "a" / "best.safetensors").exists()
    assert (tmp_path / "a" / "model.safetensors").exists() and math.isfinite(r.metrics[0]["train_loss"])


# ---- DDP ------------------------------------------------------------------------------------------

def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_ddp_on_gloo_matches_a_single_process(tmp_path):
    """Two CPU processes (gloo) train the same global batches as one process: same weights up to
    the order of floating-point sums."""
    args = ["train", "--model", "lipconvnet5", "--width", "2", "--synthetic-size", "40", "--batch-size", "12",
            "--epochs", "2", "--power-iters", "2", "--lr", "0.05", "--device", "cpu", "--no-progress"]
    lipcert = [sys.executable, "-c", "from certify.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(_torchrun() + ["--nproc_per_node", "2", "--no-python"] + lipcert
                         + args + ["--output", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2
    single = train(tiny(tmp_path / "one"), verbose=False)
    a, b = tensors(tmp_path / "ddp" / "model.safetensors"), tensors(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["val_clean_acc"]) == pytest.approx(single.metrics[-1]["val_clean_acc"])


def test_ddp_with_a_time_budget_stops_every_rank_together(tmp_path):
    """Under torchrun every rank takes the same plan and stops at the same step (a rank that
    stopped alone would hang the others in their next all-reduce)."""
    args = ["train", "--model", "lipconvnet5", "--width", "2", "--synthetic-size", "40", "--batch-size", "12",
            "--epochs", "1000", "--budget-minutes", "0.1", "--power-iters", "1", "--device", "cpu", "--no-progress",
            "--output", str(tmp_path / "ddp")]
    lipcert = [sys.executable, "-c", "from certify.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(_torchrun() + ["--nproc_per_node", "2", "--no-python"] + lipcert + args,
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "train_state.pt", weights_only=True)
    assert state["finished"]
    on_plan = state["iteration"] == state["budget"]["planned_steps"]
    assert on_plan or state["budget"]["used_s"] >= 6.0  # stopped on the plan, or by the hard stop
    assert state["budget"]["used_s"] < 6.0 + 5.0
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert rows[-1]["val_clean_acc"] != ""


def test_channels_last_trains_the_same_weights(tmp_path, reference_run):
    """The NHWC memory format changes the speed, not the result (up to summation order)."""
    result = train(tiny(tmp_path / "nhwc", channels_last=True), verbose=False)
    a, b = tensors(tmp_path / "nhwc" / "model.safetensors"), tensors(reference_run[1] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert result.metrics[-1]["val_clean_acc"] == pytest.approx(reference_run[0].metrics[-1]["val_clean_acc"])


# ---- EMMA and logit annealing (certify.losses) --------------------------------------------------


def test_emma_lifts_other_logits_to_the_eps_ball_clipped_at_the_boundary():
    from certify.losses import per_sample_loss

    logits = torch.tensor([[3.0, 1.0, 2.9], [0.0, 2.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    k, eps = 2.0, 0.5
    loss = per_sample_loss(logits, y, "emma", pair_lipschitz=k, eps=eps)
    # sample 0: margins 2.0 and 0.1 -> eps_j = min(margin / K, eps) = 0.5 and 0.05: lifted by 1.0 and 0.1
    lifted0 = torch.tensor([3.0, 2.0, 3.0])
    # sample 1 is misclassified: class 1 is ahead (eps_j = 0, not lifted); class 2 is behind by 1.0,
    # lifted by min(1.0 / K, eps) K = 1.0
    lifted1 = torch.tensor([0.0, 2.0, 0.0])
    want = F.cross_entropy(torch.stack([lifted0, lifted1]), y, reduction="none")
    assert torch.allclose(loss, want)
    loss.sum().backward()  # eps_j carries no gradient; K (a number here) neither
    assert torch.isfinite(logits.grad).all()


def test_emma_uses_the_lln_heads_row_distances(tiny_model):
    from certify.losses import margin_lipschitz

    model = tiny_model(head="lln", width=2)
    k = margin_lipschitz(model, 2.0)
    w = model.head.normalized_weight().detach()
    assert torch.allclose(k[1, 3], 2.0 * (w[1] - w[3]).norm(), rtol=1e-5)
    k.sum().backward()  # differentiable in the head's weight, as in the reference
    assert model.head.weight.grad is not None
    assert margin_lipschitz(tiny_model(head="ortho", width=2), 2.0) == pytest.approx(2 * 2**0.5)


def test_logit_annealing_is_a_focal_weighted_offset_ce():
    from certify.losses import LA_ALPHA, LA_BETA, per_sample_loss

    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    y = torch.tensor([0, 0])
    off = per_sample_loss(logits, y, "offset", offset=0.5, temperature=0.5)
    la = per_sample_loss(logits, y, "la", offset=0.5, temperature=0.5)
    p = torch.exp(-off)
    assert torch.allclose(la, 0.5 * LA_ALPHA * (1 - p) ** LA_BETA * off)
    # a confidently certified sample stops pushing; a marginal one keeps most of its loss
    assert la[0] / off[0] < 1e-4 < la[1] / off[1]


@pytest.mark.parametrize("loss", ["emma", "la"])
def test_training_with_the_new_losses_runs(loss, run_dir):
    cfg = TrainConfig(model="lipconvnet5", width=2, dataset="synthetic", synthetic_size=60, epochs=1, batch_size=16,
                      loss=loss, head="lln", device="cpu", output=str(run_dir), power_iters=0)
    res = train(cfg, progress=False)
    assert res.epochs_completed == 1 and math.isfinite(res.metrics[-1]["train_loss"])


def test_divergence_is_a_clear_error_without_a_torch_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the message once converted a grad-requiring tensor
        with pytest.raises(ConfigError, match=r"training diverged \(loss (nan|inf)\) at epoch 1, step \d+; lower --lr"):
            train(tiny(tmp_path / "run", lr=1e30, head="mlp"), verbose=False)


@pytest.mark.parametrize("given, want", [(None, None), (0.5, 0.5), (2, 2.0), ("1.5", 1.5), ("2x", "2x"), (" 2X", "2x"),
                                         ("0.5x", "0.5x"), ("0x", "0x")])
def test_offset_is_a_number_or_a_multiple_of_the_margin(given, want):
    from certify.losses import parse_offset

    assert parse_offset(given) == want


@pytest.mark.parametrize("bad", ["x", "-1x", "-0.5", "2xx", "two", "nanx", "infx", float("nan"), -1.0, True, [2]])
def test_bad_offsets_are_refused(bad):
    from certify.errors import ConfigError
    from certify.losses import parse_offset
    from certify.train import TrainConfig

    with pytest.raises(ConfigError, match="offset must be"):
        parse_offset(bad)
    with pytest.raises(ConfigError, match="offset must be"):
        TrainConfig(offset=bad).validate()


def test_a_multiple_of_the_margin_scales_the_default_offset(tiny_model):
    from certify.losses import default_offset, resolve_offset

    model = tiny_model(head="lln", width=2)
    margin = default_offset(model)
    assert margin == pytest.approx(2 ** 0.5 / min(model.std) * 36 / 255)
    assert resolve_offset("2x", model) == pytest.approx(2 * margin)
    assert resolve_offset(None, model) == pytest.approx(margin)
    assert resolve_offset(0.3, model) == 0.3
