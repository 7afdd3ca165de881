"""Input-pipeline throughput: every contender in one run, same sample, same output size and augmentation.

Contenders (training mode: random aspect-preserving crop with scale jitter + flip, normalized float32):
- ``DALI CPU``: mame-fast's DALI loader in CPU-only mode (``DALI GPU`` too when CUDA and DALI exist);
- ``PIL fallback``: mame-fast's PIL + DataLoader loader, same plan;
- ``ImageFolder``: torchvision ImageFolder + PIL over the raw JPEG folder, what most users start from
  (256: RandomResizedCrop to a square; full: aspect-kept resize to the same pixel budget, random
  batches padded to their largest image, as the official MAMe baselines do);
- ``decode limit``: libjpeg-turbo decode only (PIL ``Image.load``), in a tight loop, one process per core.

Claim (issue 3): on 2 CPU cores, DALI CPU >= 1.5x ImageFolder and >= 80% of the decode limit, at 256
and at full resolution.

    python benchmarks/loader_throughput.py [--per-class 40] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import summary, write_results
from mame_fast import _mp_context
from mame_fast import metadata as md
from mame_fast.config import DataConfig
from mame_fast.pipeline import MEAN, STD, build_loader, dali_available
from mame_fast.sample import SampleSpec, write_sample
from mame_fast.shard import ShardSettings, load_manifest, write_shards

WORK = Path(__file__).parent / "_work"


def prepare(per_class: int, workers: int) -> tuple[Path, dict[str, Path]]:
    root = WORK / f"mame_{per_class}"
    if not (root / md.DATASET_CSV).exists():
        write_sample(root, SampleSpec(per_class=(per_class, 0, 0), max_side=1000, large=0, extremes=False), workers=workers)
    shards = {}
    for res in ("full", "256"):
        folder = WORK / f"shards_{per_class}" / res
        if not (folder / "manifest.json").exists():
            write_shards(root, WORK / f"shards_{per_class}", ShardSettings(variant=res, max_pixels=None, splits=("train",)), workers=workers)
        shards[res] = folder
    return root, shards


# -- ImageFolder baseline ------------------------------------------------------------------------------


def _class_tree(root: Path, variant_dir: str) -> Path:
    """ImageFolder wants one folder per class: symlinks, as users do for MAMe's flat data/ folder."""
    tree = WORK / f"imagefolder_{root.name}_{variant_dir}"
    if not tree.exists():
        meta = md.load_dir(root)
        for r in meta.rows:
            d = tree / f"{meta.label(r):02d}"
            d.mkdir(parents=True, exist_ok=True)
            os.symlink((root / variant_dir / r.file).resolve(), d / r.file)
    return tree


class _AspectResize:
    """Resize to a pixel budget keeping the aspect ratio (the full-resolution baseline)."""

    def __init__(self, pixels: int):
        self.pixels = pixels

    def __call__(self, im: Image.Image) -> Image.Image:
        k = math.sqrt(self.pixels / (im.width * im.height))
        return im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)


def _pad_collate(batch):
    xs, ys = zip(*batch)
    H, W = max(x.shape[1] for x in xs), max(x.shape[2] for x in xs)
    out = torch.zeros(len(xs), 3, H, W)
    for i, x in enumerate(xs):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out, torch.tensor(ys)


def imagefolder_loader(root: Path, res: str, crop: int, pixels: int, batch: int, workers: int):
    from torchvision import datasets, transforms as T

    norm = T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])
    if res == "256":
        tf = T.Compose([T.RandomResizedCrop(crop, scale=(0.35, 1.0), ratio=(1.0, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        tree, collate = _class_tree(root, "data_256"), None
    else:
        tf = T.Compose([_AspectResize(pixels), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        tree, collate = _class_tree(root, "data"), _pad_collate
    ds = datasets.ImageFolder(str(tree), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)


# -- decode limit ----------------------------------------------------------------------------------------


def _decode_all(files: list[Path]) -> int:
    blobs = [f.read_bytes() for f in files]  # from memory: the limit of the decoder, not of the disk
    t = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).load()  # decode only (convert("RGB") would add a copy of each image)
    return time.perf_counter() - t


def decode_limit(files: list[Path], workers: int) -> list[float]:
    """Seconds each of ``workers`` processes takes to decode its share of ``files`` in a tight loop
    (the wall time is the largest; the core time their sum)."""
    parts = [files[i::workers] for i in range(workers)]
    with _mp_context().Pool(workers) as pool:
        return pool.map(_decode_all, parts)


def breakdown(cfg: DataConfig, epoch: int) -> tuple[float, float, float]:
    """DALI CPU's work split in parts, each run alone on all threads, in core-seconds for one epoch:
    the DALI graph (read + ROI decode), the torchvision tail (resize, flip, normalize, pad) on the decoded
    crops, and of that tail the resize alone."""
    from torchvision.transforms.v2 import functional as F

    # No prefetch: the timed runs decode exactly the epoch's batches, none of the next epoch's.
    loader = build_loader(DataConfig(**{**cfg.__dict__, "loader": "dali", "prefetch": 1}), "train", True, 0)
    plans = loader.plan(epoch)
    loader.feed.start(epoch, 0)
    pipe = loader._build()
    t = time.process_time()  # CPU time of all of this process's threads: DALI's, the tail's, the main one
    for _ in plans:
        pipe.run()
    decode = time.process_time() - t
    loader.feed.start(epoch, 0)
    pipe = loader._build()
    crops = []
    for _ in plans:  # the same crops again, copied (run() reuses its buffers) for the tail alone
        out = pipe.run()[0]
        crops.append([np.array(out[i]) for i in range(len(out))])
    t = time.process_time()
    for p, c in zip(plans, crops):
        loader._cpu_tail(c, p)
    tail = time.process_time() - t

    def resize(job):
        p, c = job
        for k, a in enumerate(c):
            F.resize(torch.from_numpy(a).permute(2, 0, 1), [int(p.out_h[k]), int(p.out_w[k])], antialias=True)

    t = time.process_time()
    list(loader._pool.map(resize, zip(plans, crops)))
    return decode, tail, time.process_time() - t


# -- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--pixels", type=int, default=360_000)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the main process only consumes batches; the cores belong to the loaders
    root, shards = prepare(args.per_class, args.workers)
    n = load_manifest(shards["full"])["splits"]["train"]["count"]
    sections = []
    for res in ("256", "full"):
        files = sorted((root / ("data_256" if res == "256" else "data")).iterdir())
        src_mpx = sum(Image.open(f).width * Image.open(f).height for f in files) / 1e6
        # The layout the trainer asks for by default (channels-last); ImageFolder hands NCHW, as torchvision does.
        cfg = DataConfig(shards=str(shards[res]), res=res, batch_size=args.batch_size, crop=args.crop, pixels=args.pixels,
                         threads=args.workers)
        # One loader per contender over all rounds, as a training run uses it (round 0 includes the start-up).
        loaders = {}
        if dali_available():
            loaders["DALI CPU"] = build_loader(DataConfig(**{**cfg.__dict__, "loader": "dali"}), "train", True, 0)
            if torch.cuda.is_available():
                loaders["DALI GPU"] = build_loader(DataConfig(**{**cfg.__dict__, "loader": "dali"}), "train", True, 0, device=torch.device("cuda"))
        loaders["PIL fallback"] = build_loader(DataConfig(**{**cfg.__dict__, "loader": "pil"}), "train", True, 0)
        imagefolder = imagefolder_loader(root, res, args.crop, args.pixels, args.batch_size, args.workers)
        times: dict[str, list[float]] = {k: [] for k in [*loaders, "ImageFolder + PIL", "decode limit"]}
        busy, limit_core = [], []
        for rep in range(args.repeats + 1):  # round 0: warm-up (page cache, imports, start-up), not counted
            for name, loader in loaders.items():
                cpu, t = time.process_time(), time.perf_counter()
                got = sum(len(b.labels) for b in loader.epoch(rep))
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                assert got == n, (name, got, n)
                if rep:
                    times[name].append(dt)
                    if name == "DALI CPU":
                        busy.append((time.process_time() - cpu) / dt)  # DALI's threads are in this process
            t = time.perf_counter()
            got = sum(len(y) for _, y in imagefolder)
            assert got == n, ("ImageFolder", got, n)
            if rep:
                times["ImageFolder + PIL"].append(time.perf_counter() - t)
            parts = decode_limit(files, args.workers)
            if rep:
                times["decode limit"].append(max(parts))
                limit_core.append(sum(parts))
        limit = summary(times["decode limit"])[0]
        split_note = ""
        if dali_available():
            dec, tail, rs = breakdown(cfg, 1)
            ms = lambda core_s: 1e3 * core_s / n  # noqa: E731  core-milliseconds per image
            lim = ms(summary(limit_core)[0])
            split_note = (
                f"\nWhere DALI CPU's time goes, in core-ms per image (each part run alone on all threads, measured as process CPU time): "
                f"DALI graph (read + ROI decode) {ms(dec):.2f}, torchvision tail {ms(tail):.2f} (of which the resize "
                f"{ms(rs):.2f}; then flip, normalize to float32, pad), against {lim:.2f} for the decode limit's full "
                f"decode. With both parts perfectly overlapped on {args.workers} cores this design reaches at most "
                f"**{lim / (ms(dec) + ms(tail)):.0%}** of the decode limit; during the timed epochs the loader kept "
                f"{summary(busy)[0]:.2f} of {args.workers} cores busy.\n")
        base = summary(times["ImageFolder + PIL"])[0]
        rows = [
            f"### --res {res}: {n} training images, source {src_mpx / n:.2f} Mpx mean "
            f"({'256x256 data_256/' if res == '256' else 'data/ originals, longest side 1000'}), "
            f"output {'%dx%d crops' % (args.crop, args.crop) if res == '256' else '~%d px per image, bucketed' % args.pixels}\n",
            "| contender | epoch s (median [min, max]) | images/s | source Mpx/s | vs ImageFolder | vs decode limit |",
            "|---|---|---|---|---|---|",
        ]
        for name, ts in times.items():
            med, lo, hi = summary(ts)
            rows.append(f"| {name} | {med:.2f} [{lo:.2f}, {hi:.2f}] | {n / med:.0f} | {src_mpx / med:.1f} | {base / med:.2f}x | {limit / med:.0%} |")
        sections.append("\n".join(rows) + "\n" + split_note)
        print(sections[-1], flush=True)
    body = (
        f"{args.workers} workers/threads per contender, batch {args.batch_size}, {args.repeats} timed epochs after one "
        f"warm-up (median [min, max]). Each loader is built once and runs the epochs in a row, as in training "
        f"(DataLoaders start their workers each epoch, as by default). mame-fast's loaders hand channels-last float32. "
        f"The decode limit decodes the same files from memory in {args.workers} processes.\n\n" + "\n".join(sections)
    )
    print("saved", write_results("loader_throughput", "Loader throughput", body, ("torch", "torchvision", "nvidia-dali-cuda130", "pillow")))


if __name__ == "__main__":
    main()
