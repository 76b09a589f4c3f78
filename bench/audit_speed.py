"""Speed of the certificate audit (``lipcert attack --audit``): the old audit path against the new.

Both audits attack the same certified samples of the same model inside their certified radii
(APGD-CE, APGD-DLR and PGD, ``--steps`` steps, 1 restart), interleaved in ONE run, with the
median of ``--repeats`` repeats:

- ``old``: the audit as `lipcert attack --audit` ran it before issue 14: the old commit's own
  ``certify/attacks.py`` and ``certify/audit.py`` (``git show OLD_REV:...``, loaded as a package
  beside the current one, so the baseline is the old code itself, not a copy), the model on the
  Taylor path (the old default ``--eval taylor``), ``audit_certificates`` called on each batch of
  64 images (attacking that batch's certified part) with the tightness search on (it always ran).
- ``new``: today's ``audit_certificates`` as `lipcert attack --audit` runs it: the fast
  evaluation path planned as the CLI plans it (``--eval fast`` with its image count, so small
  maps run as dense operators), the certified samples of all images attacked together (the
  fewest batches of at most 64, of equal sizes), the tightness search off (``--tightness`` turns it on).

Times are CPU seconds of the benchmark process (one thread): on a shared machine the wall-clock
time also counts what other programs take from it (printed beside, in brackets).

Rows that split the gain (same samples, same repeats): ``old-fast`` (old code, fast path,
tightness on), ``old-fast-no-tightness`` (old code, fast path, tightness off: the attack part of
the old audit), ``new-tightness`` (new code with ``--tightness``). Also printed, untimed: the
audit of the same samples with radii inflated 10x (the audit must find violations).

The model is the v1 budget preset's architecture (``certify.recipes``: LipConvnet-5, width 8, LLN
head), trained ``--train-epochs`` epochs on the synthetic dataset (or ``--checkpoint``); the
samples are the first ``--samples`` images of its seeded validation split (what ``lipcert attack
--limit N`` attacks). Plans are built and the certificates computed before any timing.

    .venv/bin/python bench/audit_speed.py --samples 128 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402

from certify.audit import audit_certificates, summarize_audit  # noqa: E402
from certify.certificates import Certifier  # noqa: E402
from certify.layers import set_eval_mode  # noqa: E402
from certify.layers.soc import SOC  # noqa: E402

#: The last commit with the old audit loop (issue 5's audit; unchanged until issue 14).
OLD_REV = "cc96929fd8e0f1f3cab183ae3d6288e4c9dca451"
CLI_BATCH = 64  # `lipcert attack --batch-size` default
ROWS = ("old", "new", "old-fast", "old-fast-no-tightness", "new-tightness")


def load_old_audit(rev: str, folder: str):
    """The old commit's certify/attacks.py and certify/audit.py as the package ``_old_lipcert``
    (their only other import, certify.errors, is re-exported)."""
    pkg = Path(folder) / "_old_lipcert"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from certify.errors import *  # noqa: F401,F403\n")
    for name in ("attacks", "audit"):
        src = subprocess.run(["git", "show", f"{rev}:certify/{name}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src)
    sys.path.insert(0, folder)
    return importlib.import_module("_old_lipcert.audit")


def train_budget_model(folder: Path, epochs: int) -> Path:
    """The budget preset's architecture, trained briefly on the synthetic dataset."""
    from certify.recipes import recipe_defaults
    from certify.train import TrainConfig, train

    # the v1 preset's architecture: the one this script's committed results were measured on
    opts = {k: v for k, v in recipe_defaults("budget-v1").items() if k not in ("budget_minutes", "eval_every")}
    # 32 per batch (the demo's): enough steps in a few epochs for a model that certifies
    opts.update(batch_size=32, epochs=epochs, dataset="synthetic", synthetic_size=2500, device="cpu", seed=0,
                output=str(folder))
    train(TrainConfig(**opts), progress=False)
    return folder / "best.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a budget-architecture checkpoint (default: train one)")
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--train-dir", default=None, help="where to train (default: a temporary folder)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="steps per attack (the CLI default is 50)")
    ap.add_argument("--search-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="free text printed with the environment")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    from certify.loading import load
    from certify.data import dataset_for_checkpoint, to_float

    tmp = tempfile.mkdtemp(prefix="audit_speed_")
    old_audit = load_old_audit(args.old_rev, tmp)
    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint) if args.checkpoint else train_budget_model(
        Path(args.train_dir or Path(tmp) / "run"), args.train_epochs)
    train_s = time.perf_counter() - t0 if not args.checkpoint else None

    base = load(ckpt)
    ds = dataset_for_checkpoint(base, "val", limit=args.samples)
    x, y = to_float(ds.images), ds.labels
    taylor = copy.deepcopy(base)
    set_eval_mode(taylor, "taylor")
    fast = copy.deepcopy(base)
    # the CLI's plan: images x steps x restarts x 3 attacks x 3 passes per step
    set_eval_mode(fast, "fast", images=len(ds) * args.steps * 1 * 3 * 3, dense_max=8192)
    certs = {}
    for name, m in (("taylor", taylor), ("fast", fast)):
        cert = Certifier(m)
        _, pred, _, radius = cert(x)
        certs[name] = (pred, radius, cert)
        with torch.no_grad():  # the certifier's float64 re-check used the plans' cache: refill it
            m.eval()(x[:2])
    plans = ", ".join(f"{n.split('.')[-1]}:{m._plan.kind}" for n, m in fast.named_modules() if isinstance(m, SOC))

    def old_run(model, r, tightness):
        gen = torch.Generator().manual_seed(0)
        out = []
        for s in range(0, len(y), CLI_BATCH):  # old attack_dataset: one audit per batch of 64
            out.append(old_audit.audit_certificates(model, x[s:s + CLI_BATCH], y[s:s + CLI_BATCH],
                                                    r[s:s + CLI_BATCH], steps=args.steps,
                                                    tightness=tightness, search_steps=args.search_steps,
                                                    generator=gen))
        return out

    def new_run(model, r, tightness):
        gen = torch.Generator().manual_seed(0)
        return [audit_certificates(model, x, y, r, steps=args.steps, tightness=tightness,
                                   search_steps=args.search_steps, batch_size=CLI_BATCH, generator=gen)]

    r_taylor, r_fast = certs["taylor"][1], certs["fast"][1]
    runs = {
        "old": lambda: old_run(taylor, r_taylor, True),
        "new": lambda: new_run(fast, r_fast, False),
        "old-fast": lambda: old_run(fast, r_fast, True),
        "old-fast-no-tightness": lambda: old_run(fast, r_fast, False),
        "new-tightness": lambda: new_run(fast, r_fast, True),
    }
    # CPU time of this process (one thread): what the audit costs, without the time other
    # programs on a shared machine take from it; wall-clock time is printed beside it
    times: dict[str, list[float]] = {r: [] for r in rows}
    walls: dict[str, list[float]] = {r: [] for r in rows}
    summaries: dict[str, dict] = {}
    for rep in range(args.repeats):
        for r in rows:
            t, w = time.process_time(), time.perf_counter()
            batches = runs[r]()
            times[r].append(time.process_time() - t)
            walls[r].append(time.perf_counter() - w)
            summaries[r] = summarize_audit(batches)
            print(f"repeat {rep + 1}/{args.repeats} {r}: {times[r][-1]:.1f} s CPU, {walls[r][-1]:.1f} s wall",
                  file=sys.stderr, flush=True)
    inflated = {}
    for r, fn in (("new", lambda: new_run(fast, r_fast * 10, False)),
                  ("old-fast-no-tightness", lambda: old_run(fast, r_fast * 10, False))):
        inflated[r] = summarize_audit(fn())

    med = {r: statistics.median(v) for r, v in times.items()}
    med_wall = {r: statistics.median(v) for r, v in walls.items()}
    pred, radius, cert = certs["fast"]
    certified = int(((pred == y) & (radius > 0)).sum())
    print(f"# bench/audit_speed.py  {datetime.date.today().isoformat()}")
    print(f"# cpu: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; device cpu")
    if args.note:
        print(f"# note: {args.note}")
    print(f"# model: {ckpt.name if args.checkpoint else 'trained here'}: lipconvnet5 width 8, lln head (the v1 budget "
          f"preset's architecture), {sum(p.numel() for p in base.parameters()):,} params"
          + (f", {args.train_epochs} epochs on synthetic in {train_s:.0f} s" if train_s else "")
          + f"; certificate {cert.method}")
    print(f"# samples: the first {len(y)} images of the validation split; certified (correct, radius > 0): "
          f"{certified} (fast path), {int(((certs['taylor'][0] == y) & (certs['taylor'][1] > 0)).sum())} (taylor)")
    print(f"# fast path plans: {plans}")
    print(f"# attacks: apgd-ce + apgd-dlr + pgd, {args.steps} steps, 1 restart; tightness search: "
          f"{args.search_steps} bisection steps; old code: git {args.old_rev[:12]}; "
          f"median of {args.repeats} interleaved repeats; times in CPU seconds of this process (wall in brackets)")
    print(f"{'row':22s} {'median s':>9s} {'(wall)':>8s}  {'per repeat s':24s} {'audited':>7s} {'viol.':>5s} "
          f"{'f32-only':>8s}  tightness (empirical / certified) min / median")
    for r in rows:
        s = summaries[r]
        t = s.get("tightness") or {}
        tight = f"{t['min']:.3f} / {t['median']:.3f}" if t else "not measured"
        print(f"{r:22s} {med[r]:9.1f} {f'({med_wall[r]:.1f})':>8s}  {' '.join(f'{v:.1f}' for v in times[r]):24s} "
              f"{s['certified_audited']:7d} {s['violations']:5d} {s['float32_only_flips']:8d}  {tight}")
    if "old" in med and "new" in med:
        print(f"speed-up old / new (what `lipcert attack --audit` does): {med['old'] / med['new']:.1f}x CPU, "
              f"{med_wall['old'] / med_wall['new']:.1f}x wall  (per repeat, CPU: "
              + " ".join(f"{a / b:.1f}" for a, b in zip(times["old"], times["new"])) + ")")
    if "old-fast-no-tightness" in med and "new" in med:
        print(f"speed-up old-fast-no-tightness / new (same path, no tightness: batching alone): "
              f"{med['old-fast-no-tightness'] / med['new']:.2f}x")
    if "old-fast" in med and "new-tightness" in med:
        print(f"speed-up old-fast / new-tightness (same path, tightness on): "
              f"{med['old-fast'] / med['new-tightness']:.2f}x")
    if "old" in med and "old-fast" in med:
        print(f"speed-up old / old-fast (the evaluation path alone): {med['old'] / med['old-fast']:.2f}x")
    for r, s in inflated.items():
        print(f"radii inflated 10x, {r}: {s['violations']} violations in {s['certified_audited']} audited")


if __name__ == "__main__":
    main()
