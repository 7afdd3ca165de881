"""Stage 2f: batch-level augmentation: mixup and CutMix, and the random draw each training step makes for them.

The training step applies them on the device (``train/step.py``); the preview of what the network is fed
(``records/evidence.py``) applies the very same draw, so the picture shows what the step received. The draw is a pure
function of (seed, epoch, step, rank): nothing to checkpoint, and a resumed run draws what it would have drawn.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import OptimConfig


def step_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    """The generator of a training step's mixup/CutMix draw (step counted within the epoch)."""
    return np.random.default_rng([seed, epoch, step, rank])


def soft_targets(y: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    # scatter_, not F.one_hot: one_hot may check the labels' range on the host, a sync in the step.
    onehot = torch.zeros(len(y), n, device=y.device).scatter_(1, y.view(-1, 1), 1.0)
    return onehot * (1 - smoothing) + smoothing / n


def mix(x: torch.Tensor, t: torch.Tensor, cfg: OptimConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix with the batch reversed as partner; training batches are never padded."""
    if not (cfg.mixup or cfg.cutmix):
        return x, t
    use_cut = bool(cfg.cutmix) and (not cfg.mixup or rng.random() < 0.5)
    lam = float(rng.beta(cfg.cutmix, cfg.cutmix) if use_cut else rng.beta(cfg.mixup, cfg.mixup))
    if use_cut:
        H, W = x.shape[2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        x = x.clone()
        x[:, :, y0 : y0 + ch, x0 : x0 + cw] = x.flip(0)[:, :, y0 : y0 + ch, x0 : x0 + cw]
        lam = 1 - ch * cw / (H * W)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, t * lam + t.flip(0) * (1 - lam)
