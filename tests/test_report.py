"""Experiment records: diagnosis of real short runs, cards with five parts and the right diff, plots that
are real images, a report with every run, and the data report on the real metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mame_fast.config import load
from mame_fast.records.card import Table, plain_text
from mame_fast.records.explore import explore
from mame_fast.records.kinds import card_for, diagnose_run
from mame_fast.records.report import add_note, runs_table, write_card, write_report
from mame_fast.train.loop import run

from .test_metrics import score_test_bounds


def _wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% interval by inverting the score test numerically (test_metrics), not by the code's closed form."""
    return score_test_bounds(round(p * n), n)


def _cfg(shards, out, *sets):
    base = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "log_every=2", "hist_epochs=2", "optim.name=adamw", "optim.weight_decay=0", "evidence=false"]
    return load(None, base + list(sets))


@pytest.fixture(scope="module")
def two_runs(shards, tmp_path_factory):
    """A tiny model that underfits, then a larger one without regularization that overfits (real runs)."""
    root = tmp_path_factory.mktemp("runs")
    under = run(_cfg(shards, root, "model=tiny", "epochs=2", "optim.lr=0.0005"), name="tiny-under",
                meta={"hypothesis": "start small", "after": []})
    # No augmentation, no label smoothing, no decay, a constant learning rate: 87 images get memorized.
    over = run(_cfg(shards, root, "model=small", "epochs=25", "optim.lr=0.1", "optim.label_smoothing=0", "data.flip=false",
                    "data.scale_min=1.0", "optim.warmup_epochs=0", "optim.schedule=constant", "hist_epochs=2"), name="small-over",
               meta={"hypothesis": "more capacity fits the training set", "after": [1]})
    return root, under, over


def test_diagnose_real_runs(two_runs):
    _, under, over = two_runs
    assert diagnose_run(under).verdict == "underfitting"
    d = diagnose_run(over)
    assert d.verdict == "overfitting", d.text()
    assert d.numbers["final_train_acc"] > d.numbers["final_val_acc"] and d.numbers["start_epoch"] < 25


def test_card_has_five_parts_right_numbers_and_diff(two_runs):
    root, under, over = two_runs
    add_note(over, "the val loss turns up after a few epochs")
    text = (over / "card.md").read_text()
    for part in ("1 - Previous observed state", "2 - Current hypothesis", "3 - Experimental setup & details",
                 "4 - Experimental outcomes", "5 - Observations"):
        assert part in text
    assert text.startswith("## #2: small-over")
    assert "#1 (tiny-under)" in text and "underfitting" in text  # part 1 from the predecessor's outcomes
    assert "more capacity fits the training set" in text
    changes = next(b for b in card_for(over, root).setup if isinstance(b, Table) and b.header == ("key", "before", "now"))
    diff = {plain_text(k): (plain_text(a), plain_text(b)) for k, a, b in changes.rows}
    assert diff["model"] == ("tiny", "small") and diff["epochs"] == ("2", "25") and diff["data.flip"] == ("True", "False")
    assert "optim.weight_decay" not in diff  # same in both
    # Part 4, computed here from metrics.jsonl, not by the code that writes the card.
    rows = [json.loads(line) for line in (over / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val"]["top1"])
    last = rows[-1]
    lo, hi = _wilson(best["val"]["top1"], best["val"]["count"])
    assert f"| best val top-1 [95% interval] | {100 * best['val']['top1']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] " \
           f"(epoch {best['epoch']}) |" in text
    assert f"| train/val gap | {100 * (last['train_top1'] - last['val']['top1']):.1f}% |" in text
    assert f"| final train top-1 | {100 * last['train_top1']:.1f}% |" in text
    assert f"| epochs run / status | {len(rows)} / finished |" in text
    assert f"| images/s (mean), data wait | {sum(r['images_per_s'] for r in rows) / len(rows):.0f}," in text
    under_rows = [json.loads(line) for line in (under / "metrics.jsonl").read_text().splitlines()]
    under_best = max(under_rows, key=lambda r: r["val"]["top1"])
    assert f"#1 (tiny-under): best val top-1 {100 * under_best['val']['top1']:.1f}% [" in text
    assert "Note: the val loss turns up after a few epochs" in text and "Automatic diagnosis: **overfitting**" in text


def test_plots_are_real_images(two_runs):
    _, _, over = two_runs
    for name in ("curves", "training", "confusion", "per_class", "histograms"):
        im = np.asarray(Image.open(over / "plots" / f"{name}.png").convert("L"), float)
        assert im.shape[0] > 200 and im.shape[1] > 300
        assert im.std() > 10  # not blank


def test_report_includes_every_run(two_runs):
    root, under, over = two_runs
    md, html = write_report(root)
    text = md.read_text()
    assert "## #1: tiny-under" in text and "## #2: small-over" in text
    assert "<h2>#1: tiny-under</h2>" in html.read_text() and "<h2>#2: small-over</h2>" in html.read_text()
    table = runs_table(root)
    assert [r["#"] for r in table] == [1, 2] and [r["diagnosis"] for r in table] == ["underfitting", "overfitting"]
    rows = [json.loads(line) for line in (under / "metrics.jsonl").read_text().splitlines()]
    top = max(r["val"]["top1"] for r in rows)
    lo, hi = _wilson(top, rows[0]["val"]["count"])
    assert table[0]["best val [95%]"] == f"{100 * top:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert table[0]["epochs"] == len(rows) == 2
    card = write_card(under).read_text()
    assert "None: this is a first experiment" in card and "Model `tiny`" in card and "2 epochs" in card


def test_explore_reproduces_the_real_counts(tmp_path):
    s = explore(None, tmp_path)
    assert s["splits"] == {"train": 20300, "val": 1450, "test": 15657} and s["classes"] == 29 and s["rows"] == 37407
    assert round(s["max_mpx"]) == 373 and s["aspect_max"] > 15 and s["aspect_min"] < 0.12
    text = (tmp_path / "explore.md").read_text()
    assert "| train | 20,300 |" in text and "| Woven fabric | 700 | 50 |" in text
    for p in ("class_split_counts", "class_museum_counts", "sizes"):
        assert np.asarray(Image.open(tmp_path / f"{p}.png").convert("L"), float).std() > 10


def test_explore_with_images(mame_root, tmp_path):
    """The sample grid is a page, not a strip: 29 classes as panels in rows of 6, titles readable."""
    s = explore(mame_root, tmp_path)
    assert s["splits"]["val"] == 29
    w, h = Image.open(tmp_path / "samples.png").size
    assert w >= 1000 and 0.6 < w / h < 1.6, (w, h)


def test_tensorboard_gets_the_same_scalars_histograms_and_plots(shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = run(_cfg(shards, tmp_path, "model=tiny", "epochs=2", "optim.lr=0.01", "tensorboard=true", "evidence=true"), name="tb")
    ea = EventAccumulator(str(d / "tb"), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    from mame_fast.records.records import read_metrics

    rows = read_metrics(d)
    vals = [e.value for e in ea.Scalars("val/top1")]
    assert vals == pytest.approx([r["val"]["top1"] for r in rows])
    assert {"train/loss_running", "train/lr", "epoch/images_per_s", "epoch/data_wait"} <= set(tags["scalars"])
    assert "weights/stage1" in tags["histograms"] and "activations/stage3" in tags["histograms"]
    assert {"plots/curves", "plots/confusion", "plots/batches", "plots/errors", "plots/activation_maps"} <= set(tags["images"])
