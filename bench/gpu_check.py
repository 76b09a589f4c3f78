"""GPU check: certificates computed on a CUDA device agree with the CPU's (issue 14).

For each head (default: ortho, lln and mlp, i.e. the global, pairwise and curvature certificates)
the script trains a tiny model for a few steps ON THE DEVICE with the library's
:func:`certify.train.train` (synthetic data), then certifies the same validation images on the
device and on the CPU, with both SOC evaluation paths (``taylor`` and ``fast``,
:func:`certify.layers.soc.set_eval_mode`), and prints the largest differences of logits, margins, radii
and the Lipschitz bound. It fails when a device radius exceeds the CPU radius by more than the
tolerance below, or a device bound is below the CPU bound by more than it (a smaller bound gives
larger radii), or when lipcert does not restore the user's TF32 settings. Rows:

- ``ieee``: the certificate under :func:`certify.numerics.ieee_float32` (gated);
- ``user-tf32``: the user has turned TF32 on for convolutions and matrix products; lipcert's own
  calls must turn it off (same certificate, gated) and restore the user's settings (checked with
  :func:`certify.numerics.reduced_precision_state`);
- ``tf32-conv`` / ``tf32-all``: a plain forward pass with TF32 convolutions (PyTorch's cuDNN
  default) / convolutions and matrix products, outside lipcert's protection, compared with the
  CPU's IEEE float32 logits: what a certificate would be built on if lipcert left TF32 on (with
  the radii margin / (sqrt(2) L) where the model has a global bound L). ``tf32-emulated``: the
  same on the CPU with every convolution's and matrix product's float32 operands rounded to TF32's
  10-bit mantissa (:class:`EmulatedTF32`), so the dry run shows the effect too. These rows are
  informational (never fail): they show why lipcert turns TF32 off;
- ``cpu float32 vs float64``: the CPU certificate against a float64 re-evaluation of the same
  function, the rounding the tolerance has to absorb.

``--device cpu`` is a dry run: the whole comparison runs CPU against CPU, the "device" copy with
channels-last (NHWC) convolution kernels, so that the two sides round differently as cuDNN and the
CPU do, and the script is tested without a GPU. The real TF32 rows show no effect there (TF32 is a
CUDA feature); the emulated one does. With no CUDA device, ``--device cuda`` says so and exits
with code 4.

    python bench/gpu_check.py                     # cuda, every head: meant to take < 5 minutes
                                                  # (not yet timed on a GPU; the dry run: 23 min on 1 CPU core)
    python bench/gpu_check.py --device cuda:1 --steps 50 --images 512
    python bench/gpu_check.py --device cpu --steps 2 --images 32 --heads ortho    # dry run

Exit codes: 0 all checks passed, 1 runtime error, 2 usage, 3 a check failed, 4 no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402

# ---- tolerance ------------------------------------------------------------------------------------
# A device certificate may exceed the CPU one by float32 rounding only:
#     radius_device <= radius_cpu * (1 + RADIUS_RTOL) + RADIUS_ATOL,   bound_device >= bound_cpu * (1 - RADIUS_RTOL)
# Why these numbers: cuDNN/cuBLAS and the CPU kernels sum in different orders, so the float32
# logits differ by a few float32 roundings (2^-24 = 6e-8) per layer, scaled by the size of the
# logits, and radii by about 1e-6 relative. Measured by the dry run (bench/results/
# gpu_check-cpu-dryrun.txt, NHWC against NCHW kernels, LipConvnet-5 width 8, 256 images): radii
# differ by at most 5.6e-7 between the two CPU runs and by at most 9.8e-7 from a float64
# re-evaluation ("cpu float32 vs float64", printed on every run), 14-25x below RADIUS_ATOL. The
# Certifier's soundness argument assumes float32 radius errors below 1e-4 relative to
# max(radius, eps): it re-checks radii within CONFIRM_BAND = 1e-3 of a threshold in float64 and
# evaluates a whole batch in float64 once a measured error reaches a tenth of the band. So 1e-4 is
# the largest device-vs-CPU difference under which that argument still holds on the device;
# RADIUS_ATOL = 1e-4 x 36/255 (the smallest standard eps) covers radii near 0, where a relative
# test means nothing. TF32 (10-bit mantissa) moves margins by about 1e-3: emulated, it moves radii
# by 1.0e-4 to 5.2e-4, 7-36x above RADIUS_ATOL (71 to 118 of 256 samples over the tolerance), so
# a leak of TF32 into a certificate fails this check.
RADIUS_RTOL = 1e-4
RADIUS_ATOL = 1e-4 * 36 / 255

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 2, 3, 4
HEADS = ("ortho", "lln", "mlp")
EVAL_MODES = ("taylor", "fast")
# The TF32 switches a user may turn on (PyTorch >= 2.9 per-backend API, else the legacy flags).
TF32_CONV = ("cudnn.conv",)
TF32_ALL = ("cudnn.conv", "cuda.matmul")
# The standard radii and smaller ones, which briefly trained models reach: radii near any of them
# take the Certifier's float64 re-check, on both sides.
EPS = ("1/255", "2/255", "4/255", "8/255", "16/255", "36/255", "72/255", "108/255")
ALL_SWITCHES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


class NoCudaDevice(Exception):
    pass


def resolve_device(spec: str) -> torch.device:
    """``cpu`` (the dry run), ``cuda`` or ``cuda:N``; NoCudaDevice when that GPU does not exist."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; use cuda, cuda:N or cpu") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {spec!r}; use cuda, cuda:N or cpu")
    if not torch.cuda.is_available():
        raise NoCudaDevice(f"no CUDA device: torch {torch.__version__} sees no GPU "
                           f"(built for CUDA {torch.version.cuda}); run with --device cpu for the dry run")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise NoCudaDevice(f"no CUDA device {spec}: {torch.cuda.device_count()} GPU(s) found")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


# ---- TF32 switches -------------------------------------------------------------------------------

@contextlib.contextmanager
def tf32_on(paths: tuple[str, ...]):
    """What a user does to speed up training: TF32 for ``paths`` (and matrix products at precision
    "high" when ``cuda.matmul`` is among them); restores every switch afterwards (setting the
    matmul precision also rewrites the per-backend matmul switches, so all of them are saved)."""
    saved_precision = torch.get_float32_matmul_precision()
    from certify.numerics import precision_switch

    leaves = {p: precision_switch(p) for p in ALL_SWITCHES}
    leaves = {p: leaf for p, leaf in leaves.items() if leaf is not None}
    new_api = all(p in leaves for p in paths)
    saved = ({p: leaf.fp32_precision for p, leaf in leaves.items()} if new_api
             else (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    try:
        if "cuda.matmul" in paths:
            torch.set_float32_matmul_precision("high")
        if new_api:
            for p in paths:
                leaves[p].fp32_precision = "tf32"
        else:
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = "cuda.matmul" in paths
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        if new_api:
            for p, leaf in leaves.items():
                leaf.fp32_precision = saved[p]
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class EmulatedTF32(torch.overrides.TorchFunctionMode):
    """TF32 emulated on any device: the float32 operands of convolutions and matrix products are
    rounded to a 10-bit mantissa (round to nearest), as tensor cores read them; the products are
    then summed in float32. Shows the effect of TF32 where there is none (the CPU dry run)."""

    OPS = {F.conv2d, torch.conv2d, F.linear, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul,
           torch.mm, torch.bmm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            args = tuple(_round_tf32(a) for a in args)
            kwargs = {k: _round_tf32(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _round_tf32(t):
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(t)


# ---- training and certification ------------------------------------------------------------------

def train_tiny(args, head: str, device: torch.device, folder: Path):
    """A few training steps on ``device`` with the library's training loop; returns the model
    (eval mode, on ``device``) and its validation images (float in [0, 1]) and labels."""
    from certify.data import to_float
    from certify.train import TrainConfig, load_data, train

    batch = args.batch_size
    # the pool holds the training images and a validation split (10%) of at least --images
    size = max(4000, 10 * args.images, math.ceil(args.steps * batch / 0.9) + 10)
    cfg = TrainConfig(model=args.model, width=args.width, head=head, dataset="synthetic", synthetic_size=size,
                      limit=args.steps * batch, val_limit=args.images, epochs=1, batch_size=batch,
                      device=str(device), seed=0, output=str(folder / head), power_iters=10)
    result = train(cfg, verbose=False, progress=False)
    _, val = load_data(cfg)
    x, y = val.batch(torch.arange(len(val)))
    return result.model, to_float(x), y


def certify_images(model, x, y, device, batch_size: int) -> dict:
    """The certificate of every image, as users get it (a :class:`Certifier` and
    :func:`certify_dataset`), and the logits of the model's forward pass under IEEE float32 (a
    second certifier call would double the cost of the curvature certificate); all on the CPU."""
    from torch.utils.data import TensorDataset

    from certify.certificates import Certifier, certify_dataset
    from certify.numerics import ieee_float32

    cert = Certifier(model)
    res = certify_dataset(model, TensorDataset(x, y), eps=EPS, device=device, certifier=cert,
                          batch_size=batch_size)
    with ieee_float32():
        logits = plain_forward(model, x, batch_size, device)
    s = res.samples
    c = res.summary["certificate"]
    col = {k: torch.tensor(s[k].to_numpy().copy()) for k in ("prediction", "margin", "radius", "correct")}
    return dict(logits=logits, pred=col["prediction"], margin=col["margin"], radius=col["radius"],
                correct=col["correct"], method=cert.name,
                bound=c["lipschitz_upper_bound"] if c["lipschitz_upper_bound"] is not None
                else c["feature_lipschitz_upper_bound"],
                bound_kind="L" if c["lipschitz_upper_bound"] is not None else "L_features",
                certified={k: int(v) for k, v in res.summary["counts"]["certified"].items()})


def float64_reference(model, x, batch_size: int) -> dict:
    """The same function evaluated in float64 on the CPU (float32 weights, float64 arithmetic)."""
    from certify.certificates import Certifier

    cert = Certifier(model)
    outs = [cert(xb.double()) for xb in x.split(batch_size)]
    return dict(logits=torch.cat([o[0].detach().double() for o in outs]), pred=torch.cat([o[1] for o in outs]),
                margin=torch.cat([o[2].double() for o in outs]), radius=torch.cat([o[3].double() for o in outs]))


@torch.no_grad()
def plain_forward(model, x, batch_size: int, device) -> torch.Tensor:
    """``model(x)`` with whatever precision switches are in force (no lipcert wrapper)."""
    return torch.cat([model(xb.to(device)).double().cpu() for xb in x.split(batch_size)])


# ---- comparison ----------------------------------------------------------------------------------

def allowed_radius(radius_ref: torch.Tensor) -> torch.Tensor:
    return radius_ref * (1 + RADIUS_RTOL) + RADIUS_ATOL


def compare(got: dict, ref: dict) -> dict:
    """Largest differences of ``got`` against ``ref`` (CPU), and the samples over the tolerance."""
    out = {"logits": float((got["logits"] - ref["logits"]).abs().max()),
           "logit_scale": float(ref["logits"].abs().max()),
           "margin": float((got["margin"] - ref["margin"]).abs().max())}
    if "radius" in got:
        excess = got["radius"] - ref["radius"]
        out["radius"] = float(excess.abs().max())
        out["radius_excess"] = float(excess.max())
        out["over"] = int((got["radius"] > allowed_radius(ref["radius"])).sum())
    if "pred" in got:
        out["pred_diff"] = int((got["pred"] != ref["pred"]).sum())
    if got.get("bound") is not None and ref.get("bound") is not None:
        out["bound_rel"] = (got["bound"] - ref["bound"]) / ref["bound"]
        out["bound_low"] = got["bound"] < ref["bound"] * (1 - RADIUS_RTOL)
    return out


def margins_of(logits: torch.Tensor) -> dict:
    from certify.certificates import predictions_and_margins

    pred, margin = predictions_and_margins(logits)
    return dict(logits=logits, pred=pred, margin=margin)


def fmt_row(name: str, d: dict, gated: bool) -> str:
    parts = [f"{name:<26}", f"logits {d['logits']:.2e} (of {d['logit_scale']:.3g})", f"margin {d['margin']:.2e}"]
    if "radius" in d:
        parts.append(f"radius {d['radius']:.2e} (max excess {d['radius_excess']:+.2e})")
    if "bound_rel" in d:
        parts.append(f"bound rel {d['bound_rel']:+.2e}")
    if "pred_diff" in d:
        parts.append(f"pred diff {d['pred_diff']}")
    if "over" in d:
        parts.append(f"over tol {d['over']}")
    failed = gated and (d.get("over", 0) > 0 or d.get("bound_low", False))
    parts.append(("FAIL" if failed else "ok") if gated else "(info, not gated)")
    return "  ".join(parts)


def tf32_row(name: str, got: dict, ref: dict, bound: float | None) -> str:
    """A plain-forward row: logits and margins against the CPU's IEEE float32 ones and, where the
    model has a global bound L, the radii margin / (sqrt(2) L) they give, against the tolerance."""
    if bound:
        got = dict(got, radius=got["margin"] / (math.sqrt(2) * bound))
        ref = dict(ref, radius=ref["margin"] / (math.sqrt(2) * bound))
    return fmt_row(name, compare(got, ref), gated=False)


# ---- main ----------------------------------------------------------------------------------------

def header(args, device, argv: list[str]) -> list[str]:
    from certify import __version__
    from certify.numerics import reduced_precision_state

    if device.type == "cuda":
        dev = (f"{torch.cuda.get_device_name(device)} ({device}), CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()}")
    else:
        dev = ("cpu (DRY RUN: CPU against CPU, the device copy with NHWC convolution kernels; real TF32 is a "
               "CUDA feature and has no effect here, see the emulated row)")
    return [f"# gpu_check ({datetime.date.today().isoformat()})",
            f"# lipcert {__version__}, torch {torch.__version__}, python {platform.python_version()}",
            f"# device: {dev}",
            f"# CPU: {cpu_name()}, torch threads {torch.get_num_threads()}",
            f"# model {args.model} width {args.width}, heads {','.join(args.heads)}, --eval {','.join(args.eval)}; "
            f"{args.steps} training steps of {args.batch_size} on the device; {args.images} validation images certified",
            f"# tolerance: radius_device <= radius_cpu * (1 + {RADIUS_RTOL:g}) + {RADIUS_ATOL:.3g}; "
            f"bound_device >= bound_cpu * (1 - {RADIUS_RTOL:g})",
            f"# precision switches at start: {reduced_precision_state()}",
            f"# command: python bench/gpu_check.py {' '.join(argv)}"]


def check_head(args, head: str, device, folder: Path, say) -> list[str]:
    """All rows of one head; returns the failures."""
    from certify.numerics import ieee_float32, reduced_precision_state
    from certify.layers import set_eval_mode

    failures = []
    t0 = time.perf_counter()
    before = reduced_precision_state()
    model, x, y = train_tiny(args, head, device, folder)
    if reduced_precision_state() != before:
        failures.append(f"{head}: training changed the precision switches: {before} -> {reduced_precision_state()}")
    say(f"\n## head {head}: trained {args.steps} steps on {device} in {time.perf_counter() - t0:.1f}s; "
        f"{len(x)} images")
    bs = args.batch_size
    for mode in args.eval:
        t1 = time.perf_counter()
        cpu_model = copy.deepcopy(model).to("cpu")
        dev_model = copy.deepcopy(model).to(device)
        if device.type == "cpu":
            # dry run: NHWC convolution kernels on one side, NCHW on the other, so that the two
            # CPU runs round differently, as cuDNN and the CPU kernels do
            dev_model = dev_model.to(memory_format=torch.channels_last)
        for m in (cpu_model, dev_model):
            set_eval_mode(m, mode, images=len(x))
        with ieee_float32():
            ref = certify_images(cpu_model, x, y, torch.device("cpu"), bs)
            got = certify_images(dev_model, x, y, device, bs)
        ref64 = float64_reference(cpu_model, x, bs)
        say(f"### --eval {mode}: {ref['method']} certificate, CPU {ref['bound_kind']} = {ref['bound']:.9g}, "
            f"device {got['bound_kind']} = {got['bound']:.9g}; certified (cpu / device) "
            + ", ".join(f"{k}: {ref['certified'][k]}/{got['certified'][k]}" for k in ref["certified"]))
        say(fmt_row("cpu float32 vs float64", compare(ref, ref64), gated=False))
        d = compare(got, ref)
        say(fmt_row("ieee (device vs cpu)", d, gated=True))
        if d["over"] or d.get("bound_low"):
            failures.append(f"{head}/{mode}/ieee: {d['over']} radii over the tolerance (max excess "
                            f"{d['radius_excess']:.3e}), bound rel {d.get('bound_rel', 0):+.3e}")

        # The user has TF32 on; lipcert must turn it off for its own calls and restore it.
        with tf32_on(TF32_ALL):
            user_state = reduced_precision_state()
            got_u = certify_images(dev_model, x, y, device, bs)
            after = reduced_precision_state()
        d = compare(got_u, ref)
        say(fmt_row("user-tf32 (device vs cpu)", d, gated=True))
        if d["over"] or d.get("bound_low"):
            failures.append(f"{head}/{mode}/user-tf32: {d['over']} radii over the tolerance (max excess "
                            f"{d['radius_excess']:.3e}): TF32 leaked into lipcert's certificate")
        same = after == user_state
        say(f"{'user TF32 restored':<26}{'ok' if same else 'FAIL'}  ({user_state})")
        if not same:
            failures.append(f"{head}/{mode}: the user's precision switches were not restored: {user_state} -> {after}")

        # Outside lipcert's protection: what TF32 does to the numbers a certificate is built on.
        bound = ref["bound"] if ref["bound_kind"] == "L" else None
        ref_plain = margins_of(ref["logits"])  # the certifier's margins may be float64 re-checks
        with ieee_float32():
            ieee_plain = margins_of(plain_forward(dev_model, x, bs, device))
        for name, paths in (("tf32-conv (cuDNN default)", TF32_CONV), ("tf32-all (conv + matmul)", TF32_ALL)):
            with tf32_on(paths):
                plain = margins_of(plain_forward(dev_model, x, bs, device))
            say(tf32_row(name, plain, ref_plain, bound))
        with EmulatedTF32():
            emulated = margins_of(plain_forward(cpu_model, x, bs, torch.device("cpu")))
        say(tf32_row("tf32-emulated (on cpu)", emulated, ref_plain, bound))
        say(tf32_row("ieee plain (baseline)", ieee_plain, ref_plain, bound))
        say(f"{'':<26}({time.perf_counter() - t1:.1f}s)")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the dry run (default cuda)")
    p.add_argument("--steps", type=int, default=200, help="training steps per head (default 200)")
    p.add_argument("--images", type=int, default=256, help="validation images certified (default 256)")
    p.add_argument("--model", default="lipconvnet5")
    p.add_argument("--width", type=int, default=8, help="model width (default 8, the budget model's)")
    p.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, from {','.join(HEADS)} (default all)")
    p.add_argument("--eval", default=",".join(EVAL_MODES), help="comma-separated SOC evaluation paths "
                   f"from {','.join(EVAL_MODES)} (default both)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="also write the report to this file")
    args = p.parse_args(argv)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not args.heads or any(h not in HEADS for h in args.heads):
        p.error(f"--heads: choose from {','.join(HEADS)}")
    args.eval = [m.strip() for m in args.eval.split(",") if m.strip()]
    if not args.eval or any(m not in EVAL_MODES for m in args.eval):
        p.error(f"--eval: choose from {','.join(EVAL_MODES)}")
    for name in ("steps", "images", "width", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    except NoCudaDevice as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return EXIT_NO_CUDA

    from certify.errors import ConfigError, LipcertError

    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    t0 = time.perf_counter()
    failures: list[str] = []
    try:
        for line in header(args, device, sys.argv[1:] if argv is None else list(argv)):
            say(line)
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            for head in args.heads:
                failures += check_head(args, head, device, Path(tmp), say)
    except ConfigError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LipcertError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    say(f"\n{len(failures)} failure(s) in {time.perf_counter() - t0:.1f}s")
    for f in failures:
        say(f"FAIL {f}")
    say("RESULT: " + ("FAIL" if failures else "PASS"))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
