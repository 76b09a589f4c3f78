"""Ablation of the paper's techniques at one fixed CPU wall-clock budget per variant (issue 7).

Singla & Feizi, "Improved techniques for deterministic l2 robustness" (NeurIPS 2022) propose
(a) the MLP head with the curvature certificate (CRC-Lip), (b) the fast SOC backward and (c) Lip
pooling; the ICLR 2022 paper adds LLN and the Householder activation HH1. This script trains one
small LipConvnet per variant, side by side in ONE run, each for the same ``--minutes`` of wall
clock, then certifies the same seeded validation split (never the test set) and writes a table:

    variant, head, pooling, activation, backward, epochs done, seconds per epoch,
    validation clean accuracy, certified accuracy at 36/255, 72/255, 108/255

to ``bench/results/ablation.{md,csv}`` with the exact command, the environment and the date.

Example (the tiny smoke run; a meaningful run needs a long budget, ideally on a GPU):

    .venv/bin/python bench/ablation.py --minutes 0.1 --val-limit 64 --train-limit 2000

Cost: the tight curvature certificate is the expensive part on a CPU (about 0.5 s per image at
width 8, hidden 1024 on 2 shared cores); use ``--mlp-certificate quick`` or ``--val-limit`` there,
or run on a GPU (``--device cuda``).

Variants (base = LLN head, max pooling, MaxMin, fast backward):
    lln (base), ortho, mlp (CRC-Lip, tight certificate), lip-pool, hh1, exact-backward.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _env import cpu_name  # noqa: E402

from certify.certificates import Certifier, certified_mask  # noqa: E402
from certify.models import create_model  # noqa: E402

EPS = (("36/255", 36 / 255), ("72/255", 72 / 255), ("108/255", 108 / 255))
VARIANTS = {
    # name: (head, pooling, activation, backward)
    "lln": ("lln", "max", "maxmin", "fast"),
    "ortho": ("ortho", "max", "maxmin", "fast"),
    "mlp": ("mlp", "max", "maxmin", "fast"),
    "lip-pool": ("lln", "lip", "maxmin", "fast"),
    "hh1": ("lln", "max", "hh1", "fast"),
    "exact-backward": ("lln", "max", "maxmin", "exact"),
}


def load_images(args):
    """(train images, train labels, val images, val labels, mean, std) as uint8 tensors, with a
    fixed seeded validation split of ``--val-split`` images of the training folder."""
    from certify.data import load_dataset, split_indices

    pool = load_dataset("imagefolder", "all", data_dir=args.data_dir, input_shape=(3, 32, 32),
                        workers=args.workers)
    train_idx, val_idx = split_indices(len(pool), args.val_split, args.seed)
    if args.train_limit:
        train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed))
                              [: args.train_limit]]
    if args.val_limit:  # a seeded random subset: the pool is ordered by class
        val_idx = val_idx[torch.randperm(len(val_idx), generator=torch.Generator().manual_seed(args.seed + 1))
                          [: args.val_limit]].sort().values
    xi, yi = pool.batch(train_idx)
    xv, yv = pool.batch(val_idx)
    return xi, yi, xv, yv, pool.mean, pool.std, pool.num_classes


def lr_at(args, frac: float) -> float:
    """The reference's step schedule (x0.1 at 50% and 75%), on the fraction of the time budget."""
    return args.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))


def train_variant(name, args, data, device):
    from certify.data import augment_batch, to_float

    head, pooling, act, backward = VARIANTS[name]
    xi, yi, xv, yv, mean, std, classes = data
    torch.manual_seed(args.seed)
    kwargs = dict(width=args.width, head=head, pooling=pooling, activation=act, backward=backward,
                  num_classes=classes, mean=mean, std=std)
    if head == "mlp":
        kwargs.update(mlp_hidden=args.mlp_hidden, mlp_beta=args.mlp_beta)
    model = create_model(f"lipconvnet{args.depth}", **kwargs).to(device)
    # The reference: weight decay on the SOC filters only (never on the heads).
    from certify.layers.soc import SOC

    soc_w = {id(m.weight) for m in model.modules() if isinstance(m, SOC)}
    decay = [p for p in model.parameters() if id(p) in soc_w]
    rest = [p for p in model.parameters() if id(p) not in soc_w]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=args.lr, momentum=0.9)
    reg = getattr(model.head, "regularizer", None)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    n, steps, seen = len(yi), 0, 0
    model.train()
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget and steps > 0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(args, min(elapsed / budget, 1.0))
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        xb = to_float(augment_batch(xi[idx], gen)).to(device)
        yb = yi[idx].to(device)
        loss = F.cross_entropy(model(xb), yb)
        if reg is not None:
            loss = loss + reg()  # the paper's curvature regulariser (MLP head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if head == "mlp" and args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        steps += 1
        seen += len(yb)
        if not math.isfinite(float(loss)):
            break
    train_s = time.perf_counter() - start
    epochs = seen / n

    model.eval()
    t0 = time.perf_counter()
    cert = Certifier(model)
    if head == "mlp" and args.mlp_certificate == "quick":
        cert.curvature = model.head.curvature_certifier(cert.feature_lipschitz, mode="quick")
    radii, correct = [], []
    for s in range(0, len(yv), args.eval_batch):
        xb = to_float(xv[s:s + args.eval_batch]).to(device)
        _, pred, _, radius = cert(xb)
        radii.append(radius.cpu())
        correct.append(pred.cpu() == yv[s:s + args.eval_batch])
    radius, correct = torch.cat(radii), torch.cat(correct)
    cert_s = time.perf_counter() - t0
    row = {
        "variant": name, "head": head, "pooling": pooling, "activation": act, "backward": backward,
        "steps": steps, "epochs": round(epochs, 3), "s_per_epoch": round(train_s / max(epochs, 1e-12), 2),
        "final_loss": round(float(loss), 4), "clean": round(float(correct.float().mean()), 4),
    }
    for label, eps in EPS:
        row[f"cert_{label}"] = round(float(certified_mask(radius, correct, eps).float().mean()), 4)
    row["certificate"] = cert.method + (f"/{args.mlp_certificate}" if head == "mlp" else "")
    row["certify_s"] = round(cert_s, 2)
    return row


def _run_one(name, args, data):
    row = train_variant(name, args, data, torch.device(args.device))
    print(row, file=sys.stderr, flush=True)
    return row


def _worker(core, names, args, data, queue):
    # One dedicated core and one torch thread per worker, so that every variant gets the same
    # compute for its wall-clock budget whichever worker runs it.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    for name in names:
        queue.put(_run_one(name, args, data))


def run_parallel(names, args, data):
    """Run the variants in ``args.jobs`` forked workers, each pinned to its own core; rows come back
    in the order of ``names``."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the decoded images are shared with the workers, not copied
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    jobs = min(args.jobs, len(names), len(cores))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cores[j], names[j::jobs], args, data, queue)) for j in range(jobs)]
    for proc in procs:
        proc.start()
    rows = [queue.get() for _ in names]
    for proc in procs:
        proc.join()
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: order[r["variant"]])


def environment() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def write(rows, args, out_dir: Path, env: str, command: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / args.name
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["variant", "head", "pooling", "activation", "backward", "epochs", "s_per_epoch", "clean",
            *[f"cert_{label}" for label, _ in EPS], "certificate"]
    lines = [
        f"# Ablation at a fixed wall-clock budget ({args.minutes} min per variant)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- environment: {env}",
        f"- model: lipconvnet{args.depth}, width {args.width}; data: {args.data_dir} "
        f"({args.train_limit or 'all'} training images, validation split of {args.val_split} "
        f"(seed {args.seed}), {args.val_limit or args.val_split} certified); accuracies are on the VALIDATION split",
        f"- parallelism: {args.jobs} variant(s) at a time" + (", each pinned to its own core with one torch thread"
                                                             if args.jobs > 1 else ""),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/data/train")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall clock per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--mlp-hidden", type=int, default=1024)
    p.add_argument("--mlp-beta", type=float, default=1.0)
    p.add_argument("--mlp-certificate", choices=("tight", "quick"), default="tight")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping for the MLP head")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-split", type=int, default=5000)
    p.add_argument("--val-limit", type=int, default=0, help="certify only the first N validation images (0 = all)")
    p.add_argument("--train-limit", type=int, default=0, help="train on a seeded subset of N images (0 = all)")
    p.add_argument("--workers", type=int, default=2, help="JPEG decoding threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants trained at once, each on its own core with one thread (default 1)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="ablation", help="output file stem")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    env = environment()
    print(env, file=sys.stderr)
    t0 = time.perf_counter()
    data = load_images(args)
    print(f"loaded {len(data[1])} training / {len(data[3])} validation images in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.jobs > 1:
        rows = run_parallel(names, args, data)
    else:
        rows = [_run_one(name, args, data) for name in names]
    stem = write(rows, args, Path(args.out_dir), env, command)
    print(Path(stem.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()
