"""``lipcert certify``: per-sample certified l2 radii, reports, and a gate for CI.

A thin layer over :func:`certify.certificates.certify_dataset` and :mod:`certify.reports`.
"""

from __future__ import annotations

import sys

import click
import torch
from click.core import ParameterSource
from rich.markup import escape

from ..certificates import CERTIFICATE_METHODS, STANDARD_EPS, eps_label, parse_eps
from ..errors import ConfigError
from ..reports import FORMATS
from ._common import (EXIT_GATE, checkpoint_dataset, err_console, foreign_model_options, handle_errors,
                      load_cli_model, out_console, resolve_device, show_progress)

SPLITS = ("train", "val", "test", "all")

EPILOG = (
    "Exit codes: 0 success (every --fail-under gate met); 1 runtime error (a one-line message, "
    "no certificate: unreadable or non-lipcert model file, model not in the registry, weights "
    "that do not fit, images of the wrong size, NaN/inf pixels, empty dataset, no sound "
    "Lipschitz bound); 2 usage error (bad option, malformed --eps or --fail-under); 3 a "
    "--fail-under gate failed (the report is printed and written first)."
)


def _eps_option(ctx, param, values):
    try:
        for v in values:
            parse_eps(v)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    return values


def _gate_option(ctx, param, values):
    from ..reports import parse_gate

    try:
        return [parse_gate(v) for v in values]
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


@click.command(epilog=EPILOG)
@foreign_model_options
@click.option("--dataset", default=None,
              help="cifar10, cifar100, mnist, fashion-mnist, imagefolder (with --data-dir) or synthetic. "
                   "Default: the dataset recorded in the checkpoint.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the dataset lives; for imagefolder, the folder of class subfolders.")
@click.option("--download", is_flag=True, help="Download a missing torchvision dataset.")
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="val: the validation part of the training images, split as training split it (the "
                   "checkpoint's data seed, val split and synthetic size); test: the official test split; "
                   "all: every image.")
@click.option("--val-split", type=float, default=None,
              help="Validation images carved from the training pool (default: the checkpoint's).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Certify a seeded random subset of N images (the same subset as `lipcert attack --limit N`).")
@click.option("--eps", "eps", multiple=True, callback=_eps_option, metavar="EPS",
              help="l2 radius to report certified accuracy at, a fraction (36/255) or a decimal "
                   "(0.5); repeatable. Default: 36/255, 72/255, 108/255.")
@click.option("--certificate", type=click.Choice(CERTIFICATE_METHODS), default="auto", show_default=True,
              help="auto: the tightest sound certificate for the model's head (pairwise for LLN, "
                   "curvature for MLP, global otherwise); curvature-quick: the closed-form curvature "
                   "certificate of an MLP head (sound, looser, faster than the tight one).")
@click.option("--lipschitz", type=float, default=None, metavar="VALUE",
              help="A Lipschitz upper bound you vouch for, for a model that is not 1-Lipschitz by "
                   "construction (global certificate; the report marks it user-supplied).")
@click.option("--trust-onnx-bound", is_flag=True,
              help="For an .onnx file whose graph lipcert cannot verify as one it wrote (another tool's, "
                   "an older lipcert's, or edited): certify with the bound stored in its metadata, "
                   "which the report marks as trusted from the file. Without it such a file is refused.")
@click.option("--lower-bound", is_flag=True,
              help="Also compute an empirical lower bound on L (Jacobian power iteration) to show "
                   "how tight the upper bound is.")
@click.option("--lower-bound-samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images used for --lower-bound.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per forward pass (128 was the fastest measured on a 2-core CPU).")
@click.option("--eval", "eval_path", type=click.Choice(["fast", "taylor"]), default="fast", show_default=True,
              help="SOC evaluation. fast: the cached fast path (Chebyshev degree chosen per layer from its "
                   "sound norm bound, 1x1 layers as one matrix, layers on small maps as one dense matrix "
                   "where that pays off over the images certified), 2.4-3.2x faster on a CPU; taylor: the "
                   "paper's 15-term Taylor series, as the model was trained and validated. Each is certified "
                   "with the bound of what it computes.")
@click.option("--dense-max", type=click.IntRange(min=0), default=8192, show_default=True,
              help="With --eval fast: the largest SOC operator (channels x height x width) to materialise "
                   "as one dense matrix (a float64 build holding a few n x n matrices); 0 never does.")
@click.option("--precision", type=click.Choice(["confirm", "float64", "float32"]), default="confirm",
              show_default=True,
              help="How the float32 rounding of the forward pass is covered. confirm: the first batch is "
                   "measured in float64 too, then radii within 0.1% of an eps (and near 0) are re-checked "
                   "in float64; float64: every image in float64 (slower); float32: no re-check (rounding "
                   "not covered).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--format", "format", type=click.Choice(FORMATS), default="table", show_default=True,
              help="stdout format: a rich table, the summary as JSON, one CSV row per eps, or "
                   "Markdown (for $GITHUB_STEP_SUMMARY).")
@click.option("--output", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write samples.csv (one row per image), summary.json and radius_curve.png here.")
@click.option("--fail-under", multiple=True, callback=_gate_option, metavar="PCT@EPS",
              help="Exit with code 3 when certified accuracy at EPS is below PCT percent, e.g. "
                   "60@36/255; repeatable.")
@click.option("--seed", type=int, default=None,
              help="Seed of the train/val split and the lower bound (default: the checkpoint's data seed, else 0).")
@handle_errors
def certify(model_file, module_spec, weights, input_shape, mean, std, dataset, data_dir, download, split, val_split,
            limit, eps, certificate,
            lipschitz, trust_onnx_bound, lower_bound, lower_bound_samples, batch_size, eval_path, dense_max, precision, device,
            output, fail_under, seed, **kw):
    """Certify MODEL_FILE (.safetensors checkpoint or exported .onnx): the certified l2 radius of
    every image, clean and certified accuracy at each eps, with the model's Lipschitz upper bound
    recomputed from its weights: for an .onnx file, from the graph's own weights once the graph
    is verified as the one lipcert writes. A bound stored in a file is used only with
    --trust-onnx-bound.

    A sample is certified at eps when it is correctly classified and its radius is strictly
    greater than eps (ties in the logits give radius 0).
    """
    from ..certificates import certify_dataset
    from ..reports import evaluate_gates, rich_tables, to_csv, to_json, to_markdown, write_reports

    # Parameter names follow the option names so that LIPCERT_CERTIFY_FAIL_UNDER, ..._FORMAT and
    # the [certify] table of --config reach them.
    fmt, gates = kw["format"], fail_under
    machine = fmt != "table"
    dev = resolve_device(device)
    onnx_bound = "none" if lipschitz is not None else "trust" if trust_onnx_bound else "verify"
    model, model_file = load_cli_model(model_file, module_spec, weights, input_shape, mean, std, dev, onnx_bound)

    ds = checkpoint_dataset(model, model_file, split=split, dataset=dataset, data_dir=data_dir, download=download,
                            val_split=val_split, seed=seed, limit=limit)
    seed = ds.spec.seed
    if eval_path == "fast":
        from ..layers import set_eval_mode

        # one forward per image: layers on small maps become dense where the build pays off
        if not isinstance(model, torch.nn.Module) or set_eval_mode(model, "fast", images=len(ds),
                                                                   dense_max=dense_max) == 0:
            # fast is the default: say so only to a user who asked for it
            asked = click.get_current_context().get_parameter_source("eval_path") != ParameterSource.DEFAULT
            if asked:
                err_console.print("note: --eval fast applies to SOC layers of lipcert checkpoints; this model has "
                                  "none, evaluated as stored", highlight=False, soft_wrap=True)
        elif show_progress(machine):
            err_console.print(f"preparing the fast evaluation path for {len(ds):,} images (bounds, and dense "
                              "matrices where they pay off: up to a few minutes on a CPU)", highlight=False,
                              soft_wrap=True)
    if lipschitz is not None:
        err_console.print(f"note: using the user-supplied Lipschitz bound {lipschitz!r}; the certificates are "
                          "only as sound as that value", highlight=False, soft_wrap=True)

    source = getattr(model, "bound_source", None)
    if lipschitz is None and source and not source.startswith("computed from the weights"):
        err_console.print(f"note: this model's Lipschitz bound is {source}: not recomputed from its weights, "
                          "the certificates are only as sound as that file", highlight=False, soft_wrap=True)
    if lower_bound and not isinstance(model, torch.nn.Module):
        err_console.print("note: --lower-bound needs gradients through the model; not available for an "
                          "ONNX model, skipped", highlight=False, soft_wrap=True)
        lower_bound = False

    eps_values = list(eps) or list(STANDARD_EPS)
    eps_values += [g.eps for g in gates if all(parse_eps(e) != g.eps_value for e in eps_values)]

    kwargs = dict(eps=eps_values, method=certificate, lipschitz=lipschitz, batch_size=batch_size,
                  device=dev, lower_bound=lower_bound, lower_bound_samples=lower_bound_samples, seed=seed,
                  precision=precision)
    if show_progress(machine):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)

        columns = (TextColumn("certifying"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("certify", total=len(ds), rate="")

            def progress(done, total):
                speed = bar.tasks[task].speed
                bar.update(task, completed=done, total=total, rate=f"{speed:.0f} img/s" if speed else "")

            result = certify_dataset(model, ds, progress=progress, **kwargs)
    else:
        result = certify_dataset(model, ds, **kwargs)

    result.summary["model_file"] = str(model_file)
    result.summary["config"] = {
        "dataset": ds.name, "split": split, "data_dir": ds.spec.data_dir,
        "val_split": getattr(ds, "val_split", val_split), "seed": seed, "limit": limit,
        "eps": [eps_label(e) for e in eps_values], "certificate": certificate, "lipschitz": lipschitz,
        "lower_bound": lower_bound, "batch_size": batch_size, "eval": eval_path, "dense_max": dense_max, "precision": precision,
        "device": str(dev),
        "fail_under": [str(g) for g in gates],
    }
    gate_results = evaluate_gates(result, gates)

    # Results first (stdout, then files), the gate's verdict last.
    if fmt == "json":
        click.echo(to_json(result.summary, gate_results), nl=False)
    elif fmt == "csv":
        click.echo(to_csv(result.summary), nl=False)
    elif fmt == "markdown":
        click.echo(to_markdown(result.summary, gate_results), nl=False)
    else:
        for table in rich_tables(result.summary, gate_results):
            out_console.print(table)
    if output is not None:
        paths, note = write_reports(result, output, gate_results)
        err_console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)
        if note:
            err_console.print(f"note: {note}", highlight=False, soft_wrap=True)

    failed = [g for g in gate_results if not g.passed]
    for g in gate_results:
        style = "green" if g.passed else "bold red"
        err_console.print(f"[{style}]{escape(str(g))}[/]", highlight=False, soft_wrap=True)
    if failed:
        sys.stdout.flush()
        raise SystemExit(EXIT_GATE)


__all__ = ["certify"]
