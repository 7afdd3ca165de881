"""Stage 0b: a miniature, MAMe-faithful dataset in the official layout, generated from the real metadata.

The real images cannot be downloaded everywhere (CI, laptops, these machines), but the real metadata
can: ``sample`` draws a stratified subset of the official rows and writes, for each, a picture with the
row's real file name and real aspect ratio and orientation, scaled down (longest side ~1000 px; a few
kept large so that big-image handling is exercised). The pictures are learnable but not trivial:

- each class has a texture family (stripes, rings, checks, hatching, grain, blobs, waves, dots) with its
  own frequency and orientation, an object silhouette and a palette; palettes are *shared* between
  groups of classes, so colour alone does not identify a class;
- within a class, orientation, frequency, palette, object position and size and contrast vary;
- nuisance factors shared by all classes: background gradient colour, brightness/gamma, vignetting,
  sensor noise, JPEG quality.

Texture frequencies are relative to the short side, so the class signal does not depend on image
size. The file ``data_256/`` holds the 256x256 version, squashed as the official low-resolution
release is. Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import io
import math
import shutil
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import ignore_stop_signals, mp_context, stop_signals_held, terminate_pool
from . import metadata as md

TEXTURES = ("stripes", "rings", "checks", "hatch", "grain", "blobs", "waves", "dots")
SHAPES = ("ellipse", "rect", "full", "diamond")
# Palette families shared between classes so that colour statistics overlap across classes.
N_PALETTES = 7
RENDER_SIDE = 384


@dataclass(frozen=True)
class SampleSpec:
    """What ``mame-fast sample`` writes."""

    per_class: tuple[int, int, int] = (40, 10, 10)
    """Images per class for (train, val, test)."""
    max_side: int = 1000
    """Longest side of the written images, in pixels (the originals are ~3000-6000)."""
    large: int = 2
    """How many images are kept large (longest side ``large_side``) to exercise big-image handling."""
    large_side: int = 4096
    seed: int = 0
    extremes: bool = True
    """Include the most extreme aspect ratios of the real metadata (1:9 ... 15:1)."""


def _class_styles(n_classes: int) -> list[dict]:
    # Fixed seed: a class looks the same in every sample, whatever the sampling seed.
    rng = np.random.default_rng(20240229)
    palettes = [rng.uniform(0.1, 0.9, size=(3, 3)) for _ in range(N_PALETTES)]
    styles = []
    for c in range(n_classes):
        styles.append(
            dict(
                texture=TEXTURES[c % len(TEXTURES)],
                shape=SHAPES[(c // len(TEXTURES)) % len(SHAPES)],
                palette=palettes[(c * 3) % N_PALETTES],
                freq=float(rng.uniform(4, 18)),  # cycles per short side
                angle=float(rng.uniform(0, math.pi)),
                fill=float(rng.uniform(0.35, 0.8)),  # object size relative to the frame
            )
        )
    return styles


def render(label: int, width: int, height: int, rng: np.random.Generator, n_classes: int = 29) -> Image.Image:
    """One synthetic artwork of class ``label`` at ``width`` x ``height`` (RGB)."""
    st = _class_styles(n_classes)[label]
    s = float(min(width, height))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / s, y / s  # coordinates in short-side units: texture scale independent of size
    ang = st["angle"] + rng.normal(0, 0.25)
    f = st["freq"] * rng.uniform(0.8, 1.25) * 2 * math.pi
    ru = u * math.cos(ang) + v * math.sin(ang)
    rv = -u * math.sin(ang) + v * math.cos(ang)
    cx, cy = width / s * rng.uniform(0.35, 0.65), height / s * rng.uniform(0.35, 0.65)
    t = st["texture"]
    if t == "stripes":
        tex = np.sin(f * ru)
    elif t == "rings":
        tex = np.sin(f * np.hypot(u - cx, v - cy))
    elif t == "checks":
        tex = np.sign(np.sin(f * ru) * np.sin(f * rv))
    elif t == "hatch":
        tex = np.maximum(np.sin(f * ru), np.sin(f * rv)) ** 3
    elif t == "grain":
        g = rng.normal(size=(max(2, int(st["freq"] * height / s)), max(2, int(st["freq"] * width / s))))
        tex = np.asarray(Image.fromarray(g.astype(np.float32)).resize((width, height), Image.BICUBIC))
        tex = np.tanh(tex)
    elif t == "blobs":
        tex = np.zeros_like(u)
        for _ in range(12):
            bx, by = rng.uniform(0, width / s), rng.uniform(0, height / s)
            tex += np.exp(-((u - bx) ** 2 + (v - by) ** 2) * (st["freq"] ** 2) / 2)
        tex = np.tanh(2 * tex) * 2 - 1
    elif t == "waves":
        tex = np.sin(f * ru + 2.5 * np.sin(f / 3 * rv))
    else:  # dots
        tex = (np.sin(f * ru) * np.sin(f * rv) > 0.6).astype(np.float32) * 2 - 1
    # Object silhouette of the class, jittered in position and size.
    r = st["fill"] * rng.uniform(0.8, 1.15) / 2  # radius in short-side units
    mask = _silhouette(st["shape"], (u - cx) / r, (v - cy) / r)
    pal = np.clip(st["palette"] + rng.normal(0, 0.06, size=(3, 3)), 0, 1)
    contrast = rng.uniform(0.5, 1.0)
    a = (tex * contrast + 1) / 2  # [0, 1]
    obj = pal[0] * a[..., None] + pal[1] * (1 - a[..., None])
    # Shared nuisance: a background gradient of any colour, the same family for every class.
    bg0, bg1 = rng.uniform(0.2, 0.9, size=3), rng.uniform(0.2, 0.9, size=3)
    g = (v / max(height / s, 1e-6))[..., None]
    bg = bg0 * (1 - g) + bg1 * g
    img = np.where(mask[..., None], obj, bg * 0.85 + pal[2] * 0.15)
    r2 = ((u - width / s / 2) ** 2 + (v - height / s / 2) ** 2) / (0.5 * (width / s) ** 2 + 0.5 * (height / s) ** 2 + 1e-6)
    vig = 1 - rng.uniform(0, 0.35) * r2
    img = img * vig[..., None]
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25) * rng.uniform(0.8, 1.1)
    img = img + rng.normal(0, rng.uniform(0.005, 0.04), size=img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def _silhouette(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the object is, in coordinates scaled to its radius."""
    if shape == "ellipse":
        return (dx**2 + dy**2) < 1
    if shape == "rect":
        return (np.abs(dx) < 1) & (np.abs(dy) < 1)
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) < 1
    return np.ones_like(dx, dtype=bool)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (w, h) so the longest side is ``max_side`` (never up), keeping the ratio to +-1 px."""
    k = min(1.0, max_side / max(width, height))
    return max(1, round(width * k)), max(1, round(height * k))


def choose_rows(meta: md.Metadata, spec: SampleSpec, toy: set[str]) -> list[md.Row]:
    """A stratified subset of the official rows: per class and split, toy rows first, then others."""
    rng = np.random.default_rng(spec.seed)
    chosen: list[md.Row] = []
    by_key: dict[tuple[str, str], list[md.Row]] = {}
    for r in meta.rows:
        by_key.setdefault((r.medium, r.subset), []).append(r)
    for cls in meta.classes:
        for split, n in zip(md.SPLITS, spec.per_class):
            pool = by_key.get((cls, split), [])
            order = rng.permutation(len(pool))
            pool = [pool[i] for i in order]
            pool.sort(key=lambda r: r.file not in toy)  # stable: toy rows first, shuffled within
            chosen.extend(pool[:n])
    if spec.extremes:
        names = {r.file for r in chosen}
        train = [r for r in meta.rows if r.subset == "train"]
        for r in (min(train, key=lambda r: r.aspect), max(train, key=lambda r: r.aspect)):
            if r.file not in names:
                chosen.append(r)
    return chosen


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _make_one(args: tuple) -> tuple[str, bytes, bytes]:
    row, label, side, seed, n_classes = args
    # Per-image RNG from (seed, file name): independent of worker scheduling, so output is deterministic.
    rng = np.random.default_rng([seed, *row.file.encode()])
    w, h = scaled_size(row.width, row.height, side)
    # Render at most RENDER_SIDE px and upscale: the content is smooth at that scale and rendering at
    # full size costs ~10x more, which the demo's time budget cannot pay.
    rw, rh = scaled_size(row.width, row.height, min(side, RENDER_SIDE))
    img = render(label, rw, rh, rng, n_classes)
    if (rw, rh) != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    q = int(rng.integers(80, 96))
    return row.file, _jpeg(img, q), _jpeg(img.resize((256, 256), Image.BICUBIC), 90)


def write_sample(out: Path, spec: SampleSpec, workers: int = 1, as_zip: bool = False, progress=None) -> list[md.Row]:
    """Write the miniature MAMe to ``out``; returns the rows written (with their scaled sizes)."""
    meta = md.load_dir()
    rows = choose_rows(meta, spec, md.toy_files())
    rng = np.random.default_rng(spec.seed + 1)
    large = set(rng.choice(len(rows), size=min(spec.large, len(rows)), replace=False).tolist())
    jobs = [
        (r, meta.label(r), spec.large_side if i in large else spec.max_side, spec.seed, len(meta.classes))
        for i, r in enumerate(rows)
    ]
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    (tmp / "data_256").mkdir()

    with stop_signals_held():
        pool = mp_context().Pool(workers, initializer=ignore_stop_signals) if workers > 1 else _Serial()
    try:
        for file, full, small in pool.imap(_make_one, jobs, chunksize=4):
            (tmp / "data" / file).write_bytes(full)
            (tmp / "data_256" / file).write_bytes(small)
            if progress:
                progress()
    finally:
        if workers > 1:
            terminate_pool(pool)
    rows = [replace(r, **dict(zip(("width", "height"), scaled_size(r.width, r.height, j[2])))) for r, j in zip(rows, jobs)]
    toy = md.toy_files()
    md.write_csv(tmp / md.DATASET_CSV, rows)
    md.write_labels(tmp / md.LABELS_CSV, meta.classes)
    md.write_csv(tmp / md.TOY_CSV, [r for r in rows if r.file in toy])
    if as_zip:
        _zip_official(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # publish only a complete sample
    return rows


def _zip_official(folder: Path) -> None:
    """Replace the unpacked layout by the three official zips (stored, as JPEGs don't compress)."""
    for zname, members in (
        ("MAMe_data.zip", ["data"]),
        ("MAMe_data_256.zip", ["data_256"]),
        ("MAMe_metadata.zip", [md.DATASET_CSV, md.LABELS_CSV, md.TOY_CSV]),
    ):
        with zipfile.ZipFile(folder / zname, "w", zipfile.ZIP_STORED) as z:
            for m in members:
                p = folder / m
                if p.is_dir():
                    for f in sorted(p.iterdir()):
                        z.write(f, f"{m}/{f.name}")
                else:
                    z.write(p, m)
        for m in members:
            p = folder / m
            shutil.rmtree(p) if p.is_dir() else p.unlink()


class _Serial:
    """A stand-in for a process pool when workers=1, so tests don't pay for process start-up."""

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)
