"""Stage 5d: what a run shows while it runs: a live display on rank 0 (a rich progress bar on a terminal; plain,
timestamped log lines under SLURM, nohup or CI, where control characters would garble the log), and the
optional TensorBoard log of the same scalars, histograms and plots."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import numpy as np

from ..errors import Expected
from .records import load_histograms
from .rundir import RunDir


class Progress:
    """Epoch, step, loss, accuracy, learning rate, images/s and data-wait share, at log steps; a line per epoch."""

    def __init__(self, master: bool, console, epochs: int, steps: int | list[int], plain: bool | None = None):
        self.p = None
        self.master, self.epochs = master, epochs
        self.each = steps if isinstance(steps, list) else [steps] * epochs  # per epoch (a budget schedule varies it)
        self.steps = self.each[0]
        # Plain lines wherever stdout is not a terminal (a file, a pipe, a SLURM log).
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        if not master or self.plain:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RP

        self.p = RP(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=steps, epoch=1, info="")
        self.console = self.p.console

    def say(self, text: str) -> None:
        """A line of its own (start-up facts, warnings), in either mode."""
        if not self.master:
            return
        if self.p:
            self.console.print(text)
        else:
            print(f"{dt.datetime.now().isoformat(timespec='seconds')} {text}", flush=True)

    def update(self, epoch: int, step: int, s: dict, lr: float) -> None:
        info = (f"loss {s['loss']:.3f} acc {s['top1']:.3f} lr {lr:.2e} {s['images_per_s']:.0f} img/s "
                f"data-wait {s['data_wait']:.0%}")
        if self.p:
            self.p.update(self.task, completed=step, epoch=epoch + 1, info=info)
        elif self.master:
            self.say(f"epoch {epoch + 1}/{self.epochs} step {step}/{self.steps} {info}")

    def epoch_done(self, row: dict) -> None:
        if not self.master:
            return
        v = row.get("val", {})
        ema = f" ema {row['val_ema']['top1']:.3f}" if "val_ema" in row else ""
        self.say(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.3f} acc {row['train_top1']:.3f}  "
                 f"val loss {v.get('loss', float('nan')):.3f} top1 {v.get('top1', float('nan')):.3f} "
                 f"top5 {v.get('top5', float('nan')):.3f} bal {v.get('balanced_acc', float('nan')):.3f}{ema}  "
                 f"{row['images_per_s']:.0f} img/s  data-wait {row['data_wait']:.0%}")
        if row["epoch"] < min(self.epochs, len(self.each)):
            self.steps = self.each[row["epoch"]]
            if self.p:
                self.p.reset(self.task, total=self.steps, epoch=row["epoch"] + 1, info="")

    def close(self) -> None:
        if self.p:
            self.p.stop()
            self.p = None


class MissingPackage(Expected, RuntimeError):
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
        self.w = SummaryWriter(str(Path(run_dir) / RunDir.TB))

    def step(self, step: int, stats: dict, lr: float) -> None:
        if self.w:
            self.w.add_scalar("train/loss_running", stats["loss"], step)
            self.w.add_scalar("train/top1_running", stats["top1"], step)
            self.w.add_scalar("train/lr", lr, step)
            self.w.add_scalar("train/data_wait", stats["data_wait"], step)

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
        for k, (c, e) in load_histograms(RunDir(run_dir).hist_file(epoch)).items():
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
