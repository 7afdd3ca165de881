"""The epoch plan (pure numpy): each sample once per epoch across ranks, in a small fixed set of batch shapes,
order and augmentation a function of (seed, epoch), buckets that fit the real MAMe aspect ratios."""

from __future__ import annotations

import numpy as np
import pytest

from mame_fast.data import metadata as md
from mame_fast.input import plan as pl


def _real(split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in md.load_dir().rows if r.subset == split]
    return np.array([r.height for r in rows], float), np.array([r.width for r in rows], float)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_every_sample_once_per_epoch_in_a_fixed_set_of_shapes(world, train):
    """Each sample exactly once per epoch over all ranks, the same step count on every rank, and every batch
    of every epoch and rank in the shape set known before step 0 (``batch_shapes``), which is the same in
    every epoch: fillers complete the short batches, and they are never counted as samples."""
    rng = np.random.default_rng(0)
    n = 1001  # not a multiple of anything
    h, w = rng.integers(100, 1000, n), rng.integers(100, 1000, n)
    cfg = pl.PlanConfig(train=train, batch_size=16, buckets=pl.make_buckets(20_000, 12, multiple=16))
    known = set(pl.batch_shapes(h, w, cfg))
    assert 1 < len(known) <= 12
    splits = 0
    for epoch in range(3):
        per_rank = [pl.epoch_plan(h, w, cfg, seed=0, epoch=epoch, rank=r, world=world) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same number of steps on every rank
        seen = np.concatenate([b.samples for p in per_rank for b in p])
        assert len(seen) == n and len(np.unique(seen)) == n
        shapes = set()
        for p in per_rank:
            for b in p:
                assert len({int(k) for k in pl.assign(h[b.samples], w[b.samples], cfg.buckets)}) == 1  # one bucket
                assert len(b.index) == 16 and 1 <= b.real <= 16
                assert set(b.index[b.real :]) <= set(b.samples)  # fillers are copies of the batch's own samples
                f = b.index[b.real :]
                src = np.array([np.flatnonzero(b.index == i)[0] for i in f], int)
                assert np.array_equal(b.x[b.real :], b.x[src]) and np.array_equal(b.flip[b.real :], b.flip[src])
                shapes.add((len(b.index), b.height, b.width))
                splits += b.real < 8  # halves of a batch split for the world size
            assert {(len(b.index), b.height, b.width) for b in p} <= known  # bounded on every rank
        assert shapes == known  # and the same set in every epoch
    if world == 3:
        assert splits  # the split-for-world branch was reached


def test_order_changes_per_epoch_and_repeats_per_seed():
    rng = np.random.default_rng(0)
    h, w = rng.integers(100, 1000, 500), rng.integers(100, 1000, 500)
    cfg = pl.PlanConfig(train=True, batch_size=16, buckets=pl.make_buckets(20_000, 12))
    order = lambda seed, epoch: np.concatenate([b.index for b in pl.epoch_plan(h, w, cfg, seed, epoch)])  # noqa: E731
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert np.array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 1), order(1, 1))
    a, b = pl.epoch_plan(h, w, cfg, 0, 0), pl.epoch_plan(h, w, cfg, 0, 0)
    assert all(np.array_equal(x.x, y.x) and np.array_equal(x.flip, y.flip) for x, y in zip(a, b))


def test_bucketing_padding_on_real_mame_aspects():
    rows = md.load_dir().rows
    h = np.array([r.height for r in rows], float)
    w = np.array([r.width for r in rows], float)
    b = pl.make_buckets(360_000, 20)
    assert pl.padding_fraction(h, w, b).mean() <= 0.05
    assert (b.h % 32 == 0).all() and (b.w % 32 == 0).all()  # no ragged border at a total stride of 32
    assert abs(b.aspect.min() - 0.25) < 0.015 and abs(b.aspect.max() - 4.0) < 0.25  # up to rounding to 32 px
    assert ((b.h * b.w) / 360_000 > 0.95).all() and ((b.h * b.w) / 360_000 < 1.05).all()
    extreme = ((w / h) < b.aspect.min()) | ((w / h) > b.aspect.max())
    assert extreme.mean() < 0.01  # only these need a crop to fit a bucket




def test_real_mame_shapes_and_fillers():
    """On the real train split at the defaults (360 kpx, 20 buckets, batches of 32): 17 distinct batch shapes,
    and fillers are under 2% of an epoch's rows (1.3% measured) on 1 or 2 ranks."""
    h, w = _real("train")
    cfg = pl.PlanConfig(train=True, batch_size=32, buckets=pl.make_buckets(360_000, 20))
    shapes = pl.batch_shapes(h, w, cfg)
    assert len(shapes) == 17 and len(set(shapes)) == 17 and all(n == 32 for n, _, _ in shapes)
    assert 0.005 < pl.filler_fraction(h, w, cfg) < 0.02 and pl.filler_fraction(h, w, cfg, world=2) < 0.02


@pytest.mark.parametrize("flip", [True, False])
def test_training_flips_half_the_samples_when_asked(flip):
    """The plan flips about half of the training samples (and never in evaluation, or with flip off); the crops
    do not depend on the flip setting, so a loader's flipped image is the mirror of the unflipped one."""
    rng = np.random.default_rng(1)
    h, w = rng.integers(100, 1000, 800), rng.integers(100, 1000, 800)
    b = pl.make_buckets(20_000, 8, multiple=16)
    on = pl.epoch_plan(h, w, pl.PlanConfig(train=True, batch_size=16, buckets=b, flip=flip), 0, 0)
    off = pl.epoch_plan(h, w, pl.PlanConfig(train=True, batch_size=16, buckets=b, flip=False), 0, 0)
    share = np.mean(np.concatenate([p.flip[: p.real] for p in on]))
    assert (0.4 < share < 0.6) if flip else share == 0
    for a, c in zip(on, off):
        assert np.array_equal(a.index, c.index) and np.array_equal(a.x, c.x) and np.array_equal(a.cw, c.cw)
    ev = pl.epoch_plan(h, w, pl.PlanConfig(train=False, batch_size=16, buckets=b, flip=True), 0, 0)
    assert not any(p.flip.any() for p in ev)
