"""The loaders (reader, DALI in CPU-only mode, the PIL fallback): they execute one plan into normalized batches
of the planned shapes, never deform an image, restore exactly, and fail clearly on damaged shards."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mame_fast.config import DataConfig
from mame_fast.data import metadata as md
from mame_fast.data.shard import ShardError, ShardSettings, split_shards, write_shards
from mame_fast.input import LoaderError, build_loader, dali_available
from mame_fast.input.reader import open_split

from .helpers import cli_env

LOADERS = ["dali", "pil"] if dali_available() else ["pil"]
SMALL = dict(pixels=20_000, crop=64, batch_size=8, threads=1, side_multiple=8)  # fine steps for a tiny budget


def cfg_for(shards: Path, res: str, loader: str, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), res=res, loader=loader, **{**SMALL, **kw})


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("res", ["256", "full"])
@pytest.mark.parametrize("train", [True, False])
def test_batches_shapes_dtypes_labels(shards, mame_root, loader, res, train):
    cfg = cfg_for(shards, res, loader, channels_last=False)
    L = build_loader(cfg, "val", train=train, seed=0)
    meta = {r.file: md.load_dir(mame_root).label(r) for r in md.load_dir(mame_root).split("val")}
    seen = []
    for b in L.epoch(0):
        n, c, H, W = b.images.shape
        assert c == 3 and b.images.dtype == torch.float32 and b.labels.dtype == torch.int64
        if res == "256":
            assert (H, W) == (64, 64)
        else:
            assert abs(H * W - 20_000) < 0.1 * 20_000
        assert b.images.min() > -3.0 and b.images.max() < 3.0  # normalized
        for k, i in enumerate(b.index.tolist()):
            assert int(b.labels[k]) == meta[L.split.files[i]]  # label equals the metadata label of its key
            h, w = b.sizes[k].tolist()
            assert b.images[k, :, h:, :].abs().sum() == 0 and b.images[k, :, :, w:].abs().sum() == 0
            assert b.images[k, :, :h, :w].abs().sum() > 0
        seen += b.index.tolist()
    assert sorted(seen) == list(range(len(L.split)))


@pytest.mark.skipif("dali" not in LOADERS, reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("res", ["256", "full"])
@pytest.mark.parametrize("train", [True, False])
def test_fallback_gives_dalis_batches(shards, res, train):
    """The two loaders execute one plan: the same samples, sizes and padding in every batch, and pixels
    that differ only by resampling details (DCT-scaled and torch decodes both appear at 256)."""
    cfg = cfg_for(shards, res, "dali")
    dali = build_loader(cfg, "val", train, seed=4)
    pil = build_loader(dataclasses.replace(cfg, loader="pil"), "val", train, seed=4)
    for a, b in zip(dali.epoch(1), pil.epoch(1), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels) and torch.equal(a.sizes, b.sizes)
        assert a.images.shape == b.images.shape and a.images.is_contiguous(memory_format=torch.channels_last)
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert (a.images - b.images).abs().mean() < 0.1  # measured up to 0.05; a wrong flip gives 0.3


@pytest.mark.parametrize("size", [(1001, 800), (640, 480)])
@pytest.mark.parametrize("out", [(120, 96), (600, 480)])  # DCT-scaled (PIL draft) and full decodes
def test_fallback_decodes_crops_reaching_the_image_edge(size, out):
    """A crop whose far edge lies a float32 hair past the image, or past a draft image whose sides were
    rounded up by different ratios (1001 -> 126 but 800 -> 100 at 1/8), decodes to the planned size."""
    import io

    from mame_fast.input.fallback import decode_planned

    W, H = size
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(buf, "JPEG")
    x, cw = np.float32(0.3), np.float32(W - 0.3 + 1e-3)
    for flip in (False, True):
        img = decode_planned(buf.getvalue(), x, np.float32(0), cw, np.float32(H), out[0], out[1], flip)
        assert tuple(img.shape) == (out[1], out[0], 3) and img.dtype == torch.uint8


@pytest.mark.parametrize("loader", LOADERS)
def test_dtype_and_channels_last(shards, loader):
    cfg = cfg_for(shards, "256", loader, channels_last=True)
    b = next(build_loader(cfg, "val", train=True, seed=0, dtype=torch.bfloat16).epoch(0))
    assert b.images.dtype == torch.bfloat16 and b.images.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def disc_shards(tmp_path_factory, mame_root) -> Path:
    """Val images replaced by a black disc on white, at the images' real (varied) aspect ratios."""
    root = tmp_path_factory.mktemp("disc") / "root"
    shutil.copytree(mame_root, root)
    for r in md.load_dir(root).split("val"):
        img = Image.new("RGB", (r.width, r.height), (255, 255, 255))
        rad = 0.3 * min(r.width, r.height)
        cx, cy = r.width / 2, r.height / 2
        ImageDraw.Draw(img).ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(0, 0, 0))
        img.save(root / "data" / r.file, quality=95)
    return write_shards(root, root.parent / "shards", ShardSettings(max_pixels=None, max_side=400, splits=("val",)))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("res", ["256", "full"])
@pytest.mark.parametrize("train", [True, False])
def test_no_deformation(disc_shards, loader, res, train):
    """A drawn disc stays a disc (bounding box square to 1-2 px) through crop, resize and flip."""
    cfg = cfg_for(disc_shards, res, loader, pixels=40_000, crop=96, scale_min=1.0, channels_last=False)
    L = build_loader(cfg, "val", train=train, seed=3)
    checked = 0
    for b in L.epoch(0):
        for k in range(len(b.labels)):
            h, w = b.sizes[k].tolist()
            dark = (b.images[k, :, :h, :w].mean(0) < -1.0).numpy()  # black in normalized units
            ys, xs = np.nonzero(dark)
            if len(ys) < 50 or ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1:
                continue  # disc cut by a training crop at an extreme aspect ratio: not measurable
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            assert abs(bh - bw) <= max(2, 0.04 * bh), (bh, bw, h, w)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("loader", LOADERS)
def test_real_loaders_split_across_ranks(shards, loader):
    cfg = cfg_for(shards, "full", loader)
    seen = []
    for rank in range(3):
        L = build_loader(cfg, "train", train=True, seed=1, rank=rank, world=3)
        seen += [i for b in L.epoch(0) for i in b.index.tolist()]
    assert sorted(seen) == list(range(len(open_split(shards, "train"))))


@pytest.mark.parametrize("loader", LOADERS)
def test_restore_then_continue_gives_the_same_batches(shards, loader):
    cfg = cfg_for(shards, "full", loader, color_jitter=0.2)
    full = [(b.index.clone(), b.images.clone()) for b in build_loader(cfg, "train", True, seed=5).epoch(1)]
    k = len(full) // 2
    fresh = build_loader(cfg, "train", True, seed=5)  # as after a restart: a new loader object
    resumed = [(b.index, b.images) for b in fresh.epoch(1, start_step=k)]
    assert len(resumed) == len(full) - k
    for (i1, x1), (i2, x2) in zip(full[k:], resumed):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)


@pytest.mark.parametrize("loader", LOADERS)
def test_one_loader_over_epochs_equals_fresh_loaders(shards, loader):
    """Used as the trainer uses it (epochs in a row, one left early and resumed, one skipped), a loader
    gives the batches a new loader gives for each (epoch, step). The DALI loader keeps its pipeline, and the fallback its
    workers' iterator, which have already prefetched from the next epoch, only where that is what is asked for. Batches are kept
    without copies: none may be overwritten by later ones (DALI's output buffers are reused)."""
    cfg = cfg_for(shards, "full", loader)
    L = build_loader(cfg, "train", True, seed=3)
    got = {(0, i): b for i, b in enumerate(L.epoch(0))}
    pipe = getattr(L, "pipe", None)
    if loader == "pil":  # its workers went on into the next epoch, as DALI's pipeline does
        assert L._items[0] == (1, 0)
    for i, b in enumerate(L.epoch(1)):
        got[1, i] = b
        if i == 1:
            break  # left early, as on Ctrl-C or a step limit
    assert getattr(L, "pipe", None) is pipe  # the next epoch came from the same pipeline
    got |= {(1, i): b for i, b in enumerate(L.epoch(1, start_step=2), start=2)}
    got |= {(2, i): b for i, b in enumerate(L.epoch(2))}
    got |= {(4, i): b for i, b in enumerate(L.epoch(4))}
    for e in (0, 1, 2, 4):
        want = list(build_loader(cfg, "train", True, seed=3).epoch(e))
        assert len(want) == L.steps(e) == sum(k[0] == e for k in got)
        for i, b in enumerate(want):
            assert torch.equal(got[e, i].index, b.index) and torch.equal(got[e, i].images, b.images), (e, i)


def _loaders_to_prime(shards: Path) -> list[tuple[str, object]]:
    """Each loader as the trainer builds it, and each with its GPU path (run on the CPU) too."""
    from mame_fast.input.fallback import PilLoader

    cfg = cfg_for(shards, "full", LOADERS[0])
    out = [(kind, lambda kind=kind: build_loader(cfg_for(shards, "full", kind), "train", True, seed=3)) for kind in LOADERS]
    out.append(("pil-gpu-path", lambda: PilLoader(open_split(shards, "train"), cfg_for(shards, "full", "pil"), True, 3, 0, 1,
                                                  torch.device("cpu"), torch.float32, tail_on_cpu=False)))
    if "dali" in LOADERS:
        from mame_fast.input.dali import DaliLoader

        out.append(("dali-gpu-graph", lambda: DaliLoader(open_split(shards, "train"), cfg, True, 3, 0, 1, torch.device("cpu"),
                                                         torch.float32, dali_tail=True)))
    return out


def _same_as_fresh(kind: str, make, L, e: int, start: int) -> None:
    want = list(make().epoch(e, start))
    got = list(L.epoch(e, start))
    assert len(got) == len(want) == L.steps(e) - start, (kind, e, start)
    for a, b in zip(got, want):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images), (kind, e, start)


def test_primed_batches_are_the_ones_asked_for(shards):
    """prime() starts a loader early (the trainer calls it before the warm-up): the batches then asked for are
    exactly a fresh loader's, whether they are the primed ones (the same pipeline goes on) or others (the primed
    ones are dropped), primed twice or at an epoch's end."""
    for kind, make in _loaders_to_prime(shards):
        L = make()
        L.prime(1, 2)
        L.prime(1, 2)  # twice: the same batches, none skipped
        pipe = getattr(L, "pipe", None)
        _same_as_fresh(kind, make, L, 1, 2)
        assert getattr(L, "pipe", None) is pipe  # DALI: the primed pipeline went on
        L.prime(2)  # the natural next epoch: the pipeline has already prefetched it
        _same_as_fresh(kind, make, L, 2, 0)
        L.prime(0)  # primed, then something else asked for
        _same_as_fresh(kind, make, L, 3, 1)


# Bad shard folders: a clear error naming the shard, raised when the loader is built (before training).


def _copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "s"
    shutil.copytree(shards, dst)
    return dst


def test_truncated_shard(shards, tmp_path):
    s = _copy(shards, tmp_path)
    tar = split_shards(s, "train")[0]
    tar.write_bytes(tar.read_bytes()[:-5000])
    with pytest.raises(ShardError, match=f"{tar.name}.*truncated or changed"):
        build_loader(cfg_for(s, "full", "pil"), "train", True, 0)


def _damage_a_sample(folder: Path, entropy_only: bool) -> tuple[Path, str]:
    """Damage one training JPEG inside its tar, sizes unchanged: its entropy-coded data (flipped bytes, which libjpeg
    only warns about) or everything after the start marker (which fails to decode). Returns the tar and the key."""
    split = open_split(folder, "train")
    i = len(split) // 2
    tar = split.tars[int(split.shard[i])]
    data = bytearray(tar.read_bytes())
    o, n = int(split.offset[i]), int(split.size[i])
    if entropy_only:
        for k in range(o + n // 2, o + n - 10, 97):
            data[k] ^= 0x5A
    else:
        data[o + 2 : o + n] = b"\x00" * (n - 2)
    tar.write_bytes(bytes(data))
    return tar, split.keys[i]


def _rewrite_checksum(folder: Path, tar: Path) -> None:
    """Make the manifest agree with a damaged tar, as if the damage had been sharded."""
    m = json.loads((folder / "manifest.json").read_text())
    for sh in m["splits"]["train"]["shards"]:
        if sh["tar"] == tar.name:
            sh["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("entropy_only", [True, False])
def test_damaged_sample_is_refused_before_training(shards, tmp_path, loader, entropy_only):
    """Bytes damaged inside an intact tar (same size, index still right) are found when the loader is built, by the
    shard's SHA-256 against the manifest, naming the tar; training never sees them."""
    s = _copy(shards, tmp_path)
    tar, _ = _damage_a_sample(s, entropy_only)
    with pytest.raises(ShardError, match=f"{tar}: its SHA-256 differs from the manifest"):
        build_loader(cfg_for(s, "full", loader), "train", True, 0)


@pytest.mark.parametrize("loader", LOADERS)
def test_undecodable_sample_stops_the_epoch_naming_it(shards, tmp_path, loader):
    """A sample that cannot be decoded though its shard matches the manifest (a bad image that was sharded as it was,
    here made by rewriting the manifest's checksum) stops the epoch with an error naming its shard and key."""
    s = _copy(shards, tmp_path)
    tar, key = _damage_a_sample(s, entropy_only=False)
    _rewrite_checksum(s, tar)
    L = build_loader(cfg_for(s, "full", loader), "train", True, 0)
    with pytest.raises(LoaderError, match=f"{tar.name}.*{key}"):
        for _ in L.epoch(0):
            pass


def test_missing_index(shards, tmp_path):
    s = _copy(shards, tmp_path)
    idx = split_shards(s, "train")[1].with_suffix(".idx")
    idx.unlink()
    with pytest.raises(ShardError, match=f"{idx.name}: missing index"):
        build_loader(cfg_for(s, "full", "pil"), "train", True, 0)


def test_stale_index(shards, tmp_path):
    s = _copy(shards, tmp_path)
    a, b = (t.with_suffix(".idx") for t in split_shards(s, "train")[:2])
    a.write_text(b.read_text())
    with pytest.raises(ShardError, match=f"{a.name}: stale or foreign index"):
        build_loader(cfg_for(s, "full", "pil"), "train", True, 0)


def test_other_variant(mame_root, tmp_path):
    s = write_shards(mame_root, tmp_path, ShardSettings(variant="256", max_pixels=None, splits=("val",)))
    with pytest.raises(ShardError, match="'256' shards"):
        build_loader(cfg_for(s, "full", "pil"), "val", True, 0)
    assert len(build_loader(cfg_for(s, "256", "pil"), "val", True, 0).split) == 29  # fine at --res 256


def test_missing_split_and_no_manifest(shards, tmp_path):
    s = _copy(shards, tmp_path)
    import json

    m = json.loads((s / "manifest.json").read_text())
    m["splits"]["val"]["count"] = 0
    (s / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="'val' split is empty"):
        build_loader(cfg_for(s, "full", "pil"), "val", True, 0)
    del m["splits"]["test"]
    (s / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="no 'test' split here"):
        build_loader(cfg_for(s, "full", "pil"), "test", True, 0)
    (s / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        build_loader(cfg_for(s, "full", "pil"), "train", True, 0)


@pytest.mark.skipif("dali" not in LOADERS, reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("res", ["256", "full"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_graph_on_cpu_matches_the_cpu_tail(shards, res, train, dtype, channels_last):
    """The GPU path's DALI graph (resize, flip, crop_mirror_normalize with padding, feed_ndarray) run in
    CPU-only mode gives the same batches as the CPU path's torch tail, up to resampling details."""
    from mame_fast.input.dali import DaliLoader

    cfg = cfg_for(shards, res, "dali", channels_last=channels_last)
    split = open_split(shards, "val")
    dali = DaliLoader(split, cfg, train, 0, 0, 1, torch.device("cpu"), dtype, dali_tail=True)
    tv = DaliLoader(split, cfg, train, 0, 0, 1, torch.device("cpu"), dtype, dali_tail=False)
    n = 0
    for a, b in zip(dali.epoch(0), tv.epoch(0), strict=True):
        assert a.images.dtype == dtype and a.images.shape == b.images.shape
        assert a.images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.sizes, b.sizes) and torch.equal(a.index, b.index)
        for k, (h, w) in enumerate(a.sizes.tolist()):
            assert a.images[k, :, h:].abs().sum() == 0 and a.images[k, :, :, w:].abs().sum() == 0
        assert (a.images.float() - b.images.float()).abs().mean() < 0.02
        n += a.real
    assert n == len(split)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("res", ["256", "full"])
def test_flips_mirror_the_planned_samples(shards, loader, res):
    """Training flips happen, and only where planned: with flips on, each planned sample is the mirror image of the
    same crop with flips off, and every other sample is identical."""
    cfg = cfg_for(shards, res, loader, channels_last=False)
    on = build_loader(cfg, "train", True, seed=2)
    off = build_loader(dataclasses.replace(cfg, flip=False), "train", True, seed=2)
    flipped = kept = 0
    for i, (a, b) in enumerate(zip(on.epoch(0), off.epoch(0), strict=True)):
        p = on.plan(0)[i]
        for k in range(a.real):
            h, w = a.sizes[k].tolist()
            x, y = a.images[k, :, :h, :w], b.images[k, :, :h, :w]
            if p.flip[k]:
                assert torch.equal(x, y.flip(-1)) and not torch.equal(x, y)
                flipped += 1
            else:
                assert torch.equal(x, y)
                kept += 1
    assert flipped >= 10 and kept >= 10


def test_colour_jitter_factors_act_in_pixel_space():
    """Brightness scales pixel values, contrast scales their distance to the mean grey, saturation their distance
    to each pixel's grey; factors of 1 change nothing."""
    from mame_fast.input.loader import color_jitter as _color_jitter
    from mame_fast.tensors import MEAN, STD

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    px = torch.rand(4, 3, 8, 10) * 150 + 50
    jit = lambda f: _color_jitter((px - mean) / std, torch.tensor(f)) * std + mean  # noqa: E731
    torch.testing.assert_close(jit([[1.0, 1.0, 1.0]] * 4), px, atol=1e-3, rtol=0)
    torch.testing.assert_close(jit([[1.2, 1.0, 1.0]] * 4), (px * 1.2).clamp(0, 255), atol=1e-3, rtol=0)
    grey = (px * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    m = grey.mean((2, 3), keepdim=True)
    torch.testing.assert_close(jit([[1.0, 0.5, 1.0]] * 4), (px - m) * 0.5 + m, atol=1e-3, rtol=0)
    desat = jit([[1.0, 1.0, 0.0]] * 4)
    torch.testing.assert_close(desat, grey.expand_as(px), atol=1e-3, rtol=0)


@pytest.mark.parametrize("loader", LOADERS)
def test_colour_jitter_reaches_training_batches_only(shards, loader):
    cfg = cfg_for(shards, "full", loader, channels_last=False)
    for train in (True, False):
        a = next(iter(build_loader(dataclasses.replace(cfg, color_jitter=0.4), "val", train, seed=1).epoch(0)))
        b = next(iter(build_loader(cfg, "val", train, seed=1).epoch(0)))
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images) != train


@pytest.mark.parametrize("forked", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("tasks", [1, 2, 5])
def test_the_cpu_tail_gives_one_batch_however_its_tasks_run(forked, channels_last, tasks):
    """The CPU tail's tasks (both loaders'; forked on torch's inter-op pool, or on a Python pool without TorchScript) write each
    crop resized, flipped, normalized and zero-padded into its row, and into the filler rows that copy it; a task's
    error is raised by the wait."""
    from concurrent.futures import ThreadPoolExecutor

    from mame_fast.input import loader as L

    if forked:
        assert L._forked_tail() is not None, "TorchScript cannot compile the forked tail: the Python pool runs it"
    g = torch.Generator().manual_seed(tasks)
    crops = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in [(40, 30), (24, 24), (50, 10)]]
    out_h, out_w, flips = [20, 24, 32], [16, 24, 8], [True, False, True]
    n, H, W = 7, 32, 24  # rows 3..6 are fillers: copies of rows 0, 1, 2, 0
    mean, std = torch.tensor(L.MEAN), torch.tensor(L.STD)
    want = torch.zeros(n, H, W, 3)
    for j in range(n):
        k = j % len(crops)
        x = L.resize_hwc(crops[k], out_h[k], out_w[k]).float()
        want[j, : out_h[k], : out_w[k]] = ((x.flip(1) if flips[k] else x) - mean) / std
    scale, bias = L.normalize_rows(W)
    with ThreadPoolExecutor(2) as pool:
        out = torch.full((n, H, W, 3) if channels_last else (n, 3, H, W), float("nan"))
        L.start_tail(crops, out_h, out_w, flips, out, scale, bias, channels_last, tasks, lambda: pool, forked)()
        torch.testing.assert_close(out if channels_last else out.permute(0, 2, 3, 1), want, atol=1e-4, rtol=0)
        wait = L.start_tail([crops[0], crops[1][:, :, :2]], out_h, out_w, flips, out, scale, bias, channels_last, tasks,
                            lambda: pool, forked)  # the second crop has two channels: its task fails
        with pytest.raises(RuntimeError):
            wait()


@pytest.mark.parametrize("forked", [True, False])
def test_a_copy_started_off_the_thread_is_whole_when_awaited(forked):
    """The fallback's GPU path copies each ring slot off the training thread (forked, or on a Python pool)."""
    from concurrent.futures import ThreadPoolExecutor

    from mame_fast.input.loader import start_copy

    src = torch.randint(0, 256, (4, 30, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dst = torch.zeros_like(src)
    with ThreadPoolExecutor(1) as pool:
        start_copy(src, dst, lambda: pool, fork=forked)()
    assert torch.equal(dst, src)


def test_a_rank_takes_the_cores_it_may_use():
    """data.threads=0: the CPUs of the rank's affinity mask, shared with the node's other ranks only when they share it."""
    from mame_fast.input.loader import rank_cores

    assert rank_cores(112, 112, 4, torchrun=False) == 28  # nothing restricted: the machine, split among 4 ranks
    assert rank_cores(112, 112, 4, torchrun=True) == 28
    assert rank_cores(20, 112, 4, torchrun=False) == 20  # srun bound each of the 4 tasks to 20 CPUs of its own
    assert rank_cores(32, 112, 4, torchrun=True) == 8  # torchrun's 4 workers inherit one 32-CPU allotment
    assert rank_cores(8, 112, 1, torchrun=False) == 8  # taskset / a container's cpuset
    assert rank_cores(2, 112, 4, torchrun=True) == 1  # never none


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity masks on this OS")
def test_a_loader_pinned_to_one_cpu_takes_one_thread(shards):
    """A process restricted to one CPU (as by taskset or a Slurm binding) builds loaders of one thread, not one per CPU
    of the machine."""
    import subprocess
    import sys

    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from mame_fast.config import DataConfig; from mame_fast.input import build_loader; "
            f"print(build_loader(DataConfig(shards={str(shards)!r}, res='full', loader='pil', threads=0), 'val', False, 0)"
            ".threads)")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"


def test_the_fallback_normalizes_on_a_cpu_as_on_a_gpu(shards):
    """The fallback's workers write uint8 batches into a shared ring. A CPU run takes each sample's image from its slot
    into the CPU tail's tasks; a GPU run copies the whole slot out (into pinned memory there) and normalizes it on the
    device in one kernel (``normalize_batch``), run here on the CPU through the same code. Both give the same batches,
    fillers and zero padding included, and the bytes earlier batches left in the ring reach neither."""
    from mame_fast.input.fallback import PilLoader

    cfg = cfg_for(shards, "full", "pil", threads=2)
    split = open_split(shards, "val")
    loaders = [PilLoader(split, cfg, False, 0, 0, 1, torch.device("cpu"), torch.float32, tail_on_cpu=t) for t in (True, False)]
    for L in loaders:
        L._loader()
        L._ring.fill_(255)  # stale bytes everywhere in the ring, as after batches of other shapes
    kinds = set()
    for i, (a, b) in enumerate(zip(*(L.epoch(0) for L in loaders), strict=True)):
        p = loaders[0].plan(0)[i]
        assert torch.equal(a.index, b.index) and a.images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
        kinds |= {"padded"} if p.padded else set()
        kinds |= {"fillers"} if p.real < len(p.index) else set()
    assert kinds == {"padded", "fillers"}, kinds


def test_the_fallbacks_workers_are_asked_for_each_step_once_in_order(shards):
    """The fallback's item sampler: from (epoch, step) on, every later step of that epoch once, in order; a training
    loader's then every step of the following epochs (its workers go on into the next epoch), an evaluation loader's
    nothing more. The sequence number, which picks the ring slot, counts up by one across epochs."""
    import itertools

    from mame_fast.input.fallback import _Steps

    L = build_loader(cfg_for(shards, "full", "pil"), "train", True, seed=0)
    for run_on in (True, False):
        steps = _Steps(L.plan, run_on)
        steps.epoch, steps.start = 2, 1
        got = list(itertools.islice(steps, L.steps(2) - 1 + L.steps(3) + L.steps(4) + 1))
        want = [(2, s) for s in range(1, L.steps(2))]
        if run_on:
            want += [(3, s) for s in range(L.steps(3))] + [(4, s) for s in range(L.steps(4))] + [(5, 0)]
        assert [(e, s) for e, s, _ in got] == want
        assert [q for _, _, q in got] == list(range(len(got)))


def test_a_fallback_ring_larger_than_shared_memory_is_refused(shards):
    """The fallback's ring is allocated whole before the workers start: one larger than /dev/shm's free space is refused
    with the sizes and what to lower, instead of a SIGBUS when a worker writes past the limit mid-epoch."""
    from mame_fast.files import shared_memory_free

    if shared_memory_free() is None:
        pytest.skip("no /dev/shm on this OS")
    L = build_loader(cfg_for(shards, "full", "pil", prefetch=10**9), "train", True, seed=0)
    with pytest.raises(LoaderError, match=r"shared memory .*data\.prefetch=1000000000.*/dev/shm has") as e:
        L.prime(0)
    assert str(shards) in str(e.value)


def _worker_pids(L) -> list[int]:
    return [w.pid for w in L._dl._iterator._workers]  # DataLoader's persistent workers


def test_a_fallback_worker_ignores_signals_that_are_its_parents_to_handle(shards):
    """Ctrl-C and SIGTERM sent to the whole process group (a terminal, SLURM) reach the workers too: they ignore them
    and go on decoding, so the trainer can save and stop; a SIGTERM from their parent (how DataLoader ends a worker that
    did not stop when asked) still ends one, quietly."""
    import signal
    import subprocess

    L = build_loader(cfg_for(shards, "full", "pil", threads=2), "train", True, seed=0)
    batches = L.epoch(0)
    next(batches)
    pids = _worker_pids(L)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # sent by another process, as a terminal or SLURM does
            subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", *map(str, pids)], check=True)
        assert sum(1 for _ in batches) == L.steps(0) - 1  # every worker still decodes
        assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids)
        os.kill(pids[0], signal.SIGTERM)  # from the parent
        worker = L._dl._iterator._workers[0]
        worker.join(10)
        assert worker.exitcode == 0
    finally:
        L.close()
        for pid in pids:  # a worker that would not end (the failure looked for) must not hang the suite's exit
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_finished_run_leaves_no_loader_behind(shards, tmp_path, loader):
    """The trainer closes its loaders when a run ends: no worker process outlives it (left to the garbage collector,
    each of the fallback's workers held the next run back 5 s)."""
    import multiprocessing

    from mame_fast.config import load
    from mame_fast.train.loop import run

    before = {p.pid for p in multiprocessing.active_children()}
    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.res=256", "data.crop=48", "data.batch_size=16",
            "data.threads=2", "epochs=1", "hist_epochs=1", f"data.loader={loader}"]
    gc.disable()  # the collector may reach the run's loaders at any moment: only closing them may count here
    try:
        run(load(None, sets), name="closed")
        assert {p.pid for p in multiprocessing.active_children()} - before == set()
    finally:
        gc.enable()


def test_auto_says_which_loader_it_took_and_why():
    from mame_fast.input import choose_loader

    kind, why = choose_loader("auto")
    assert kind == ("dali" if dali_available() else "pil")
    assert why.startswith("auto: ") and ("DALI is installed" in why if dali_available() else "DALI" in why)
    assert choose_loader("pil") == ("pil", "as asked (data.loader=pil)")
    if not dali_available():
        with pytest.raises(LoaderError, match="data.loader=dali, but"):
            choose_loader("dali")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_fallbacks_workers_give_the_same_batches_under_every_start_method(shards, method):
    """macOS and Windows start processes with spawn, Python 3.14 makes forkserver Linux's default: the fallback's
    workers (the shared ring, persistent across epochs, running on into the next one) give the batches they give when
    forked, byte for byte, over two epochs and a restart inside one."""
    def batches(start_method: str) -> list[torch.Tensor]:
        L = build_loader(cfg_for(shards, "full", "pil", threads=2, start_method=start_method), "train", True, seed=3)
        try:
            got = [b.images.clone() for e in (0, 1) for b in L.epoch(e)]
            return got + [b.images.clone() for b in L.epoch(1, 2)]
        finally:
            L.close()

    forked = batches("fork")
    started = batches(method)
    assert len(forked) == len(started) and all(torch.equal(a, b) for a, b in zip(forked, started))


POOL_SCRIPT = """
import multiprocessing, sys, time
from mame_fast.data.shard import _worker_init
from mame_fast.files import mp_context, stop_signals_held
with stop_signals_held():
    pool = mp_context().Pool(2, initializer=_worker_init)  # as `shard` starts it
assert pool.map(abs, range(-8, 0)) == list(range(8, 0, -1))
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
sys.stdin.readline()  # the test has signalled the workers
time.sleep(0.5)
pool.terminate()
print("terminated", flush=True)
"""


def test_an_image_pool_survives_the_groups_sigterm_and_still_terminates(tmp_path):
    """`shard` and `sample` stop their image pool with Pool.terminate() when a signal reaches the command. The same
    SIGTERM reaches the pool's workers (a process group, SLURM): an idle worker that died of it held the task queue's
    lock, and terminate() waited for it for ever. They ignore it (their parent's own SIGTERM still ends them), and the
    pool terminates."""
    import signal
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], env=cli_env(), cwd=tmp_path, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids += [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGTERM)  # from another process, as killpg or SLURM sends it
        p.stdin.write("go\n")
        p.stdin.flush()
        out = p.communicate(timeout=30)[0]
        assert p.returncode == 0 and "terminated" in out
    finally:
        p.kill()
        for pid in pids:  # a worker left behind by the failure looked for must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
