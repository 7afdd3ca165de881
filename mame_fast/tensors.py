"""Tensor helpers every stage shares: the normalization constants and the mask of a padded batch's real pixels.

They sit below the stages so that the model (``train/model.py``) and the pictures (``records/evidence.py``) use the
loader's exact conventions without importing a loader (and with it DALI or the worker pool).
"""

from __future__ import annotations

import torch

# Normalization constants in 0-255 units (generic photographic statistics, no pretrained weights involved).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def valid_mask(sizes: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, 1, h, w) mask of the real pixels of a batch whose images have valid sizes (n, 2), top-left aligned."""
    hh = torch.arange(h, device=sizes.device).view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)
    ww = torch.arange(w, device=sizes.device).view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    return (hh & ww).unsqueeze(1).to(dtype)
