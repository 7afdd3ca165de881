"""Stage 4f: the test set, once. ``mame-fast test RUN`` evaluates the test split with one checkpoint, writes
``test.json`` into the run folder and a line into ``<runs>/test_ledger.jsonl``, and refuses a second look at
the same run unless asked (``--again``), showing the earlier result.

Which weights: ``best`` (the default) is exactly what won validation, the model's or the EMA's, at its epoch
(``best.pt``); ``last`` the model at the end of training; ``ema`` the EMA at the end of training. ``test.json``
and the ledger say which weights and which epoch were looked at.

Why a ledger: choosing a model by its test accuracy turns the test set into a validation set; the ledger
keeps every look at it, with the time, so a report can show that it was looked at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import load
from ..files import atomic_write_text
from ..input import build_loader
from ..records.records import append_jsonl, now, update_run_info
from ..records.rundir import RunDir
from . import checkpoint as ckpt
from .evaluate import evaluate
from .model import build
from .runtime import setup_runtime
from .spec import spec_from_dict

CHECKPOINTS = ("best", "last", "ema")


class AlreadyTested(RuntimeError):
    def __init__(self, previous: dict):
        self.previous = previous
        super().__init__(
            f"this run was already evaluated on the test set at {previous['time']} ({previous['weights']} weights of "
            f"epoch {previous['epoch']}: top-1 {previous['top1']:.4f}); pass --again to look again (it is recorded in the ledger)"
        )


def weights_to_test(run_dir: RunDir, which: str) -> tuple[dict, str, int, dict]:
    """(state dict, 'model' or 'ema', epoch, checkpoint) of the weights ``which`` names."""
    if which == "best":
        state = ckpt.load(run_dir / RunDir.BEST)
        return state["model"], state["weights"], state["epoch"], state
    state = ckpt.load(run_dir / RunDir.LAST)
    if which == "last":
        return state["model"], "model", state["epoch"], state
    if not state.get("ema"):
        raise ValueError(f"{run_dir.path}: this run has no EMA weights (optim.ema was 0); use --checkpoint best or last")
    return {k.removeprefix("module."): v for k, v in state["ema"].items()}, "ema", state["epoch"], state


def evaluate_test_set(run_dir: str | Path, which: str = "best", again: bool = False) -> dict:
    run_dir = RunDir(run_dir)
    result_path = run_dir / RunDir.TEST
    if result_path.is_file() and not again:
        raise AlreadyTested(json.loads(result_path.read_text()))
    if which not in CHECKPOINTS:
        raise ValueError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    cfg = load(run_dir / RunDir.CONFIG)
    weights, kind, epoch, state = weights_to_test(run_dir, which)
    spec = spec_from_dict(state["spec"])
    model = build(spec)
    model.load_state_dict(weights)
    # The one place that decides device and precision: the run's own precision, as in its validation (an fp16
    # run tested on a machine without a GPU is evaluated in fp32: evaluation needs no GradScaler).
    rt = setup_runtime(cfg.precision, training=False)
    model.to(rt.device)
    if cfg.data.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = build_loader(cfg.data, "test", False, cfg.seed, device=rt.device, dtype=rt.dtype)
    m = evaluate(model, loader, rt, spec.num_classes)
    result = {"time": now(), "checkpoint": which, "weights": kind, "epoch": epoch, "classes": state["classes"], **m}
    atomic_write_text(result_path, json.dumps(result, indent=1))
    append_jsonl(run_dir.ledger, {"run": run_dir.path.name, "time": result["time"], "checkpoint": which, "weights": kind,
                                  "epoch": epoch, "top1": m["top1"], "balanced_acc": m["balanced_acc"], "again": again})
    update_run_info(run_dir, {"test_top1": m["top1"], "test_time": result["time"]})
    return result
