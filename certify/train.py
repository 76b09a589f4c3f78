"""Training of 1-Lipschitz networks with the recipe of Singla & Feizi (NeurIPS 2022; paper.md 7).

Defaults follow the reference: SGD with momentum 0.9, lr 0.1, batch 128, lr x0.1 at 50% and 75% of
the iterations (``step``; ``cosine`` as an option), weight decay 5e-4 on SOC weights only, random
crop (padding 4) and horizontal flips, cross-entropy. With the paper's fixes:

- Model selection on a seeded VALIDATION split of the training images (``best.safetensors``, by
  certified accuracy at 36/255), never on test data.
- The losses of :mod:`certify.losses`: cross-entropy, certificate regularisation (CR), offset
  cross-entropy (default offset ``sqrt(2) L 36/255``), EMMA and logit annealing.

For the LiResNet/BRONet recipes (:mod:`certify.recipes`): NAdam and Lookahead
(:mod:`certify.optim`), a linear warmup of the learning rate over ``warmup_epochs`` (then the
schedule over the remaining steps, as the LiResNet/BRONet trainers' scheduler), and EMMA's eps
ramped from ``train_eps_ramp[0]`` to ``train_eps_ramp[1]`` times ``train_eps`` over the first half
of the steps (the BRONet trainer's ``min_eps_ratio`` / ``max_eps_ratio``). Their defaults (SGD, no
warmup, eps 36/255 throughout) train exactly as before.

SOC power-iteration refresh as in the paper: one step per training forward (inside ``SOC``), plus
``power_iters`` steps for every SOC after each epoch. Every evaluation certifies the validation
split with :class:`certify.certificates.Certifier` (the sound bound, computed once per evaluation).

Runs are reproducible: the model is initialised from ``seed``, each epoch's data order and
augmentation draw from generators seeded by ``(seed, epoch)``, so the same seed gives the same
weights bit for bit on CPU, and ``resume`` from the last completed epoch reaches the same final
weights as an uninterrupted run. Under ``torchrun`` (env ``WORLD_SIZE`` > 1) training uses
DistributedDataParallel: every rank draws the same global batch and augmentation and trains on its
share (``batch[rank::world]``), with losses weighted so that the averaged gradient equals the
single-process one; rank 0 logs and writes the run folder.

Run folder: ``config.json`` (resolved config), ``metrics.csv`` (one row per epoch),
``model.safetensors`` (last epoch), ``best.safetensors`` (best validation certified accuracy at
36/255) and ``train_state.pt`` (model, optimizer, schedule, RNG, epoch; loaded with
``weights_only=True``). Every write is atomic.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .budget import BudgetPlanner
from .certificates import STANDARD_EPS, Certifier, certify_batches, parse_eps
from .checkpoint import atomic_write_bytes, save
from .data import ImageDataset, augment_batch, load_dataset, to_float
from .errors import ConfigError, LipcertError, RunFolderError
from .losses import (LA_ALPHA, LA_BETA, LOSSES, margin_lipschitz, nominal_lipschitz, parse_offset, per_sample_loss,
                     resolve_offset)
from .optim import OPTIMIZERS, build_optimizer

SCHEDULES = ("step", "cosine")
#: Files a training run writes; ``overwrite`` removes exactly these.
RUN_FILES = ("config.json", "metrics.csv", "model.safetensors", "best.safetensors", "train_state.pt")
STATE_VERSION = 1
EVAL_EPS = tuple(parse_eps(e) for e in STANDARD_EPS)
EPS_COLUMNS = tuple("val_cert_" + e.replace("/", "_") for e in STANDARD_EPS)
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_clean_acc", *EPS_COLUMNS,
                  "lipschitz_bound", "epoch_seconds", "images_per_second", "budget_used_s")
#: Fields that define the model, the data and the random streams: a resumed run must keep them.
IDENTITY_FIELDS = ("model", "width", "depth", "layer", "activation", "pooling", "head", "train_terms", "eval_terms",
                   "backward", "model_options", "optimizer", "lookahead",
                   "mlp_hidden", "mlp_beta", "dataset", "val_split", "data_seed", "synthetic_size", "limit",
                   "val_limit", "seed", "batch_size")
MODEL_KWARGS = ("width", "depth", "layer", "activation", "pooling", "head", "train_terms", "eval_terms", "backward",
                "mlp_hidden", "mlp_beta")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` model options keep the builder's defaults.

    Data: ``dataset`` (see :data:`certify.data.DATASETS`), ``data_dir``, ``download``,
    ``val_split`` (images carved from the training set; default min(5000, 10%)), ``data_seed``
    (seeds the split and the synthetic images; keep it fixed so every run validates on the same
    images), ``synthetic_size``, ``limit`` / ``val_limit`` (seeded random subsets of the training /
    validation images, for quick runs).
    """

    model: str = "lipconvnet5"
    width: int | None = None
    depth: int | None = None
    layer: str | None = None
    model_options: dict[str, Any] | None = None  # any other keyword argument of the model builder
    activation: str | None = None
    pooling: str | None = None
    head: str | None = None
    train_terms: int | str | None = None  # an integer >= 2, or "auto" (SOC: degree from the sound bound)
    eval_terms: int | None = None
    backward: str | None = None
    mlp_hidden: int | None = None
    mlp_beta: float | None = None
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    val_split: float | None = None
    data_seed: int = 0
    synthetic_size: int | None = None
    limit: int | None = None
    val_limit: int | None = None
    augment: bool = True
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_all: bool = False
    schedule: str = "step"
    loss: str = "ce"
    gamma: float = 0.5
    offset: float | str | None = None  # logits, or "<k>x": k times the margin sqrt(2) L 36/255
    temperature: float = 1.0
    la_alpha: float = LA_ALPHA
    la_beta: float = LA_BETA
    train_eps: float = EVAL_EPS[0]
    train_eps_ramp: tuple[float, float] = (1.0, 1.0)
    optimizer: str = "sgd"
    lookahead: int = 0
    lookahead_alpha: float = 0.5
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    channels_last: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    output: str | None = None
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 1
    power_iters: int = 50
    budget_minutes: float | None = None
    recipe: str | None = None

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` on an out-of-range or inconsistent value; return self."""
        self.offset = parse_offset(self.offset)  # ConfigError on a bad one; "2X" becomes "2x"
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; choose from {LOSSES}"),
            (self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (_finite(self.la_alpha) and self.la_alpha > 0, f"la_alpha must be positive, got {self.la_alpha}"),
            (_finite(self.la_beta) and self.la_beta >= 0, f"la_beta must be >= 0, got {self.la_beta}"),
            (_finite(self.train_eps) and self.train_eps > 0, f"train_eps must be positive, got {self.train_eps}"),
            (_ramp_ok(self.train_eps_ramp),
             f"train_eps_ramp must be two numbers >= 0 (start, end), got {self.train_eps_ramp!r}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}"),
            (not isinstance(self.lookahead, bool) and isinstance(self.lookahead, int) and self.lookahead >= 0,
             f"lookahead (steps between slow updates; 0: off) must be an int >= 0, got {self.lookahead!r}"),
            (_finite(self.lookahead_alpha) and 0 < self.lookahead_alpha <= 1,
             f"lookahead_alpha must be in (0, 1], got {self.lookahead_alpha}"),
            (_finite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warmup_epochs must be a number >= 0, got {self.warmup_epochs}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad clip must be positive, got {self.grad_clip}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.power_iters >= 0, f"power_iters must be >= 0, got {self.power_iters}"),
            (self.budget_minutes is None or (self.budget_minutes > 0 and math.isfinite(self.budget_minutes)),
             f"the time budget must be a positive number of minutes, got {self.budget_minutes}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.val_limit is None or self.val_limit >= 1, f"val_limit must be >= 1, got {self.val_limit}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {k: getattr(self, k) for k in MODEL_KWARGS if getattr(self, k) is not None}
        for k, v in (self.model_options or {}).items():
            if k in kwargs:
                raise ConfigError(f"model option {k!r} is given twice (it has its own command-line option)")
            kwargs[k] = v
        return kwargs

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict such as ``config.json``; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """The config saved in ``run_dir/config.json`` with ``overrides`` applied (for resuming)."""
        path = Path(run_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunFolderError(f"{run_dir}: no config.json, so nothing to resume") from None
        except (OSError, json.JSONDecodeError) as e:
            raise RunFolderError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
        data.update(overrides)
        data["output"] = str(run_dir)
        return cls.from_dict(data)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ramp_ok(ramp: Any) -> bool:
    return (isinstance(ramp, (tuple, list)) and len(ramp) == 2
            and all(_finite(r) and r >= 0 for r in ramp))


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, per-epoch metrics, the best validation row and
    the trained model (last epoch, in eval mode, on the training device)."""

    run_dir: Path
    model: nn.Module
    metrics: list[dict[str, Any]]
    best: dict[str, Any] | None
    epochs_completed: int
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.metrics[-1] if self.metrics else None


# ---- pieces -------------------------------------------------------------------------------------

def learning_rate(cfg: TrainConfig, iteration: int, total: int) -> float:
    """``step``: lr, x0.1 from 50% and x0.01 from 75% of the iterations (the paper's schedule);
    ``cosine``: lr * (1 + cos(pi t/T)) / 2."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    if iteration >= 0.75 * total:
        return cfg.lr * 0.01
    if iteration >= 0.5 * total:
        return cfg.lr * 0.1
    return cfg.lr


def scheduled_lr(cfg: TrainConfig, iteration: int, total: int, warmup: int = 0) -> float:
    """:func:`learning_rate` after a linear warmup of ``warmup`` = W steps, as the LiResNet/BRONet
    trainers' scheduler: step i = iteration + 1 gets lr i / W while i < W, then the schedule over
    the other T - W steps at i - W. Without warmup, :func:`learning_rate` itself."""
    if warmup <= 0:
        return learning_rate(cfg, iteration, total)
    i = iteration + 1
    if i < warmup:
        return cfg.lr * i / warmup
    return learning_rate(cfg, i - warmup, max(total - warmup, 1))


def training_eps(cfg: TrainConfig, progress: float) -> float:
    """EMMA's eps at ``progress`` (steps done / steps planned, in [0, 1]): ``train_eps`` times a
    ratio going linearly from ``train_eps_ramp[0]`` to ``train_eps_ramp[1]`` over the first half
    of training, then constant (the BRONet trainer's eps schedule, there per epoch)."""
    start, end = cfg.train_eps_ramp
    return cfg.train_eps * (start + (end - start) * min(2.0 * progress, 1.0))


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on the parameters each layer names (``decay_parameters`` of the layer
    protocol: the SOC filters, as in the reference), or on every parameter."""
    from .layers.protocol import decay_parameters

    chosen = {id(p) for p in decay_parameters(model)}
    decay, rest = [], []
    for p in model.parameters():
        (decay if decay_all or id(p) in chosen else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def refresh_power_iteration(model: nn.Module, iters: int) -> None:
    """Every layer's after-epoch upkeep (``refresh`` of the layer protocol; SOC: ``iters``
    power-iteration steps, the paper's once-per-epoch refresh)."""
    from .layers.protocol import refresh_layers

    refresh_layers(model, iters)


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (stable across runs and processes)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, *, batch_size: int = 128, device: torch.device | str = "cpu",
             eps: tuple[float, ...] = EVAL_EPS, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Clean accuracy and certified accuracy at each eps on ``dataset`` with the model's sound
    certificate (:class:`Certifier`, bound computed once). Under DDP each rank certifies its
    share and the counts are summed."""
    was_training = model.training
    model.eval()
    try:
        certifier = Certifier(model)
        idx_all = torch.arange(len(dataset))[rank::world]
        batches = ((to_float(x), y) for x, y in (dataset.batch(idx) for idx in idx_all.split(batch_size)))
        res = certify_batches(certifier, batches, thresholds=eps, device=device)
        ok = res.correct
        correct = torch.tensor([float(ok.sum())] + [float((ok & (res.radii > e)).sum()) for e in eps],
                               dtype=torch.float64, device=device)
        total = torch.tensor([float(len(idx_all))], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(correct)
            torch.distributed.all_reduce(total)
        n = max(float(total), 1.0)
        out = {"val_clean_acc": float(correct[0]) / n}
        for i, col in enumerate(EPS_COLUMNS[: len(eps)]):
            out[col] = float(correct[1 + i]) / n
        out["lipschitz_bound"] = certifier.lipschitz if certifier.lipschitz is not None else float("nan")
        return out
    finally:
        model.train(was_training)


# ---- distributed --------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    from .devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist(), resolve_device(device_spec)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _all_agree(ok: bool, d: _Dist, device: torch.device) -> bool:
    """True when every rank reports ``ok`` (a collective: every rank must call it)."""
    if d.world == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    return float(flag) == 0.0


def _agree_plan(planner: BudgetPlanner, d: _Dist, device: torch.device) -> None:
    """Every rank takes the smallest planned total (the slowest rank's), so all stop together."""
    planned = torch.tensor([float(planner.planned_steps)], device=device)
    torch.distributed.all_reduce(planned, op=torch.distributed.ReduceOp.MIN)
    planner.planned_steps = int(planned.item())


# ---- run folder ---------------------------------------------------------------------------------

def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Read-only checks: an existing folder with files needs ``resume`` or ``overwrite``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output {run_dir} exists and is not a folder")
    existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if resume:
        if not (run_dir / "train_state.pt").is_file():
            raise RunFolderError(f"{run_dir}: no train_state.pt, so nothing to resume (start a new run without --resume)")
    elif existing and not overwrite:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise RunFolderError(f"run folder {run_dir} already has files ({shown}); pass --resume to continue "
                             "it or --overwrite to start over")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the folder, prove it is writable, and (with ``overwrite``) remove a previous run's
    files, only those lipcert writes."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / ".write-test", b"")
        (run_dir / ".write-test").unlink()
    except OSError as e:
        raise RunFolderError(f"cannot write to output folder {run_dir}: {e.strerror or e}") from None
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.6e}"
    return "" if v is None else v


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state saved for ``resume`` (``weights_only=True``: tensors and plain data)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFolderError(f"{path}: no such file") from None
    except Exception as e:  # a truncated or foreign file
        raise RunFolderError(f"{path}: not a readable lipcert training state ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RunFolderError(f"{path}: not a lipcert training state (version {STATE_VERSION})")
    return state


# ---- the loop -----------------------------------------------------------------------------------

def _log_fn(enabled: bool):
    if not enabled:
        return lambda *a, **k: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per epoch, even in logs
    return console.print


def build_model(cfg: TrainConfig, data: ImageDataset) -> nn.Module:
    """The model of ``cfg`` for ``data`` (classes, input shape, normalisation), seeded by cfg.seed."""
    from certify.models import create_model

    c, h, w = data.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=c,
                         input_size=h if h == w else [h, w], mean=list(data.mean), std=list(data.std),
                         **cfg.model_kwargs())
    shape = tuple(getattr(model, "input_shape", data.input_shape))
    data.check_shape(shape)
    return model


def load_data(cfg: TrainConfig, *, input_shape=None) -> tuple[ImageDataset, ImageDataset | None]:
    """Training and validation splits of ``cfg``'s dataset (validation None when val_split=0)."""
    kw = dict(data_dir=cfg.data_dir, download=cfg.download, val_split=cfg.val_split, seed=cfg.data_seed,
              input_shape=input_shape, limit=cfg.limit, workers=cfg.workers)
    if cfg.synthetic_size is not None:
        if cfg.dataset != "synthetic":
            raise ConfigError("--synthetic-size (synthetic_size) only applies to --dataset synthetic")
        kw["size"] = cfg.synthetic_size
    train_ds = load_dataset(cfg.dataset, "train", **kw)
    if train_ds.val_split == 0:
        return train_ds, None
    kw.update(download=False, limit=cfg.val_limit)
    return train_ds, load_dataset(cfg.dataset, "val", **kw)


def train(config: TrainConfig, *, on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          verbose: bool = True, progress: bool | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` and write the run folder ``config.output``.

    Args:
        on_epoch_end: called on every rank after each completed (and saved) epoch with that
            epoch's metrics row; raising from it stops training (the run can be resumed).
        verbose: log one line per epoch on stderr (rank 0).
        progress: rich progress bars on stderr; default: only when stderr is a terminal.
    """
    cfg = dataclasses.replace(config).validate()
    d, device = _setup_distributed(cfg.device)
    try:
        return _train(cfg, d, device, on_epoch_end, verbose, progress)
    finally:
        if d.owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg, d: _Dist, device, on_epoch_end, verbose, progress) -> TrainResult:
    log = _log_fn(verbose and d.main)
    run_dir = Path(cfg.output) if cfg.output else default_run_dir(cfg)
    cfg.output = str(run_dir)

    # 1. Run folder: every rank checks (read-only) and all agree, THEN rank 0 prepares it (its
    # write test would otherwise show up in another rank's check), and all agree again.
    error: LipcertError | None = None
    state = None
    try:
        check_run_dir(run_dir, cfg.resume, cfg.overwrite)
        if cfg.resume:
            state = load_train_state(run_dir / "train_state.pt")
            _check_resume_config(cfg, state.get("config", {}), run_dir)
    except LipcertError as e:
        error = e
    if not _all_agree(error is None, d, device):
        raise error or RunFolderError(f"another rank could not use the run folder {run_dir}")
    if d.main:
        try:
            prepare_run_dir(run_dir, overwrite=False)  # fail early; old files go once data and model are ready
        except LipcertError as e:
            error = e
    if not _all_agree(error is None, d, device):
        raise error or RunFolderError(f"rank 0 could not use the run folder {run_dir}")

    # 2. Data and model (identical on every rank).
    train_ds, val_ds = load_data(cfg)
    model = build_model(cfg, train_ds).to(device)
    if cfg.channels_last:
        # NHWC convolutions: 1.5x faster steps at width 8 and 1.3x at width 16 on a 1-thread CPU,
        # but slower at width 32 (LipConvnet-5, batch 128); checkpoints are saved contiguous.
        model = model.to(memory_format=torch.channels_last)
    if cfg.loss in ("offset", "la", "emma_la") or cfg.offset is not None:
        cfg.offset = resolve_offset(cfg.offset, model)  # a number in config.json: "2x" resolved
    lip_nominal = nominal_lipschitz(model)
    optimizer = build_optimizer(parameter_groups(model, cfg.weight_decay, cfg.decay_all), cfg.optimizer, lr=cfg.lr,
                                momentum=cfg.momentum, lookahead=cfg.lookahead, lookahead_alpha=cfg.lookahead_alpha)
    n_train = len(train_ds)
    batch = min(cfg.batch_size, n_train)
    if batch < d.world:
        raise ConfigError(f"batch size {batch} is smaller than the number of processes ({d.world})")
    steps = n_train // batch  # the last partial batch is dropped, so every step has `batch` images
    total_steps = steps * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps)

    start_epoch, iteration, best, rows = 0, 0, None, []
    if state is not None:
        from .checkpoint import load_state_strict

        load_state_strict(model, state["model"], run_dir / "train_state.pt")
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, iteration, best = int(state["epoch"]), int(state["iteration"]), state.get("best")
        rows = [dict(r) for r in state.get("metrics", [])]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)

    planner = None
    if cfg.budget_minutes is not None:
        saved = (state or {}).get("budget") or {}
        planner = BudgetPlanner(cfg.budget_minutes * 60.0, used_s=float(saved.get("used_s", 0.0)),
                                planned_steps=saved.get("planned_steps"), steps_done=iteration)

    resolved = {**asdict(cfg), "val_split": train_ds.val_split, "resolved_device": str(device),
                "world_size": d.world, "steps_per_epoch": steps, "train_images": n_train,
                "val_images": len(val_ds) if val_ds is not None else 0,
                "dataset_fingerprint": train_ds.fingerprint,
                "val_fingerprint": val_ds.fingerprint if val_ds is not None else None,
                "mean": list(train_ds.mean), "std": list(train_ds.std), "class_names": train_ds.class_names,
                "lipcert_version": __version__, "torch_version": torch.__version__}
    error = None
    if d.main:
        try:
            if cfg.overwrite and not cfg.resume:
                prepare_run_dir(run_dir, overwrite=True)
            atomic_write_bytes(run_dir / "config.json", (json.dumps(resolved, indent=2) + "\n").encode())
            _write_metrics(run_dir / "metrics.csv", rows)  # drops rows of an epoch that was never committed
        except (LipcertError, OSError) as e:
            error = e if isinstance(e, LipcertError) else RunFolderError(f"cannot write to {run_dir}: {e}")
    if not _all_agree(error is None, d, device):
        raise error or RunFolderError(f"rank 0 could not write the run folder {run_dir}")

    net: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (the power-iteration vectors) are updated from identical weights on every rank,
        # so there is nothing to broadcast.
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    meta = dict(class_names=train_ds.class_names, dataset=train_ds.name, dataset_fingerprint=train_ds.fingerprint,
                val_fingerprint=val_ds.fingerprint if val_ds is not None else None,
                val_split=train_ds.val_split, data_seed=cfg.data_seed, synthetic_size=cfg.synthetic_size,
                seed=cfg.seed, config=resolved)
    head_reg = getattr(getattr(model, "head", None), "regularizer", None)
    amp = cfg.amp and device.type in ("cuda", "cpu")
    log(f"[bold]lipcert train[/] {cfg.model} on {train_ds.name}: {n_train} training / "
        f"{resolved['val_images']} validation images, {cfg.epochs} epochs x {steps} steps of {batch}, "
        f"device {device}{f' x {d.world} processes' if d.world > 1 else ''}, run folder {run_dir}")
    if start_epoch:
        log(f"resuming after epoch {start_epoch}")
    if warmup >= total_steps > 0:
        log(f"note: the warmup ({cfg.warmup_epochs:g} epochs) is as long as the run or longer: the learning rate "
            f"rises to {cfg.lr * total_steps / warmup:.3g}, not to --lr {cfg.lr:g}")
    if planner is not None:
        log(f"time budget {cfg.budget_minutes:g} min for the training steps ({planner.used_s:.0f}s used): "
            f"the schedule is fitted to the steps that fit, measured on the first steps")
    done_before = planner is not None and state is not None and bool(state.get("finished"))
    if start_epoch >= cfg.epochs or done_before:
        log(f"nothing to do: the run already completed {start_epoch} epochs")

    planned_logged = planner is not None and planner.planned_steps is not None
    bars = _Progress(progress if progress is not None else _is_tty(), d.main, cfg.epochs, steps, start_epoch)
    files = {"config": run_dir / "config.json", "metrics": run_dir / "metrics.csv"}
    with bars:
        for epoch in range(start_epoch, cfg.epochs if not done_before else start_epoch):
            model.train()
            t0 = time.perf_counter()
            if planner is not None:
                planner.resume()
            done_steps = 0
            order = torch.randperm(n_train, generator=_generator(cfg.seed, epoch, 1))
            aug = _generator(cfg.seed, epoch, 2)
            sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (this rank)
            lr = cfg.lr
            planned = planner.total_steps(total_steps) if planner else total_steps
            eps = training_eps(cfg, min(iteration / max(planned, 1), 1.0))
            bars.start_epoch(epoch)
            for step in range(steps):
                if planner is not None:
                    if not _all_agree(not planner.finished(), d, device):
                        break  # the budget is spent (on any rank) or the planned steps are done
                    planner.step_started()
                idx = order[step * batch:(step + 1) * batch]
                x, y = train_ds.batch(idx)
                if cfg.augment:
                    x = augment_batch(x, aug, padding=4, hflip=train_ds.hflip)
                x, y = x[d.rank::d.world], y[d.rank::d.world]
                x, y = to_float(x).to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = scheduled_lr(cfg, iteration, planner.total_steps(total_steps) if planner else total_steps, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = net(x)
                pairs = margin_lipschitz(model, lip_nominal) if cfg.loss in ("emma", "emma_la") else None
                losses = per_sample_loss(logits, y, cfg.loss, gamma=cfg.gamma, offset=cfg.offset or 0.0,
                                         temperature=cfg.temperature, lipschitz=lip_nominal, pair_lipschitz=pairs,
                                         eps=eps, la_alpha=cfg.la_alpha, la_beta=cfg.la_beta)
                # Sum over this rank's share / global batch x world: DDP's gradient average then
                # equals the gradient of the mean loss over the whole global batch.
                loss = losses.sum() * (d.world / batch)
                if head_reg is not None:
                    loss = loss + head_reg()
                if d.world == 1 and not torch.isfinite(loss):
                    raise ConfigError(f"training diverged (loss {float(loss.detach())}) at epoch {epoch + 1}, step "
                                      f"{step + 1}; lower --lr or set --grad-clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                iteration += 1
                done_steps += 1
                if planner is not None:
                    if planner.step_done() and d.world > 1:
                        _agree_plan(planner, d, device)  # every rank (re)plans at the same step
                    if planner.planned_steps is not None and not planned_logged:
                        planned_logged = True
                        bars.set_total_steps(planner.planned_steps)
                        log(f"budget: {planner.seconds_per_step:.3f}s per step measured, {planner.planned_steps} "
                            f"steps planned ({planner.planned_steps / steps:.2f} epochs)")
                with torch.no_grad():
                    sums += torch.tensor([float(losses.sum()), float((logits.argmax(1) == y).sum()), len(y)],
                                         dtype=torch.float64)
                bars.advance(len(idx))
            if d.world > 1:
                sums = sums.to(device)
                torch.distributed.all_reduce(sums)
                sums = sums.cpu()
            if not math.isfinite(float(sums[0])):
                raise ConfigError(f"training diverged (non-finite loss) in epoch {epoch + 1}; lower --lr or set --grad-clip")
            if hasattr(optimizer, "sync"):
                optimizer.sync()  # Lookahead: validate and save the slow weights (the BRONet trainer's sync)
            refresh_power_iteration(model, cfg.power_iters)
            train_seconds = time.perf_counter() - t0
            last_epoch = epoch + 1 == cfg.epochs
            if planner is not None:
                finished = planner.finished() or done_steps < steps
                if not finished:
                    planner.replan()
                    if planner.planned_steps is not None:  # not before the first plan (same step on every rank)
                        if d.world > 1:
                            _agree_plan(planner, d, device)
                        bars.set_total_steps(planner.planned_steps)
                    finished = planner.finished()
                last_epoch = last_epoch or finished
                planner.pause()  # validation and checkpoints are not training time
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(sums[0] / max(sums[2], 1)),
                                   "train_acc": float(sums[1] / max(sums[2], 1))}
            evaluated = val_ds is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch)
            if evaluated:
                bars.status("certifying the validation split")
                row.update(evaluate(model, val_ds, batch_size=max(batch, 256), device=device,
                                    rank=d.rank, world=d.world))
            row["epoch_seconds"] = time.perf_counter() - t0
            row["images_per_second"] = done_steps * batch / max(train_seconds, 1e-9)
            if planner is not None:
                row["budget_used_s"] = planner.used_s
            rows.append(row)
            improved = evaluated and (best is None or (row[EPS_COLUMNS[0]], row["val_clean_acc"])
                                      > (best[EPS_COLUMNS[0]], best["val_clean_acc"]))
            if improved:
                best = dict(row)
            if d.main:
                epoch_meta = dict(meta, epoch=epoch + 1, metrics={k: row[k] for k in row if k != "epoch"})
                files["model"] = save(run_dir / "model.safetensors", model, **epoch_meta)
                if improved:
                    files["best"] = save(run_dir / "best.safetensors", model, **epoch_meta)
                _write_metrics(run_dir / "metrics.csv", rows)
                # The training state is written last: it is the commit point of the epoch.
                _save_state(run_dir / "train_state.pt", {
                    "version": STATE_VERSION, "epoch": epoch + 1, "iteration": iteration,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "best": best, "metrics": rows,
                    "config": {k: resolved[k] for k in IDENTITY_FIELDS},
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                    "budget": planner.state() if planner is not None else None,
                    "finished": bool(last_epoch),
                })
            log(_epoch_line(row, cfg.epochs if planner is None or planner.planned_steps is None
                            else math.ceil(planner.planned_steps / steps)))
            if d.world > 1:
                torch.distributed.barrier()  # rank 0's files are complete before anyone goes on
            if on_epoch_end is not None:
                on_epoch_end(row)
            if last_epoch:
                break
    model.eval()
    for name in ("model", "best"):
        if (run_dir / f"{name}.safetensors").is_file():
            files[name] = run_dir / f"{name}.safetensors"
    files["state"] = run_dir / "train_state.pt"
    return TrainResult(run_dir, model, rows, best, max(start_epoch, len(rows) and rows[-1]["epoch"]), files)


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path) -> None:
    current = asdict(cfg)
    current["val_split"] = None if cfg.val_split is None else cfg.val_split
    diffs = []
    for k in IDENTITY_FIELDS:
        if k not in saved:
            continue
        a, b = saved[k], current.get(k)
        if k == "val_split" and b is None:
            continue  # the saved value is the resolved default
        if k == "val_split" and a is not None and b is not None and float(a) == float(b):
            continue
        if a != b:
            diffs.append(f"{k} {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(f"cannot resume {run_dir} with a different " + ", ".join(diffs[:4])
                          + " (these define the model, the data or the random streams)")


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}", f"train {100 * row['train_acc']:.1f}%"]
    if "val_clean_acc" in row:
        parts.append(f"val {100 * row['val_clean_acc']:.1f}%")
        parts.append("cert " + " / ".join(f"{100 * row[c]:.1f}%" for c in EPS_COLUMNS) + " @ " + ", ".join(STANDARD_EPS))
    parts.append(f"{row['epoch_seconds']:.1f}s ({row['images_per_second']:.0f} img/s)")
    return "  ".join(parts)


def _is_tty() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class _Progress:
    """Rich progress bars on stderr (rank 0, terminals only): the epoch and the whole run, with
    images/s and time left."""

    def __init__(self, enabled: bool, main: bool, epochs: int, steps: int, start_epoch: int) -> None:
        self.enabled = enabled and main
        self.epochs, self.steps = epochs, steps
        self.p = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=True)
            self.run = self.p.add_task("run", total=epochs * steps, completed=start_epoch * steps, rate="-")
            self.epoch = self.p.add_task("epoch", total=steps, rate="-")
            self.t0, self.images = time.perf_counter(), 0

    def __enter__(self):
        if self.p:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p:
            self.p.__exit__(*exc)

    def start_epoch(self, epoch: int) -> None:
        if self.p:
            self.p.reset(self.epoch, total=self.steps, description=f"epoch {epoch + 1}/{self.epochs}", rate="-")
            self.t0, self.images = time.perf_counter(), 0

    def advance(self, images: int) -> None:
        if self.p:
            self.images += images
            rate = f"{self.images / max(time.perf_counter() - self.t0, 1e-9):.0f}"
            self.p.update(self.epoch, advance=1, rate=rate)
            self.p.update(self.run, advance=1, rate=rate)

    def set_total_steps(self, total: int) -> None:
        """A budgeted run knows its length once planned: the run bar follows the plan."""
        if self.p:
            self.p.update(self.run, total=total)

    def status(self, text: str) -> None:
        if self.p:
            self.p.update(self.epoch, description=text)
