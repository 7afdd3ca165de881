"""diagnose: the right verdict for constructed histories of each state."""

import math

import pytest

from mame_fast.records.diagnose import diagnose_history

N = 10
falling = [3.3 - 0.25 * i for i in range(N)]


def line(start: float, step: float) -> list[float]:
    return [start + step * i for i in range(N)]


CASES = {
    "underfitting": (line(3.3, -0.05), line(3.3, -0.05), line(0.05, 0.02), line(0.05, 0.02)),
    "overfitting": (
        [2.0 * 0.7**i for i in range(N)],
        [2.0, 1.6, 1.3, 1.1, 1.0, 1.05, 1.15, 1.3, 1.45, 1.6],
        [0.4 + 0.06 * i for i in range(N)],
        [0.4, 0.5, 0.58, 0.62, 0.64, 0.63, 0.62, 0.61, 0.6, 0.6],
    ),
    "fitting": ([2.0 * 0.8**i for i in range(N)], [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.83, 0.82, 0.82, 0.82], line(0.5, 0.04),
                line(0.5, 0.03)),
    "diverged": ([2.0, 1.8, 1.7] + [math.nan] * 7, [2.0] * 3 + [math.nan] * 7, [0.3] * N, [0.3] * N),
    "unstable": ([1.0 - 0.05 * i for i in range(N)], [1.0, 0.6, 1.1, 0.5, 1.2, 0.55, 1.15, 0.5, 1.1, 0.6], [0.8] * N, [0.6] * N),
    "not converged": (line(2.0, -0.15), line(2.0, -0.15), line(0.5, 0.04), line(0.5, 0.035)),
}


# What the course's method says to do next, per verdict (a word each next step must contain).
NEXT_WORD = {"underfitting": "Grow the model (wider", "overfitting": "Regularize", "fitting": "Grow the model until it overfits",
             "diverged": "Lower the learning rate", "unstable": "Lower the learning rate", "not converged": "Train longer"}


@pytest.mark.parametrize("verdict", sorted(CASES))
def test_verdicts(verdict):
    d = diagnose_history(*CASES[verdict])
    assert d.verdict == verdict, d.text()
    assert d.next_step.startswith(NEXT_WORD[verdict]) and len(d.reasons) >= 1 and d.numbers["epochs"] == N


def test_a_short_run_still_learning_fast_is_not_converged_rather_than_underfitting():
    """Three epochs, accuracy low and both losses falling fast: too early to say the model is too small."""
    d = diagnose_history([3.30, 3.05, 2.80], [3.25, 3.00, 2.78], [0.05, 0.10, 0.15], [0.06, 0.11, 0.16])
    assert d.verdict == "not converged" and "too early to judge" in d.text() and d.next_step.startswith("Train longer")
    d = diagnose_history([3.30, 3.29, 3.28], [3.25, 3.24, 3.24], [0.05, 0.05, 0.06], [0.06, 0.06, 0.06])
    assert d.verdict == "underfitting"  # flat and low: the model (or its training) cannot fit


def test_overfitting_reports_start_and_gap():
    d = diagnose_history(*CASES["overfitting"])
    assert d.numbers["start_epoch"] == 5
    assert "epoch 5" in d.text() and "gap +0.34" in d.text()
    assert d.numbers["best_val_acc"] == 0.64 and d.numbers["best_epoch"] == 5


def test_diverged_names_the_epoch():
    d = diagnose_history(*CASES["diverged"])
    assert d.numbers["epoch"] == 4


# The losses of one real 25-epoch run that memorizes the tiny sample's 87 training images, with either loader (their
# pixels differ by resampling details): 29 validation images make the validation loss zig-zag around its trend.
REAL = {
    "pil": ([3.43, 3.05, 2.72, 2.47, 2.33, 2.17, 1.89, 1.83, 1.54, 1.59, 1.22, 1.19, 1.21, 1.1, 1.0, 0.95, 0.94, 0.79, 0.78,
             0.93, 0.91, 0.82, 0.64, 0.59, 0.56],
            [3.37, 3.29, 2.95, 2.85, 2.86, 3.19, 2.94, 2.98, 3.25, 2.91, 3.07, 3.57, 2.93, 2.71, 2.96, 3.43, 3.29, 3.33, 3.16,
             3.66, 3.94, 3.33, 3.78, 3.89, 3.57]),
    "dali": ([3.44, 3.03, 2.73, 2.46, 2.28, 2.18, 1.86, 1.81, 1.48, 1.55, 1.21, 1.21, 1.29, 1.08, 1.02, 0.87, 1.02, 0.84, 0.7,
              0.97, 0.91, 0.74, 0.56, 0.53, 0.55],
             [3.37, 3.3, 2.97, 2.79, 2.76, 2.93, 2.76, 2.56, 2.79, 3.04, 3.12, 3.36, 2.98, 3.33, 3.18, 3.46, 2.97, 2.96, 3.24,
              3.02, 2.32, 2.91, 2.96, 2.71, 2.69]),
}


@pytest.mark.parametrize("loader", sorted(REAL))
def test_overfitting_under_a_noisy_validation_loss_is_overfitting(loader):
    """Neither unstable (the zig-zags are the small split's noise around a trend) nor not converged (a lucky last epoch)."""
    train, val = REAL[loader]
    d = diagnose_history(train, val, [0.85] * 25, [0.3] * 25)
    assert d.verdict == "overfitting", d.text()
