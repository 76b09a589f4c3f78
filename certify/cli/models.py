"""``lipcert models``: list the registered models."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ._common import err_console, handle_errors, out_console


@click.command()
@click.argument("pattern", default="*")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--width", type=int, default=None, help="Build each model at this width (default: the paper's 32).")
@click.option("--no-bound", is_flag=True, help="Skip the Lipschitz bound at initialisation (faster).")
@handle_errors
def models(pattern: str, fmt: str, width: int | None, no_bound: bool) -> None:
    """List registered models matching PATTERN (fnmatch, e.g. 'lipconvnet*'), with parameter
    counts and the sound Lipschitz upper bound of a freshly initialised model."""
    import torch

    from certify.models import create_model, list_models

    rows = []
    names = list_models(pattern)
    for name in names:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_model(name, width=width).eval()
        row = {"name": name, "parameters": sum(p.numel() for p in model.parameters()),
               "input_shape": list(model.input_shape), "head": getattr(model, "head_kind", "?")}
        if not no_bound:
            try:
                row["lipschitz_upper_bound"] = model.lipschitz_bound()
            except Exception as e:  # e.g. an MLP head: certified by curvature instead
                row["lipschitz_upper_bound"] = None
                row["note"] = str(e)
        rows.append(row)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        err_console.print(f"no model matches {pattern!r}")
        return
    table = Table(title="lipcert models")
    for col in ("name", "parameters", "input", "head") + (() if no_bound else ("Lipschitz bound (init)",)):
        table.add_column(col, justify="right" if col in ("parameters", "Lipschitz bound (init)") else "left")
    for r in rows:
        cells = [r["name"], f"{r['parameters']:,}", "x".join(map(str, r["input_shape"])), r["head"]]
        if not no_bound:
            b = r["lipschitz_upper_bound"]
            cells.append("-" if b is None else f"{b:.6f}")
        table.add_row(*cells)
    out_console.print(table)
