"""Every metric the records report, against an independent computation: the loss, top-1, top-5, per-class and balanced
accuracy and the confusion matrix of ``evaluate`` (recomputed here in float64 numpy from the model's logits, on real
batches of either loader with padding and fillers), and the intervals of ``stats`` (Wilson's by inverting the score
test numerically, Newcombe's against the paper's worked example, Student's t quantiles by integrating its density)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mame_fast.config import DataConfig
from mame_fast.input import build_loader, dali_available
from mame_fast.records.stats import Z95, difference, mean_interval, wilson
from mame_fast.train.evaluate import evaluate
from mame_fast.train.model import build
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.spec import ModelSpec, StageSpec

LOADERS = ["dali", "pil"] if dali_available() else ["pil"]


@pytest.fixture(scope="module")
def uneven_shards(mame_root, tmp_path_factory) -> Path:
    """Shards of a split whose classes have 3, 2 or 1 images (the tiny sample's splits are even): only then do balanced
    accuracy and top-1 differ."""
    import shutil

    from mame_fast.data import metadata as md
    from mame_fast.data.shard import ShardSettings, write_shards

    root = tmp_path_factory.mktemp("uneven") / "root"
    shutil.copytree(mame_root, root)
    meta = md.load_dir(root)
    kept, seen = [], {}
    for r in meta.rows:
        seen[r.medium] = seen.get(r.medium, 0) + 1
        if r.subset != "train" or seen[r.medium] <= 1 + meta.classes.index(r.medium.strip()) % 3:
            kept.append(r)
    md.write_csv(root / md.DATASET_CSV, kept)
    return write_shards(root, tmp_path_factory.mktemp("uneven-shards"), ShardSettings(max_pixels=60_000,
                                                                                        splits=("train",)), workers=1)


def independent_metrics(logits: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """The metrics, written out here from their definitions, in float64, without torch."""
    z = logits - logits.max(1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(1, keepdims=True))
    order = np.argsort(-logits, axis=1, kind="stable")
    confusion = np.zeros((k, k), int)
    for y, p in zip(labels, order[:, 0]):
        confusion[y, p] += 1
    per_class = [confusion[c, c] / confusion[c].sum() if confusion[c].sum() else None for c in range(k)]
    return {"loss": float(-log_softmax[np.arange(len(labels)), labels].mean()),
            "top1": float(np.mean(order[:, 0] == labels)),
            "top5": float(np.mean([y in row[:5] for y, row in zip(labels, order)])),
            "per_class": per_class, "balanced_acc": float(np.mean([v for v in per_class if v is not None])),
            "confusion": confusion.tolist(), "count": len(labels)}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("res", ["256", "full"])
def test_evaluate_reports_what_its_definitions_give(uneven_shards, loader, res):
    torch.manual_seed(3)
    model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2), StageSpec(24, 1, 2)), num_classes=29)).eval()
    with torch.no_grad():  # logits spread wide enough that top-5 and top-1 differ on 29 images
        model.fc.weight.mul_(300)
    cfg = DataConfig(shards=str(uneven_shards), res=res, loader=loader, pixels=6000, crop=48, batch_size=8, threads=1,
                     side_multiple=8)
    rt = setup_runtime("fp32", training=False)
    val = build_loader(cfg, "train", False, seed=0)  # evaluated as validation is: whole images, padded, no augmentation
    logits, labels = [], []
    with torch.no_grad():
        for b in val.epoch(0):  # padded full-resolution batches, fillers in the last ones: only real rows count
            logits.append(model(b.images, b.sizes if b.padded else None)[: b.real].double().numpy())
            labels.append(b.labels[: b.real].numpy())
    want = independent_metrics(np.concatenate(logits), np.concatenate(labels), 29)
    # The setup can tell the metrics apart: top-5 from top-1, balanced from top-1 (classes of 1, 2 and 3 images).
    assert want["top5"] > want["top1"] and abs(want["balanced_acc"] - want["top1"]) > 1e-4
    got = evaluate(model, val, rt, 29)
    val.close()
    assert got["count"] == want["count"] == len(val.split)
    assert got["confusion"] == want["confusion"] and got["per_class"] == pytest.approx(want["per_class"])
    for key in ("loss", "top1", "top5", "balanced_acc"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def score_test_bounds(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's interval by its definition: the proportions p0 that the score test |k/n - p0| / sqrt(p0 (1 - p0) / n) <= z
    does not reject, found by bisection on each side of k/n."""
    p = k / n

    def rejected(p0: float) -> bool:
        return abs(p - p0) > z * math.sqrt(p0 * (1 - p0) / n)

    def edge(inside: float, outside: float) -> float:
        for _ in range(200):
            mid = (inside + outside) / 2
            inside, outside = (inside, mid) if rejected(mid) else (mid, outside)
        return (inside + outside) / 2

    return (0.0 if k == 0 else edge(p, 0.0)), (1.0 if k == n else edge(p, 1.0))


@pytest.mark.parametrize("k, n", [(0, 29), (1, 29), (14, 29), (28, 29), (29, 29), (1160, 1450), (725, 1450), (11000, 15657)])
def test_wilson_inverts_the_score_test(k, n):
    lo, hi = wilson(k / n, n)
    want = score_test_bounds(k, n)
    assert (lo, hi) == pytest.approx(want, abs=1e-9)


def test_newcombe_reproduces_the_papers_example():
    """Newcombe (1998), Statistics in Medicine 17:873, Table II, example (a): 56/70 against 48/80, method 10 (the hybrid
    score interval) gives +0.0524 to +0.3339 for the difference."""
    d, lo, hi = difference(48 / 80, 80, 56 / 70, 70)
    assert d == pytest.approx(0.2) and (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    d, lo, hi = difference(56 / 70, 70, 48 / 80, 80)  # the other way round: the same interval, negated
    assert (round(lo, 4), round(hi, 4)) == (-0.3339, -0.0524)


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile, from its density integrated numerically (Simpson) and bisection."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf_above_zero(x: float, steps: int = 4000) -> float:
        h = x / steps
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_zero(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("values", [[0.61, 0.64], [0.61, 0.64, 0.58], [0.7, 0.72, 0.69, 0.75, 0.71, 0.73]])
def test_the_seeds_interval_is_students(values):
    m, half = mean_interval(values)
    n = len(values)
    sd = math.sqrt(sum((v - sum(values) / n) ** 2 for v in values) / (n - 1))
    assert m == pytest.approx(sum(values) / n)
    assert half == pytest.approx(t_quantile_975(n - 1) * sd / math.sqrt(n), rel=1e-3)
    assert mean_interval([0.5]) == (0.5, math.inf)


@pytest.mark.parametrize("a, b, said", [(0.60, 0.70, "conclusive (better)"), (0.70, 0.60, "conclusive (worse)"),
                                        (0.70, 0.71, "not conclusive")])
def test_a_comparison_says_better_when_the_second_run_scores_higher(a, b, said):
    """1,450 validation images each: 10 points apart is beyond noise, 1 point is not; the direction is the second's."""
    from mame_fast.records.stats import verdict

    text = verdict(a, 1450, b, 1450)
    assert said in text and text.startswith(f"{100 * (b - a):+.1f} points")


def test_metrics_csv_has_each_value_under_its_own_header(shards, tmp_path):
    """metrics.csv, read back by its header, holds metrics.jsonl's numbers column by column."""
    import csv

    from mame_fast.records.records import read_metrics
    from mame_fast.train.loop import run

    from .helpers import cfg_for

    d = run(cfg_for(shards, tmp_path, epochs=2, **{"optim.ema": 0.9}), name="csv")
    rows = list(csv.DictReader((d / "metrics.csv").open()))
    for got, want in zip(rows, read_metrics(d), strict=True):
        assert float(got["epoch"]) == want["epoch"] and float(got["train_loss"]) == pytest.approx(want["train_loss"])
        assert float(got["val_top1"]) == pytest.approx(want["val"]["top1"])
        assert float(got["val_top5"]) == pytest.approx(want["val"]["top5"])
        assert float(got["val_ema_balanced_acc"]) == pytest.approx(want["val_ema"]["balanced_acc"])
        assert float(got["lr"]) == pytest.approx(want["lr"]) and float(got["images_per_s"]) == pytest.approx(want["images_per_s"])
