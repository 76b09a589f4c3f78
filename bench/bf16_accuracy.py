"""bfloat16 autocast in training: its effect on accuracy and on step time (issue 8).

Trains the same model twice with ``lipcert train``, identical but for ``--amp`` (bfloat16
autocast of the training forward; certification stays float32): same seed, data order, options
and number of epochs, on the CIFAR-10 training JPEGs with the seeded 5,000-image validation split
(data seed 0) that no training step sees. The model and options are those of the v1 budget preset
(LipConvnet-5 at width 8, LLN head, offset cross-entropy, cosine schedule), with a fixed number of
epochs instead of a time budget, so both rows take the same steps. Prints each row's validation
clean and certified accuracy, and its training images/s.

    python bench/bf16_accuracy.py --epochs 1 --concurrent     # one core and one thread per row
    python bench/bf16_accuracy.py --epochs 1 --synthetic      # a smoke test on synthetic data

Writes RUN/{float32,bf16}/ (run folders), RUN/{float32,bf16}.log and RUN/bf16_accuracy.md;
RUN defaults to bench/results/<date>-bf16-accuracy.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name, run_rows, start_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"float32": [], "bf16": ["--amp"]}
EPS = ("36_255", "72_255", "108_255")
LIPCERT = [sys.executable, "-c", "from certify.cli import main; main()"]
PRESET = ["--model", "lipconvnet5", "--width", "8", "--head", "lln", "--activation", "maxmin", "--pooling", "max",
          "--loss", "offset", "--schedule", "cosine", "--lr", "0.1", "--weight-decay", "5e-4", "--batch-size", "128"]


def train_command(row: str, args, run_dir: Path) -> list[str]:
    cmd = [*LIPCERT, "train", *PRESET, *ROWS[row], "--epochs", str(args.epochs), "--eval-every", str(args.epochs),
           "--output", str(run_dir), "--seed", str(args.seed), "--no-progress", "--device", "cpu"]
    if args.synthetic:
        cmd += ["--dataset", "synthetic", "--synthetic-size", "1200", "--val-split", "200"]
    else:
        cmd += ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-split", "5000", "--data-seed", "0",
                "--workers", "2"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd


def start(row: str, args, run_dir: Path, core: int | None) -> subprocess.Popen:
    return start_run(train_command(row, args, run_dir), run_dir.parent / f"{row}.log", ROOT, core)


def summarise(row: str, run_dir: Path) -> dict:
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
    last = metrics[-1]
    images_s = sorted(float(r["images_per_second"]) for r in metrics)
    return {"row": row, "epochs": len(metrics), "clean": float(last["val_clean_acc"]),
            **{f"cert_{e}": float(last[f"val_cert_{e}"]) for e in EPS},
            "train_loss": float(last["train_loss"]), "images_per_s": images_s[len(images_s) // 2]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--data-dir", default="/work/data/train", help="ImageFolder of the CIFAR-10 training JPEGs")
    p.add_argument("--synthetic", action="store_true", help="synthetic data instead (a smoke test)")
    p.add_argument("--concurrent", action="store_true", help="run both rows at once, each on its own core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-bf16-accuracy"
    out.mkdir(parents=True, exist_ok=True)
    if any((out / r).exists() for r in ROWS):
        p.error(f"{out} already holds run folders; pick another --output")
    env = (f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}, "
           + ("rows concurrent, one core and one thread each" if args.concurrent else "rows one after the other"))
    print(f"bf16_accuracy: {args.epochs} epoch(s) per row, {env}", file=sys.stderr)
    try:
        codes = run_rows(list(ROWS), lambda r, core: start(r, args, out / r, core), args.concurrent)
    except ValueError as e:
        p.error(str(e))
    for r, code in codes.items():
        if code != 0:
            print(f"row {r} failed (exit {code}); see {out / (r + '.log')}", file=sys.stderr)
            return 1
    results = [summarise(r, out / r) for r in ROWS]
    lines = [f"# bfloat16 autocast in training: accuracy and speed ({dt.date.today()})", "",
             f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'bench/bf16_accuracy.py', *(argv or sys.argv[1:])])}`",
             f"- environment: {env}",
             "- data: " + ("synthetic" if args.synthetic else f"{args.data_dir} (CIFAR-10 training JPEGs), 5,000 "
                           "validation images (data seed 0)" + (f", {args.limit:,} training images" if args.limit
                                                                   else ", 45,000 training images"))
             + "; accuracies on the VALIDATION split, certified in float32 with the sound bound",
             f"- options: {' '.join(PRESET)} --epochs {args.epochs}; the bf16 row adds --amp", "",
             "| row | epochs | clean | cert 36/255 | cert 72/255 | cert 108/255 | final train loss | train images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['epochs']} | {100 * r['clean']:.2f}% | "
                     + " | ".join(f"{100 * r[f'cert_{e}']:.2f}%" for e in EPS)
                     + f" | {r['train_loss']:.4f} | {r['images_per_s']:.0f} |")
    (out / "bf16_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
