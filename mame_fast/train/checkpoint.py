"""Stage 4d: checkpoints: every stateful part of a run in one file, written atomically (temp file, fsync, rename).

``TrainState`` holds the model, optimizer, grad scaler, EMA, the epoch's running sums, the position (epoch and
step within it, global step), the best validation result so far, and the RNG states of every rank, with one
symmetric ``snapshot`` / ``restore`` pair. The loader needs nothing else: its order and
augmentation are functions of (seed, epoch), so resuming at (epoch, step) replays the exact batches an
uninterrupted run would have seen; the learning rate is a function of the global step (``step.make_schedule``).

``last.pt`` is resumable; ``best.pt`` holds exactly the weights that won validation (the model's or the
EMA's), with which and at which epoch, for the one look at the test set.
"""

from __future__ import annotations

import copy as _copy
import io
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import Expected
from ..files import atomic_write


class CheckpointError(Expected, RuntimeError):
    """A checkpoint that is missing or unreadable; the message names it and what to do."""


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class TrainState:
    """Everything a resume needs (see the module docstring). ``snapshot`` / ``restore`` are the one pair that reads
    and sets it all: a checkpoint is a snapshot written to disk, and the range test takes one in memory and restores
    it afterwards, so that nothing it learned leaks into a run."""

    def __init__(self, model: torch.nn.Module, opt, scaler, ema, meter):
        self.model, self.opt, self.scaler, self.ema, self.meter = model, opt, scaler, ema, meter
        self.epoch = self.step = self.global_step = 0  # epoch and step within it: where the next batch comes from
        self.best = {"top1": -1.0, "weights": None, "epoch": 0}  # the validation winner so far

    def snapshot(self, rngs: list[dict] | None = None, copy: bool = False) -> dict:
        """Every stateful part. ``rngs``: the RNG state of every rank, in rank order (each rank draws its own dropout
        masks); by default this process's. ``copy``: detached from the live tensors (an in-memory snapshot that later
        steps do not change); a checkpoint is serialized at once and needs no copy."""
        state = {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None, "meter": self.meter.state_dict(),
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step, "best": dict(self.best),
            "rng": rngs if rngs is not None else [rng_state()],
        }
        return _copy.deepcopy(state) if copy else state

    def restore(self, d: dict, rank: int = 0) -> None:
        """Set every part from a snapshot (rank ``rank``'s RNG); gradients are cleared, as after a step."""
        self.model.load_state_dict(d["model"])
        self.opt.load_state_dict(d["optimizer"])
        self.scaler.load_state_dict(d["scaler"])
        if self.ema is not None:
            if d["ema"] is None:
                raise CheckpointError("this checkpoint has no EMA weights (optim.ema was 0); resume without setting optim.ema")
            self.ema.load_state_dict(d["ema"])
        self.meter.load_state_dict(d["meter"])
        self.epoch, self.step, self.global_step, self.best = d["epoch"], d["step"], d["global_step"], dict(d["best"])
        set_rng_state(d["rng"][rank])
        for p in self.model.parameters():
            p.grad = None


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old file or the new one, never half. Serialized in
    memory first: torch.save straight into a file reports a full disk as an obscure RuntimeError, the plain write as
    the OSError it is (one copy of the checkpoint in memory for a moment)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (the run stopped before its first one was written); "
                              f"start the run again instead of resuming it")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
