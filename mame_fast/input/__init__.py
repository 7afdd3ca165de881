"""Stage 2: shards -> batches: the epoch plan, random access to a split, and the loaders (DALI and the PIL
fallback, peers under one contract in ``loader``)."""

from __future__ import annotations

import torch

from ..config import DataConfig
from .dali import DaliLoader, dali_available
from .fallback import PilLoader
from .loader import Batch, Loader, LoaderError
from .reader import open_split

__all__ = ["Batch", "Loader", "LoaderError", "build_loader", "dali_available"]


def build_loader(cfg: DataConfig, split_name: str, train: bool, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Loader:
    """The loader the config asks for (``auto``: DALI when installed, else the PIL fallback)."""
    device = device or torch.device("cpu")
    if cfg.prefetch < 1:
        raise ValueError(f"data.prefetch must be at least 1, got {cfg.prefetch}")
    split = open_split(cfg.shards, split_name, cfg.res)
    kind = cfg.loader
    if kind == "auto":
        kind = "dali" if dali_available() else "pil"
    if kind == "dali":
        if not dali_available():
            raise LoaderError("data.loader=dali but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); "
                              "use data.loader=pil")
        return DaliLoader(split, cfg, train, seed, rank, world, device, dtype)
    if kind == "pil":
        return PilLoader(split, cfg, train, seed, rank, world, device, dtype)
    raise ValueError(f"data.loader must be 'auto', 'dali' or 'pil', got {kind!r}")
