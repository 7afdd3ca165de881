"""Stage 5h: a data report from the metadata (and the images, when present).

Counts per class, split and museum; histograms of width, height, megapixels and aspect ratio; a grid
of sample images per class when the images are there. Works on the real ``MAMe_dataset.csv`` alone.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..data import metadata as md
from ..data.source import Source, SourceError, read_metadata
from .plots import pyplot, save_figure


def explore(src: Path | None, out: Path, per_class: int = 4) -> dict:
    """Write explore.md and PNGs into ``out``; ``src``: a MAMe root, a folder of CSVs, or None (vendored)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(src) if src else md.vendored_dir()
    meta = read_metadata(root)
    figs = [
        stacked_counts(meta, lambda r: r.subset, md.SPLITS, "Images per class and split", out / "class_split_counts.png"),
        stacked_counts(meta, lambda r: r.museum, sorted({r.museum for r in meta.rows}), "Images per class and museum",
                       out / "class_museum_counts.png"),
        size_histograms(meta, out / "sizes.png"),
    ]
    source = images_of(root)
    if source is not None:  # the images' folder or the official zip: a sample grid either way
        figs.append(sample_grid(meta, source, out / "samples.png", per_class))
    stats = summary(meta)
    (out / "explore.md").write_text(markdown(root, meta, stats, figs))
    return stats


def summary(meta: md.Metadata) -> dict:
    w, h = np.array([r.width for r in meta.rows], float), np.array([r.height for r in meta.rows], float)
    return {"rows": len(meta.rows), "classes": len(meta.classes), "splits": dict(Counter(r.subset for r in meta.rows)),
            "museums": dict(Counter(r.museum for r in meta.rows)), "median_mpx": float(np.median(w * h / 1e6)),
            "max_mpx": float((w * h).max() / 1e6), "aspect_min": float((w / h).min()), "aspect_max": float((w / h).max()),
            "beyond_4_to_1": int(((w / h) > 4).sum() + ((w / h) < 0.25).sum())}


def stacked_counts(meta: md.Metadata, group, groups, title: str, path: Path) -> Path:
    """Images per class, stacked by ``group(row)`` over ``groups`` (splits, museums)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5))
    x = np.arange(len(meta.classes))
    bottom = np.zeros(len(x))
    totals = Counter(group(r) for r in meta.rows)
    for g in groups:
        per = Counter(r.medium for r in meta.rows if group(r) == g)
        v = np.array([per[c] for c in meta.classes])
        ax.bar(x, v, bottom=bottom, label=f"{g} ({totals[g]:,})")
        bottom += v
    ax.set_xticks(x, meta.classes, rotation=90, fontsize=8)
    ax.set(ylabel="images", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def size_histograms(meta: md.Metadata, path: Path) -> Path:
    """Width, height (log counts), megapixels and aspect ratio (log axes)."""
    plt = pyplot()
    w, h = np.array([r.width for r in meta.rows], float), np.array([r.height for r in meta.rows], float)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].hist(w, bins=80)
    ax[0, 0].set(title="Width (px)", yscale="log")
    ax[0, 1].hist(h, bins=80)
    ax[0, 1].set(title="Height (px)", yscale="log")
    ax[1, 0].hist(w * h / 1e6, bins=np.logspace(np.log10(max(1e-3, (w * h).min() / 1e6)), np.log10((w * h).max() / 1e6), 60))
    ax[1, 0].set(title="Megapixels", xscale="log")
    ax[1, 1].hist(w / h, bins=np.logspace(np.log10((w / h).min()), np.log10((w / h).max()), 60))
    ax[1, 1].set(title="Aspect ratio (w/h)", xscale="log")
    for a in ax.flat:
        a.grid(alpha=0.3)
    return save_figure(fig, path)


def markdown(root: Path, meta: md.Metadata, stats: dict, figs: list[Path]) -> str:
    splits, museums = stats["splits"], stats["museums"]
    per = {c: Counter(r.subset for r in meta.rows if r.medium == c) for c in meta.classes}
    lines = [f"# Data report: {root}", "", f"{stats['rows']:,} images, {stats['classes']} classes.", "",
             "| split | images |", "|---|---|"] + [f"| {s} | {splits.get(s, 0):,} |" for s in md.SPLITS]
    lines += ["", "| museum | images |", "|---|---|"] + [f"| {m} | {museums[m]:,} |" for m in sorted(museums)]
    lines += ["", "| class | " + " | ".join(md.SPLITS) + " |", "|---|" + "---|" * 3]
    lines += [f"| {c} | " + " | ".join(str(per[c][s]) for s in md.SPLITS) + " |" for c in meta.classes]
    lines += ["", f"Median {stats['median_mpx']:.1f} Mpx, largest {stats['max_mpx']:.0f} Mpx; aspect ratio "
              f"{stats['aspect_min']:.2f} to {stats['aspect_max']:.1f}; {stats['beyond_4_to_1']} images beyond 1:4 or 4:1.", ""]
    return "\n".join(lines + [f"![{p.stem}]({p.name})" for p in figs]) + "\n"


def images_of(root: Path):
    """The images beside the metadata (data/ or MAMe_data.zip, else data_256/ or its zip), or None (CSVs only)."""
    for variant in ("full", "256"):
        try:
            return Source(root, variant)
        except SourceError:
            continue
    return None


def sample_grid(meta: md.Metadata, source, path: Path, per_class: int, cols: int = 6) -> Path:
    """Each class as a panel of ``per_class`` of its images (a square montage, each image whole, never squashed), the
    panels in a grid ``cols`` wide, titled in a readable size: one page, not a strip of 29 rows."""
    from PIL import Image

    plt = pyplot()
    side, tile = math.ceil(math.sqrt(per_class)), 160
    rows = math.ceil(len(meta.classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    everything = [r.file for r in meta.rows]
    have = set(everything) - set(source.missing(everything))  # one listing of the folder or the zip, not one per class
    for a, c in zip(axes.flat, meta.classes):
        files = [r.file for r in meta.rows if r.medium == c and r.file in have][:per_class]
        montage = Image.new("RGB", (side * tile, side * tile), "white")
        for j, f in enumerate(files):
            with Image.open(io.BytesIO(source.read(f))) as im:
                im.draft("RGB", (tile, tile))
                im = im.convert("RGB")
                im.thumbnail((tile - 4, tile - 4))  # keeps the aspect ratio
                x, y = (j % side) * tile + (tile - im.width) // 2, (j // side) * tile + (tile - im.height) // 2
                montage.paste(im, (x, y))
        a.imshow(np.asarray(montage))
        a.set_title(f"{c} ({len(files)})", fontsize=10)
    fig.suptitle(f"{per_class} images per class, each whole (aspect ratio kept)", fontsize=12)
    return save_figure(fig, path)
