"""lipcert vs a faithful SOC baseline, side by side in one run (issue 8).

Prints, with the environment:
  1. certification throughput (images/s): lipcert's Certifier on the fast evaluation path (cached
     plans, Chebyshev degree from the sound bound, 1x1 layers as one matrix, small-map layers as one
     dense matrix where that pays off over a run of 10,000 or 50,000 images; bound and plans built
     once, reported separately and in an end-to-end ratio) vs the baseline's 15-term Taylor
     evaluation forward, LipConvnet-5/-10;
  2. training step time (forward + backward + SGD step): lipcert's training path vs the baseline
     with the paper's fast backward, LipConvnet-5/-10;
  3. peak memory (max RSS growth of one training step, each in a fresh subprocess);
  4. a profile: FLOPs per image or step (torch's FLOP counter) and the GFLOP/s each side reaches,
     and where one lipcert training step spends its time (torch.profiler);
  5. how lipcert's step time grows with depth and batch size, and its certification throughput
     with the batch size.
Timings are interleaved (baseline, lipcert, baseline, ...) and the median of --repeats is used.

    python bench/perf_vs_baseline.py                 # full run (tens of minutes on 2 cores)
    python bench/perf_vs_baseline.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402
from baseline_soc import BaselineLipConvNet  # noqa: E402

from certify.certificates import Certifier  # noqa: E402
from certify.models import create_model  # noqa: E402
from certify.layers import set_eval_mode  # noqa: E402
from certify.layers.soc import SOC  # noqa: E402


def environment() -> str:
    cpu = cpu_name()
    return (f"date {datetime.date.today()}, CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, python {platform.python_version()}")


def pair_models(depth: int, width: int, train: bool, **options):
    """The baseline and lipcert's model with identical weights (lipcert's layout is the same);
    ``options`` go to lipcert's model (e.g. ``train_terms="auto"``)."""
    torch.manual_seed(0)
    base = BaselineLipConvNet(depth=depth, width=width)
    ours = create_model(f"lipconvnet{depth}", width=width, eval_mode="fast", **options)
    src = [m for m in base.modules() if type(m).__name__ == "BaselineSOC"]
    dst = [m for m in ours.modules() if type(m).__name__ == "SOC"]
    assert len(src) == len(dst)
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)
            for n in ("u1", "v1", "u2", "v2", "u3", "v3", "u4", "v4"):
                getattr(d, n).copy_(getattr(s, n))
    return base.train(train), ours.train(train)


def gflops(fn) -> float:
    """GFLOP of one call of ``fn`` (forward and backward ops alike), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_certify(depth, width, batch, repeats, runs=(10_000, 50_000)):
    """Baseline vs lipcert's fast path planned for certification runs of each size in ``runs``
    (the size decides which small-map layers become dense matrices: their build must pay off)."""
    base, ours = pair_models(depth, width, train=False)
    x = torch.rand(batch, 3, 32, 32)
    variants = []
    for images in runs:
        model = copy.deepcopy(ours)
        set_eval_mode(model, "fast", images=images)
        t0 = time.perf_counter()
        cert = Certifier(model)  # the sound bound (and the eval plans, dense ones included), once
        setup = time.perf_counter() - t0
        dense = sum(1 for m in model.modules() if isinstance(m, SOC) and m._plan.kind == "dense")
        variants.append({"images": images, "cert": cert, "model": model, "setup": setup, "dense": dense})
    with torch.no_grad():
        ref = base(x)
        base_gf = gflops(lambda: base(x))
        for v in variants:
            v["diff"] = float((ref - v["model"](x)).abs().max())
            v["gf"] = gflops(lambda: v["model"](x))
        tb, tv = [], [[] for _ in variants]
        for _ in range(repeats):
            tb.append(timed(lambda: base(x)))
            for v, t in zip(variants, tv):
                t.append(timed(lambda: v["cert"](x)))
    b = statistics.median(tb)
    rows = []
    for v, t in zip(variants, tv):
        o = statistics.median(t)
        # end to end for a run of that size: the one-time setup plus the images at the measured rate
        e2e_base, e2e_ours = v["images"] * b / batch, v["setup"] + v["images"] * o / batch
        rows.append({"depth": depth, "images": v["images"], "baseline_img_s": batch / b,
                     "lipcert_img_s": batch / o, "speedup": b / o, "setup_s": v["setup"], "dense": v["dense"],
                     "end_to_end": e2e_base / e2e_ours, "max_logit_diff": v["diff"], "L": v["cert"].lipschitz,
                     "baseline_gflop_img": base_gf / batch, "lipcert_gflop_img": v["gf"] / batch,
                     "baseline_gflop_s": base_gf / b, "lipcert_gflop_s": v["gf"] / o})
    return rows


def train_step(model, opt, x, y, amp: bool = False):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # `lipcert train --amp` on a CPU
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    opt.step()


def bench_train(depth, width, batch, repeats):
    """Interleaved step times of the baseline, lipcert (6 Taylor terms, as the paper) and lipcert
    with ``train_terms="auto"`` (issue 17: per layer, the fewest Chebyshev terms within train_tol
    of exp(A) for the sound norm bound). The auto row's one-time bound refresh is timed apart and
    amortised over :data:`TRAIN_BOUND_EVERY` steps in ``auto_s``."""
    from certify.layers import soc as soc_mod

    base, ours = pair_models(depth, width, train=True)
    _, auto = pair_models(depth, width, train=True, train_terms="auto")
    _, amp = pair_models(depth, width, train=True, train_terms="auto")
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    ob = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9)
    oo = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    oa = torch.optim.SGD(auto.parameters(), lr=0.01, momentum=0.9)
    om = torch.optim.SGD(amp.parameters(), lr=0.01, momentum=0.9)
    train_step(base, ob, x, y), train_step(ours, oo, x, y)  # warm-up
    first = timed(lambda: train_step(auto, oa, x, y))  # refreshes every layer's bound
    train_step(amp, om, x, y, amp=True)
    tb, to, ta, tm = [], [], [], []
    for _ in range(repeats):
        tb.append(timed(lambda: train_step(base, ob, x, y)))
        to.append(timed(lambda: train_step(ours, oo, x, y)))
        ta.append(timed(lambda: train_step(auto, oa, x, y)))
        tm.append(timed(lambda: train_step(amp, om, x, y, amp=True)))
    b, o, a, m = statistics.median(tb), statistics.median(to), statistics.median(ta), statistics.median(tm)
    refresh = max(first - a, 0.0)
    a_amortised = a + refresh / soc_mod.TRAIN_BOUND_EVERY
    m_amortised = m + refresh / soc_mod.TRAIN_BOUND_EVERY
    terms = [m.terms for m in auto.modules() if isinstance(m, SOC)]
    gb, go = gflops(lambda: train_step(base, ob, x, y)), gflops(lambda: train_step(ours, oo, x, y))
    return {"depth": depth, "batch": batch, "baseline_s": b, "lipcert_s": o, "speedup": b / o,
            "auto_s": a_amortised, "auto_speedup": b / a_amortised, "auto_refresh_s": refresh, "auto_terms": terms,
            "auto_amp_s": m_amortised, "auto_amp_speedup": b / m_amortised,
            "baseline_gflop": gb, "lipcert_gflop": go, "baseline_gflop_s": gb / b, "lipcert_gflop_s": go / o}


def _rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(kind: str, depth: int, width: int, batch: int) -> None:
    """Peak RSS growth of two training steps of one model, in a fresh process: the high-water mark
    is reset (Linux clear_refs) after the model is built, so construction does not count."""
    torch.manual_seed(0)
    if kind == "baseline":
        model = BaselineLipConvNet(depth=depth, width=width).train()
    else:
        model = create_model(f"lipconvnet{depth}", width=width).train()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mib("VmRSS")
    for _ in range(2):
        train_step(model, opt, x, y)
    print(json.dumps({"peak_step_mib": _rss_mib("VmHWM") - before}))


def bench_memory(depth, width, batch):
    out = {}
    for kind in ("baseline", "lipcert"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(depth), str(width), str(batch)],
                             capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])["peak_step_mib"]
    return {"depth": depth, "batch": batch, **{f"{k}_mib": v for k, v in out.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 8, small batches, 3 repeats")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-depths", default="5,10", help="LipConvnet depths of the train section")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--sections", default="certify,train,memory,batch,profile,scaling",
                   help="comma-separated subset of certify,train,memory,batch,profile,scaling")
    args = p.parse_args()
    if args.memory_child:
        kind, d, w, b = args.memory_child
        memory_child(kind, int(d), int(w), int(b))
        return
    width = 8 if args.quick else 32
    repeats = 3 if args.quick else max(5, args.repeats)
    cbatch, tbatch = (32, 16) if args.quick else (256, 128)
    print(f"# lipcert vs faithful SOC baseline ({'quick' if args.quick else 'full'} run, width {width})")
    print(f"# {environment()}")
    print(f"# median of {repeats} interleaved repeats\n")

    sections = set(args.sections.split(","))
    if "certify" in sections:
        certify_section(width, cbatch, repeats)
    if "train" in sections:
        train_section(width, tbatch, repeats, tuple(int(d) for d in args.train_depths.split(",")))
    if "memory" in sections:
        memory_section(width, tbatch)
    if "batch" in sections:
        batch_section(width, repeats, args.quick)
    if "profile" in sections:
        profile_section(width, tbatch)
    if "scaling" in sections:
        scaling_section(width, repeats, args.quick)


def certify_section(width, cbatch, repeats):
    print("## Certification throughput (eval forward + radii), batch", cbatch)
    print("lipcert's fast path is planned for a certification run of N images: SOC layers on small maps")
    print("become one dense matrix where its one-time build (float64, then its exact norm) pays off over N.")
    print("Throughput excludes the setup; 'end to end' is the time for the N images including it.\n")
    rows = []
    print("| model | run of N images | dense layers | baseline img/s | lipcert img/s | speedup | "
          "lipcert one-time setup s | end to end | max logit diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth in (5, 10):
        for r in bench_certify(depth, width, cbatch, repeats):
            rows.append(r)
            print(f"| LipConvnet-{depth} | {r['images']:,} | {r['dense']} | {r['baseline_img_s']:.1f} | "
                  f"{r['lipcert_img_s']:.1f} | {r['speedup']:.2f}x | {r['setup_s']:.1f} | {r['end_to_end']:.2f}x | "
                  f"{r['max_logit_diff']:.1e} |", flush=True)
    print("\nWhat bounds it: floating-point work per image (torch's FLOP counter) and the rate achieved.")
    print("If both ran at the same GFLOP/s, the speedup would be the FLOP ratio.\n")
    print("| model | run of N images | baseline GFLOP/img | lipcert GFLOP/img | FLOP ratio | baseline GFLOP/s | "
          "lipcert GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| LipConvnet-{r['depth']} | {r['images']:,} | {r['baseline_gflop_img']:.2f} | "
              f"{r['lipcert_gflop_img']:.2f} | {r['baseline_gflop_img'] / r['lipcert_gflop_img']:.2f}x | "
              f"{r['baseline_gflop_s']:.0f} | {r['lipcert_gflop_s']:.0f} |")


def train_section(width, tbatch, repeats, depths=(5, 10)):
    print("\n## Training step (forward + backward + SGD), batch", tbatch)
    print("| model | baseline (fast backward) s | lipcert s | speedup | baseline GFLOP | lipcert GFLOP | "
          "baseline GFLOP/s | lipcert GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for depth in depths:
        r = bench_train(depth, width, tbatch, repeats)
        rows.append(r)
        print(f"| LipConvnet-{depth} | {r['baseline_s']:.2f} | {r['lipcert_s']:.2f} | {r['speedup']:.2f}x | "
              f"{r['baseline_gflop']:.0f} | {r['lipcert_gflop']:.0f} | {r['baseline_gflop_s']:.0f} | "
              f"{r['lipcert_gflop_s']:.0f} |", flush=True)
    print("\n`--train-terms auto` (per layer, the fewest Chebyshev terms within train_tol 0.02 of exp(A) for the")
    print("sound norm bound; its bound refresh amortised over its refresh interval), same weights, interleaved:\n")
    print("The last two columns add bfloat16 autocast (`--amp`) to auto: it needs bf16 units (AMX/AVX512-BF16")
    print(f"here: {_bf16_units()}) to pay off on a CPU.\n")
    print("| model | baseline s | lipcert 6 terms s | lipcert auto s | auto vs baseline | auto vs 6 terms | "
          "refresh s (once per interval) | terms per SOC layer | auto + amp s | auto + amp vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| LipConvnet-{r['depth']} | {r['baseline_s']:.2f} | {r['lipcert_s']:.2f} | {r['auto_s']:.2f} | "
              f"{r['auto_speedup']:.2f}x | {r['lipcert_s'] / r['auto_s']:.2f}x | {r['auto_refresh_s']:.1f} | "
              f"{' '.join(map(str, r['auto_terms']))} | {r['auto_amp_s']:.2f} | {r['auto_amp_speedup']:.2f}x |",
              flush=True)


def _bf16_units() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) if found else "none"


def memory_section(width, tbatch):
    print("\n## Peak memory growth of two training steps (fresh process each), batch", tbatch)
    print("| model | baseline MiB | lipcert MiB |")
    print("|---|---|---|")
    for depth in (5, 10):
        r = bench_memory(depth, width, tbatch)
        print(f"| LipConvnet-{depth} | {r['baseline_mib']:.0f} | {r['lipcert_mib']:.0f} |", flush=True)


def batch_section(width, repeats, quick):
    """Certification throughput of the fast path against the batch size (the CLI's default is 256)."""
    print("\n## lipcert certification throughput vs batch size (LipConvnet-5, fast path planned for 10,000 images)")
    _, ours = pair_models(5, width, train=False)
    set_eval_mode(ours, "fast", images=10_000)
    cert = Certifier(ours)
    print("| batch | img/s |")
    print("|---|---|")
    with torch.no_grad():
        for batch in ((8, 32) if quick else (32, 64, 128, 256, 512)):
            x = torch.rand(batch, 3, 32, 32)
            cert(x)
            t = statistics.median(timed(lambda: cert(x)) for _ in range(max(3, repeats // 2)))
            print(f"| {batch} | {batch / t:.1f} |", flush=True)


def profile_section(width, tbatch):
    """Where one lipcert training step spends its time (torch.profiler, self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile

    print("\n## Profile of one lipcert training step (LipConvnet-5), batch", tbatch)
    _, ours = pair_models(5, width, train=True)
    x, y = torch.rand(tbatch, 3, 32, 32), torch.randint(0, 10, (tbatch,))
    opt = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    train_step(ours, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(ours, opt, x, y)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    print(f"convolutions: {100 * conv / total:.0f}% of the step's self CPU time\n")
    print("| op | self CPU s | share |")
    print("|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.1f}% |")


def scaling_section(width, repeats, quick):
    print("\n## lipcert training step time vs depth and batch size")
    print("| depth | batch | s/step | ms/image |")
    print("|---|---|---|---|")
    grid = [(5, 32), (5, 128), (10, 128), (20, 128), (5, 512)] if not quick else [(5, 8), (10, 8)]
    for depth, batch in grid:
        _, ours = pair_models(depth, width, train=True)
        x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        opt = torch.optim.SGD(ours.parameters(), lr=0.01)
        train_step(ours, opt, x, y)
        t = statistics.median(timed(lambda: train_step(ours, opt, x, y)) for _ in range(max(3, repeats // 2)))
        print(f"| {depth} | {batch} | {t:.2f} | {1000 * t / batch:.1f} |", flush=True)


if __name__ == "__main__":
    main()
