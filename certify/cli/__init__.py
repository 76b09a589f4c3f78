"""The ``lipcert`` command line: a thin layer over library functions.

Results go to stdout, progress and logs to stderr. Options also read environment variables
(``LIPCERT_<COMMAND>_<OPTION>``) and a ``--config`` file (TOML: one table per command); the
command line wins.
"""

from __future__ import annotations

import tomllib

import click

from .. import __version__
from ._common import EXIT_CODES_HELP, fail


def _load_config(ctx: click.Context, _param, value):
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"cannot read config file {value}: {e}") from None
    ctx.default_map = {cmd: {k.replace("-", "_"): v for k, v in opts.items()}
                       for cmd, opts in data.items() if isinstance(opts, dict)}
    return value


@click.group(context_settings={"auto_envvar_prefix": "LIPCERT", "help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="lipcert")
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="TOML file with one [command] table of option defaults.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """lipcert: train 1-Lipschitz CNNs and certify their l2 robustness, soundly."""


def _register_commands() -> None:
    from . import models as _models

    cli.add_command(_models.models)
    # Each command lives in its own module; optional ones are added when present.
    import importlib

    for module, name in (("train", "train"), ("train", "demo"), ("certify_cmd", "certify"),
                         ("attack", "attack"), ("export", "export")):
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
            continue
        if hasattr(mod, name):
            cli.add_command(getattr(mod, name))


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lipcert")


__all__ = ["cli", "fail", "main"]
