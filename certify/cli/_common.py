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
