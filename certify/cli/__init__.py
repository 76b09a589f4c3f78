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
    # One module per command; imported here so that `lipcert --help` lists them all.
    from .attack import attack
    from .certify_cmd import certify
    from .export import export
    from .layers import layers
    from .models import models
    from .train import demo, train

    for command in (models, layers, train, demo, certify, attack, export):
        cli.add_command(command)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lipcert")


__all__ = ["cli", "fail", "main"]
