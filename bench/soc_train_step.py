"""Training-step time of LipConvnets with the exact SOC backward vs the paper's fast backward.

The fast backward (Singla & Feizi, NeurIPS 2022, technique b) saves one tensor per SOC layer
instead of K-1 and computes the filter gradient with one weight-gradient convolution instead of
one per Taylor term (11 instead of 15 convolutions per layer for K = 6). The paper reports more
than 30% less time per epoch for deeper networks on a GPU. This script measures one training
step (forward, cross-entropy, backward, SGD step) on random data, both modes on the same weights
and inputs, interleaved repeat by repeat (the order alternates) so that load from other
processes hits both alike, and reports medians and their ratio.

    python bench/soc_train_step.py                    # LipConvnet-5 and -10, width 32, batch 128
    python bench/soc_train_step.py --quick            # a smoke run in seconds
    python bench/soc_train_step.py --depths 5 10 20 --repeats 7 --no-memory

Peak memory per mode is measured in a fresh subprocess per (depth, mode) that runs two steps
and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (Linux: KiB), so each figure includes
the interpreter, torch and the model; the difference between modes is the activation memory.
"""

from __future__ import annotations

from pathlib import Path

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402
import torch.nn.functional as F

from certify.models import create_model
from certify.layers.soc import SOC

MODES = ("exact", "fast")


def build(depth: int, width: int, seed: int = 0):
    """Two models with identical weights that differ only in the SOC backward mode."""
    torch.manual_seed(seed)
    base = create_model(f"lipconvnet{depth}", width=width, backward="exact")
    models = {}
    for mode in MODES:
        m = copy.deepcopy(base)
        for layer in m.modules():
            if isinstance(layer, SOC):
                layer.backward_mode = mode
        models[mode] = m.train()
    return models


def step(model, opt, x, y) -> float:
    """One training step; returns its wall-clock time in seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def time_depth(depth: int, args) -> dict:
    models = build(depth, args.width)
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-3, momentum=0.9) for m in MODES}
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    times = {m: [] for m in MODES}
    for m in MODES:  # warm-up: allocator, thread pool, first-call overheads
        for _ in range(args.warmup):
            step(models[m], opts[m], x, y)
    for r in range(args.repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for m in order:
            times[m].append(step(models[m], opts[m], x, y))
    return times


def child_peak_rss(depth: int, mode: str, args) -> float | None:
    """Peak RSS (MiB) of a fresh process that builds the model and runs two training steps."""
    cmd = [sys.executable, __file__, "--_child", mode, "--depths", str(depth), "--width", str(args.width),
           "--batch-size", str(args.batch_size)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mib"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
        print(f"  (memory measurement failed for depth {depth} {mode}: {e})", file=sys.stderr)
        return None


def run_child(mode: str, args) -> None:
    depth = args.depths[0]
    torch.manual_seed(0)
    model = create_model(f"lipconvnet{depth}", width=args.width, backward=mode).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    for _ in range(2):
        step(model, opt, x, y)
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))




def header(args) -> list[str]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return [
        "# bench/soc_train_step.py: SOC training step, exact vs fast backward (CPU)",
        f"# date        {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"# cpu         {cpu_name()} ({os.cpu_count()} logical cores visible)",
        f"# torch       {torch.__version__}, intra-op threads {torch.get_num_threads()}, python {platform.python_version()}",
        f"# settings    width {args.width}, batch {args.batch_size}, repeats {args.repeats} (+{args.warmup} warm-up), "
        f"depths {' '.join(map(str, args.depths))}, random data, SGD momentum 0.9, train_terms 6",
        f"# load        {' '.join(f'{v:.1f}' for v in load)} (1/5/15 min) at start; this machine is shared with "
        "other engineers' jobs, so absolute times are noisy; the modes run interleaved on the same "
        "weights and inputs, so their ratio is the figure to read",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[5, 10])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="width 8, batch 16, 3 repeats, no memory")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode peak-RSS subprocesses")
    p.add_argument("--_child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        run_child(args._child, args)
        return
    if args.quick:
        args.width, args.batch_size, args.repeats, args.no_memory = 8, 16, 3, True
    for line in header(args):
        print(line, flush=True)
    print(f"{'model':<14}{'exact s/step':>14}{'fast s/step':>13}{'fast/exact':>12}{'time saved':>12}"
          f"{'exact MiB':>11}{'fast MiB':>10}   per-repeat exact | fast")
    for depth in args.depths:
        times = time_depth(depth, args)
        med = {m: statistics.median(times[m]) for m in MODES}
        ratio = med["fast"] / med["exact"]
        mem = {m: None for m in MODES}
        if not args.no_memory:
            mem = {m: child_peak_rss(depth, m, args) for m in MODES}
        fmt_mem = {m: "-" if mem[m] is None else f"{mem[m]:.0f}" for m in MODES}
        reps = " ".join(f"{t:.2f}" for t in times["exact"]) + " | " + " ".join(f"{t:.2f}" for t in times["fast"])
        print(f"{'lipconvnet' + str(depth):<14}{med['exact']:>14.3f}{med['fast']:>13.3f}{ratio:>12.3f}"
              f"{(1 - ratio) * 100:>11.1f}%{fmt_mem['exact']:>11}{fmt_mem['fast']:>10}   {reps}", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"# load at end {' '.join(f'{v:.1f}' for v in load)}; the paper's claim (GPU): >30% less time "
          "per epoch for deeper networks")


if __name__ == "__main__":
    main()
