"""The evidence pictures tell the truth: a preview tile is the loader's batch row as fed (de-normalized, mixing as the
step applies it), every gallery image is a mistake with its recorded labels and probability, a class activation map has
the evaluated image's size and is zero on its padding, and the range test leaves the run's state as it found it and
suggests a rate inside the range it tried. A run writes the pictures where its card and the report show them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mame_fast.config import load
from mame_fast.input import build_loader, dali_available
from mame_fast.input.mixing import mix, soft_targets, step_rng
from mame_fast.records import evidence
from mame_fast.records.records import read_run_info
from mame_fast.tensors import MEAN, STD
from mame_fast.train import checkpoint as ckpt
from mame_fast.train.loop import build, run
from mame_fast.train.model import build as build_model
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.spec import spec_from_dict

from .helpers import cfg_for

LOADERS = ["dali", "pil"] if dali_available() else ["pil"]


def data_cfg(shards, tmp_path, loader: str, res: str, **kw):
    return cfg_for(shards, tmp_path, **{"data.loader": loader, "data.res": res, "data.pixels": 3000, **kw})


def assert_pixels_of(tiles: np.ndarray, images: torch.Tensor) -> None:
    """The tiles are the pixels that the loader normalized into ``images`` (its own mean and std): normalizing them
    again gives the batch back, to within the half a grey level that rounding to uint8 costs."""
    again = (torch.from_numpy(tiles).float() - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(again.permute(0, 3, 1, 2), images.float(), atol=0.5 / min(STD) + 1e-4)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("res", ["256", "full"])
def test_a_preview_tile_is_the_loaders_batch_row_as_fed(shards, tmp_path, loader, res):
    """Training tiles: the batch rows de-normalized, one batch per shape; evaluation tiles: the padded images with the
    padding black; the labels are the batch's classes."""
    cfg = data_cfg(shards, tmp_path, loader, res)
    train, val = (build_loader(cfg.data, split, split == "train", cfg.seed) for split in ("train", "val"))
    classes = train.split.classes
    shown = evidence.train_batches(cfg, train, classes)
    firsts = {}
    for b in train.epoch(0):  # the first batch of each shape, read again
        firsts.setdefault(tuple(b.images.shape[2:]), b)
    assert len(shown) == min(6, len(firsts))
    for s, b in zip(shown, firsts.values()):
        assert np.array_equal(s.tiles, evidence.denormalize(b.images[: len(s.tiles)]))
        assert_pixels_of(s.tiles, b.images[: len(s.tiles)])
        assert s.labels == [classes[int(y)] for y in b.labels[: len(s.tiles)]]
    padded = 0
    for s, b in zip(evidence.eval_batches(val, classes), val.epoch(0)):
        n = len(s.tiles)
        assert np.array_equal(s.tiles, evidence.denormalize(b.images[:n], b.sizes[:n] if b.padded else None))
        for k, (tile, (h, w)) in enumerate(zip(s.tiles, b.sizes[:n].tolist())):
            assert not tile[h:].any() and not tile[:, w:].any()
            assert_pixels_of(tile[None, :h, :w], b.images[k : k + 1, :, :h, :w])
            padded += (h, w) != tile.shape[:2]
    assert padded or res == "256"  # full resolution evaluates whole images, padded
    train.close()
    val.close()


def test_mixing_is_shown_as_the_step_applies_it(shards, tmp_path):
    cfg = data_cfg(shards, tmp_path, "pil", "256", **{"optim.mixup": 0.8, "optim.cutmix": 1.0})
    loader = build_loader(cfg.data, "train", True, cfg.seed)
    classes = loader.split.classes
    s = evidence.train_batches(cfg, loader, classes, shapes=1)[0]
    b = next(iter(loader.epoch(0)))
    x, t = mix(b.images.float(), soft_targets(b.labels, len(classes), 0.0), cfg.optim, step_rng(cfg.seed, 0, 0, 0))
    assert np.array_equal(s.tiles, evidence.denormalize(x[: len(s.tiles)]))
    assert all("+" in label for label in s.labels)  # two classes and their weights in every mixed tile
    loader.close()


@pytest.fixture(scope="module")
def evidenced_run(shards, tmp_path_factory):
    """A short full-resolution run with the evidence pictures on."""
    from mame_fast.records.report import write_card

    out = tmp_path_factory.mktemp("evidence")
    d = run(cfg_for(shards, out, epochs=2, evidence="true", **{"data.res": "full", "data.pixels": 3000}), name="ev")
    write_card(d)  # as the command line does when a run ends
    return d


def test_a_run_writes_the_pictures_where_its_card_shows_them(evidenced_run):
    d = evidenced_run
    for name in ("batches", "errors", "activation_maps"):
        assert (d / "plots" / f"{name}.png").stat().st_size > 5000
        assert f"![{name}](plots/{name}.png)" in (d / "card.md").read_text()
    cost = read_run_info(d)["evidence_s"]
    assert cost["batches"] > 0 and cost["errors_and_maps"] > 0


def test_every_gallery_image_is_a_mistake_with_its_recorded_labels(evidenced_run):
    d = evidenced_run
    best = ckpt.load(d / "best.pt")
    model = build_model(spec_from_dict(best["spec"]))
    model.load_state_dict(best["model"])
    model.eval()
    cfg = load(d / "config.yaml")
    gallery = json.loads((d / "plots" / "evidence.json").read_text())["gallery"]
    assert gallery
    classes = best["classes"]
    seen = {}
    with torch.no_grad():
        for b in build_loader(cfg.data, "val", False, cfg.seed).epoch(0):
            p = model(b.images, b.sizes if b.padded else None)[: b.real].softmax(-1)
            for k, i in enumerate(b.index.tolist()):
                seen[i] = (int(b.labels[k]), int(p[k].argmax()), float(p[k].max()))
    for g in gallery:
        true, pred, prob = seen[g["index"]]
        assert true != pred and (classes[true], classes[pred]) == (g["true"], g["pred"])
        assert g["prob"] == pytest.approx(prob, abs=1e-5)


def test_a_class_activation_map_has_the_evaluated_size_and_is_zero_on_padding(evidenced_run):
    """Grad-CAM of the predicted class, for padded full-resolution validation images, with the run's best weights."""
    best = ckpt.load(evidenced_run / "best.pt")
    model = build_model(spec_from_dict(best["spec"]))
    model.load_state_dict(best["model"])
    cfg = load(evidenced_run / "config.yaml")
    val = build_loader(cfg.data, "val", False, cfg.seed)
    b = next(b for b in val.epoch(0) if b.padded)
    rows = [k for k, (h, w) in enumerate(b.sizes[: b.real].tolist()) if (h, w) != tuple(b.images.shape[2:])][:3]
    with torch.no_grad():
        pred = model.eval()(b.images[rows], b.sizes[rows]).argmax(-1).tolist()
    maps = evidence.activation_maps(model, b.images[rows], b.sizes[rows], pred, setup_runtime("fp32"))
    assert len(maps) == len(rows) > 0
    for cam, (h, w) in zip(maps, b.sizes[rows].tolist()):
        assert cam.shape == tuple(b.images.shape[2:])
        assert not cam[h:].any() and not cam[:, w:].any() and cam[:h, :w].max() > 0
    val.close()


def test_the_range_test_leaves_the_run_as_it_was_and_suggests_a_rate_it_tried(shards, tmp_path):
    from mame_fast.train.lrfind import range_test

    cfg = cfg_for(shards, tmp_path, **{"optim.ema": 0.9, "optim.name": "sgd"})
    rt = setup_runtime(cfg.precision)
    s = build(cfg, rt)
    try:
        before = ({k: v.clone() for k, v in s.model.state_dict().items()}, json.dumps(s.opt.state_dict(), default=str),
                  {k: v.clone() for k, v in s.ema.state_dict().items()}, torch.get_rng_state())
        r = range_test(s, start=1e-4, end=100.0, steps=30)
        assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in before[0].items())
        assert json.dumps(s.opt.state_dict(), default=str) == before[1] and not s.opt.state
        assert all(torch.equal(v, s.ema.state_dict()[k]) for k, v in before[2].items())
        assert torch.equal(torch.get_rng_state(), before[3])
        assert all(p.grad is None for p in s.model.parameters())
        assert 1e-4 <= r["range"][0] <= r["suggested_lr"] <= r["range"][1] <= r["lr"][-1] <= 100.0
        # rates it tried, and below the one of the lowest loss: the loss still falls inside the suggested range
        assert r["steepest_lr"] in r["lr"] and r["min_loss_lr"] in r["lr"] and r["range"][1] <= r["min_loss_lr"]
        assert r["lr"] == sorted(r["lr"]) and len(r["loss"]) == len(r["lr"]) <= 30
    finally:
        s.close()
