"""Cost of one attack step relative to one forward + backward pass of the model.

An attack step of :mod:`certify.attacks` (APGD or PGD) should cost about one forward plus one
input-backward of the model; the rest (projection, step-size bookkeeping, best-point tracking) is
elementwise work on the batch. This script measures, interleaved in ONE run on the same inputs:

- baseline: forward + backward of the cross-entropy to the input, parameters frozen (what any
  gradient attack needs at least), and, for context, the same with parameter gradients (a
  training step's forward + backward);
- APGD-CE and PGD with ``--steps`` steps, each timed as a whole. The total also contains one
  clean forward and one final forward, so two forwards (timed in the same repeat) are subtracted
  before dividing by the steps; the raw ratio (nothing subtracted) is printed too.

eps is 1e-6 and labels are the model's own predictions, so no sample is broken and the attacks'
early exit never shrinks the batch: every step does the full work. Prints the medians of
``--repeats`` repeats and the environment.

    .venv/bin/python bench/attack_step.py            # LipConvnet-5, width 32, batch 64, CPU
"""

from __future__ import annotations

from pathlib import Path

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402
import torch.nn.functional as F

from certify import attacks as A
from certify.models import create_model




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lipconvnet5")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--note", default="", help="free text printed with the environment")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *model.input_shape, generator=g).to(dev)
    with torch.no_grad():
        y = model(x).argmax(1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def fb_input():
        with A.attack_mode(model):
            A._forward_backward(model, x, y, A.ce_loss)

    def fwd():
        with torch.no_grad():
            model(x)

    def fb_params():
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        F.cross_entropy(model(xi), y).backward()

    def apgd():
        A.apgd_l2(model, x, y, 1e-6, steps=args.steps, seed=0)

    def pgd():
        A.pgd_l2(model, x, y, 1e-6, steps=args.steps, seed=0)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    for fn in (fb_input, fb_params):  # warm-up (allocator, cached SOC plans)
        timed(fn)
    timed(lambda: A.apgd_l2(model, x, y, 1e-6, steps=1))
    rows = {"fwd": [], "fb_input": [], "fb_params": [], "apgd": [], "pgd": [], "apgd_raw": [], "pgd_raw": []}
    for r in range(args.repeats):
        f = timed(fwd)
        rows["fwd"].append(f)
        rows["fb_input"].append(timed(fb_input))
        rows["fb_params"].append(timed(fb_params))
        for name, fn in (("apgd", apgd), ("pgd", pgd)):
            t = timed(fn)
            rows[name + "_raw"].append(t / args.steps)
            rows[name].append((t - 2 * f) / args.steps)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}

    print(f"# bench/attack_step.py  {datetime.date.today().isoformat()}")
    print(f"# cpu: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    if args.note:
        print(f"# note: {args.note}")
    print(f"# model {args.model} width {args.width} ({sum(p.numel() for p in model.parameters()):,} params), "
          f"batch {args.batch}, {args.steps} steps per attack, median of {args.repeats} interleaved repeats")
    print(f"forward only (no grad)                   : {med['fwd'] * 1e3:9.1f} ms")
    print(f"forward+backward to the input (baseline): {med['fb_input'] * 1e3:9.1f} ms")
    print(f"forward+backward with param grads        : {med['fb_params'] * 1e3:9.1f} ms")
    print(f"APGD-CE step                             : {med['apgd'] * 1e3:9.1f} ms   "
          f"ratio {med['apgd'] / med['fb_input']:.2f}  (per repeat: "
          + " ".join(f"{a / b:.2f}" for a, b in zip(rows['apgd'], rows['fb_input'])) + f")  raw ratio {med['apgd_raw'] / med['fb_input']:.2f}")
    print(f"PGD step                                 : {med['pgd'] * 1e3:9.1f} ms   "
          f"ratio {med['pgd'] / med['fb_input']:.2f}  (per repeat: "
          + " ".join(f"{a / b:.2f}" for a, b in zip(rows['pgd'], rows['fb_input'])) + f")  raw ratio {med['pgd_raw'] / med['fb_input']:.2f}")


if __name__ == "__main__":
    main()
