"""``lipcert train`` and ``lipcert demo``: thin layers over :func:`certify.train.train`."""

from __future__ import annotations

import time
from pathlib import Path

import click
from click.core import ParameterSource

from ._common import handle_errors, out_console, resolve_device
from ..recipes import RECIPES

_ACTIVATIONS = ("maxmin", "hh1", "hh2")
_POOLINGS = ("max", "lip")
_HEADS = ("ortho", "lln", "mlp", "layer")

#: The demo's model and recipe: small enough for about two minutes on one CPU core.
DEMO_CONFIG = dict(model="lipconvnet5", width=8, dataset="synthetic", synthetic_size=2500, batch_size=32,
                   lr=0.1, schedule="cosine", loss="offset", power_iters=50)
DEMO_EPOCHS = 6


def _parse_model_options(ctx, param, values):
    """``KEY=VALUE`` pairs as a dict (VALUE parsed as JSON where it is JSON), or None when none given."""
    import json

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out or None


class _Radius(click.ParamType):
    """An l2 radius: a fraction (36/255) or a decimal (0.14)."""

    name = "EPS"

    def convert(self, value, param, ctx):
        from certify.certificates import parse_eps
        from certify.errors import ConfigError

        try:
            return parse_eps(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class _Offset(click.ParamType):
    """A logit offset: a number >= 0 or a multiple of the margin, ``2x``."""

    name = "OFFSET|Kx"

    def convert(self, value, param, ctx):
        from certify.errors import ConfigError
        from certify.losses import parse_offset

        try:
            return parse_offset(value if isinstance(value, (int, float)) else str(value))
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class _TrainTerms(click.ParamType):
    """An integer >= 2 or ``auto``."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            terms = int(value)
        except ValueError:
            terms = None
        if terms is None or terms < 2:
            self.fail(f"{value!r} is neither an integer >= 2 nor 'auto'", param, ctx)
        return terms


def _model_options(f):
    opts = [
        click.option("--model", default="lipconvnet5", show_default=True, help="Registered model (see `lipcert models`)."),
        click.option("--width", type=click.IntRange(min=2), default=None, help="Base channel width (paper: 32)."),
        click.option("--layer", default=None,
                     help="Layer type of models that take one (convnet_*, see `lipcert layers --kind convolution`)."),
        click.option("--depth", type=click.IntRange(min=1), default=None,
                     help="Depth of models that take one as an option (liresnet)."),
        click.option("--model-option", "model_options", multiple=True, callback=_parse_model_options,
                     metavar="KEY=VALUE",
                     help="Any other option of the model builder (VALUE as JSON, else a string), repeatable: "
                          "--model-option features=256 --model-option 'layer_options={\"eval_terms\": 10}'."),
        click.option("--activation", type=click.Choice(_ACTIVATIONS), default=None, help="Activation (default maxmin)."),
        click.option("--pooling", type=click.Choice(_POOLINGS), default=None, help="Channel pooling (default max)."),
        click.option("--head", type=click.Choice(_HEADS), default=None,
                     help="Last layer (LipConvnets: ortho, lln, mlp; default ortho. ConvNets: layer, lln; default layer)."),
        click.option("--train-terms", type=_TrainTerms(), default=None,
                     help="SOC Taylor terms in training (default 6), or 'auto': per layer, the fewest Chebyshev "
                          "terms within --model-option train_tol (default 0.02) of exp(A) for the layer's sound "
                          "norm bound."),
        click.option("--eval-terms", type=click.IntRange(min=2), default=None, help="SOC Taylor terms in evaluation (default 15)."),
        click.option("--backward", type=click.Choice(["fast", "exact"]), default=None,
                     help="SOC backward: the paper's fast approximate filter gradient, or exact autograd."),
        click.option("--mlp-hidden", type=click.IntRange(min=1), default=None, help="MLP head hidden size (--head mlp)."),
        click.option("--mlp-beta", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="MLP head curvature regulariser weight (--head mlp)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command()
@_model_options
@click.option("--dataset", default="synthetic", show_default=True,
              help="cifar10, cifar100, mnist, fashion-mnist, imagefolder or synthetic.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the torchvision datasets (default $LIPCERT_DATA_DIR or ~/.cache/lipcert/data), "
                   "or the image folder itself for --dataset imagefolder.")
@click.option("--download", is_flag=True, help="Download a missing torchvision dataset.")
@click.option("--val-split", type=click.FloatRange(min=0), default=None,
              help="Validation images carved from the training set: a count, or a fraction < 1 "
                   "(default min(5000, 10%)); 0 trains on everything and skips validation.")
@click.option("--data-seed", type=int, default=0, show_default=True,
              help="Seed of the train/validation split (and of the synthetic images).")
@click.option("--synthetic-size", type=click.IntRange(min=10), default=None,
              help="Images in the synthetic dataset (default 4000).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Train on a seeded random subset of this many training images.")
@click.option("--val-limit", type=click.IntRange(min=1), default=None,
              help="Certify a seeded random subset of this many validation images each epoch.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random crop (padding 4) and horizontal flip where the dataset allows it.")
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch size (split across processes under torchrun).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True,
              help="Weight decay, on SOC filters only unless --decay-all.")
@click.option("--decay-all", is_flag=True, help="Apply weight decay to every parameter.")
@click.option("--schedule", type=click.Choice(["step", "cosine"]), default="step", show_default=True,
              help="step: lr x0.1 at 50% and 75% of the iterations (the paper); cosine: to 0.")
@click.option("--loss", type=click.Choice(["ce", "cr", "offset", "emma", "la", "emma_la"]), default="ce",
              show_default=True,
              help="ce: cross-entropy; cr: CE - gamma*mean(relu(radius)); offset: CE with the true logit lowered by "
                   "--offset; emma: CE on the worst-case logits within --train-eps (Hu et al. 2023); la: logit "
                   "annealing, a focal-weighted offset CE (Lai et al. 2025); emma_la: la on EMMA's worst-case logits "
                   "(the BRONet trainer's loss).")
@click.option("--gamma", type=click.FloatRange(min=0), default=0.5, show_default=True, help="CR weight (--loss cr).")
@click.option("--offset", type=_Offset(), default=None,
              help="Logit offset for --loss offset, la and emma_la: a number, or a multiple of the margin "
                   "certifying 36/255, sqrt(2)/min(std)*36/255 (2x: twice it, as the CVPR'24 layer comparison; "
                   "default 1x).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Logits are divided by this before the softmax.")
@click.option("--la-alpha", type=click.FloatRange(min=0, min_open=True), default=0.25, show_default=True,
              help="Logit annealing's weight alpha (--loss la, emma_la).")
@click.option("--la-beta", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Logit annealing's exponent beta on (1 - p_true) (--loss la, emma_la).")
@click.option("--train-eps", type=_Radius(), default="36/255", show_default=True,
              help="The radius EMMA lifts the other logits for (--loss emma, emma_la).")
@click.option("--train-eps-ramp", type=click.FloatRange(min=0), nargs=2, default=(1.0, 1.0), show_default=True,
              metavar="START END",
              help="--train-eps times a ratio growing linearly from START to END over the first half of the steps, "
                   "then END (the BRONet trainer: 0.1 3.0).")
@click.option("--optimizer", type=click.Choice(["sgd", "nadam"]), default="sgd", show_default=True,
              help="sgd: with --momentum (the SOC papers); nadam: NAdam, torch's defaults (the LiResNet/BRONet "
                   "trainers).")
@click.option("--lookahead", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Lookahead around the optimizer: every K steps the slow weights move --lookahead-alpha of the "
                   "way to the fast ones, which restart from them, and once more after each epoch; 0: off.")
@click.option("--lookahead-alpha", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Lookahead's step towards the fast weights.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Linear learning-rate warmup over this many epochs, then --schedule over the other steps.")
@click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True), default=None, help="Clip the gradient norm.")
@click.option("--channels-last", is_flag=True,
              help="NHWC memory format: faster for narrow networks on a CPU (1.5x per step at width 8, "
                   "slower at width 32); measure before using it elsewhere.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast (CUDA; also allowed on CPU). Certification stays float32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation, data order and augmentation.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads decoding image folders.")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="Run folder (default runs/<model>-<dataset>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Start over in an existing run folder (removes lipcert's files there).")
@click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Certify the validation split every N epochs (and after the last).")
@click.option("--power-iters", type=click.IntRange(min=0), default=50, show_default=True,
              help="SOC power-iteration steps after each epoch.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Fill the options not given from a preset: paper (the paper's LipConvnet-5 recipe), budget "
                   "(the best certified accuracy per CPU minute measured: the compact SOC LipConvnet lipconvnet8c at "
                   "width 8, for --budget-minutes; default 70), budget-v1 (the previous budget preset, LipConvnet-5 at "
                   "width 8), budget-bro (a BRO ConvNet, best at 15 minutes) or bronet-cifar "
                   "(BRONet's published CIFAR-10/100 configuration, for GPUs; --model-option KEY=VALUE overrides "
                   "one of its model options).")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Train for this many minutes of wall clock (validation and checkpoints not counted): the "
                   "steps are planned from the measured step time and the schedule fits them; --epochs is a cap.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@handle_errors
def train(**opts) -> None:
    """Train a 1-Lipschitz network and write a run folder.

    The run folder gets config.json, metrics.csv (per epoch: training loss and accuracy,
    validation clean and certified accuracy at 36/255, 72/255, 108/255), model.safetensors (last
    epoch), best.safetensors (best validation certified accuracy at 36/255) and train_state.pt
    (for --resume). Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.
    """
    from certify.train import TrainConfig
    from certify.train import train as run_training

    from certify.recipes import apply_recipe

    ctx = click.get_current_context()
    progress = opts.pop("progress")
    recipe = opts.pop("recipe")
    if opts["resume"] and opts["overwrite"]:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if opts["resume"]:
        if not opts["output"]:
            raise click.UsageError("--resume needs --output RUN_DIR")
        # The saved config, with the options given on this command line (or in the environment).
        given = {k: v for k, v in opts.items()
                 if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        if recipe is not None:
            raise click.UsageError("--recipe applies to a new run; --resume keeps the run's saved options")
        cfg = TrainConfig.from_run_dir(opts["output"], **given)
        cfg.resume, cfg.overwrite = True, False
    else:
        given = {k: v for k, v in opts.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
        cfg = TrainConfig(**apply_recipe(recipe, given, opts))
    result = run_training(cfg, progress=progress)
    _print_summary(result)


def _print_summary(result) -> None:
    import os

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    from rich.table import Table

    from certify.certificates import STANDARD_EPS
    from certify.train import EPS_COLUMNS

    table = Table(title=f"lipcert train: {result.run_dir}", title_justify="left")
    table.add_column("checkpoint")
    table.add_column("epoch", justify="right")
    table.add_column("clean", justify="right")
    for e in STANDARD_EPS:
        table.add_column(e, justify="right")
    rows = [("model.safetensors (last)", result.last), ("best.safetensors (best at 36/255)", result.best)]
    for label, r in rows:
        if r is None or "val_clean_acc" not in r:
            continue
        table.add_row(label, str(r["epoch"]), f"{100 * r['val_clean_acc']:.2f}%",
                      *(f"{100 * r[c]:.2f}%" for c in EPS_COLUMNS))
    if table.row_count:
        out_console.print(table)
        click.echo("Validation split of the training images; certified with the sound Lipschitz bound.")
    else:
        click.echo(f"trained {result.epochs_completed} epoch(s) into {result.run_dir} (no validation split)")


def _fresh_dir(base: Path) -> Path:
    """``base`` if it is absent or empty, else ``base-1``, ``base-2``, ...: never clobber."""
    candidate, i = base, 0
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


@click.command()
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Run folder (default ./lipcert-demo, or lipcert-demo-N if that is taken).")
@click.option("--epochs", type=click.IntRange(min=1), default=DEMO_EPOCHS, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@handle_errors
def demo(output: str | None, epochs: int, seed: int, device: str, progress: bool | None) -> None:
    """Train a small LipConvnet on the built-in synthetic dataset (about two minutes on a CPU),
    certify its validation split and print the certified-accuracy table."""
    import torch

    import certify.data
    from certify.certificates import STANDARD_EPS, parse_eps
    from certify.loading import load
    from certify.errors import RunFolderError
    from certify.train import TrainConfig
    from certify.train import train as run_training

    run_dir = Path(output) if output else _fresh_dir(Path("lipcert-demo"))
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunFolderError(f"demo output {run_dir} already has files; pick another --output")
    cfg = TrainConfig(**DEMO_CONFIG, epochs=epochs, seed=seed, device=device, output=str(run_dir))
    if resolve_device(device).type == "cpu":
        # The demo's convolutions are tiny: thread hand-offs cost more than a second core gives
        # (measured 3x slower with 2 threads when anything else runs on the machine).
        torch.set_num_threads(1)
    click.echo(f"lipcert demo: training {cfg.model} (width {cfg.width}) on the synthetic dataset "
               f"for {epochs} epochs into {run_dir}", err=True)
    t0 = time.perf_counter()
    result = run_training(cfg, progress=progress)
    train_s = time.perf_counter() - t0

    # Certify the best checkpoint as a user would: load it from disk, recompute the bound.
    from certify.certificates import Certifier, certify_batches

    model = load(run_dir / "best.safetensors", device=result.model.parameters().__next__().device)
    val = certify.data.dataset_for_checkpoint(model, "val")  # the images `lipcert certify` sees
    certifier = Certifier(model)
    x, y = val.images, val.labels
    dev = next(model.parameters()).device
    eps_values = [parse_eps(e) for e in STANDARD_EPS]
    batches = ((x[s:s + 256].float() / 255, y[s:s + 256]) for s in range(0, len(y), 256))
    res = certify_batches(certifier, batches, thresholds=eps_values, device=dev)
    correct, radii = res.correct, res.radii
    from rich.table import Table

    table = Table(title=f"lipcert demo: {len(y)} validation images (synthetic), "
                        f"Lipschitz bound {certifier.lipschitz:.4f}", title_justify="left")
    table.add_column("")
    table.add_column("clean", justify="right")
    for e in STANDARD_EPS:
        table.add_column(e, justify="right")
    cells = [f"{100 * float(correct.double().mean()):.1f}%"]
    cells += [f"{100 * float((correct & (radii > parse_eps(e))).double().mean()):.1f}%" for e in STANDARD_EPS]
    table.add_row("accuracy", *cells)
    out_console.print(table)
    click.echo(f"trained in {train_s:.0f}s; checkpoint {run_dir / 'best.safetensors'} "
               f"(epoch {model.checkpoint_metadata.get('epoch')}), metrics {run_dir / 'metrics.csv'}")

