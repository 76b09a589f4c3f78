"""``lipcert models``: list the registered models from their static facts (instant); the
Lipschitz bound at initialisation, which builds each model, only with ``--bound``."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ._common import echo_csv, err_console, handle_errors, out_console

#: Columns of the table and the CSV (JSON has every fact).
_COLUMNS = ("name", "depth", "width", "layer", "head", "certificate", "input_shape", "parameters")


def _bound(name: str, width: int | None) -> dict:
    """The sound Lipschitz upper bound of ``name`` freshly initialised with seed 0 (a real build)."""
    import torch

    from certify.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(name, width=width).eval()
    try:
        return {"lipschitz_upper_bound": model.lipschitz_bound()}
    except Exception as e:  # e.g. an MLP head: certified by curvature instead
        return {"lipschitz_upper_bound": None, "note": str(e)}


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return "" if value is None else str(value)


@click.command()
@click.argument("pattern", default="*")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="A rich table, a JSON list of every fact, or CSV rows.")
@click.option("--width", type=int, default=None, help="Describe each model at this width (default: the paper's 32).")
@click.option("--bound", is_flag=True,
              help="Also build each model (seed 0) and compute the sound Lipschitz upper bound at initialisation: "
                   "seconds per model at width 32 on a CPU.")
@click.option("--no-bound", is_flag=True, hidden=True)  # the default since the bound became opt-in
@handle_errors
def models(pattern: str, fmt: str, width: int | None, bound: bool, no_bound: bool) -> None:
    """List registered models matching PATTERN (fnmatch, e.g. 'lipconvnet*'): depth, width, head,
    certificate, input shape and parameter count, from each model's configuration (no weights are
    built). --bound adds the Lipschitz upper bound of a freshly initialised model."""
    from certify.models import list_models, model_facts

    rows = [model_facts(name, width=width) for name in list_models(pattern)]
    if bound and not no_bound:
        for row in rows:
            row.update(_bound(row["name"], width))
    columns = _COLUMNS + (("lipschitz_upper_bound",) if rows and "lipschitz_upper_bound" in rows[0] else ())
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        echo_csv(columns, [[_cell(r.get(c)) for c in columns] for r in rows])
        return
    if not rows:
        err_console.print(f"no model matches {pattern!r}")
        return
    # To fit 80 columns: a width or input shape that every row shares goes into the title, and
    # the certificate beside the head.
    shared = [c for c in ("width", "input_shape") if len({_cell(r.get(c)) for r in rows}) == 1 and rows[0].get(c)]
    title = ", ".join(["lipcert models"] + [f"{'input' if c == 'input_shape' else c} {_cell(rows[0][c])}"
                                            for c in shared])
    table = Table(title=title)
    titles = {"input_shape": "input", "head": "head (certificate)", "lipschitz_upper_bound": "bound at init"}
    columns = tuple(c for c in columns if c != "certificate" and c not in shared)
    for c in columns:
        right = c in ("depth", "width", "parameters", "lipschitz_upper_bound")
        longest = max(len(_cell(r.get(c))) for r in rows) if c == "name" else None
        table.add_column(titles.get(c, c), justify="right" if right else "left", min_width=longest)
    for r in rows:
        cells = [_cell(r.get(c)) for c in columns]
        cells[columns.index("parameters")] = f"{r['parameters']:,}"
        if r.get("certificate"):
            cells[columns.index("head")] += f" ({r['certificate']})"
        if "lipschitz_upper_bound" in columns:
            b = r.get("lipschitz_upper_bound")
            cells[-1] = "-" if b is None else f"{b:.6f}"
        table.add_row(*cells)
    out_console.print(table)
