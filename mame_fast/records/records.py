"""Stage 5b: what a run leaves behind: run.json (status and facts), metrics.jsonl / metrics.csv (one row per epoch)
and the weight and activation histograms. Plots are ``plots.py``; the live display is ``live.py``.

The status in run.json always tells the truth: ``running`` (with pid, host and a heartbeat the trainer
refreshes), then ``finished``, ``stopped`` (a step limit), ``interrupted`` (resumable), ``diverged`` or
``failed`` (with the error). A ``running`` run whose process is gone, or whose heartbeat went stale, reads
as ``died`` (``run_status``). Readers of the append-only files skip a torn last line (a crash mid-append).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np

from ..errors import Expected
from ..files import alive, atomic_write_text
from .rundir import RunDir

STALE_AFTER_S = 15 * 60  # a heartbeat this old means the process is gone (the trainer beats every minute or more often)


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


# -- run.json -----------------------------------------------------------------------------------------


def read_run_info(run_dir: str | Path) -> dict:
    p = Path(run_dir) / RunDir.INFO
    return json.loads(p.read_text()) if p.is_file() else {}


def write_run_info(run_dir: str | Path, info: dict) -> None:
    atomic_write_text(Path(run_dir) / RunDir.INFO, json.dumps(info, indent=1))


def update_run_info(run_dir: str | Path, changes: dict) -> None:
    write_run_info(run_dir, {**read_run_info(run_dir), **changes})


def running_status() -> dict:
    """What run.json says of a run in progress: this process, this host, a fresh heartbeat."""
    return {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": now()}


def run_status(info: dict) -> str:
    """The status to show: ``died`` for a run marked running whose process is gone or whose heartbeat is stale."""
    status = info.get("status", "?")
    if status != "running":
        return status
    if info.get("host") == socket.gethostname() and info.get("pid") and not alive(int(info["pid"])):
        return "died"
    beat = info.get("heartbeat")
    if beat and (dt.datetime.now() - dt.datetime.fromisoformat(beat)).total_seconds() > STALE_AFTER_S:
        return "died"
    return status


# -- metrics.jsonl / metrics.csv, the test ledger -------------------------------------------------------


class DamagedRecord(Expected, ValueError):
    """A record file damaged in the middle (not a torn last line, which readers skip and writers repair)."""


def append_jsonl(path: Path, row: dict) -> None:
    """One row onto an append-only file, synced; a torn last line left by a crash is cut off first (repair_jsonl)."""
    if (cut := repair_jsonl(path)) is not None:
        warnings.warn(f"{path}: cut a torn last line (a crash while it was written): {cut[:60]!r}", stacklevel=2)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The rows of an append-only file; a torn last line (a crash mid-append) is skipped with a warning."""
    if not path.is_file():
        return []
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DamagedRecord(f"{path}: line {i + 1} is not JSON (and not the last line): the file is damaged; "
                                    f"delete or fix that line") from None
            warnings.warn(f"{path}: skipped a torn last line (a crash while it was written)", stacklevel=2)
    return rows


def repair_jsonl(path: Path) -> str | None:
    """Cut a torn last line (a crash mid-append) off an append-only file before anything is appended to it: appended
    onto the fragment, the next row would be a damaged line in the middle. Returns what was cut, or None."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":  # the common case: read one byte, not the file
            return None
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    tail = data[end:]
    if not tail.strip():
        return None
    try:
        json.loads(tail)
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return tail.decode(errors="replace")
    with open(path, "ab") as f:  # a whole row that only lacks its newline
        f.write(b"\n")
    return None


def append_metrics(run_dir: str | Path, row: dict) -> None:
    append_jsonl(Path(run_dir) / RunDir.METRICS, row)
    write_metrics_csv(run_dir)


def read_metrics(run_dir: str | Path) -> list[dict]:
    rows = read_jsonl(Path(run_dir) / RunDir.METRICS)
    # A resumed run may repeat an epoch that was logged before the interruption: keep the last.
    by_epoch = {r["epoch"]: r for r in rows}
    return [by_epoch[k] for k in sorted(by_epoch)]


CSV_COLUMNS = ("epoch", "lr", "time_s", "images_per_s", "data_wait", "train_loss", "train_top1", "grad_norm", "skipped_steps",
               "val_loss", "val_top1", "val_top5", "val_balanced_acc", "val_ema_loss", "val_ema_top1", "val_ema_top5",
               "val_ema_balanced_acc")


def write_metrics_csv(run_dir: str | Path) -> None:
    """metrics.csv: the scalar columns of metrics.jsonl, one row per epoch, for spreadsheets."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in read_metrics(run_dir):
        flat = dict(r)
        for p in ("val", "val_ema"):
            flat.update({f"{p}_{k}": r[p][k] for k in ("loss", "top1", "top5", "balanced_acc")} if r.get(p) else {})
        w.writerow(["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])
    atomic_write_text(Path(run_dir) / RunDir.METRICS_CSV, buf.getvalue())


# -- histograms ---------------------------------------------------------------------------------------


def hist_epochs(epochs: int, n: int) -> set[int]:
    """0-based epochs at which histograms are saved: first, evenly spaced, last."""
    if n <= 0:
        return set()
    return {int(round(i * (epochs - 1) / max(1, n - 1))) for i in range(n)}


def save_histograms(run_dir: str | Path, model, batch, epoch: int, autocast, bins: int = 60) -> None:
    """Weights and activations per stage (one validation batch, run under the run's ``autocast`` context, as
    everything that runs the model), as histogram counts in hist/epoch_N.npz."""
    import torch  # here, not at the top: the readers of a run folder (runs, diagnose, report) need no torch

    path = RunDir(run_dir).hist_file(epoch)
    path.parent.mkdir(exist_ok=True)
    data = {}
    was = model.training
    model.eval()
    taps: dict = {}
    with torch.no_grad():
        for s, stage in enumerate(model.stages):
            w = torch.cat([p.detach().flatten().float().cpu() for p in stage.parameters() if p.dim() > 1])
            data[f"weights/stage{s + 1}"] = w.numpy()
        with autocast():
            model.features(batch.images, batch.sizes if batch.padded else None, taps)
    model.train(was)
    for k, v in taps.items():
        data[f"activations/{k}"] = v.float().flatten().cpu().numpy()
    arrays = {}
    for k, v in data.items():
        counts, edges = np.histogram(v, bins=bins)
        arrays[f"{k}/counts"], arrays[f"{k}/edges"] = counts, edges
    np.savez(path, **arrays)


def load_histograms(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (counts, edges)} of one hist/epoch_N.npz."""
    d = np.load(path)
    return {k: (d[f"{k}/counts"], d[f"{k}/edges"]) for k in sorted({f.rsplit("/", 1)[0] for f in d.files})}
