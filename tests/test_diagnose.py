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


def test_overfitting_reports_start_and_gap():
    d = diagnose_history(*CASES["overfitting"])
    assert d.numbers["start_epoch"] == 5
    assert "epoch 5" in d.text() and "gap +0.34" in d.text()
    assert d.numbers["best_val_acc"] == 0.64 and d.numbers["best_epoch"] == 5


def test_diverged_names_the_epoch():
    d = diagnose_history(*CASES["diverged"])
    assert d.numbers["epoch"] == 4
