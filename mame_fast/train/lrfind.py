"""Stage 4g: the learning-rate range test (`mame-fast lr-find`): the evidence for a learning rate.

A short run whose learning rate grows exponentially, step by step, from ``start`` to ``end`` (per 256 images, as
``optim.lr``), through the trainer's own step: the same loader, model, precision, optimizer, mixing and clipping. The
loss is smoothed (a bias-corrected exponential mean) and the test stops once it diverges (above ``diverge`` times its
minimum, or non-finite). Suggested: the rate where the smoothed loss fell fastest (against log lr), and a tenth of the
rate at its minimum, an upper bound for the peak rate; ``optim.lr`` between the two is the usual choice.

The model, optimizer, scaler, EMA and RNG states are restored afterwards: nothing the test learned leaks into a run
(``range_test``). `mame-fast lr-find` records it as a numbered run folder of kind ``lr-find`` (config, ``lr_find.json``,
``plots/lr_find.png``, a card), with no checkpoint, so that a later run's card cites it with ``--after N``.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from ..errors import Expected
from ..files import atomic_write_text
from ..input.mixing import step_rng
from ..records.card import plain_text
from ..records.facts import range_test_sentence
from ..records.plots import pyplot, save_figure
from ..records.rundir import RunDir
from ..records.runrecord import RunRecord
from .step import train_step


def range_test(s, start: float = 1e-5, end: float = 10.0, steps: int = 100, diverge: float = 4.0,
               smooth: float = 0.9) -> dict:
    """Run the test on session ``s`` (``loop.build``'s); returns the tested rates, raw and smoothed losses and the
    suggestion. Every state it touches is restored."""
    model, opt, rt, cfg = s.model, s.opt, s.rt, s.cfg
    saved = s.state.snapshot(copy=True)
    scale = s.global_batch / 256  # rates are per 256 images; the optimizer's are at this batch
    rates = [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]
    sched = _Held()  # the rate is set per step below
    tried, raw, smoothed = [], [], []
    mean, best, diverged = 0.0, math.inf, False
    try:
        model.train()
        batches = _batches(s.train_loader)
        for i, lr in enumerate(rates):
            for g in opt.param_groups:
                g["lr"] = lr * scale
            batch = next(batches)
            rng = step_rng(cfg.seed, 0, i, rt.rank)
            loss = float(train_step(s.net, batch, opt, sched, s.ema, rt, cfg, rng, s.graphs)[0])  # a sync per step: fine
            mean = smooth * mean + (1 - smooth) * loss
            value = mean / (1 - smooth ** (i + 1))
            tried.append(lr)
            raw.append(loss)
            smoothed.append(value)
            best = min(best, value)
            if not math.isfinite(value) or value > diverge * best:
                diverged = True
                break
    finally:
        s.state.restore(saved)
    return {"lr": tried, "loss": raw, "smoothed": smoothed, **suggest(tried, smoothed), "start": start, "end": end,
            "global_batch": s.global_batch, "diverged": diverged}


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    """The rate of steepest descent of the smoothed loss against log lr, and a tenth of the rate of its minimum; both
    lie before the loss diverged. ``usable`` is False when the loss did not fall over at least three tested rates
    first (a test that started too high): then there is no range to suggest."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    lo = finite[min(len(finite) - 1, len(finite) // 10)] if finite else 0  # skip the first tenth: the mean settling
    low = min(finite, key=lambda i: smoothed[i]) if finite else 0
    usable = low - lo >= 2 and smoothed[low] < smoothed[0]
    slopes = np.gradient(np.asarray(smoothed[: low + 1], float), np.log(lrs[: low + 1])) if low - lo >= 2 else None
    steepest = lo + int(np.argmin(slopes[lo:])) if slopes is not None else low
    peak = max(lrs[0], lrs[low] / 10)
    return {"steepest_lr": lrs[steepest], "min_loss_lr": lrs[low], "suggested_lr": max(min(lrs[steepest], peak), lrs[0]),
            "range": [min(lrs[steepest], peak), max(lrs[steepest], peak)], "usable": usable}


class NoUsableRange(Expected, RuntimeError):
    """The loss did not fall before it diverged: the test started too high (or ended too low) to show a range."""

    run_status = "diverged"  # what the run record writes


class _Held:
    """The step's scheduler during the test: the test sets each step's rate itself."""

    def step(self) -> None:
        pass


def _batches(loader):
    """Training batches without end: epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def plot(result: dict, path: Path) -> Path:
    """Loss against learning rate (log axis), raw and smoothed, with the suggested range."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(result["lr"], result["loss"], ".", alpha=0.35, label="loss per step")
    ax.plot(result["lr"], result["smoothed"], "-", label="smoothed")
    lo, hi = result["range"]
    ax.axvspan(lo, hi, color="green", alpha=0.15, label=f"suggested range {lo:.2g} to {hi:.2g}")
    ax.axvline(result["suggested_lr"], color="green", lw=1)
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * min(finite)) * 1.05)
    ax.set(xlabel="learning rate per 256 images (optim.lr)", ylabel="training loss (cross-entropy)")
    ax.set_title(textwrap.fill(plain_text(range_test_sentence(result)), 100), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def run(cfg, name: str = "lr-find", meta: dict | None = None, console=None, start: float = 1e-5, end: float = 10.0,
        steps: int = 100) -> Path:
    """`mame-fast lr-find`: the range test on ``cfg``'s data, model and optimizer, recorded as a numbered run folder of
    kind lr-find (no checkpoint); returns the folder."""
    from ..config import ConfigError, to_dict
    from ..records.live import Progress
    from .loop import build
    from .runtime import setup_runtime
    from .spec import spec_dict

    rt = setup_runtime(cfg.precision, cfg.cudnn_benchmark)
    try:
        if rt.world > 1:
            raise ConfigError("lr-find runs in one process: start it without torchrun")
        s = build(cfg, rt)
        try:
            with RunRecord.create(cfg.out, name, to_dict(cfg), spec_dict(s.spec),
                                  {**(meta or {}), "kind": "lr-find", "classes": s.classes}, command="lr-find") as record:
                record.start()
                record.finish("finished", lr_find=measure(s, record.dir, Progress(rt.master, console, 1, steps), start,
                                                          end, steps))
            return record.path
        finally:
            s.close()
    finally:
        rt.close()


def measure(s, run_dir: RunDir, progress, start: float, end: float, steps: int) -> dict:
    """The test, its numbers (lr_find.json) and its plot; returns run.json's summary of it."""
    t = time.perf_counter()
    progress.say(f"learning-rate range test: up to {steps} steps from {start:g} to {end:g} per 256 images")
    result = range_test(s, start, end, steps)
    atomic_write_text(run_dir / RunDir.LR_FIND, json.dumps(result, indent=1))
    plot(result, run_dir.plot(RunDir.LR_PLOT))
    if not result["usable"]:
        lrs, losses = result["lr"], result["loss"]
        raise NoUsableRange(
            f"no learning-rate range to suggest: the loss went from {losses[0]:.3g} at lr {lrs[0]:.3g} to {losses[-1]:.3g} "
            f"at lr {lrs[-1]:.3g} in {len(lrs)} steps without falling first ({'it diverged' if result['diverged'] else 'flat'}"
            f"; plot {run_dir.plot(RunDir.LR_PLOT)}). Start lower (--start {lrs[0] / 1e3:.3g}) or end higher (--end)")
    summary = {**{k: result[k] for k in ("steepest_lr", "min_loss_lr", "suggested_lr", "range", "diverged")},
               "start": start, "end": end, "steps": len(result["lr"]), "seconds": round(time.perf_counter() - t, 1)}
    progress.say(f"{plain_text(range_test_sentence(summary))}; plot {run_dir.plot(RunDir.LR_PLOT)}")
    progress.close()
    return summary
