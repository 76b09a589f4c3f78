"""``lipcert export``: write a deployable model (ONNX or baked safetensors) that gives the same
logits and certificates as the checkpoint. A thin layer over :mod:`certify.export`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import err_console, handle_errors, out_console

EPILOG = (
    "Exit codes: 0 success; 1 runtime error (a one-line message: unreadable checkpoint, output "
    "exists without --overwrite, the `export` extra missing, or the exported model's logits off "
    "by more than --tolerance; nothing is written then); 2 usage error."
)


@click.command("export", epilog=EPILOG)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), default="onnx", show_default=True,
              help="onnx: lipcert's graph for onnxruntime, which `lipcert certify` verifies and "
                   "recomputes the bound of; safetensors: the baked PyTorch model, loadable without "
                   "training code.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write.")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True,
              help="ONNX opset version of the graph.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest absolute logit difference to the checkpoint allowed on the check batch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random images used to check the export against the checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the check images.")
@click.option("--one-by-one", type=click.Choice(["matrix", "taylor"]), default="matrix", show_default=True,
              help="Bake 1x1 SOC layers as one matrix exp(A) (faster) or as the checkpoint's own "
                   "Taylor series (bit-identical logits).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@handle_errors
def export(checkpoint, fmt, output, opset, tolerance, batch_size, seed, one_by_one, overwrite, as_json):
    """Export CHECKPOINT (a lipcert .safetensors file) for deployment.

    The parametrisations are evaluated once (baked); the export is then run on a random batch
    and compared with the checkpoint, and written (atomically) only if every logit agrees within
    --tolerance. `lipcert certify OUTPUT` certifies the result with the bound recomputed from
    its weights: an ONNX file through onnxruntime, once its graph is verified as the one lipcert
    writes for its layer plan (an edited graph is refused); a baked safetensors file directly.
    Exports run on the CPU.
    """
    from ..loading import load
    from ..export import export_model, require

    from ..errors import ExportError

    out = Path(output)
    # Output checks before the (slow) load and export.
    if out.exists() and Path(checkpoint).exists() and out.resolve() == Path(checkpoint).resolve():
        raise ExportError(f"{out}: the output would replace the checkpoint being exported")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists already; pass --overwrite to replace it")
    if fmt == "onnx":  # say what to install before doing any work
        for module in ("onnx", "onnxruntime"):
            require(module, "ONNX export")
    model = load(checkpoint, device="cpu")
    err_console.print(f"exporting {checkpoint} ({getattr(model, 'model_name', '?')}) to {fmt} ...", highlight=False,
                      soft_wrap=True)
    report = export_model(model, out, format=fmt, opset=opset, tolerance=tolerance, batch_size=batch_size,
                          seed=seed, overwrite=overwrite, one_by_one=one_by_one, source=Path(checkpoint))
    for note in report.extra.get("notes", []):
        err_console.print(f"note: {note}", highlight=False)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    bound = "n/a (curvature certificate)" if report.lipschitz_bound is None else f"{report.lipschitz_bound:.9g}"
    exporter = f" ({report.exporter} exporter, opset {report.opset})" if fmt == "onnx" else ""
    out_console.print(
        f"wrote {report.path}{exporter}, {report.size_bytes / 1e6:.2f} MB in {report.seconds:.1f} s\n"
        f"max |logit difference| vs checkpoint: {report.max_abs_logit_diff:.3g} "
        f"(tolerance {report.tolerance:g}, {report.check_batch} random images)\n"
        f"Lipschitz upper bound: {bound}"
        + ("  (recomputed from the graph by `lipcert certify`)" if fmt == "onnx" else "")
        + f"\ncertificate: {report.certificate}",
        highlight=False, soft_wrap=True,
    )


__all__ = ["export"]
