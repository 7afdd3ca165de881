"""Stage 5b: a run folder's life, as one context manager shared by the trainer, the range test and the test look.

    with RunRecord.create(root, name, config, spec, info) as record:   # or RunRecord.reopen(folder, "train")
        ...                     # record.beat() now and then; record.update({...}) for measured facts
        record.finish("finished", best_val_top1=...)

- **One process per run folder.** The record holds the folder's lock (``run.lock``, an exclusive ``flock`` that the
  kernel releases when the process dies, however it dies) from the moment it opens the folder until it closes it.
  A second trainer, range test or test look of the same folder is refused in one sentence naming the holder (its
  command, host and pid): a requeued SLURM job and a hand-started resume never both train.
- **Published atomically.** ``config.yaml``, ``model.yaml`` and ``run.json`` are written through ``files.atomic_write``:
  a reader sees the old file or the new one, never half.
- **The status tells the truth.** Entering writes ``running`` (pid, host, heartbeat); ``finish`` writes the ending;
  leaving on an exception writes ``diverged`` (an exception whose ``run_status`` says so), ``interrupted``
  (Ctrl-C) or ``failed``, with the error, before the lock is released. Only the master process of a multi-process
  run writes (``master=False``: every method is a no-op).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from ..config import save
from ..errors import Expected
from .records import now, read_run_info, run_status, running_status, update_run_info, write_run_info
from .rundir import RunDir, existing_run, list_runs

HEARTBEAT_S = 60  # how often a running record refreshes run.json's heartbeat (records.STALE_AFTER_S reads it)


class RunBusy(Expected, RuntimeError):
    """Another process holds the run folder (training it, testing it)."""


class RunRecord:
    def __init__(self, run_dir: str | Path | RunDir, master: bool = True, command: str = "train", owns_status: bool = True):
        self.dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.master, self.command = master, command
        self.owns_status = owns_status  # False for a test look: it reads a run, its failure is not the run's
        self.status: str | None = None  # set by finish
        self.on_end = None  # () -> dict of facts recorded whatever the ending (the best epoch so far)
        self._lock = None
        self._beat_at = time.monotonic()

    @property
    def path(self) -> Path:
        return self.dir.path

    # -- opening -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, name: str, config: dict, spec: dict | None, info: dict, command: str = "train",
               master: bool = True) -> RunRecord:
        """A new numbered folder under ``root``, locked, with its config, spec and run.json published."""
        record = cls(RunDir.create(root, name), master, command)
        record.acquire()
        record.write_config(config)
        if spec is not None:
            save(spec, record.dir / RunDir.SPEC)
        write_run_info(record.dir, {**info, "name": name, "created": now()})
        return record

    @classmethod
    def reopen(cls, path: str | Path, command: str = "train", master: bool = True, owns_status: bool = True) -> RunRecord:
        """An existing run folder, locked for this process (refused, naming the holder, if another holds it)."""
        record = cls(existing_run(path), master, command, owns_status)
        record.acquire()
        return record

    def acquire(self) -> None:
        """Take the folder's lock, or refuse in one sentence naming who holds it."""
        if not self.master:
            return
        import fcntl

        f = open(self.dir / RunDir.LOCK, "a+")  # noqa: SIM115 (held open for the record's life: the lock is the open file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(f)
            f.close()
            raise RunBusy(f"{self.path}: {_holder(holder)}; one process works on a run folder at a time. Wait for it to "
                          f"end (`mame-fast runs --root {self.dir.root}` shows the run's status); a trainer continues the "
                          f"run by itself") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"command": self.command, "host": socket.gethostname(), "pid": os.getpid(), "since": now()}))
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            import fcntl

            with contextlib.suppress(OSError):  # the next holder's refusals must not name this process
                self._lock.truncate(0)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- life ----------------------------------------------------------------------------------------------

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if exc is not None and self.status is None and self.owns_status:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else getattr(exc, "run_status", "failed")
                self.finish(status, f"{type(exc).__name__}: {exc}")
        finally:
            if self.master:
                with contextlib.suppress(Exception):  # a card that cannot be written must not hide why the run ended
                    from .report import write_card

                    write_card(self.path)
            self.release()

    def start(self, facts: dict | None = None) -> None:
        """``running``, with this process's pid, host and a fresh heartbeat, and what it runs on (``facts``)."""
        self.update({**running_status(), **(facts or {})})

    def beat(self) -> None:
        """Refresh the heartbeat, at most every HEARTBEAT_S."""
        if self.master and time.monotonic() - self._beat_at > HEARTBEAT_S:
            self.update({"heartbeat": now()})
            self._beat_at = time.monotonic()

    def update(self, changes: dict) -> None:
        if self.master:
            update_run_info(self.dir, changes)

    def info(self) -> dict:
        return read_run_info(self.dir)

    def write_config(self, config: dict) -> None:
        if self.master:
            save(config, self.dir / RunDir.CONFIG)

    def finish(self, status: str, error: str | None = None, **facts) -> None:
        """The run's ending; never raises over the error that ended it (a full disk then leaves ``running``, which
        readers show as ``died`` once the process is gone)."""
        self.status = status
        if not self.master:
            return
        try:
            end = self.on_end() if self.on_end is not None else {}
            self.update({"status": status, "error": error, "ended": now(), **end, **facts})
        except Exception:
            if error is None:
                raise


DOING = {"train": "training it", "test": "evaluating it on the test set", "lr-find": "running its range test"}


def resumable(root: str | Path, name: str) -> Path | None:
    """For ``--resume auto``: the latest run of this name in ``root`` that has a checkpoint and did not finish (None:
    start a new run)."""
    mine = [r for r in list_runs(root) if r.path.name.split("-", 1)[1] == name and (r / RunDir.LAST).is_file()]
    open_ = [r for r in mine if run_status(read_run_info(r.path)) not in ("finished", "running")]
    return open_[-1].path if open_ else None


def _read_holder(f, wait_s: float = 2.0) -> dict | None:
    """What the lock's holder wrote about itself. It writes just after it takes the lock, so a refusal that comes in
    between sees an empty file or the name of a holder that died (the kernel freed its lock, not its words): wait
    for a name that is alive, a little, then settle for none."""
    from ..files import alive

    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        try:
            h = json.loads(f.read())
            if h["host"] != socket.gethostname() or alive(int(h["pid"])):
                return h
        except (ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _holder(h: dict | None) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    try:
        return (f"another `mame-fast {h['command']}` of this run is {DOING.get(h['command'], 'working on it')} right now "
                f"(pid {h['pid']} on {h['host']}, since {h['since']})")
    except (ValueError, KeyError, TypeError):  # the holder had not written its name yet
        return "another process holds this run right now"
