"""Stage 4f: the test set, once. ``mame-fast test RUN`` evaluates the test split with one checkpoint, writes
``test.json`` into the run folder and a line into ``<runs>/test_ledger.jsonl``, and refuses a second look at
the same run unless asked (``--again``), showing the earlier result.

Which weights: ``best`` (the default) is exactly what won validation, the model's or the EMA's, at its epoch
(``best.pt``); ``last`` the model at the end of training; ``ema`` the EMA at the end of training. ``test.json``
and the ledger say which weights and which epoch were looked at.

Why a ledger: choosing a model by its test accuracy turns the test set into a validation set; the ledger
keeps every look at it, with the time, so a report can show that it was looked at once.

One look under any timing: a look holds the run folder's lock (``records/runrecord.py``: an exclusive ``flock``,
released by the kernel if the process dies) from the check for an earlier look until its result and ledger line are
written, so a second ``test`` started meanwhile is refused instead of looking too, and so is a trainer resuming the
run. A run that has not ended (running, died, interrupted, failed) is refused unless asked (``--unfinished``): its
``best.pt`` is that moment's, and after the run finished the one look would already be spent.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import load
from ..errors import Expected
from ..files import atomic_write_text
from ..input import build_loader, eval_data
from ..records.records import append_jsonl, now, read_run_info, run_status, update_run_info
from ..records.rundir import RunDir
from ..records.runrecord import RunRecord
from ..records.stats import wilson
from . import checkpoint as ckpt
from .budgets import budget_for_test
from .evaluate import evaluate
from .model import for_evaluation
from .runtime import setup_runtime
from .spec import spec_from_dict

CHECKPOINTS = ("best", "last", "ema")
FINAL = ("finished", "stopped", "diverged")  # a run in one of these states will not change its weights any more


class TestRefused(Expected, RuntimeError):
    """A look at the test set that would not be the one look: another is in progress, or the run has not ended."""


class AlreadyTested(Expected, RuntimeError):
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
        raise TestRefused(f"{run_dir.path}: this run has no EMA weights (optim.ema was 0); use --checkpoint best or last")
    return {k.removeprefix("module."): v for k, v in state["ema"].items()}, "ema", state["epoch"], state


def evaluate_test_set(run_dir: str | Path, which: str = "best", again: bool = False, unfinished: bool = False) -> dict:
    run_dir = RunDir(run_dir)
    if which not in CHECKPOINTS:
        raise TestRefused(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    with RunRecord.reopen(run_dir.path, "test", owns_status=False):
        result_path = run_dir / RunDir.TEST
        if result_path.is_file() and not again:
            raise AlreadyTested(json.loads(result_path.read_text()))
        status = run_status(read_run_info(run_dir))
        if status not in FINAL and not unfinished:
            # Never advise a second trainer on a live run: a running one finishes by itself.
            finish = ("Wait for it to finish" if status == "running" else
                      f"Finish it first (mame-fast train --resume {run_dir.path})")
            raise TestRefused(
                f"{run_dir.path} is {status}: its {RunDir.BEST} is that moment's, not the run's, and the one look at the "
                f"test set would be spent on it. {finish}, or pass --unfinished to test it as it is (recorded).")
        return _look(run_dir, which, again, status)


def _look(run_dir: RunDir, which: str, again: bool, status: str) -> dict:
    """Evaluate the test split with the weights ``which`` names; write test.json, the ledger line and run.json."""
    cfg = load(run_dir / RunDir.CONFIG)
    weights, kind, epoch, state = weights_to_test(run_dir, which)
    spec = spec_from_dict(state["spec"])
    # The one place that decides device and precision: the run's own precision, as in its validation (an fp16
    # run tested on a machine without a GPU is evaluated in fp32: evaluation needs no GradScaler).
    rt = setup_runtime(cfg.precision, training=False)
    model = for_evaluation(spec, weights, rt.device, cfg.data.channels_last)
    budget = budget_for_test(run_dir.path, cfg)  # where `evaluate` chose it on validation, that budget
    key = cfg.data.budget_key
    loader = build_loader(eval_data(cfg.data, **{key: budget[key]}), "test", False, cfg.seed, device=rt.device,
                          dtype=rt.dtype)
    try:
        m = evaluate(model, loader, rt, spec.num_classes)
    finally:
        loader.close()
    lo, hi = wilson(m["top1"], m["count"])
    result = {"time": now(), "checkpoint": which, "weights": kind, "epoch": epoch, "run_status": status, "budget": budget,
              "val_top1": state.get("top1") if which == "best" else None,  # what these weights scored on validation
              "classes": state["classes"], **m, "top1_interval": [lo, hi]}
    atomic_write_text(run_dir / RunDir.TEST, json.dumps(result, indent=1))
    append_jsonl(run_dir.ledger, {"run": run_dir.path.name, "time": result["time"], "checkpoint": which, "weights": kind,
                                  "epoch": epoch, "top1": m["top1"], "top1_interval": [lo, hi], "count": m["count"],
                                  "balanced_acc": m["balanced_acc"], "again": again, "run_status": status,
                                  "budget": {key: budget[key]}})
    update_run_info(run_dir, {"test_top1": m["top1"], "test_count": m["count"], "test_time": result["time"]})
    return result
