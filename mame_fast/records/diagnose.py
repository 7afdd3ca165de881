"""Stage 5c: what state a run is in, from its curves, with the numbers behind the verdict and the next
step of the course's method: start small and underfit, grow until it overfits, then regularize.

Verdicts, checked in this order (the first that holds wins):
- ``diverged``: a non-finite loss, or the last train loss above 3x its minimum;
- ``overfitting``: the validation loss (smoothed over 3 epochs: a small split is noisy) has stopped improving or
  risen since its minimum, at least 2 epochs before the end, while the training loss kept falling (by over ``5 tol``
  of itself), and the gap between the two grew by more than the validation loss's noise (a loss that only stopped
  improving counts once the accuracy gap exceeds ``gap``); reports the epoch where it started and the train/val gap;
- ``unstable``: the validation loss zig-zags without that trend (over a third of the epoch-to-epoch changes reverse
  direction with swings above 10% of the loss range);
- ``not converged``: training accuracy is low but the validation loss still falls fast (more than ``early`` of
  itself per epoch over the last epochs): too early to judge the model's capacity (a 3-epoch run);
- ``underfitting``: training accuracy is low (below ``low_acc``), the losses plateaued or falling slowly;
- ``not converged``: still improving at the end (the validation loss fell over the last epochs);
- ``fitting``: none of the above: the validation loss is at or near its minimum and has flattened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEXT = {
    "diverged": "Lower the learning rate (e.g. /3), add warm-up or gradient clipping (optim.clip_grad=1), check the data.",
    "unstable": "Lower the learning rate or raise the batch size; consider EMA weights (optim.ema=0.999).",
    "overfitting": "Regularize: more augmentation (data.color_jitter, data.scale_min lower), optim.mixup/cutmix, "
                   "drop_path/dropout in the spec, more weight decay, label smoothing; or stop at the best epoch.",
    "underfitting": "Grow the model (wider or deeper stages in the spec), train longer, or lower regularization.",
    "not converged": "Train longer (more epochs): the validation loss was still falling.",
    "fitting": "Grow the model until it overfits, then regularize; or run the test set once with the best checkpoint.",
}


@dataclass
class Diagnosis:
    verdict: str
    reasons: list[str]
    next_step: str
    numbers: dict = field(default_factory=dict)

    def text(self) -> str:
        return f"{self.verdict}: " + "; ".join(self.reasons) + f". Next: {self.next_step}"


def diagnose_history(train_loss: list[float], val_loss: list[float], train_acc: list[float], val_acc: list[float],
                     low_acc: float = 0.6, tol: float = 0.02, window: int = 3, early: float = 0.04,
                     gap: float = 0.1) -> Diagnosis:
    """Classify a run from per-epoch histories (all the same length, one value per epoch)."""
    tl, vl = np.asarray(train_loss, float), np.asarray(val_loss, float)
    ta, va = np.asarray(train_acc, float), np.asarray(val_acc, float)
    n = len(tl)
    num = {"epochs": n}
    if n == 0:
        return Diagnosis("not converged", ["no finished epoch"], NEXT["not converged"], num)
    num.update(final_train_loss=float(tl[-1]), final_val_loss=float(vl[-1]), final_train_acc=float(ta[-1]),
               final_val_acc=float(va[-1]), best_val_acc=float(np.nanmax(va)), best_epoch=int(np.nanargmax(va)) + 1,
               gap=float(ta[-1] - va[-1]))
    if not (np.isfinite(tl).all() and np.isfinite(vl).all()) or tl[-1] > 3 * np.min(tl):
        bad = int(np.argmax(~np.isfinite(tl) | ~np.isfinite(vl) | (tl > 3 * np.nanmin(tl)))) + 1
        why = f"loss became non-finite or exploded at epoch {bad} (train loss {tl[bad - 1]:.3g}, minimum {np.nanmin(tl):.3g})"
        return Diagnosis("diverged", [why],
                         NEXT["diverged"], {**num, "epoch": bad})
    if (over := overfitting(tl, vl, ta, va, tol, window, gap, num)) is not None:
        return over
    rng = max(np.ptp(vl), 1e-12)
    d = np.diff(vl)
    if n >= 5:
        flips = np.sum(np.sign(d[1:]) != np.sign(d[:-1]))
        big = np.mean(np.abs(d) > 0.1 * rng)
        if flips / (len(d) - 1) > 1 / 3 and big > 0.5 and np.ptp(vl[-window:]) > 0.25 * rng:
            why = f"validation loss changed direction {flips} times in {n} epochs with swings of up to {np.abs(d).max():.3f}"
            return Diagnosis("unstable", [why],
                             NEXT["unstable"], {**num, "reversals": int(flips)})
    k = min(window, n - 1)
    falling = k > 0 and vl[-1] < vl[-1 - k] - tol * max(abs(vl[-1 - k]), 1e-12)
    per_epoch = (vl[-1 - k] - vl[-1]) / (k * max(abs(vl[-1 - k]), 1e-12)) if k > 0 else 0.0
    if ta[-1] < low_acc and per_epoch > early:
        why = (f"training accuracy still {ta[-1]:.3f}, but the validation loss still falls {per_epoch:.0%} per epoch "
               f"({vl[-1 - k]:.3f} to {vl[-1]:.3f} over the last {k} epochs): too early to judge the model's capacity")
        return Diagnosis("not converged", [why], NEXT["not converged"], num)
    if ta[-1] < low_acc:
        state = "still falling" if falling else "plateaued"
        return Diagnosis("underfitting", [f"training accuracy only {ta[-1]:.3f} (< {low_acc}); losses {state} "
                                          f"(train {tl[-1]:.3f}, val {vl[-1]:.3f})",
                                          f"train/val accuracy gap {ta[-1] - va[-1]:+.3f}"], NEXT["underfitting"], num)
    if falling:
        why = f"validation loss still fell from {vl[-1 - k]:.3f} to {vl[-1]:.3f} over the last {k} epochs"
        return Diagnosis("not converged", [why],
                         NEXT["not converged"], num)
    why = (f"validation loss flat near its minimum {vl.min():.3f}; train accuracy {ta[-1]:.3f}, val {va[-1]:.3f}, "
           f"gap {ta[-1] - va[-1]:+.3f}")
    return Diagnosis("fitting", [why],
                     NEXT["fitting"], num)


def overfitting(tl: np.ndarray, vl: np.ndarray, ta: np.ndarray, va: np.ndarray, tol: float, window: int, gap: float,
                num: dict) -> Diagnosis | None:
    """The overfitting verdict, or None.

    The validation loss of a small split is noisy (29 to 1,450 images), so it is judged smoothed (a centred 3-epoch
    mean), from the first epoch that came within tol of its minimum; and the gap between it and the training loss must
    have grown by more than that noise (2.5 standard deviations of the loss around its smoothed curve). Overfitting
    under noise then reads as overfitting, and noise alone as an unstable run. A validation loss that rose is
    overfitting; one that only stopped improving is, once the accuracy gap is material (above ``gap``)."""
    n = len(vl)
    sm = np.convolve(vl, np.ones(3), "same") / np.convolve(np.ones(n), np.ones(3), "same") if n >= 3 else vl
    noise = float(np.std(vl - sm)) if n >= 3 else 0.0
    best = int(np.argmax(sm <= sm.min() + tol * max(abs(sm.min()), 1e-12)))
    k = min(window, n - 1)
    rose = sm[-1] > sm[best] + tol * max(abs(sm[best]), 1e-12)
    stalled = n - 1 - best >= min(2, k) and (rose or ta[-1] - va[-1] > gap)
    widened = (sm[-1] - tl[-1]) - (sm[best] - tl[best])
    if not (stalled and tl[-1] < tl[best] * (1 - 5 * tol) and widened > 2.5 * noise):
        return None
    how = (f"rose from {sm[best]:.3f} (epoch {best + 1}) to {sm[-1]:.3f}" if rose else
           f"stopped improving after epoch {best + 1} (flat near {sm[best]:.3f})")
    return Diagnosis(
        "overfitting",
        [f"validation loss (3-epoch mean) {how} while the training loss fell from {tl[best]:.3f} to {tl[-1]:.3f}",
         f"train/val accuracy gap {ta[-1] - va[-1]:+.3f}",
         f"best val accuracy {np.nanmax(va):.3f} at epoch {int(np.nanargmax(va)) + 1}"],
        NEXT["overfitting"], {**num, "start_epoch": best + 1},
    )


# Runs that did not end by training: what they need is not training advice.
NOT_TRAINED = {
    "failed": "Fix what the error names (run.json has it), then start the run again or resume it from last.pt.",
    "died": "The process ended without a word (killed, out of memory, a lost node): resume it from last.pt with --resume.",
    "running": "Still running: diagnose it when it has finished.",
    "interrupted": "Interrupted with a resumable checkpoint: continue it with `mame-fast train --resume <run>`.",
}


def low_resolution_tip(cfg, rows: list[dict], info: dict, plateau: float = 0.01) -> str | None:
    """For a --res 256 run that fits with a plateaued val top-1: the low-resolution limit may be reached; --res full,
    with the model's FLOPs at that budget (as the trainer recorded them in run.json) and an epoch time estimated from
    this run's images/s."""
    tops = [r["val"]["top1"] for r in rows]
    if cfg.data.res != "256" or len(tops) < 3 or max(tops[-3:]) - min(tops[-3:]) > plateau:
        return None
    tip = (f"The validation top-1 has plateaued at {tops[-1]:.3f} and the model fits: the low-resolution limit may be "
           f"reached. Try --res full")
    f = info.get("flops")
    if not f:  # a run folder from before 0.2 has no recorded cost: `mame-fast model` states it
        return tip + " (`mame-fast model` gives this model's cost at full resolution)."
    ips = sum(r["images_per_s"] for r in rows[-3:]) / 3 * f["crop"] / f["full"]  # images/s scale as 1/FLOPs
    samples = info.get("train_samples", 20_300)
    return (f"{tip}: this model costs {f['full'] / 1e9:.1f} GFLOPs per image at ~{f['full_pixels']:,} px "
            f"({f['full'] / f['crop']:.1f}x its {cfg.data.crop} px cost), so an epoch of {samples:,} images takes about "
            f"{samples / max(ips, 1e-9) / 60:.1f} min at this run's speed.")
