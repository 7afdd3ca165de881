"""The pixel-budget schedule and the evaluation budget: each epoch's batches have the shapes of its budget on the ramp
(both loaders), no crop deforms at any budget, a run cut before, at and after a change of budget resumes bit for bit,
and the test set is looked at the budget `evaluate` chose on validation, which test.json records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mame_fast.config import ConfigError, load
from mame_fast.input import budget_at, build_loader, dali_available, eval_data, ramp_levels
from mame_fast.input.loader import plan_config
from mame_fast.input.plan import batch_shapes
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.train import checkpoint as ckpt
from mame_fast.train.loop import run

from .helpers import cfg_for, invoke
from .test_resume import RANDOM, assert_same_run, signal_during_validation

LOADERS = ["dali", "pil"] if dali_available() else ["pil"]
# A ramp over the tiny shards at full resolution: 48x48-px images in epoch 1, 96x96 from epoch 3, one level between.
RAMP = {"data.res": "full", "data.pixels": 9216, "data.pixels_start": 2304, "data.ramp_start": 1, "data.ramp_end": 2,
        "data.ramp_levels": 3, "data.side_multiple": 16, "data.buckets": 4, "epochs": 3}


def test_the_ramp_grows_in_side_length_through_its_levels():
    d = load(None, ["data.res=full", "data.pixels=360000", "data.pixels_start=90000", "data.ramp_start=2",
                    "data.ramp_end=6", "data.ramp_levels=3"]).data
    budgets = [budget_at(d, e).pixels for e in range(9)]
    assert budgets == [90000] * 4 + [202500, 202500] + [360000] * 3  # 300 -> 450 -> 600 px a side, 600 from epoch 6
    assert [x.pixels for x in ramp_levels(d)] == [90000, 202500, 360000]
    c = load(None, ["data.crop=224", "data.crop_start=160", "data.ramp_end=4", "data.ramp_levels=3"]).data
    assert [budget_at(c, e).crop for e in range(6)] == [160, 160, 192, 192, 224, 224]
    assert not budget_at(c, 0).ramped and budget_at(load(None).data, 5) == load(None).data  # no ramp: the config
    assert eval_data(d, pixels=450000).pixels == 450000 and eval_data(d).pixels == 360000 and not eval_data(d).ramped
    for bad, said in ((["data.res=full", "data.pixels_start=400000"], "above data.pixels"),
                      (["data.crop_start=160", "data.ramp_start=5", "data.ramp_end=2"], "before data.ramp_start"),
                      (["data.ramp_levels=1"], "out of range")):
        with pytest.raises(ConfigError, match=said):
            load(None, bad)


@pytest.mark.parametrize("loader", LOADERS)
def test_each_epochs_batches_have_the_shapes_of_its_budget(shards, tmp_path, loader):
    cfg = cfg_for(shards, tmp_path, **RAMP, **{"data.loader": loader})
    L = build_loader(cfg.data, "train", True, cfg.seed)
    try:
        split = L.split
        for e in range(cfg.epochs):
            planned = batch_shapes(split.height, split.width, plan_config(budget_at(cfg.data, e), True))
            assert L.shapes(e) == planned
            seen = {tuple(b.images.shape[:1]) + tuple(b.images.shape[2:]) for b in L.epoch(e)}
            assert seen <= set(planned) and seen, (e, seen, planned)
            area = np.mean([h * w for _, h, w in planned])
            assert abs(area / budget_at(cfg.data, e).pixels - 1) < 0.35, (e, area)  # about the budget, sides of 16
        assert set(L.shapes()) == {sh for e in range(cfg.epochs) for sh in L.shapes(e)}  # what run.json lists
    finally:
        L.close()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_crop_deforms_at_any_budget(shards, tmp_path, train):
    cfg = cfg_for(shards, tmp_path, **RAMP)
    L = build_loader(cfg.data, "train", train, cfg.seed)
    try:
        for e in range(cfg.epochs):
            for p in L.plan(e):
                aspect_in, aspect_out = p.cw / p.ch, p.out_w / p.out_h
                # The output keeps the crop's aspect up to its one-pixel rounding.
                tolerance = 1 / np.minimum(p.out_h, p.out_w) + 1e-4
                assert (np.abs(aspect_out / aspect_in - 1) <= tolerance).all(), (e, aspect_in, aspect_out)
    finally:
        L.close()


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_a_cut_before_at_and_after_a_change_of_budget_resumes_exactly(shards, tmp_path, monkeypatch, loader):
    """Epoch 2 is the last at the start budget, epoch 3 the first at the next: cut inside epoch 2, then while it is
    validated (the resume starts epoch 3, at the new budget), then inside epoch 3; the end equals the run never cut."""
    extra = {**RAMP, "data.loader": loader, "optim.ema": 0.9, "log_every": 2, **RANDOM}
    ref = run(cfg_for(shards, tmp_path / "ref", **extra), name="ref")
    assert [r["budget"]["pixels"] for r in read_metrics(ref)] == [2304, 2304, 9216]
    phases = read_run_info(ref)["budget_schedule"]
    assert [(p["pixels"], p["epochs"]) for p in phases] == [(2304, [1, 2]), (9216, [3, 3])]
    first, second = phases[0]["steps"], phases[1]["steps"]
    cut = run(cfg_for(shards, tmp_path / "cut", max_steps=2 * first - 1, **extra), name="cut")  # before the change
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (1, first - 1)
    with monkeypatch.context() as m:  # at it: stopped while epoch 2 is validated
        signal_during_validation(m, epoch=2)
        run(load(cut / "config.yaml", ["max_steps=0"]), name="cut", resume=cut)
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (2, 0)
    run(load(cut / "config.yaml", [f"max_steps={2 * first + 2}"]), name="cut", resume=cut)  # after it
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (2, 2) and second > 2
    run(load(cut / "config.yaml", ["max_steps=0"]), name="cut", resume=cut)
    assert read_run_info(cut)["status"] == "finished"
    assert_same_run(ref, cut)


@pytest.mark.slow
def test_evaluate_chooses_a_budget_on_validation_and_test_looks_there(shards, tmp_path):
    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.batch_size=8", "data.threads=1", "hist_epochs=0",
            "evidence=false", "optim.name=sgd", "data.loader=pil", *[f"{k}={v}" for k, v in RAMP.items()], "epochs=2"]
    code, out = invoke("train", "--name", "b", *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    d = next(tmp_path.glob("*-b"))
    code, out = invoke("evaluate", d, "--pixels", "4096,9216,16384")
    assert code == 0 and "<- chosen" in out, out
    found = read_run_info(d)["eval_budgets"]
    assert [r["value"] for r in found["results"]] == [4096, 9216, 16384] and found["trained_at"] == 9216
    best = max(found["results"], key=lambda r: (r["top1"], -r["value"]))
    assert found["chosen"] == best["value"] and all(r["count"] == found["results"][0]["count"] for r in found["results"])
    card = (d / "card.md").read_text()
    assert "Evaluation budgets" in card and f"the test looks at pixels **{found['chosen']:,}**" in card
    code, out = invoke("evaluate", d, "--crop", "64")
    assert code == 2 and "give --pixels" in out
    code, out = invoke("test", d)
    assert code == 0, out
    t = json.loads((d / "test.json").read_text())
    assert t["budget"]["pixels"] == found["chosen"] and "mame-fast evaluate" in t["budget"]["why"]
    ledger = [json.loads(x) for x in (tmp_path / "test_ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["budget"] == {"pixels": found["chosen"]}


def test_preview_shows_the_batches_at_the_start_and_the_end_of_the_ramp(shards, tmp_path, monkeypatch):
    from mame_fast.records import evidence

    drawn = {}
    real = evidence.plot_preview

    def keep(shown, path, title):
        drawn["titles"] = [s.title for s in shown]
        return real(shown, path, title)

    monkeypatch.setattr(evidence, "plot_preview", keep)
    path = evidence.preview(cfg_for(shards, tmp_path, **RAMP), tmp_path / "preview.png")
    titles = drawn["titles"]
    assert path.is_file() and any(t.startswith("epoch 1 (pixels 2,304), training step") for t in titles)
    assert any(t.startswith("epoch 3 (pixels 9,216), training step") for t in titles)
    assert any(t.startswith("evaluation step") for t in titles)
