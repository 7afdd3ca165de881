"""Publishing files safely, and the process pool (and the cores) every stage uses for per-image work.

Everything the project publishes (manifest.json, run.json, test.json, checkpoints, cards) goes through
``atomic_write``: a temporary file beside the target, flushed and fsynced, then renamed over it, so a
reader (or a crash, or a full disk) sees the old content or the new, never half of it, and no temporary
file outlives a failure: a writer that was killed (kill -9, a lost node) leaves one behind, which the next write
into that folder removes (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import IO, Callable, Iterator

# The signals that ask a run to stop and save (Ctrl-C; a cluster's time limit: SLURM sends SIGTERM to every process of
# the job, or SIGUSR1 with --signal). Only the parent acts on them; see ignore_stop_signals.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


# A temporary file names its writer (host and pid): one whose writer is gone (kill -9, a lost node) is removed the next
# time the folder is written (remove_stale_temps), and one of a live writer (a concurrent `note`, another rank) is not.
_HOST = socket.gethostname().split(".")[0]
_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$")
_cleaned: set[tuple[int, Path]] = set()  # (pid, folder): once per folder and process (a fork is a new writer)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(f)`` on a binary temporary file, then rename it into place."""
    path = Path(path)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (once per folder and process); returns them."""
    folder = Path(folder)
    key = (os.getpid(), folder.resolve())
    if key in _cleaned:
        return []
    _cleaned.add(key)
    removed = []
    with contextlib.suppress(OSError):  # a folder that does not exist yet holds nothing stale
        for p in folder.iterdir():
            m = _TEMP.match(p.name)
            if m and m["host"] == _HOST and not alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def ignore_stop_signals(*_) -> None:
    """A worker's initializer (DataLoader's, and the image pools of `shard` and `sample`): the stop signals are its
    parent's to handle.

    A terminal's Ctrl-C goes to the whole foreground process group, and SLURM signals every process of a job, workers
    included. A worker that died of it took the trainer down with it (DataLoader's "worker exited unexpectedly" in the
    middle of a step, no checkpoint). So a worker ignores SIGINT and SIGUSR1, and SIGTERM from anyone but its parent:
    the parent's SIGTERM is how DataLoader, and multiprocessing at exit, end a worker that did not stop when asked,
    and a worker deaf to it would hang the parent's exit. (A pool worker killed by the group's SIGTERM hung `shard`:
    an idle worker holds the task queue's lock while it waits, and Pool.terminate() waits for that lock for ever.)
    Where ``sigwaitinfo`` exists (Linux), one thread of the worker waits for SIGTERM, which every other thread holds
    back, and ends the worker when its parent sent it (as torch's own handler does); elsewhere (macOS) torch's handler
    stays, and anyone's SIGTERM ends the worker."""
    ignore_signals(tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGTERM))
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it held
        threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True, name="sigterm").start()
    elif hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # held while the worker started


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's handler does: quietly, so that the parent's SIGCHLD handler reports no failure


def terminate_pool(pool, grace: float = 2.0) -> None:
    """``pool.terminate()`` (a multiprocessing Pool of ``ignore_stop_signals`` workers), made sure to end.

    terminate() ends each worker with a SIGTERM, which such a worker takes from its parent only. When the process
    group got a SIGTERM too (a Ctrl-C's twin from SLURM or ``kill -- -PGID``, the very signal that stopped the command),
    the two can merge before the worker reads them (standard signals do not queue): the worker sees only the group's
    and goes on, and terminate() waited for it for ever. After ``grace`` seconds, the workers still alive are killed:
    by then terminate() has drained the task queue, so a killed worker holds no lock it needs."""
    ender = threading.Thread(target=pool.terminate, daemon=True, name="terminate-pool")
    ender.start()
    ender.join(grace)
    if ender.is_alive():
        for p in list(pool._pool):  # multiprocessing's list of the pool's worker processes
            if p.exitcode is None:
                p.kill()
        ender.join()


def ignore_signals(signals: tuple[int, ...]) -> None:
    """Ignore ``signals`` in this process. Those that arrived before, held by ``stop_signals_held`` while it started, are
    dropped: setting SIG_IGN discards a pending signal."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """While worker processes are started: this thread holds the stop signals back (delivered when it ends), so a
    forked or spawned worker inherits them held until its initializer ignores them (``ignore_signals``): no window in
    which a Ctrl-C kills a worker that is still starting."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
