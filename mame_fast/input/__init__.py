"""Stage 2: shards -> batches: the epoch plan, random access to a split, and the loaders (DALI and the PIL
fallback, peers under one contract in ``loader``)."""

from __future__ import annotations

import torch

from ..config import DataConfig
from .dali import DaliLoader, dali_available, dali_missing
from .fallback import PilLoader
from .loader import Batch, Loader, LoaderError, budget_at, eval_data, ramp_levels, validation_data
from .reader import open_split

__all__ = ["Batch", "Loader", "LoaderError", "budget_at", "build_loader", "choose_loader", "dali_available", "eval_data",
           "ramp_levels", "validation_data"]


def build_loader(cfg: DataConfig, split_name: str, train: bool, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Loader:
    """The loader the config asks for (``auto``: DALI when installed, else the PIL fallback)."""
    device = device or torch.device("cpu")
    split = open_split(cfg.shards, split_name, cfg.res)
    kind, why = choose_loader(cfg.loader)
    loader = (DaliLoader if kind == "dali" else PilLoader)(split, cfg, train, seed, rank, world, device, dtype)
    loader.why = why
    return loader


def choose_loader(request: str) -> tuple[str, str]:
    """('dali' or 'pil', why): what ``data.loader`` asks for, 'auto' deciding by whether DALI imports here."""
    if request == "pil":
        return "pil", "as asked (data.loader=pil)"
    missing = dali_missing()
    if request == "dali":
        if missing:
            raise LoaderError(f"data.loader=dali, but {missing}; or use data.loader=pil (or auto)")
        return "dali", "as asked (data.loader=dali)"
    if missing:
        return "pil", f"auto: the fallback, as {missing}"
    return "dali", "auto: NVIDIA DALI is installed"
