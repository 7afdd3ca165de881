"""Stage 2a: what each rank reads in each epoch, in which batch shape, with which crop. Pure numpy.

Both loaders (DALI and the PIL fallback) execute the same plan, so they have the same semantics by
construction, and everything random is a function of ``(seed, epoch)``:

- **Buckets** (``--res full``): K aspect ratios between 1:4 and 4:1 placed at quantiles of the real
  MAMe aspect-ratio distribution (widened towards the tails), each a (H, W) of about ``pixels`` pixels. An image goes to the
  bucket where fitting it wastes the fewest pixels. On the real ``MAMe_dataset.csv`` with 20 buckets
  the evaluation padding is 2.5% of the pixels (random batches of 32 padded to their largest image,
  as the official baselines do, waste 56%). ``--res 256`` is the one bucket (S, S).
- **Crops never deform**: the source rectangle always has the aspect ratio of the output rectangle.
  Training: a random crop of area fraction ``scale`` in [scale_min, 1] of the largest rectangle with
  the bucket's aspect ratio, so a training batch has *no* padding (the crop absorbs the small aspect
  difference). Evaluation: the whole image fitted into the bucket (``full``; padding right/bottom,
  valid size reported) or the centre crop of ``crop_fraction`` of the short side (``256``). Images more
  extreme than the outermost buckets (~0.5% of MAMe) get an aspect-preserving centre crop to them.
- **Exact epochs across ranks**: each bucket's samples are shuffled and cut into batches, the batches
  shuffled; if the batch count is not a multiple of the world size, the batches with the most samples
  are split in two until it is. Ranks deal batches round-robin. So every sample appears exactly once
  per epoch across all ranks, every rank has the same number of steps, and nothing is dropped.
- **A small, fixed set of batch shapes** (``batch_shapes``): every batch has exactly ``batch_size`` rows.
  A batch with fewer samples (the last of a bucket, the halves of a split) is completed with *fillers*:
  copies of its own samples, with the same crops, that come after its ``real`` rows and carry no weight
  (the loss, the accuracy and the metrics use the first ``real`` rows only). The shapes of an epoch are
  then one (batch_size, H, W) per non-empty bucket, known before step 0, the same in every epoch and on
  every rank: cuDNN autotuning and CUDA graphs pay once per shape, not once per step. The price is the
  fillers' compute: on the real MAMe train split with 20 buckets and batches of 32, 1.8% of the rows
  (``filler_fraction``). BatchNorm's batch statistics see the fillers (copies of real samples).
- Bucket sides are multiples of ``multiple`` (default 32, the model's total stride), so that no stage of
  the network has a ragged border.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Buckets:
    """Batch shapes: heights and widths (pixels) of each bucket, sorted by aspect ratio (w/h)."""

    h: np.ndarray
    w: np.ndarray

    @property
    def aspect(self) -> np.ndarray:
        return self.w / self.h

    def __len__(self) -> int:
        return len(self.h)


def real_aspects() -> np.ndarray:
    """Aspect ratios (w/h) of the real MAMe training images, from the vendored metadata."""
    return _real_aspects().copy()


@lru_cache(maxsize=1)
def _real_aspects() -> np.ndarray:
    from ..data import metadata as md

    return np.array([r.aspect for r in md.load_dir().rows if r.subset == "train"])


def make_buckets(pixels: int, n: int, lo: float = 0.25, hi: float = 4.0, multiple: int = 32,
                 aspects: np.ndarray | None = None, spread: float = 0.3) -> Buckets:
    """Up to ``n`` bucket shapes of ~``pixels`` px (sides multiples of ``multiple``) between ``lo`` and ``hi``.

    Aspect ratios sit at quantiles of ``aspects`` (default: real MAMe train) mixed with ``spread`` as
    much log-uniform mass: pure quantiles crowd the buckets around 0.7-1.3 and leave the tails to the
    1:4 and 4:1 extremes (37% worst-case padding on MAMe; 28% with the mix, mean 3.3% -> 2.5%). Each
    side is rounded down or up to a multiple, whichever pair keeps area and aspect closest; buckets
    that round to the same shape are merged (small budgets), so every shape is distinct.
    """
    la = np.log(np.clip(real_aspects() if aspects is None else np.asarray(aspects, float), lo, hi))
    la = np.concatenate([la, np.linspace(np.log(lo), np.log(hi), int(spread * len(la)))])
    q = np.quantile(la, (np.arange(n) + 0.5) / n)
    q[0], q[-1] = min(q[0], np.log(lo)), max(q[-1], np.log(hi))
    ar = np.unique(np.exp(q))
    h0, w0 = np.sqrt(pixels / ar) / multiple, np.sqrt(pixels * ar) / multiple
    # The four floor/ceil pairs per aspect; keep the one with the least squared log error of area and aspect.
    hs = np.maximum(1, np.stack([np.floor(h0), np.floor(h0), np.ceil(h0), np.ceil(h0)], 1)) * multiple
    ws = np.maximum(1, np.stack([np.floor(w0), np.ceil(w0), np.floor(w0), np.ceil(w0)], 1)) * multiple
    err = np.log(hs * ws / pixels) ** 2 + np.log(ws / hs / ar[:, None]) ** 2
    pick = np.argmin(err, 1)
    h, w = hs[np.arange(len(ar)), pick].astype(int), ws[np.arange(len(ar)), pick].astype(int)
    shapes = sorted({(int(a), int(b)) for a, b in zip(h, w)}, key=lambda s: s[1] / s[0])
    return Buckets(h=np.array([s[0] for s in shapes]), w=np.array([s[1] for s in shapes]))


def square_bucket(size: int) -> Buckets:
    return Buckets(h=np.array([size]), w=np.array([size]))


def fit(img_h: np.ndarray, img_w: np.ndarray, box_h: np.ndarray, box_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest (h, w) with the image's aspect ratio inside the box (floored, at least 1 px)."""
    s = np.minimum(box_h / img_h, box_w / img_w)
    return np.maximum(1, np.floor(img_h * s + 1e-6)).astype(int), np.maximum(1, np.floor(img_w * s + 1e-6)).astype(int)


def assign(h: np.ndarray, w: np.ndarray, b: Buckets) -> np.ndarray:
    """Bucket index per image: the one whose box the image (clipped to the bucket range) fills best."""
    a = np.clip(w / h, b.aspect.min(), b.aspect.max())
    # Fill fraction of bucket k for aspect a: min(a/ak, ak/a); maximize it.
    ratio = a[:, None] / b.aspect[None, :]
    return np.argmax(np.minimum(ratio, 1 / ratio), axis=1)


def padding_fraction(h: np.ndarray, w: np.ndarray, b: Buckets) -> np.ndarray:
    """Per image, the padded share of its bucket when the whole image is fitted (evaluation mode)."""
    k = assign(h, w, b)
    a = np.clip(w / h, b.aspect.min(), b.aspect.max())  # beyond the range: centre-cropped first
    ch, cw = _crop_to_aspect(h.astype(float), w.astype(float), a)
    fh, fw = fit(ch, cw, b.h[k], b.w[k])
    return 1 - fh * fw / (b.h[k] * b.w[k])


def _crop_to_aspect(h: np.ndarray, w: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest (h, w) region of aspect ``a`` inside an h x w image."""
    return np.minimum(h, w / a), np.minimum(w, h * a)


@dataclass
class BatchPlan:
    """One batch: which samples, and for each the source rectangle, output size and flip.

    Every array has one entry per row; the first ``real`` rows are the batch's samples, the rest are
    fillers (copies of them, with the same crops) that make the batch ``batch_size`` rows long."""

    index: np.ndarray  # (n,) int64 sample index in the split
    x: np.ndarray  # (n,) source rectangle, stored-image pixels (float32)
    y: np.ndarray
    cw: np.ndarray  # crop width / height in source pixels
    ch: np.ndarray
    out_h: np.ndarray  # (n,) int32 resized size; <= bucket, the rest is padding
    out_w: np.ndarray
    flip: np.ndarray  # (n,) int32
    color: np.ndarray  # (n, 3) float32 brightness, contrast, saturation factors (1 = off)
    height: int  # bucket
    width: int
    real: int  # rows [0, real) are samples of the epoch; rows [real, n) are weightless fillers

    @property
    def padded(self) -> bool:
        """Some image is smaller than the bucket, so the batch carries padding."""
        return bool((self.out_h < self.height).any() or (self.out_w < self.width).any())

    @property
    def samples(self) -> np.ndarray:
        """The indices of the batch's own samples (fillers left out)."""
        return self.index[: self.real]


@dataclass(frozen=True)
class PlanConfig:
    train: bool
    batch_size: int
    buckets: Buckets
    scale_min: float = 0.35
    flip: bool = True
    crop_fraction: float = 0.875  # eval centre crop in 256 mode (224 of 256)
    color_jitter: float = 0.0
    fixed: bool = False  # one square bucket (256 mode): eval takes a centre crop instead of fitting


def epoch_plan(h: np.ndarray, w: np.ndarray, cfg: PlanConfig, seed: int, epoch: int, rank: int = 0,
               world: int = 1) -> list[BatchPlan]:
    """This rank's batches for ``epoch`` over a split whose stored sizes are (h, w)."""
    n = len(h)
    if n < world:
        raise ValueError(f"{n} samples cannot be split over {world} ranks")
    b = cfg.buckets
    k = assign(h, w, b) if len(b) > 1 else np.zeros(n, int)
    rng = np.random.default_rng([seed, epoch, 0 if cfg.train else 1])
    chunks: list[np.ndarray] = []
    for bk in range(len(b)):
        members = np.flatnonzero(k == bk)
        if cfg.train:
            members = rng.permutation(members)
        chunks += [members[i : i + cfg.batch_size] for i in range(0, len(members), cfg.batch_size)]
    if cfg.train:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    while len(chunks) % world:
        j = int(np.argmax([len(c) for c in chunks]))
        if len(chunks[j]) < 2:
            raise ValueError(f"{n} samples in batches of {cfg.batch_size} cannot be dealt evenly over {world} ranks; "
                             f"use a batch size of at least 2")
        c = chunks.pop(j)
        chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 :]]
    # Per-sample random draws for the whole split at once (vectorized, independent of the deal).
    u = rng.random((n, 4))
    jitter = rng.uniform(1 - cfg.color_jitter, 1 + cfg.color_jitter, (n, 3)) if cfg.color_jitter else np.ones((n, 3))
    # Fillers: the batch's own samples again (np.resize repeats them), so every batch has batch_size rows.
    return [_batch(np.resize(c, cfg.batch_size), len(c), k[c[0]], h, w, cfg, u, jitter) for c in chunks[rank::world]]


def batch_shapes(h: np.ndarray, w: np.ndarray, cfg: PlanConfig) -> list[tuple[int, int, int]]:
    """Every batch shape (rows, H, W) that ``epoch_plan`` gives for a split of stored sizes (h, w), in any
    epoch and on any rank: one per bucket that has samples."""
    b = cfg.buckets
    used = np.unique(assign(h, w, b)) if len(b) > 1 else [0]
    return [(cfg.batch_size, int(b.h[k]), int(b.w[k])) for k in used]


def filler_fraction(h: np.ndarray, w: np.ndarray, cfg: PlanConfig, world: int = 1) -> float:
    """Share of the rows of an epoch that are fillers (compute spent on weightless copies)."""
    plans = [epoch_plan(h, w, cfg, 0, 0, r, world) for r in range(world)]
    rows = sum(len(p.index) for rp in plans for p in rp)
    return 1 - len(h) / rows


class EpochPlans:
    """``epoch -> epoch_plan(...)`` for one rank, computed on demand, with one plan config or the epoch's (a pixel-budget
    schedule). Keeps the last two epochs: the DALI feed reads the next epoch's plan while the current one is still
    being consumed."""

    def __init__(self, h: np.ndarray, w: np.ndarray, cfg: PlanConfig | Callable[[int], PlanConfig], seed: int, rank: int = 0,
                 world: int = 1):
        self.h, self.w, self.cfg, self.seed, self.rank, self.world = h, w, cfg, seed, rank, world
        self._cache: dict[int, list[BatchPlan]] = {}

    def __call__(self, epoch: int) -> list[BatchPlan]:
        if epoch not in self._cache:
            keep = {e: p for e, p in self._cache.items() if e == epoch - 1}
            cfg = self.cfg if isinstance(self.cfg, PlanConfig) else self.cfg(epoch)  # a budget schedule: the epoch's
            self._cache = {**keep, epoch: epoch_plan(self.h, self.w, cfg, self.seed, epoch, self.rank, self.world)}
        return self._cache[epoch]


def _batch(idx: np.ndarray, real: int, bk: int, h: np.ndarray, w: np.ndarray, cfg: PlanConfig, u: np.ndarray,
           jitter: np.ndarray) -> BatchPlan:
    b = cfg.buckets
    H, W = int(b.h[bk]), int(b.w[bk])
    ih, iw = h[idx].astype(float), w[idx].astype(float)
    if cfg.train:
        # Largest region with the bucket's aspect, then a random sub-region of area fraction s.
        ch, cw = _crop_to_aspect(ih, iw, np.full(len(idx), W / H))
        s = np.sqrt(cfg.scale_min + (1 - cfg.scale_min) * u[idx, 0])
        ch, cw = ch * s, cw * s
        x, y = (iw - cw) * u[idx, 1], (ih - ch) * u[idx, 2]
        oh, ow = np.full(len(idx), H), np.full(len(idx), W)
        flip = (u[idx, 3] < 0.5) & cfg.flip
    else:
        if cfg.fixed:
            side = np.minimum(ih, iw) * cfg.crop_fraction
            ch, cw = side, side
        else:
            ch, cw = _crop_to_aspect(ih, iw, np.clip(iw / ih, b.aspect.min(), b.aspect.max()))
        x, y = (iw - cw) / 2, (ih - ch) / 2
        oh, ow = fit(ch, cw, np.full(len(idx), H), np.full(len(idx), W))
        flip = np.zeros(len(idx), bool)
    return BatchPlan(
        index=idx.astype(np.int64), x=x.astype(np.float32), y=y.astype(np.float32), cw=cw.astype(np.float32),
        ch=ch.astype(np.float32), out_h=oh.astype(np.int32), out_w=ow.astype(np.int32), flip=flip.astype(np.int32),
        color=(jitter[idx] if cfg.train else np.ones((len(idx), 3))).astype(np.float32), height=H, width=W, real=real,
    )
