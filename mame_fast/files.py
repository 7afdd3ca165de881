"""Publishing files safely, and the process pool (and the cores) every stage uses for per-image work.

Everything the project publishes (manifest.json, run.json, test.json, checkpoints, cards) goes through
``atomic_write``: a temporary file beside the target, flushed and fsynced, then renamed over it, so a
reader (or a crash, or a full disk) sees the old content or the new, never half of it, and no temporary
file outlives a failure.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(f)`` on a binary temporary file, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the original error is the one to report, not a failed cleanup
            tmp.unlink()
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def mp_context():
    """Process pool context for image work: fork where available (no re-import per worker, and it
    works from an interactive main), spawn elsewhere."""
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask (a Slurm task's binding, ``taskset``, a container's cpuset),
    which ``os.cpu_count()`` ignores; every CPU where there are no masks (macOS)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Bytes free in POSIX shared memory, where torch's shared tensors live on Linux (``shm_open``); None where there is
    no such mount (macOS). A container's default is often 64 MB: a shared tensor larger than what is free is created
    without complaint, and the process dies of SIGBUS when it writes the page past the limit."""
    try:
        s = os.statvfs(path)
    except OSError:
        return None
    return s.f_bavail * s.f_frsize
