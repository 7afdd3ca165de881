"""Stage 5b: the test set, once. ``mame-fast test RUN`` evaluates the test split with one checkpoint,
writes ``test.json`` into the run folder and a line into ``<runs>/test_ledger.jsonl``, and refuses a
second evaluation of the same run unless asked (``--again``), showing the earlier result.

Why a ledger: choosing a model by its test accuracy turns the test set into a validation set; the
ledger keeps every look at it, with the time, so a report can show that it was looked at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import load
from .model import ModelSpec, build, merge_stages
from .pipeline import build_loader
from .records import update_run_info
from .train import Runtime, evaluate


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
    spec_d = dict(state["spec"])
    stages = spec_d.pop("stages")
    spec = merge_stages(dataclasses.replace(ModelSpec(), **spec_d), stages)
    model = build(spec)
    if which == "ema":
        if not state.get("ema"):
            raise ValueError(f"{run_dir}: this run has no EMA weights (optim.ema was 0)")
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()})
    else:
        model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rt = Runtime(0, 1, 0, device, torch.bfloat16 if device.type == "cuda" else None, torch.amp.GradScaler(device.type, enabled=False), True)
    loader = build_loader(dataclasses.replace(cfg.data, channels_last=False), "test", False, cfg.seed, device=device)
    m = evaluate(model, loader, rt, spec.num_classes)
    result = {"time": dt.datetime.now().isoformat(timespec="seconds"), "checkpoint": which, "epoch": state["epoch"],
              "classes": state["classes"], **m}
    tmp = result_path.with_name(".test.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    with open(run_dir.parent / "test_ledger.jsonl", "a") as f:
        f.write(json.dumps({"run": run_dir.name, "time": result["time"], "checkpoint": which, "top1": m["top1"],
                            "balanced_acc": m["balanced_acc"], "again": again}) + "\n")
    update_run_info(run_dir, {"test_top1": m["top1"], "test_time": result["time"]})
    return result
