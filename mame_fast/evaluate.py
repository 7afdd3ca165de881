"""Stage 5b: the test set, once. ``mame-fast test RUN`` evaluates the test split with one checkpoint,
writes ``test.json`` into the run folder and a line into ``<runs>/test_ledger.jsonl``, and refuses a
second evaluation of the same run unless asked (``--again``), showing the earlier result.

Why a ledger: choosing a model by its test accuracy turns the test set into a validation set; the
ledger keeps every look at it, with the time, so a report can show that it was looked at once.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import torch

from . import atomic_write_text
from . import checkpoint as ckpt
from .config import load
from .model import build, spec_from_dict
from .pipeline import build_loader
from .records import update_run_info
from .runtime import setup_runtime
from .train import evaluate


class AlreadyTested(RuntimeError):
    def __init__(self, previous: dict):
        self.previous = previous
        super().__init__(
            f"this run was already evaluated on the test set at {previous['time']} "
            f"(checkpoint {previous['checkpoint']}: top-1 {previous['top1']:.4f}); pass --again to look again "
            f"(it is recorded in the ledger)"
        )


def evaluate_test_set(run_dir: Path, which: str = "best", again: bool = False) -> dict:
    run_dir = Path(run_dir)
    result_path = run_dir / "test.json"
    if result_path.is_file() and not again:
        raise AlreadyTested(json.loads(result_path.read_text()))
    if which not in ("best", "last", "ema"):
        raise ValueError(f"--checkpoint must be best, last or ema, got {which!r}")
    cfg = load(run_dir / "config.yaml")
    state = ckpt.load(run_dir / ("last.pt" if which == "ema" else f"{which}.pt"))
    spec = spec_from_dict(state["spec"])
    model = build(spec)
    if which == "ema":
        if not state.get("ema"):
            raise ValueError(f"{run_dir}: this run has no EMA weights (optim.ema was 0)")
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()})
    else:
        model.load_state_dict(state["model"])
    # The one place that decides device and precision: the run's own precision, as in its validation (an fp16
    # run tested on a machine without a GPU is evaluated in fp32: evaluation needs no GradScaler).
    rt = setup_runtime(cfg.precision, training=False)
    model.to(rt.device)
    if cfg.data.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = build_loader(cfg.data, "test", False, cfg.seed, device=rt.device, dtype=rt.dtype)
    m = evaluate(model, loader, rt, spec.num_classes)
    result = {"time": dt.datetime.now().isoformat(timespec="seconds"), "checkpoint": which, "epoch": state["epoch"],
              "classes": state["classes"], **m}
    atomic_write_text(result_path, json.dumps(result, indent=1))
    with open(run_dir.parent / "test_ledger.jsonl", "a") as f:
        f.write(json.dumps({"run": run_dir.name, "time": result["time"], "checkpoint": which, "top1": m["top1"],
                            "balanced_acc": m["balanced_acc"], "again": again}) + "\n")
    update_run_info(run_dir, {"test_top1": m["top1"], "test_time": result["time"]})
    return result
