"""Certified accuracy under a compute budget: the paper's recipe vs lipcert's budget preset (issue 9).

Every row trains with ``lipcert train --budget-minutes M`` on the CIFAR-10 training JPEGs
(../shared/data, ImageFolder layout) with the same seeded 5,000-image validation split (data seed
0), which no training step sees, then certify that split with the sound Lipschitz bound
(certification is not counted in the budget). Rows:

- ``paper``:  ``--recipe paper``  (LipConvnet-5 width 32, SOC with fast backward, MaxMin, max
  pooling, orthogonal head, SGD 0.1 / 0.9 / 5e-4, crop + flip, batch 128, lr x0.1 at 50% and 75%
  of the steps that fit, cross-entropy);
- ``budget-v1``: ``--recipe budget-v1`` (lipcert's preset until issue 17, LipConvnet-5 at width 8);
- ``budget``: ``--recipe budget`` (lipcert's preset; see certify/recipes.py);
- ``budget-bro``: ``--recipe budget-bro`` (a BRO ConvNet-XS, the best layer at 15 minutes).

Each row prints clean and certified accuracy at 36/255, 72/255, 108/255, the epochs done and the
training images/s. After training, ``lipcert attack --audit`` checks the budget model's
certificates against PGD and AutoPGD on a seeded subset of the validation split.

    python bench/budget_recipe.py --minutes 70                  # the protocol: one row after the other
    python bench/budget_recipe.py --minutes 70 --rows budget-v1,budget --concurrent   # two at once, one core each
    python bench/budget_recipe.py --minutes 0.3 --synthetic     # a smoke test on synthetic data
    python bench/budget_recipe.py --minutes 70 --concurrent \
        --row budget-o1x="--recipe budget --offset 1x" --rows budget,budget-o1x   # a candidate row

``--row NAME=ARGS`` adds a row of your own: ``lipcert train ARGS`` with the protocol's budget, data,
split, seed and device options appended (so a candidate for the preset is measured exactly like the
preset). Every row but ``paper`` (the baseline, not a candidate) is audited.

``--concurrent`` gives each row one dedicated core (sched_setaffinity) and one torch thread for the
same wall clock: the two rows get equal compute, half of what the sequential protocol gives each.
Writes RUN/<row>/ (run folders), RUN/<row>.log, RUN/budget_recipe.{md,csv}; RUN defaults to
bench/results/<date>-budget-recipe-<minutes>min.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name, run_rows, start_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("paper", "budget-v1", "budget", "budget-bro")
EPS = ("36_255", "72_255", "108_255")
LIPCERT = [sys.executable, "-c", "from certify.cli import main; main()"]


def custom_rows(items: list[str]) -> dict[str, list[str]]:
    """``--row NAME=ARGS`` items as {NAME: lipcert train options}; ValueError on a bad item."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, extra = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ValueError(f"--row takes NAME=ARGS with NAME a plain folder name, got {item!r}")
        if name in ROWS or name in out:
            raise ValueError(f"--row {name!r}: that row name is already taken")
        try:
            options = shlex.split(extra)
        except ValueError as e:
            raise ValueError(f"--row {name!r}: {e}") from None
        if not options:
            raise ValueError(f"--row {name!r}: no lipcert train options given")
        clash = sorted({o.split("=", 1)[0] for o in options} & PROTOCOL_OPTIONS)
        if clash:
            raise ValueError(f"--row {name!r}: {', '.join(clash)} belong to the protocol and are set by this script")
        out[name] = options
    return out


# Set by train_command for every row, so that all rows are measured alike.
PROTOCOL_OPTIONS = {"--budget-minutes", "--output", "-o", "--seed", "--device", "--dataset", "--data-dir", "--val-split",
                    "--data-seed", "--synthetic-size", "--workers", "--epochs", "--limit", "--val-limit"}


def train_command(row: str, args, run_dir: Path) -> list[str]:
    options = args.custom[row] if row in args.custom else ["--recipe", row]
    cmd = [*LIPCERT, "train", *options, "--budget-minutes", str(args.minutes),
           "--output", str(run_dir), "--seed", str(args.seed), "--no-progress", "--device", "cpu"]
    if args.synthetic:
        cmd += ["--dataset", "synthetic", "--synthetic-size", "1200", "--val-split", "200"]
    else:
        cmd += ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-split", "5000",
                "--data-seed", "0", "--workers", str(args.workers)]
    return cmd


def start(row: str, args, run_dir: Path, core: int | None) -> subprocess.Popen:
    return start_run(train_command(row, args, run_dir), run_dir.parent / f"{row}.log", ROOT, core)


def summarise(row: str, run_dir: Path) -> dict:
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
    config = json.loads((run_dir / "config.json").read_text())
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    last = next(r for r in reversed(metrics) if r["val_clean_acc"])
    steps = int(state["iteration"])
    out = {
        "row": row, "model": config["model"], "width": config["width"], "loss": config["loss"],
        "schedule": config["schedule"], "clean": float(last["val_clean_acc"]),
        **{f"cert_{e}": float(last[f"val_cert_{e}"]) for e in EPS},
        "epochs": round(steps / int(config["steps_per_epoch"]), 3), "steps": steps,
        "images_per_s": round(steps * int(config["batch_size"]) / float(metrics[-1]["budget_used_s"]), 1),
        "budget_used_s": round(float(metrics[-1]["budget_used_s"]), 1),
        # training, validation and checkpoints (JPEG decoding excluded)
        "wall_s": round(sum(float(r["epoch_seconds"]) for r in metrics), 1),
    }
    return out


def audit(run_dir: Path, args) -> str:
    """``lipcert attack --audit`` on the budget model (a seeded validation subset)."""
    # The dataset, split and seed come from the checkpoint; only the folder has to be named.
    cmd = [*LIPCERT, "attack", str(run_dir / "model.safetensors"), "--audit", "--limit", str(args.audit_limit),
           "--device", "cpu"] + ([] if args.synthetic else ["--data-dir", args.data_dir])
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return f"exit {res.returncode}\n{res.stdout.strip()}\n{res.stderr.strip()[-2000:]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=70.0, help="training budget per row")
    p.add_argument("--data-dir", default="/work/data/train", help="ImageFolder of the CIFAR-10 training JPEGs")
    p.add_argument("--synthetic", action="store_true", help="synthetic data instead (a smoke test)")
    p.add_argument("--concurrent", action="store_true", help="run the rows at once, each on its own core")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows to run: among " + ", ".join(ROWS) + " and the --row names "
                   "(default: all of them)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ARGS",
                   help="a row of your own, trained with `lipcert train ARGS` plus the protocol's options")
    p.add_argument("--audit-limit", type=int, default=50,
                   help="validation images the audit attacks (about 20 s each at width 8 on one core)")
    p.add_argument("--workers", type=int, default=2, help="JPEG decoding threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--report-only", action="store_true",
                   help="do not train: audit and report the run folders already in --output")
    args = p.parse_args(argv)
    try:
        args.custom = custom_rows(args.row)
    except ValueError as e:
        p.error(str(e))
    known = (*ROWS, *args.custom)
    rows = list(known) if args.rows is None else [r for r in args.rows.split(",") if r]
    if not rows or any(r not in known for r in rows) or len(set(rows)) != len(rows):
        p.error(f"--rows must name distinct rows among {', '.join(known)}")
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-budget-recipe-{args.minutes:g}min")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        missing = [r for r in rows if not (out / r / "train_state.pt").is_file()]
        if missing:
            p.error(f"--report-only: no finished run folder for {missing} in {out}")
    elif any((out / r).exists() for r in rows):
        p.error(f"{out} already holds run folders; pick another --output (or --report-only)")
    env = (f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}, "
           + ("rows concurrent, one core and one thread each" if args.concurrent else "rows one after the other"))
    print(f"budget_recipe: {args.minutes:g} min per row, {env}", file=sys.stderr)

    results = []
    try:
        codes = ({r: 0 for r in rows} if args.report_only
                 else run_rows(rows, lambda r, core: start(r, args, out / r, core), args.concurrent))
    except ValueError as e:
        p.error(str(e))
    for r in rows:
        if codes[r] != 0:
            print(f"row {r} failed (exit {codes[r]}); see {out / (r + '.log')}", file=sys.stderr)
            return 1
        results.append(summarise(r, out / r))

    audits = {r: audit(out / r, args) for r in rows if r != "paper"}
    cols = list(results[0])
    with open(out / "budget_recipe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(results)
    lines = [f"# Certified accuracy under a {args.minutes:g}-minute training budget ({dt.date.today()})", "",
             f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'bench/budget_recipe.py', *(argv or sys.argv[1:])])}`",
             f"- environment: {env}",
             *(["- the rows were trained before this report (same --minutes and row options); their training "
                "logs are " + ", ".join(f"{r}.log" for r in rows) + " beside this file"]
               if args.report_only else []),
             *[f"- row {r}: `lipcert train {' '.join(shlex.quote(a) for a in train_command(r, args, out / r)[4:])}`"
               for r in rows],
             "- data: " + ("synthetic" if args.synthetic else f"{args.data_dir} (CIFAR-10 training JPEGs), 45,000 "
                           "training / 5,000 validation images (data seed 0)")
             + "; every accuracy is on the VALIDATION split, certified with the sound bound", "",
             "| row | model | width | loss | clean | cert 36/255 | cert 72/255 | cert 108/255 | epochs | images/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['model']} | {r['width']} | {r['loss']} | {100 * r['clean']:.2f}% | "
                     + " | ".join(f"{100 * r[f'cert_{e}']:.2f}%" for e in EPS)
                     + f" | {r['epochs']:.2f} | {r['images_per_s']:.0f} |")
    for r, text in audits.items():
        lines += ["", f"Audit of the {r} model (`lipcert attack --audit`):", "", "```", text, "```"]
    (out / "budget_recipe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
