"""Shared pieces of the command line: exit codes, the console, devices and error handling."""

from __future__ import annotations

import functools
import os
import sys

import click
from rich.console import Console
from rich.markup import escape

from ..devices import resolve_device  # noqa: F401  (the CLI's --device)
from ..errors import LipcertError

#: Exit codes, as documented in ``lipcert --help`` and the README.
EXIT_OK = 0  #: success
EXIT_ERROR = 1  #: runtime error (a clear one-line message; a traceback only with --debug)
EXIT_USAGE = 2  #: usage error (bad option or argument; click's own code)
EXIT_GATE = 3  #: a gate failed (--fail-under, or certificate violations found by an audit)

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 runtime error, 2 usage error, "
    "3 gate failed (--fail-under not met, or an audit found a violation)."
)

#: Progress and logs go to stderr; results go to stdout.
err_console = Console(stderr=True)
out_console = Console()


def show_progress(machine_readable: bool = False) -> bool:
    """Progress bars only on an interactive stderr and for human-readable output."""
    return not machine_readable and sys.stderr.isatty() and not os.environ.get("CI")


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """Print a one-line error on stderr and exit with ``code``."""
    # The message is plain text: escape it, or rich would swallow "[export]" in
    # "pip install 'lipcert[export]'" (and any other bracketed text, e.g. in a path) as markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise SystemExit(code)


def handle_errors(fn):
    """Turn lipcert's exceptions (and a few expected OS errors) into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        debug = bool(ctx and ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except (LipcertError, OSError, MemoryError) as e:
            if debug:
                raise
            text = " ".join(str(e).split()) or type(e).__name__
            fail(text)

    return wrapper


def checkpoint_dataset(model, model_file, **options):
    """The images of ``model``'s checkpoint a command works on (:func:`certify.data.dataset_for_checkpoint`
    with the command's options), with a usage error when no dataset is known and a warning when
    the validation or training images differ from the ones recorded at training time."""
    from .. import data

    if not options.get("dataset") and data.recorded_dataset(model) is None:
        raise click.UsageError(f"{model_file} records no dataset; pass --dataset NAME")
    ds = data.dataset_for_checkpoint(model, **options)
    if getattr(ds, "matches_training", None) is False:
        err_console.print(f"warning: these {'validation' if ds.split == 'val' else ds.split} images differ from the "
                          "ones recorded at training time (different seed, val split or data)",
                          highlight=False, soft_wrap=True)
    return ds


# ---- models built elsewhere: `--module` (certify, attack) -----------------------------------------


def _numbers(text: str, option: str, kind):
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


def foreign_model_options(f):
    """MODEL_FILE (optional) and the options that name a PyTorch model built elsewhere instead."""
    opts = [
        click.argument("model_file", type=click.Path(dir_okay=False), required=False),
        click.option("--module", "module_spec", default=None, metavar="PKG.MODULE:FACTORY",
                     help="A PyTorch model built elsewhere instead of MODEL_FILE: a callable (or module instance) "
                          "importable from the current folder; its bound is computed from its torch.fx graph "
                          "(ops lipcert cannot bound soundly are refused). Needs --dataset."),
        click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="With --module: a .safetensors state dict to load into it (strictly)."),
        click.option("--input-shape", default="3,32,32", show_default=True, metavar="C,H,W",
                     help="With --module: the image shape the model takes."),
        click.option("--mean", default=None, metavar="M[,M,...]",
                     help="With --module: an input normalisation (x - mean) / std to put in front of a model that "
                          "expects normalised images (radii stay in [0, 1] pixel units); one value or one per "
                          "channel."),
        click.option("--std", default=None, metavar="S[,S,...]", help="With --module: see --mean."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def load_cli_model(model_file, module_spec, weights, input_shape, mean, std, device, onnx_bound="verify"):
    """The model a command works on, and the name to report it by: MODEL_FILE (any file lipcert
    loads) or ``--module`` (:func:`certify.foreign.load_module`), exactly one of them."""
    if (model_file is None) == (module_spec is None):
        raise click.UsageError("give MODEL_FILE or --module PKG.MODULE:FACTORY (one of them)")
    if module_spec is None:
        if weights is not None or mean is not None or std is not None:
            raise click.UsageError("--weights, --mean and --std go with --module")
        from ..loading import load_any

        return load_any(model_file, device=device, onnx_bound=onnx_bound), model_file
    from ..foreign import load_module

    model = load_module(module_spec, weights, _numbers(input_shape, "--input-shape", int),
                        None if mean is None else _numbers(mean, "--mean", float),
                        None if std is None else _numbers(std, "--std", float))
    return model.to(device), module_spec


def echo_csv(columns, rows) -> None:
    """``rows`` (lists of cells, in ``columns`` order) as CSV on stdout, with a header row."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    click.echo(buf.getvalue(), nl=False)
