"""1-Lipschitz layers compared under one wall-clock budget (the protocol of Prach, Brau, Buttazzo &
Lampert, "1-Lipschitz Layers Compared: Memory, Speed, and Certifiable Robustness", CVPR 2024, at
this machine's scale; issues 16 and 17).

Every row trains the same architecture, the comparison's ConvNet (``--size``, default XS), with one
registered convolution type (``--layer`` of ``lipcert train``) for the same training budget
(``--budget-minutes`` of ``lipcert train``: validation and checkpoints not counted), with the same
recipe (``--train-args``), on the CIFAR-10 training JPEGs (../shared/data) with the seeded
5,000-image validation split (data seed 0) that no training step sees. Then, per row:

- ``lipcert certify`` of the best checkpoint on that validation split: clean and certified
  accuracy at 36, 72 and 108/255 (the sound bound; ``--eval fast``), certification images/s;
- ``lipcert attack --audit`` on a seeded subset (``--audit-limit``): violations must be 0;
- training images/s (from the run's own step count and budget clock), epochs reached, the peak
  resident memory of the training process (``wait4``), and the speed ratios to the ``conv`` row, an
  unconstrained plain convolution of the same shape (the speed reference; its certificate is sound
  but tiny, since nothing keeps it 1-Lipschitz).

``--parallel 2`` runs two rows at a time, each pinned to its own core with one thread (say so in the
output: each row then has one core, as in the sequential protocol with ``taskset -c``).

    python bench/layers_compared.py --budget-minutes 20 --parallel 2
    python bench/layers_compared.py --budget-minutes 0.2 --synthetic --layers soc,aol,conv   # smoke test

Writes OUT/<layer>/ (run folders, certify reports, logs, row.json: how the row was run) and
OUT/layers_compared.{md,csv}; OUT defaults to bench/results/<date>-layers-compared-<size>-<minutes>min.
Rows may come from several invocations into one OUT (each refuses to overwrite a finished row);
``--report-only`` rebuilds the table from all of them. A hand-written reading goes in OUT/reading.md,
which the table links and no run overwrites.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIPCERT = [sys.executable, "-c", "from certify.cli import main; main()"]
EPS = ("36/255", "72/255", "108/255")
#: the recipe every row trains with (the same for all; override with --train-args)
DEFAULT_TRAIN_ARGS = "--loss offset --schedule cosine --lr 0.05 --batch-size 128 --eval-every 1000"


def _convolutions() -> list[str]:
    from certify.layers import list_layers

    return [n for n in list_layers("convolution") if not n.startswith("example")]


def _data_args(args) -> list[str]:
    if args.synthetic:
        return ["--dataset", "synthetic", "--synthetic-size", "600", "--val-split", "100"]
    return ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-split", "5000", "--data-seed", "0"]


def _run(cmd: list[str], log: Path, core: int | None) -> tuple[subprocess.Popen, object]:
    env = dict(os.environ)
    if core is not None:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    f = open(log, "a")
    f.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
    return proc, f


def _wait(proc) -> tuple[int, float]:
    """Exit code and peak resident memory (MiB) of that one child (wait4's rusage)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _row_args(args) -> dict[str, list[str]]:
    """``--row-args LAYER=ARGS``: extra training options of one row (reported beside the table)."""
    out: dict[str, list[str]] = {}
    for item in args.row_args:
        layer, sep, extra = item.partition("=")
        if not sep:
            raise SystemExit(f"--row-args takes LAYER=ARGS, got {item!r}")
        out[layer] = shlex.split(extra)
    return out


def row_commands(layer: str, args, out: Path) -> list[tuple[str, list[str]]]:
    run = out / layer
    shape = [] if args.layers_per_block is None else ["--model-option", f"layers_per_block={args.layers_per_block}"]
    train = [*LIPCERT, "train", "--model", f"convnet_{args.size}", "--layer", layer, *shape, "--budget-minutes",
             str(args.budget_minutes), "--output", str(run / "run"), "--seed", str(args.seed), "--no-progress",
             "--device", "cpu", "--workers", "0", *_data_args(args), *shlex.split(args.train_args),
             *_row_args(args).get(layer, [])]
    common = ["--device", "cpu"] + ([] if args.synthetic else ["--data-dir", args.data_dir])
    certify = [*LIPCERT, "certify", str(run / "run" / "best.safetensors"), "--output", str(run / "certify"),
               "--format", "json", *common]
    audit = [*LIPCERT, "attack", str(run / "run" / "best.safetensors"), "--audit", "--limit",
             str(args.audit_limit), "--format", "json", *common]
    return [("train", train), ("certify", certify), ("audit", audit)]


def run_row(layer: str, args, out: Path, core: int | None, environment: str) -> dict:
    (out / layer).mkdir(parents=True, exist_ok=True)
    log = out / layer / "log.txt"
    # how this row was run, kept with it: a --report-only table may gather rows of several invocations
    result: dict = {"layer": layer, "environment": environment,
                    "core": core, "command": " ".join(shlex.quote(a) for a in ["python", "bench/layers_compared.py",
                                                                                *args.argv])}
    for step, cmd in row_commands(layer, args, out):
        t0 = time.perf_counter()
        proc, f = _run(cmd, log, core)
        code, peak = _wait(proc)
        f.close()
        result[f"{step}_exit"], result[f"{step}_wall_s"] = code, round(time.perf_counter() - t0, 1)
        if step == "train":
            result["train_peak_mib"] = round(peak, 1)
        if code != 0 and step != "audit":  # an audit exits 3 on a violation: reported, not fatal
            result["error"] = f"{step} exited {code}; see {log}"
            break
    # kept beside the row so that --report-only can rebuild the table from several invocations
    (out / layer / "row.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarise(layer: str, out: Path, result: dict) -> dict:
    run = out / layer / "run"
    if "error" in result or ("clean" in result and not (run / "train_state.pt").is_file()):
        return result  # failed, or summarised before and its checkpoints not kept (a fresh clone)
    config = json.loads((run / "config.json").read_text())
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    import torch

    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)
    steps = int(state["iteration"])
    used = float(metrics[-1]["budget_used_s"])
    summary = json.loads((out / layer / "certify" / "summary.json").read_text())
    log = (out / layer / "log.txt").read_text()
    audit = _last_json(log)
    result.update({
        "params": summary.get("parameters"),
        "clean": summary["clean_accuracy"],
        **{f"cert_{e}": summary["certified_accuracy"][e] for e in EPS},
        "lipschitz_bound": summary["certificate"]["lipschitz_upper_bound"],
        "epochs": round(steps / int(config["steps_per_epoch"]), 2),
        "train_images_per_s": round(steps * int(config["batch_size"]) / used, 1) if used else None,
        "certify_images_per_s": round(summary["images_per_second"], 1),
        "audit_violations": None if audit is None else audit.get("audit", {}).get("violations"),
        "audit_audited": None if audit is None else audit.get("audit", {}).get("certified_audited"),
    })
    return result


def _last_json(text: str):
    """The last JSON object printed in a log (``--format json`` output of the audit)."""
    end = text.rfind("}")
    depth, start = 0, None
    for i in range(end, -1, -1):
        if text[i] == "}":
            depth += 1
        elif text[i] == "{":
            depth -= 1
            if depth == 0:
                start = i
                break
    if start is None:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None


def schedule(layers: list[str], args, out: Path, environment: str) -> dict[str, dict]:
    """Run the rows, ``args.parallel`` at a time, each pinned to its own core (or unpinned when 1)."""
    if args.parallel <= 1:
        return {layer: run_row(layer, args, out, args.one_core, environment) for layer in layers}
    import concurrent.futures as cf

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.parallel:
        raise SystemExit(f"--parallel {args.parallel} needs as many cores; this process may use {len(cores)}")
    free = list(cores[: args.parallel])
    results: dict[str, dict] = {}
    with cf.ThreadPoolExecutor(args.parallel) as pool:
        pending = {}
        queue = list(layers)
        while queue or pending:
            while queue and free:
                layer, core = queue.pop(0), free.pop(0)
                pending[pool.submit(run_row, layer, args, out, core, environment)] = (layer, core)
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                layer, core = pending.pop(fut)
                results[layer] = fut.result()
                free.append(core)
                print(f"row {layer} done: {results[layer]}", file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-minutes", type=float, default=20.0, help="training budget per row")
    p.add_argument("--size", default="xs", choices=("xs", "s", "m", "l"))
    p.add_argument("--layers", default=None, help="comma-separated layer types (default: every registered "
                                                   "convolution, `conv` included as the speed reference)")
    p.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS, help="the recipe, the same for every row")
    p.add_argument("--data-dir", default="/work/data/train", help="ImageFolder of the CIFAR-10 training JPEGs")
    p.add_argument("--synthetic", action="store_true", help="synthetic data (a smoke test)")
    p.add_argument("--parallel", type=int, default=1, help="rows at a time, one core and one thread each")
    p.add_argument("--audit-limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--layers-per-block", type=int, default=None,
                   help="convolutions per block (the study's ConvNet: 5); fewer fit a CPU budget")
    p.add_argument("--row-args", action="append", default=[], metavar="LAYER=ARGS",
                   help="extra training options of one row, e.g. 'conv=--lr 0.01' (listed in the report)")
    p.add_argument("--one-core", type=int, default=None, metavar="CORE",
                   help="run the rows one after the other, pinned to this core with one thread")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the table from every row already in --output")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.one_core is not None and args.parallel > 1:
        p.error("--one-core runs the rows one after the other; it does not combine with --parallel")
    layers = args.layers.split(",") if args.layers else _convolutions()
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-layers-compared-{args.size}-{args.budget_minutes:g}min")
    if args.report_only:
        layers = sorted(d.name for d in out.iterdir() if (d / "row.json").is_file()) if out.is_dir() else []
        if not layers:
            p.error(f"{out} holds no rows (row.json) to report")
        raw = {layer: json.loads((out / layer / "row.json").read_text()) for layer in layers}
    else:
        if any((out / layer).exists() for layer in layers):
            p.error(f"{out} already holds rows for some of {layers}; pick another --output")
        out.mkdir(parents=True, exist_ok=True)
        env = (f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
               + (f"{args.parallel} rows at a time, one core and one thread each" if args.parallel > 1
                  else f"rows one after the other on core {args.one_core}, one thread" if args.one_core is not None
                  else "rows one after the other, unpinned"))
        print(f"layers_compared: convnet_{args.size}, {args.budget_minutes:g} min per row, {env}", file=sys.stderr)
        raw = schedule(layers, args, out, env)
    rows = [summarise(layer, out, raw[layer]) for layer in layers]
    for r in rows:  # the summary joins the row, so that --report-only needs no checkpoints (not committed)
        (out / r["layer"] / "row.json").write_text(json.dumps(r, indent=1) + "\n")
    ref = next((r for r in rows if r["layer"] == "conv" and "error" not in r), None)
    for r in rows:
        if ref and "error" not in r:
            r["train_speed_vs_conv"] = round(r["train_images_per_s"] / ref["train_images_per_s"], 3)
            r["certify_speed_vs_conv"] = round(r["certify_images_per_s"] / ref["certify_images_per_s"], 3)
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "layer", k))
    with open(out / "layers_compared.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    text = report(rows, out, args)
    (out / "layers_compared.md").write_text(text)
    print(text, end="")
    return 1 if any("error" in r or r.get("audit_violations") for r in rows) else 0


def _budgets(rows: list[dict], out: Path) -> str:
    """The training budget(s) the rows ran with, from their own run configs (not this invocation's flags)."""
    found = set()
    for r in rows:
        config = out / r["layer"] / "run" / "config.json"
        if config.is_file():
            found.add(json.loads(config.read_text()).get("budget_minutes"))
    found.discard(None)
    if not found:
        return "an unknown budget"
    return " / ".join(f"{b:g}" for b in sorted(found)) + " minutes of training" + (" each" if len(found) == 1 else
                                                                                    " (rows differ!)")


def report(rows: list[dict], out: Path, args) -> str:
    """The Markdown table of the rows, with how each was run; links a hand-written OUT/reading.md."""
    cmd = " ".join(shlex.quote(a) for a in ["python", "bench/layers_compared.py", *args.argv])
    envs = {r.get("environment") for r in rows}
    one_env = len(envs) == 1 and None not in envs
    lines = [f"# 1-Lipschitz layers compared: convnet_{args.size}, {_budgets(rows, out)} ({dt.date.today()})", "",
             f"- command: `{cmd}`",
             f"- environment: {next(iter(envs))}" if one_env else
             "- environment: rows from several invocations; each row's conditions are listed below the table",
             # --report-only runs nothing: the recipe is what its caller says (rows' own commands below)
             f"- recipe{' (as given to this report)' if args.report_only else ''} (every row): `{args.train_args}`"
             + (f"; {args.layers_per_block} convolution(s) per block" if args.layers_per_block else ""),
             *[f"- row options: {item}" for item in args.row_args],
             "- data: " + ("synthetic (smoke test)" if args.synthetic else
                           f"{args.data_dir} (CIFAR-10 training JPEGs), 45,000 training / 5,000 validation images "
                           "(data seed 0)") + "; accuracies on the VALIDATION split, certified with the sound bound",
             "", "| layer | clean | 36/255 | 72/255 | 108/255 | epochs | train img/s | x conv | certify img/s | x conv "
             "| peak MiB | audit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | failed: {r['error']} |")
            continue
        audit = "n/a" if r["audit_violations"] is None else f"{r['audit_violations']} / {r['audit_audited']}"
        lines.append(
            f"| {r['layer']} | {100 * r['clean']:.1f}% | "
            + " | ".join(f"{100 * r[f'cert_{e}']:.1f}%" for e in EPS)
            + f" | {r['epochs']:.2f} | {r['train_images_per_s']:.0f} | {r.get('train_speed_vs_conv', float('nan')):.2f}"
            f" | {r['certify_images_per_s']:.0f} | {r.get('certify_speed_vs_conv', float('nan')):.2f}"
            f" | {r['train_peak_mib']:.0f} | {audit} |")
    lines += ["", "audit: violations / certified samples attacked inside their radius (must be 0 / n)."]
    if not one_env:
        lines += ["", "## How each row was run", ""]
        for r in rows:
            if r.get("environment") is None:
                lines.append(f"- `{r['layer']}`: not recorded in its row.json (an earlier version of this script; see the reading)")
            else:
                lines.append(f"- `{r['layer']}`: {r['environment']}; `{r['command']}`")
    if (out / "reading.md").is_file():
        lines += ["", "The reading of these rows (hand-written): [reading.md](reading.md)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
