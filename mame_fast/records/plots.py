"""Stage 5c: the plots of a run, as PNG files in ``<run>/plots/``: curves, training dynamics, the confusion matrix,
per-class accuracy, histograms. Drawn at the end of a run and by ``mame-fast report``; ``pyplot`` and
``save_figure`` serve the other figures of the project (compare, explore)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .records import load_histograms, read_metrics
from .rundir import RunDir


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """The figure as a PNG, published atomically (a report or a slide deck never reads half a picture)."""
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" (subfigures) lays itself out
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(buf.getbuffer()))


def plot_run(run_dir: str | Path, classes: list[str]) -> list[Path]:
    """Curves, training dynamics, confusion matrix, per-class accuracy and histograms of a run; the files written."""
    run = RunDir(run_dir)
    rows = read_metrics(run.path)
    if not rows:
        return []
    out = run / RunDir.PLOTS
    out.mkdir(exist_ok=True)
    written = [plot_curves(rows, classes, out / RunDir.CURVES), plot_training(rows, out / RunDir.TRAINING)]
    last = next((r for r in reversed(rows) if r.get("val")), None)
    if last:
        written += [plot_confusion(last, classes, out / RunDir.CONFUSION),
                    plot_per_class(last, classes, out / RunDir.PER_CLASS)]
    hists = sorted((run / RunDir.HIST).glob("epoch_*.npz"))
    if hists:
        written.append(plot_histograms(hists, out / RunDir.HISTOGRAMS))
    return written


def plot_curves(rows: list[dict], classes: list[str], path: Path) -> Path:
    """Train and validation loss and accuracy per epoch (EMA too when present), against chance."""
    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    series = {part: [(r["epoch"], r[part]) for r in rows if r.get(part)] for part in ("val", "val_ema")}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    ax[1].plot(ep, [r["train_top1"] for r in rows], "o-", label="train")
    for part, style, name in (("val", "s-", "val"), ("val_ema", "^--", "val (EMA)")):
        if series[part]:
            e, v = zip(*series[part])
            ax[0].plot(e, [x["loss"] for x in v], style, label=name)
            ax[1].plot(e, [x["top1"] for x in v], style, label=f"{name} top-1")
            if part == "val":
                ax[1].plot(e, [x["top5"] for x in v], "s:", label="val top-5")
    ax[0].set(xlabel="epoch", ylabel="cross-entropy", title="Loss (train: on its smoothed or mixed targets)")
    ax[0].set_ylim(bottom=0)  # from 0: a short run's small changes do not fill the axis and look large
    ax[1].axhline(1 / len(classes), color="grey", lw=0.8, ls="--", label="chance")
    ax[1].set(xlabel="epoch", ylabel="accuracy (fraction of images)", title="Accuracy", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
        whole_epochs(a)
        legend_below(a)
    return save_figure(fig, path)


def whole_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_below(ax, ncol: int = 4, handles=None) -> None:
    """The legend under the axes, never over the curves (the last epochs are what a reader looks at)."""
    kw = {"handles": handles} if handles else {}
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol, fontsize=8, frameon=False, **kw)


def plot_training(rows: list[dict], path: Path) -> Path:
    """Learning rate, throughput with the data-wait share, and the mean gradient norm per epoch; and the training budget
    per epoch of a run on a pixel-budget schedule."""
    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    ramped = [r for r in rows if "budget" in r]
    fig, ax = plt.subplots(1, 4 if ramped else 3, figsize=(18 if ramped else 14, 3.8))
    ax[0].plot(ep, [r["lr"] for r in rows], "o-")
    ax[0].set(xlabel="epoch", ylabel="learning rate (at the run's batch size)", title="Learning rate (end of epoch)")
    speed = ax[1].plot(ep, [r["images_per_s"] for r in rows], "o-", label="training images/s (all ranks)")
    ax2 = ax[1].twinx()
    wait = ax2.plot(ep, [100 * r["data_wait"] for r in rows], "r.--", label="data wait (% of the step time)")
    ax2.set(ylim=(0, 100), ylabel="data wait (%)")
    ax[1].set(xlabel="epoch", ylabel="images/s", title="Throughput and time waiting for data")
    legend_below(ax[1], ncol=1, handles=speed + wait)
    ax[2].plot(ep, [r["grad_norm"] for r in rows], "o-")
    ax[2].set(xlabel="epoch", ylabel="L2 norm of all gradients, mean per step", title="Gradient norm (before clipping)")
    if ramped:
        key = next(iter(ramped[0]["budget"]))
        ax[3].step([r["epoch"] for r in ramped], [r["budget"][key] for r in ramped], "o-", where="mid")
        ax[3].set(xlabel="epoch", ylabel="pixels per image" if key == "pixels" else "crop side (px)",
                  title="Training budget (schedule)", ylim=(0, None))
    for a in ax:
        a.grid(alpha=0.3)
        whole_epochs(a)
    return save_figure(fig, path)


def plot_confusion(row: dict, classes: list[str], path: Path) -> Path:
    """The row-normalized validation confusion matrix of one epoch."""
    plt = pyplot()
    conf = np.array(row["val"]["confusion"], float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 10))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"Validation confusion matrix, row-normalized (epoch {row['epoch']})")
    fig.colorbar(im, fraction=0.046)
    return save_figure(fig, path)


def plot_per_class(row: dict, classes: list[str], path: Path) -> Path:
    """Validation accuracy per class with its 95% interval (Wilson, from the class's image count) and the count in the
    class's label: on MAMe's 50 images a class, one bar's interval is about +-13 points."""
    from .stats import wilson

    plt = pyplot()
    acc = np.array([np.nan if v is None else v for v in row["val"]["per_class"]], float)
    counts = np.array(row["val"]["confusion"], float).sum(1).astype(int) if row["val"].get("confusion") else \
        np.zeros(len(classes), int)
    bounds = np.array([wilson(a, n) if n and np.isfinite(a) else (np.nan, np.nan) for a, n in zip(acc, counts)])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(range(len(classes)), acc, yerr=np.abs(np.vstack([acc - bounds[:, 0], bounds[:, 1] - acc])), capsize=2,
           error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
    ax.set_xticks(range(len(classes)), [f"{c} ({n})" for c, n in zip(classes, counts)], rotation=90, fontsize=7)
    ax.set(xlabel="true class (validation images)", ylabel="accuracy, with its 95% interval", ylim=(0, 1),
           title=f"Validation accuracy per class (epoch {row['epoch']}); balanced {row['val']['balanced_acc']:.3f}")
    return save_figure(fig, path)


HISTOGRAM_CAPTION = ("What to look for: weights whose spread collapses towards 0 or keeps growing between epochs; "
                     "activations spreading over orders of magnitude from stage to stage (exploding) or shrinking "
                     "towards 0 (vanishing). After a ReLU a tall bar at 0 is normal (every negative input gives 0); "
                     "dead units show as that bar with almost nothing beside it.")


def plot_histograms(files: list[Path], path: Path) -> Path:
    """Weights and activations per stage, one line per saved epoch, log counts, with what to look for."""
    plt = pyplot()
    from matplotlib.ticker import NullLocator

    per_epoch = [(f.stem.replace("_", " "), load_histograms(f)) for f in files]
    keys = list(per_epoch[0][1])
    cols = (len(keys) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 7.5), squeeze=False)
    for a, k in zip(axes.flat, keys):
        kind, stage = k.split("/", 1)
        for label, h in per_epoch:
            a.stairs(*h[k], label=label)
        a.set_title(f"{stage}: {kind}", fontsize=9)
        a.set(xlabel="weight value" if kind == "weights" else "activation value (stage output, one val batch)",
              ylabel="count (log)")
        a.set_yscale("log")
        # A log axis's minor ticks, 8 per decade, took a third of the figure's time (0.3-0.4 s at the end of each run)
        # and say nothing that the labelled decades don't.
        a.yaxis.set_minor_locator(NullLocator())
        a.legend(fontsize=7)
    fig.suptitle(HISTOGRAM_CAPTION, fontsize=9, wrap=True)
    return save_figure(fig, path)
