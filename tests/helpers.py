"""Shared by the tests: a training config for the tiny shards, small enough to run in seconds on 2 cores, the environment
of a `mame-fast` child process, and a record of the operations a block of code dispatches."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from mame_fast.config import TrainConfig, load


def cfg_for(shards: Path, out: Path, **kw) -> TrainConfig:
    sets = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "log_every=2", "hist_epochs=2", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01",
            "evidence=false"]  # the pictures have tests of their own; in every other run they would cost seconds
    sets += [f"{k}={v}" for k, v in kw.items()]
    return load(None, sets)


def cli_env() -> dict:
    """The environment of a `mame-fast` child process: this checkout first, one OpenMP thread (as a pytest worker)."""
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")


class Dispatched(TorchDispatchMode):
    """The names of the operations dispatched inside (``aten.clone``, ``aten._local_scalar_dense``, ...), in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
