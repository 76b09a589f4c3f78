"""Throughput of certification against a bare evaluation forward pass of the same model.

Issue 4 asks that certifying cost about one evaluation forward pass per image plus the Lipschitz
bound, computed once per model. This script measures, in ONE run and on the same images:

- ``forward``: a bare evaluation loop (``torch.no_grad``, ``model(x)`` over a DataLoader);
- ``certify``: :func:`certify.certificates.certify_dataset` over the same images with a Certifier
  built once (margins, radii, checks, per-sample table), i.e. the per-image cost;
- ``bound``: the Lipschitz upper bound, computed once per model (reported separately and folded
  into an "including the bound once" figure for this run's number of images).

The two loops are interleaved (alternating which goes first) and repeated; medians are printed
with the environment. Timings on a shared machine are noisy: read the ratio, not the absolute
numbers.

    .venv/bin/python bench/certify_throughput.py            # LipConvnet-5, width 32, batch 256
    .venv/bin/python bench/certify_throughput.py --width 4 --repeats 5 --batches 2
"""

from __future__ import annotations

from pathlib import Path

import sys

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402
from torch.utils.data import DataLoader




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lipconvnet5")
    p.add_argument("--width", type=int, default=None, help="default: the paper's 32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=1, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (a median of fewer is not worth printing)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from certify import __version__
    from certify.certificates import Certifier, certify_dataset
    from certify.data import load_dataset
    from certify.models import create_model

    device = torch.device(args.device)
    n = args.batch_size * args.batches
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width).eval().to(device)
    ds = load_dataset("synthetic", "all", seed=0, input_shape=model.input_shape, limit=n)
    n = len(ds)

    print(f"# certify throughput ({datetime.date.today().isoformat()})")
    print(f"# lipcert {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"# CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
          f"device {device}")
    try:
        load = os.getloadavg()
        print(f"# load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              "(a shared machine: other engineers' jobs run at the same time, so absolute numbers are noisy)")
    except OSError:
        pass
    print(f"# model {args.model} width {model.width}, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{n} synthetic images per repeat, batch {args.batch_size}; {args.repeats} interleaved repeats")

    t = time.perf_counter()
    cert = Certifier(model)
    bound_s = time.perf_counter() - t
    print(f"# Lipschitz upper bound {cert.lipschitz:.6f}, computed once in {bound_s:.2f} s")

    def bare_forward() -> float:
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def certify() -> float:
        t0 = time.perf_counter()
        certify_dataset(model, ds, batch_size=args.batch_size, device=device, certifier=cert)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    bare_forward()  # warm-up (allocator, caches); not timed
    fwd, cer = [], []
    for r in range(args.repeats):
        order = (("forward", bare_forward), ("certify", certify)) if r % 2 == 0 else \
                (("certify", certify), ("forward", bare_forward))
        for name, fn in order:
            s = fn()
            (fwd if name == "forward" else cer).append(s)
        print(f"repeat {r + 1}: forward {fwd[-1]:.2f} s, certify {cer[-1]:.2f} s", flush=True)

    f_med, c_med = statistics.median(fwd), statistics.median(cer)
    print()
    print(f"{'':34s}{'seconds':>10s}{'images/s':>12s}")
    print(f"{'bare eval forward (median)':34s}{f_med:10.2f}{n / f_med:12.1f}")
    print(f"{'certify, bound reused (median)':34s}{c_med:10.2f}{n / c_med:12.1f}")
    print(f"{'certify incl. bound once':34s}{c_med + bound_s:10.2f}{n / (c_med + bound_s):12.1f}")
    print()
    print(f"certify / forward time ratio (per image): {c_med / f_med:.3f} (ratio of medians), "
          f"{statistics.median(c / f for c, f in zip(cer, fwd)):.3f} (median of per-repeat ratios)")
    print(f"bound = {bound_s / (f_med / n):.0f} forward-pass images' worth of time "
          f"({bound_s / f_med:.2f}x this run's {n}-image forward)")


if __name__ == "__main__":
    main()
