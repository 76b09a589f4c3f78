"""``lipcert attack``: empirical l2 attacks beside the certificates, and an audit of them.

A thin layer over :func:`certify.audit.attack_dataset` (attacks in :mod:`certify.attacks`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import click
from rich.table import Table

from ..errors import ConfigError, RunFolderError
from ._common import (EXIT_GATE, checkpoint_dataset, err_console, foreign_model_options, handle_errors,
                      load_cli_model, out_console, resolve_device, show_progress)

SPLITS = ("train", "val", "test", "all")
ATTACK_CHOICES = ("all", "pgd", "apgd-ce", "apgd-dlr")

EPILOG = (
    "Exit codes: 0 success; 1 runtime error (a one-line message: unreadable model file, an "
    "exported model that cannot be differentiated, images of the wrong size, NaN pixels, empty "
    "dataset); 2 usage error (bad option, eps <= 0); 3 --audit found a certificate violation "
    "(the report is printed and written first)."
)


def _eps_option(ctx, param, values):
    from ..certificates import eps_label, parse_eps

    try:
        return [(eps_label(v), parse_eps(v)) for v in values]
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{digits}f}")
    return str(v)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _summary_rows(summary: dict) -> list[dict]:
    return [{"eps": e["eps"], "eps_value": e["eps_value"], "clean_accuracy": e["clean_accuracy"],
             "certified_accuracy": e["certified_accuracy"],
             "empirical_robust_accuracy": e["empirical_robust_accuracy"],
             "certified_but_broken": e["certified_but_broken"], "samples": summary["samples"]}
            for e in summary["eps"]]


def _tables(summary: dict) -> list[Table]:
    t = Table(title=f"lipcert attack: {summary['samples']} images, {'+'.join(summary['attacks'])}, "
                    f"{summary['steps']} steps x {summary['restarts']} restart(s)")
    for col in ("eps", "clean %", "certified %", "empirical robust %", "certified but broken"):
        t.add_column(col, justify="right")
    for e in summary["eps"]:
        t.add_row(e["eps"], f"{100 * e['clean_accuracy']:.2f}", f"{100 * e['certified_accuracy']:.2f}",
                  f"{100 * e['empirical_robust_accuracy']:.2f}", str(e["certified_but_broken"]))
    tables = [t]
    a = summary.get("audit")
    if a:
        ta = Table(title="audit: attacks inside each certified radius (x (1 - 1e-4))")
        ta.add_column("quantity")
        ta.add_column("value", justify="right")
        ta.add_row("certified samples audited", str(a["certified_audited"]))
        ta.add_row("violations (confirmed in float64)", str(a["violations"]))
        ta.add_row("float32-only flips (rounding, not violations)", str(a["float32_only_flips"]))
        for k, v in a.get("tightness", {}).items():
            ta.add_row(f"empirical / certified radius, {k}", _fmt(v, 3))
        if a["tightness_not_broken"] is None:
            ta.add_row("empirical / certified radius", "not measured (--tightness)")
        else:
            ta.add_row("certified samples no attack broke", str(a["tightness_not_broken"]))
        ta.add_row("Lipschitz upper bound (from the weights)", _fmt(a["lipschitz_upper"], 6))
        ta.add_row("Lipschitz lower bound (largest ratio attacks saw)", _fmt(a["lipschitz_lower_attack"], 6))
        ta.add_row("upper / lower", _fmt(a.get("lipschitz_gap"), 3))
        ta.add_row("verdict", "[green]PASSED[/]" if a["passed"] else "[bold red]VIOLATIONS FOUND[/]")
        tables.append(ta)
    q = summary.get("empirical_radius")
    if q:
        tr = Table(title="empirical robustness radius (min-norm search; witness lengths)")
        for k in q:
            tr.add_column(k, justify="right")
        tr.add_row(*[_fmt(v, 4) for v in q.values()])
        tables.append(tr)
    return tables


def _prepare_folder(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"{what} {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()):
        raise RunFolderError(f"{what} {p} is not empty; refusing to overwrite files in it (choose a new folder)")
    return p  # created only when there is something to write


def _save_pngs(folder: Path, images) -> int:
    from PIL import Image

    for name, img in images:
        arr = (img.clamp(0, 1) * 255).round().to("cpu").byte()
        arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
        safe = name.replace("/", "_")
        target = folder / f"{safe}.png"
        if target.exists():  # never overwrite silently
            raise RunFolderError(f"{target} exists already")
        Image.fromarray(arr).save(target)
    return len(images)


@click.command(epilog=EPILOG)
@foreign_model_options
@click.option("--dataset", default=None,
              help="cifar10, cifar100, mnist, fashion-mnist, imagefolder or synthetic. Default: the "
                   "dataset recorded in the checkpoint.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where the dataset lives.")
@click.option("--download", is_flag=True, help="Download a missing torchvision dataset.")
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="val: the validation part of the training images, split as training split it (the "
                   "same images as `lipcert certify`).")
@click.option("--val-split", type=float, default=None,
              help="Validation images carved from the training pool (default: the checkpoint's).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Attack a seeded random subset of N images (the same subset as `lipcert certify --limit N`).")
@click.option("--eps", "eps", multiple=True, callback=_eps_option, metavar="EPS",
              help="l2 radius in [0, 1] pixel units, a fraction (36/255) or a decimal; repeatable. "
                   "Default: 36/255.")
@click.option("--attack", "attack", type=click.Choice(ATTACK_CHOICES), default="all", show_default=True,
              help="all: APGD-CE, then APGD-DLR, then PGD, each on what the others left unbroken.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Steps per attack run.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Random restarts per attack.")
@click.option("--audit", is_flag=True,
              help="Attack every certified image inside its certified radius; exit 3 on any violation.")
@click.option("--tightness", is_flag=True,
              help="With --audit: also measure empirical / certified radius (min-norm search on the certified "
                   "images; about --search-steps + 2 times the audit's time; --min-norm implies it).")
@click.option("--min-norm", is_flag=True, help="Estimate every image's empirical robustness radius (bisection).")
@click.option("--search-steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Bisection steps of the min-norm search.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--eval", "eval_path", type=click.Choice(["fast", "taylor"]), default="fast", show_default=True,
              help="SOC evaluation, as in `lipcert certify --eval` (the same default): the attacks and the "
                   "certificates use the same function. fast caches the input-independent tensors, so attacks "
                   "run faster; taylor is the paper's 15-term series.")
@click.option("--dense-max", type=click.IntRange(min=0), default=8192, show_default=True,
              help="With --eval fast: the largest SOC operator to materialise as one dense matrix "
                   "(see `lipcert certify --dense-max`); 0 never does.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the attacks' random starts.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="stdout: rich tables, the summary as JSON, or one CSV row per eps.")
@click.option("--output", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write samples.csv (one row per image and eps), radii.csv (with --audit/--min-norm), "
                   "summary.json and config.json here.")
@click.option("--save-adversarials", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write the adversarial images found as PNG (8-bit: for looking at, not for replay) "
                   "into this new or empty folder.")
@handle_errors
def attack(model_file, module_spec, weights, input_shape, mean, std, dataset, data_dir, download, split, val_split,
           limit, eps, attack, steps, restarts, audit, tightness, min_norm, search_steps, batch_size, eval_path,
           dense_max, device, seed, fmt, output, save_adversarials):
    """Attack MODEL_FILE (a .safetensors checkpoint), or a model built elsewhere (--module), with
    l2 PGD and APGD, report clean, certified and empirical robust accuracy side by side, and with
    --audit prove that no certificate is wrong (an attack that succeeds inside a certified radius
    is a violation)."""
    import torch

    from ..audit import attack_dataset
    from ..certificates import Certifier

    machine = fmt != "table"
    eps = list(eps) or [("36/255", 36 / 255)]
    out_dir = _prepare_folder(output, "--output folder") if output else None
    png_dir = _prepare_folder(save_adversarials, "--save-adversarials folder") if save_adversarials else None
    dev = resolve_device(device)
    model, model_file = load_cli_model(model_file, module_spec, weights, input_shape, mean, std, dev)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{model_file}: attacks need the model's gradients; exported models cannot be "
                          "attacked, use the .safetensors checkpoint")
    ds = checkpoint_dataset(model, model_file, split=split, dataset=dataset, data_dir=data_dir, download=download,
                            val_split=val_split, limit=limit)

    if eval_path == "fast":
        from ..layers import set_eval_mode

        # certified below with the bound of this same path; each attack step is about three
        # forward passes (forward and backward), which the dense operators' build is weighed against
        passes = len(ds) * steps * restarts * (3 if attack == "all" else 1) * 3
        set_eval_mode(model, "fast", images=passes, dense_max=dense_max)
    cert = Certifier(model)
    kwargs = dict(attacks=attack, steps=steps, restarts=restarts, audit=audit, tightness=tightness,
                  min_norm=min_norm, search_steps=search_steps, batch_size=batch_size, device=dev, seed=seed,
                  certifier=cert, keep_adversarials=png_dir is not None)
    if show_progress(machine):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("attacking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task("attack", total=len(ds))
            report = attack_dataset(model, ds, eps, progress=lambda d, t: bar.update(task, completed=d, total=t),
                                    **kwargs)
    else:
        report = attack_dataset(model, ds, eps, **kwargs)

    summary = report.summary
    summary["model_file"] = str(model_file)
    config = {"model_file": str(model_file), "dataset": ds.spec.name, "split": split, "data_dir": ds.spec.data_dir,
              "split_seed": ds.spec.seed, "val_split": getattr(ds, "val_split", ds.spec.val_split),
              "fingerprint": getattr(ds, "fingerprint", None), "limit": limit, "eps": [lab for lab, _ in eps],
              "attack": attack, "steps": steps, "restarts": restarts, "audit": audit, "tightness": tightness,
              "min_norm": min_norm, "search_steps": search_steps, "batch_size": batch_size, "eval": eval_path,
              "dense_max": dense_max, "device": str(dev), "seed": seed}
    summary["config"] = config

    if fmt == "json":
        click.echo(json.dumps(summary, indent=2, default=str))
    elif fmt == "csv":
        click.echo(_csv_text(_summary_rows(summary)), nl=False)
    else:
        for t in _tables(summary):
            out_console.print(t)

    if out_dir is not None:
        from ..checkpoint import atomic_write_bytes

        out_dir.mkdir(parents=True, exist_ok=True)
        written = [atomic_write_bytes(out_dir / "samples.csv", _csv_text(report.samples).encode())]
        if report.radii:
            written.append(atomic_write_bytes(out_dir / "radii.csv", _csv_text(report.radii).encode()))
        written.append(atomic_write_bytes(out_dir / "summary.json",
                                          json.dumps(summary, indent=2, default=str).encode()))
        written.append(atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=2).encode()))
        err_console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        count = _save_pngs(png_dir, report.adversarials)
        err_console.print(f"wrote {count} adversarial image(s) to {png_dir}", highlight=False)

    broken = sum(e["certified_but_broken"] for e in summary["eps"])
    if broken:
        err_console.print(f"[bold red]{broken} certified sample(s) broken inside their certified radius[/]",
                          highlight=False)
    if audit:
        a = summary["audit"]
        if a["violations"] or broken:
            err_console.print(f"[bold red]audit failed: {a['violations']} certificate violation(s)[/]",
                              highlight=False)
            sys.stdout.flush()
            raise SystemExit(EXIT_GATE)
        if a["certified_audited"] == 0:
            err_console.print("note: no image was certified (correct with radius > 0): the audit tested nothing",
                              highlight=False)
        else:
            err_console.print(f"[green]audit passed: 0 violations in {a['certified_audited']} certified "
                              "samples[/]", highlight=False)
