"""Stage 0c: a data report from the metadata (and the images, when present).

Counts per class, split and museum; histograms of width, height, megapixels and aspect ratio; a grid
of sample images per class when the images are there. Works on the real ``MAMe_dataset.csv`` alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from . import metadata as md
from .records import _plt, _save


def explore(src: Path | None, out: Path, per_class: int = 4) -> dict:
    """Write explore.md and PNGs into ``out``; ``src``: a MAMe root, a folder of CSVs, or None (vendored)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(src) if src else md.vendored_dir()
    if src and not (root / md.DATASET_CSV).is_file() and (root / "MAMe_metadata.zip").is_file():
        from .source import Source

        s = Source.__new__(Source)
        s.root = root
        meta = md.load(s.metadata_bytes(md.DATASET_CSV), s.metadata_bytes(md.LABELS_CSV), str(root))
    else:
        meta = md.load_dir(root)
    rows = meta.rows
    splits = Counter(r.subset for r in rows)
    museums = Counter(r.museum for r in rows)
    per = {c: Counter(r.subset for r in rows if r.medium == c) for c in meta.classes}
    plt = _plt()
    figs = []

    fig, ax = plt.subplots(figsize=(12, 5))
    x = np.arange(len(meta.classes))
    bottom = np.zeros(len(x))
    for s in md.SPLITS:
        v = np.array([per[c][s] for c in meta.classes])
        ax.bar(x, v, bottom=bottom, label=f"{s} ({splits[s]:,})")
        bottom += v
    ax.set_xticks(x, meta.classes, rotation=90, fontsize=8)
    ax.set(ylabel="images", title="Images per class and split")
    ax.legend()
    figs.append(_save(fig, out / "class_split_counts.png", plt))

    fig, ax = plt.subplots(figsize=(12, 5))
    mus = sorted(museums)
    bottom = np.zeros(len(x))
    for m in mus:
        v = np.array([sum(1 for r in rows if r.medium == c and r.museum == m) for c in meta.classes])
        ax.bar(x, v, bottom=bottom, label=f"{m} ({museums[m]:,})")
        bottom += v
    ax.set_xticks(x, meta.classes, rotation=90, fontsize=8)
    ax.set(ylabel="images", title="Images per class and museum")
    ax.legend(fontsize=8)
    figs.append(_save(fig, out / "class_museum_counts.png", plt))

    w = np.array([r.width for r in rows], float)
    h = np.array([r.height for r in rows], float)
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
    figs.append(_save(fig, out / "sizes.png", plt))

    grid = None
    data = root / "data"
    if data.is_dir():
        grid = _grid(meta, data, out / "samples.png", per_class, plt)
        figs.append(grid)
    stats = {"rows": len(rows), "classes": len(meta.classes), "splits": dict(splits), "museums": dict(museums),
             "median_mpx": float(np.median(w * h / 1e6)), "max_mpx": float((w * h).max() / 1e6),
             "aspect_min": float((w / h).min()), "aspect_max": float((w / h).max()),
             "beyond_4_to_1": int(((w / h) > 4).sum() + ((w / h) < 0.25).sum())}
    md_lines = [f"# Data report: {root}", "", f"{stats['rows']:,} images, {stats['classes']} classes.", "",
                "| split | images |", "|---|---|"] + [f"| {s} | {splits[s]:,} |" for s in md.SPLITS]
    md_lines += ["", "| museum | images |", "|---|---|"] + [f"| {m} | {museums[m]:,} |" for m in mus]
    md_lines += ["", "| class | " + " | ".join(md.SPLITS) + " |", "|---|" + "---|" * 3]
    md_lines += [f"| {c} | " + " | ".join(str(per[c][s]) for s in md.SPLITS) + " |" for c in meta.classes]
    md_lines += ["", f"Median {stats['median_mpx']:.1f} Mpx, largest {stats['max_mpx']:.0f} Mpx; aspect ratio "
                 f"{stats['aspect_min']:.2f} to {stats['aspect_max']:.1f}; {stats['beyond_4_to_1']} images beyond 1:4 or 4:1.", ""]
    md_lines += [f"![{p.stem}]({p.name})" for p in figs]
    (out / "explore.md").write_text("\n".join(md_lines) + "\n")
    return stats


def _grid(meta: md.Metadata, data: Path, path: Path, per_class: int, plt) -> Path:
    from PIL import Image

    fig, axes = plt.subplots(len(meta.classes), per_class, figsize=(per_class * 1.6, len(meta.classes) * 1.5))
    for i, c in enumerate(meta.classes):
        files = [r.file for r in meta.rows if r.medium == c and (data / r.file).is_file()][:per_class]
        for j in range(per_class):
            a = axes[i, j]
            a.axis("off")
            if j < len(files):
                with Image.open(data / files[j]) as im:
                    im.draft("RGB", (160, 160))
                    im.thumbnail((160, 160))
                    a.imshow(np.asarray(im.convert("RGB")))
        axes[i, 0].set_title(c, fontsize=7, loc="left")
    return _save(fig, path, plt)
