"""Stage 2c': the fallback loader: PIL decode + torch DataLoader, executing the same plan as DALI.

For machines without DALI (macOS, ARM) or on request (``data.loader=pil``), and the baseline in
``benchmarks/loader_throughput.py``. Same plan (order, buckets, crops, flips), same normalization and
padding, so the training semantics do not depend on the loader; pixels differ only by resampling
details (PIL's antialiased bilinear vs DALI's). A DataLoader item is a whole planned batch, so the
batch shape comes from the plan, not from collation.
"""

from __future__ import annotations

import io
import math
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .pipeline import MEAN, STD, Batch, Loader, LoaderError, valid_mask
from .plan import BatchPlan
from .reader import Split


def decode_planned(data: bytes, x: float, y: float, cw: float, ch: float, ow: int, oh: int, flip: bool) -> np.ndarray:
    """One planned sample as uint8 HWC: crop (x, y, cw, ch) of the stored image, resized to (oh, ow)."""
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    scale = min(ow / cw, oh / ch)
    if scale < 0.5 and im.format == "JPEG":
        # DCT-domain downscaling (1/2, 1/4, 1/8) when the output is much smaller than the stored image.
        im.draft("RGB", (math.ceil(W * scale), math.ceil(H * scale)))
    r = W / im.size[0]
    im = im.convert("RGB")
    box = (x / r, y / r, (x + cw) / r, (y + ch) / r)
    im = im.resize((int(ow), int(oh)), Image.BILINEAR, box=box)  # crop + antialiased resize in one pass
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(im)  # writable copy: torch refuses read-only arrays


class _PlannedBatches(torch.utils.data.Dataset):
    def __init__(self, split: Split, plans: list[BatchPlan]):
        self.split, self.plans = split, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, j: int) -> torch.Tensor:
        p = self.plans[j]
        out = torch.zeros((len(p.index), p.height, p.width, 3), dtype=torch.uint8)
        for k, i in enumerate(p.index):
            try:
                a = decode_planned(bytes(self.split.jpeg(int(i))), p.x[k], p.y[k], p.cw[k], p.ch[k], p.out_w[k], p.out_h[k], bool(p.flip[k]))
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for unreadable or damaged images
                tar = self.split.tars[int(self.split.shard[i])]
                raise LoaderError(f"{tar}: sample {self.split.keys[i]} cannot be decoded ({e}). "
                                  f"Check the shards with `mame-fast shard {self.split.folder} --verify`.") from e
            out[k, : a.shape[0], : a.shape[1]] = torch.from_numpy(a)
        return out  # uint8: a quarter of the bytes of float32 to move between processes and to the device


class PilLoader(Loader):
    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plans = self.plan(epoch)[start_step:]
        dl = torch.utils.data.DataLoader(
            _PlannedBatches(self.split, plans), batch_size=None, shuffle=False, num_workers=self.threads,
            pin_memory=self.device.type == "cuda", prefetch_factor=self.cfg.prefetch if self.threads else None,
        )
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        for p, raw in zip(plans, dl):
            x = raw.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            x = (x - mean) / std
            if p.padded:
                x = x * valid_mask(p, self.device)  # padding is exactly 0, as in DALI's output
            yield self._finish(x, p)
