"""Shared by the benchmark scripts: machine description, statistics and the results file."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

# Where results and generated samples go; gpu_check.sh's smoke run points them at a temporary folder.
RESULTS = Path(os.environ.get("MAME_FAST_RESULTS") or Path(__file__).parent / "results")
WORK = Path(os.environ.get("MAME_FAST_BENCH_WORK") or Path(__file__).parent / "_work")


# What the server of fresh_process() imports once. Neither import calls the CUDA driver (the suite checks it against a
# stand-in libcuda that logs every call), so its children start with CUDA untouched. DALI and mame-fast are left to
# the child: cheap to import, and DALI's import is not worth the risk of a thread in the server.
PRELOAD = ("torch", "timm")


def fresh_process() -> ProcessPoolExecutor:
    """A pool of one process for one measured configuration, so that no CUDA context, kernel choice, loader thread,
    worker process or heap of an earlier configuration is in it. It is forked from multiprocessing's forkserver, which
    imported ``PRELOAD`` once, rather than spawned: a spawned process imports torch and timm again, 3-4 CPU seconds on
    each of the 13 configurations of gpu_check.sh, and a CPU run's rows are each that much longer."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ProcessPoolExecutor(1, mp_context=ctx, initializer=_start_processes_as_by_default)


def _start_processes_as_by_default() -> None:
    # A child of the forkserver would start its own processes (DataLoader workers) through the server too: each one
    # importing the benchmark again and starting from the server's state, not its parent's. A user's run forks them.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def versions(*packages: str) -> str:
    out = [f"python {platform.python_version()}"]
    for p in packages:
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def hardware_tag() -> str:
    g = gpu_name()
    return (g.replace(" ", "-").lower() if g else f"cpu{os.cpu_count()}")


def proc_cpu(stat: Path) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system) from a /proc ``stat`` file of a process or a thread (Linux); None when
    it ended meanwhile."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: state, ppid, ...
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(xs: list[float]) -> tuple[float, float, float]:
    """median, min, max"""
    return statistics.median(xs), min(xs), max(xs)


def write_results(theme: str, title: str, body: str, packages: tuple[str, ...]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{theme}_{hardware_tag()}_{dt.date.today().isoformat()}.md"
    head = (
        f"# {title}\n\n"
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, GPU: {gpu_name() or 'none'}, {platform.platform()}\n"
        f"- versions: {versions(*packages)}\n"
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}\n\n"
    )
    path.write_text(head + body)
    return path


def publish(theme: str, title: str, lines: list[str], packages: tuple[str, ...] = ("torch", "nvidia-dali-cuda130")) -> Path:
    """A benchmark's table: saved under ``RESULTS`` (``write_results``) and printed, with where it went."""
    path = write_results(theme, title, "\n".join(lines) + "\n", packages)
    print("\n".join(lines))
    print(f"wrote {path}")
    return path
