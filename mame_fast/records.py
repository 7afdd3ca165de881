"""Stage 5a: what a run leaves behind: run.json, metrics.jsonl, histograms and plots, and the live display.

Everything a user needs to defend a decision is written as the run goes (one metrics row per epoch,
histograms at chosen epochs) and drawn at the end (``plot_run``, also callable later by
``mame-fast report``). Plots are PNG files in ``<run>/plots/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import atomic_write_text

# -- run.json and metrics.jsonl -----------------------------------------------------------------------


def read_run_info(run_dir: Path) -> dict:
    p = Path(run_dir) / "run.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def write_run_info(run_dir: Path, info: dict) -> None:
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=1))


def update_run_info(run_dir: Path, changes: dict) -> None:
    write_run_info(run_dir, {**read_run_info(run_dir), **changes})


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    # A resumed run may repeat an epoch that was logged before the interruption: keep the last.
    by_epoch = {r["epoch"]: r for r in rows}
    return [by_epoch[k] for k in sorted(by_epoch)]


# -- accumulating on the device: no host sync per step ------------------------------------------------


class EpochAccumulator:
    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, grad norm
        self.last = torch.zeros((), device=device)
        self.count = 0
        self.steps = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, gnorm: torch.Tensor, n: int) -> None:
        self.sums += torch.stack([loss.double() * n, correct.double(), gnorm.double()])
        self.last = loss
        self.count += n
        self.steps += 1

    def sync(self) -> dict:
        s = self.sums.tolist()
        return {"loss_last": float(self.last), "loss": s[0] / max(1, self.count), "top1": s[1] / max(1, self.count),
                "grad_norm": s[2] / max(1, self.steps)}

    def epoch_stats(self) -> dict:
        s = self.sync()
        return {"train_loss": s["loss"], "train_top1": s["top1"], "grad_norm": s["grad_norm"]}


class Progress:
    """Rich live display on rank 0: epoch, step, loss, accuracy, images/s, data-wait share, ETA."""

    def __init__(self, master: bool, console, epochs: int, steps: int):
        self.p = None
        if not master:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn

        self.p = RP(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
        self.p.start()
        self.epochs = epochs
        self.task = self.p.add_task("train", total=steps, epoch=1, info="")
        self.console = self.p.console

    def update(self, epoch: int, step: int, s: dict, lr: float, wait: float) -> None:
        if self.p:
            info = f"loss {s['loss']:.3f} acc {s['top1']:.3f} lr {lr:.2e} data-wait {wait:.0%}"
            self.p.update(self.task, completed=step, epoch=epoch + 1, info=info)

    def epoch_done(self, row: dict) -> None:
        if self.p:
            v = row.get("val", {})
            ema = f" ema {row['val_ema']['top1']:.3f}" if "val_ema" in row else ""
            self.console.print(
                f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.3f} acc {row['train_top1']:.3f}  "
                f"val loss {v.get('loss', float('nan')):.3f} top1 {v.get('top1', float('nan')):.3f} "
                f"top5 {v.get('top5', float('nan')):.3f} bal {v.get('balanced_acc', float('nan')):.3f}{ema}  "
                f"{row['images_per_s']:.0f} img/s  data-wait {row['data_wait']:.0%}"
            )
            if row["epoch"] < self.epochs:
                self.p.reset(self.task, total=self.p.tasks[self.task].total, epoch=row["epoch"] + 1, info="")

    def close(self) -> None:
        if self.p:
            self.p.stop()
            self.p = None


# -- TensorBoard (optional) ---------------------------------------------------------------------------


class MissingPackage(RuntimeError):
    pass


class TensorBoard:
    """The same scalars, histograms and plots in TensorBoard; does nothing when ``run_dir`` is None."""

    def __init__(self, run_dir: Path | None):
        self.w = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise MissingPackage("tensorboard=true needs the tensorboard package: pip install 'mame-fast[tensorboard]'") from e
        self.w = SummaryWriter(str(Path(run_dir) / "tb"))

    def step(self, step: int, stats: dict, lr: float, wait: float) -> None:
        if self.w:
            self.w.add_scalar("train/loss_running", stats["loss"], step)
            self.w.add_scalar("train/top1_running", stats["top1"], step)
            self.w.add_scalar("train/lr", lr, step)
            self.w.add_scalar("train/data_wait", wait, step)

    def epoch(self, row: dict) -> None:
        if not self.w:
            return
        e = row["epoch"]
        for k in ("train_loss", "train_top1", "grad_norm", "images_per_s", "data_wait", "lr"):
            self.w.add_scalar(f"epoch/{k}", row[k], e)
        for part in ("val", "val_ema"):
            for k in ("loss", "top1", "top5", "balanced_acc"):
                if part in row:
                    self.w.add_scalar(f"{part}/{k}", row[part][k], e)

    def histograms(self, run_dir: Path, epoch: int) -> None:
        if not self.w:
            return
        d = np.load(Path(run_dir) / "hist" / f"epoch_{epoch:03d}.npz")
        for k in sorted({k.rsplit("/", 1)[0] for k in d.files}):
            c, e = d[f"{k}/counts"], d[f"{k}/edges"]
            centers = (e[:-1] + e[1:]) / 2
            self.w.add_histogram_raw(k, min=float(e[0]), max=float(e[-1]), num=int(c.sum()), sum=float((c * centers).sum()),
                                     sum_squares=float((c * centers**2).sum()), bucket_limits=e[1:].tolist(),
                                     bucket_counts=c.tolist(), global_step=epoch)

    def images(self, paths: list[Path]) -> None:
        if not self.w:
            return
        from PIL import Image

        for p in paths:
            self.w.add_image(f"plots/{p.stem}", np.asarray(Image.open(p).convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        if self.w:
            self.w.close()
            self.w = None


# -- histograms ---------------------------------------------------------------------------------------


def hist_epochs(epochs: int, n: int) -> set[int]:
    """0-based epochs at which histograms are saved: first, evenly spaced, last."""
    if n <= 0:
        return set()
    return {int(round(i * (epochs - 1) / max(1, n - 1))) for i in range(n)}


@torch.no_grad()
def save_histograms(run_dir: Path, model, batch, epoch: int, autocast, bins: int = 60) -> None:
    """Weights and activations per stage (one validation batch, run under the run's ``autocast`` context, as
    everything that runs the model), as histogram counts in hist/epoch_N.npz."""
    out = Path(run_dir) / "hist"
    out.mkdir(exist_ok=True)
    data = {}
    ends = [-1] + model.stage_ends
    for s in range(len(model.stage_ends)):
        w = torch.cat([p.detach().flatten().float().cpu() for b in model.blocks[ends[s] + 1 : ends[s + 1] + 1]
                       for n, p in b.named_parameters() if p.dim() > 1])
        data[f"weights/stage{s + 1}"] = w.numpy()
    was = model.training
    model.eval()
    taps: dict = {}
    with autocast():
        model.features(batch.images, batch.sizes if batch.padded else None, taps)
    model.train(was)
    for k, v in taps.items():
        data[f"activations/{k}"] = v.float().flatten().cpu().numpy()
    arrays = {}
    for k, v in data.items():
        counts, edges = np.histogram(v, bins=bins)
        arrays[f"{k}/counts"], arrays[f"{k}/edges"] = counts, edges
    np.savez(out / f"epoch_{epoch:03d}.npz", **arrays)


# -- plots --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, classes: list[str]) -> list[Path]:
    """Curves, confusion matrix, per-class accuracy and histograms of a run, as PNGs in <run>/plots/."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    plt = _plt()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    ep = [r["epoch"] for r in rows]
    val = [r.get("val") for r in rows]
    vep = [e for e, v in zip(ep, val) if v]
    ema = [r.get("val_ema") for r in rows]

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    ax[0].plot(vep, [v["loss"] for v in val if v], "s-", label="val")
    if any(ema):
        ax[0].plot([e for e, v in zip(ep, ema) if v], [v["loss"] for v in ema if v], "^--", label="val (EMA)")
    ax[0].set(xlabel="epoch", ylabel="loss (train: smoothed/mixed targets)", title="Loss")
    ax[1].plot(ep, [r["train_top1"] for r in rows], "o-", label="train")
    ax[1].plot(vep, [v["top1"] for v in val if v], "s-", label="val top-1")
    ax[1].plot(vep, [v["top5"] for v in val if v], "s:", label="val top-5")
    if any(ema):
        ax[1].plot([e for e, v in zip(ep, ema) if v], [v["top1"] for v in ema if v], "^--", label="val top-1 (EMA)")
    ax[1].axhline(1 / len(classes), color="grey", lw=0.8, ls="--", label="chance")
    ax[1].set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    written.append(_save(fig, out / "curves.png", plt))

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
    ax[0].plot(ep, [r["lr"] for r in rows], "o-")
    ax[0].set(xlabel="epoch", title="Learning rate (end of epoch)")
    ax[1].plot(ep, [r["images_per_s"] for r in rows], "o-", label="images/s")
    ax2 = ax[1].twinx()
    ax2.plot(ep, [100 * r["data_wait"] for r in rows], "r.--", label="data wait %")
    ax2.set_ylim(0, 100)
    ax[1].set(xlabel="epoch", title="Throughput (line) and data-wait share (red, %)")
    ax[2].plot(ep, [r["grad_norm"] for r in rows], "o-")
    ax[2].set(xlabel="epoch", title="Mean gradient norm")
    for a in ax:
        a.grid(alpha=0.3)
    written.append(_save(fig, out / "training.png", plt))

    last = next((v for v in reversed(val) if v), None)
    if last:
        conf = np.array(last["confusion"], float)
        norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(11, 10))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=f"Validation confusion matrix, row-normalized (epoch {vep[-1]})")
        fig.colorbar(im, fraction=0.046)
        written.append(_save(fig, out / "confusion.png", plt))
        fig, ax = plt.subplots(figsize=(11, 4))
        pc = [np.nan if v is None else v for v in last["per_class"]]
        ax.bar(range(len(classes)), pc)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set(ylabel="accuracy", ylim=(0, 1), title=f"Validation accuracy per class (epoch {vep[-1]}); balanced {last['balanced_acc']:.3f}")
        written.append(_save(fig, out / "per_class.png", plt))

    hists = sorted((run_dir / "hist").glob("epoch_*.npz"))
    if hists:
        first = np.load(hists[0])
        keys = sorted({k.rsplit("/", 1)[0] for k in first.files})
        fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 6.5), squeeze=False)
        for a, k in zip(axes.flat, keys):
            for h in hists:
                d = np.load(h)
                e = d[f"{k}/edges"]
                a.stairs(d[f"{k}/counts"], e, label=h.stem.replace("_", " "))
            a.set_title(k, fontsize=9)
            a.set_yscale("log")
            a.legend(fontsize=7)
        written.append(_save(fig, out / "histograms.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
