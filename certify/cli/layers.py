"""``lipcert layers``: the registered layer types, their kind and what their sound bound is made of."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..layers.registry import KINDS
from ._common import echo_csv, err_console, handle_errors, out_console

_COLUMNS = ("name", "kind", "bound", "reference")


@click.command()
@click.argument("pattern", default="*")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only layers of this kind.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="A rich table, a JSON list, or CSV rows.")
@handle_errors
def layers(pattern: str, kind: str | None, fmt: str) -> None:
    """List registered layer types matching PATTERN (fnmatch): name, kind, how each one's sound
    Lipschitz bound is computed, and its paper."""
    import fnmatch

    from certify.layers import all_layers

    rows = [info.as_dict() for info in all_layers()
            if fnmatch.fnmatchcase(info.name, pattern) and (kind is None or info.kind == kind)]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        echo_csv(_COLUMNS, [[r[c] for c in _COLUMNS] for r in rows])
        return
    if not rows:
        err_console.print(f"no layer matches {pattern!r}" + (f" of kind {kind}" if kind else ""))
        return
    table = Table(title="lipcert layers")
    for col in ("name", "kind", "bound"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["bound"])
    out_console.print(table)
