"""Checkpoints: every stateful part of a run, written atomically (temp file, fsync, rename).

A checkpoint holds the model, optimizer, scheduler, grad scaler, EMA, the RNG states (Python, NumPy,
torch CPU and CUDA) and the loader position (epoch, step within it). The loader needs nothing else:
its order and augmentation are functions of (seed, epoch), so resuming at (epoch, step) replays the
exact batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


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


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    return torch.load(path, map_location=device, weights_only=False)
