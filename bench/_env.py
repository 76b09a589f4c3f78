"""Environment facts the benchmark scripts print beside their measurements."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def start_run(cmd: list[str], log_path, cwd, core: int | None):
    """Start ``cmd`` with its output in ``log_path``; with ``core``, pinned to that one core with
    one thread (so that runs started side by side get equal, separate compute)."""
    import os
    import subprocess

    env = dict(os.environ)
    if core is not None:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)


def run_rows(rows, start, concurrent: bool) -> dict:
    """Exit codes of ``start(row, core)`` for each row: all at once, one core each (``concurrent``),
    or one after the other on every core. Raises ValueError when there are too few cores."""
    import os

    if not concurrent:
        return {r: start(r, None).wait() for r in rows}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < len(rows):
        raise ValueError(f"--concurrent needs {len(rows)} cores, this process may use {len(cores)}")
    procs = {r: start(r, cores[i]) for i, r in enumerate(rows)}
    return {r: proc.wait() for r, proc in procs.items()}
