"""Stage 5i: the pictures a student shows to defend a decision, each from the run's own loader and weights:

- what the network is fed (``preview``): real training batches as the step receives them (crops with their scale
  jitter, flips, colour jitter, mixup or cutmix as applied, one batch per bucket shape at full resolution) and
  evaluation batches (whole images, padded at full resolution), de-normalized;
- where it errs (``error_gallery``): the most confused class pairs, with examples, and the most confident mistakes,
  each with its true class, predicted class and probability, from the validation images as evaluated;
- where it looks (``activation_maps``): Grad-CAM (torchcam's, not a hand-written one) of a right and a wrong validation
  image per class, computed on the padded image as evaluated, masked to its valid region and overlaid on it.

A run writes the first at its start and the other two from its best weights at its end (``plots/``, where its card
and the report pick them up); `mame-fast preview` draws the first for any config, at both resolutions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_text
from ..tensors import MEAN, STD, valid_mask
from .card import plain_text
from .facts import data_sentence
from .plots import pyplot, save_figure
from .rundir import RunDir

MAX_TILES = 8  # rows shown of each previewed batch


def denormalize(images: torch.Tensor, sizes: torch.Tensor | None = None) -> np.ndarray:
    """Normalized (n, 3, H, W) images back to uint8 (n, H, W, 3) pixels, as the loader produced them before normalizing;
    with ``sizes``, what lies outside each image's valid region (padding) is black."""
    x = images.detach().float().cpu() * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    if sizes is not None:
        x = x * valid_mask(sizes.cpu(), *x.shape[2:], x.dtype)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# -- what the network is fed ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Shown:
    """One previewed batch: its tiles (uint8 HWC, as fed), one label per tile, and a title."""

    tiles: np.ndarray
    labels: list[str]
    title: str


def train_batches(cfg, loader, classes: list[str], epoch: int = 0, shapes: int = 6, when: str = "") -> list[Shown]:
    """The first training batch of each of up to ``shapes`` batch shapes of ``epoch``, as the step receives them: the
    loader's batch, then the step's mixup or cutmix with the draw the trainer makes at that step."""
    from ..input.mixing import mix, soft_targets, step_rng

    shown, seen = [], set()
    for step, b in enumerate(loader.epoch(epoch)):
        shape = tuple(b.images.shape[2:])
        if shape in seen:
            continue
        seen.add(shape)
        target = soft_targets(b.labels, len(classes), 0.0)
        rng = step_rng(cfg.seed, epoch, step, 0)  # the draw train_epoch makes (rank 0)
        x, target = mix(b.images.float(), target, cfg.optim, rng)
        n = min(MAX_TILES, b.real)
        labels = [_target_label(target[k], classes) for k in range(n)]
        drawn = "mixup or cutmix (one per batch)" if cfg.optim.mixup and cfg.optim.cutmix else \
            "mixup" if cfg.optim.mixup else "cutmix"
        mixed = f", {drawn} as the step drew it (the weights in the labels)" if cfg.optim.mixup or cfg.optim.cutmix else ""
        shown.append(Shown(denormalize(x[:n]), labels, f"{when}training step {step + 1}: batch {b.images.shape[0]}x"
                                                       f"{shape[0]}x{shape[1]}{mixed}"))
        if len(seen) == shapes:
            break
    return shown


def eval_batches(loader, classes: list[str], batches: int = 2) -> list[Shown]:
    """The first validation batches as evaluated: whole images, padded (black) to the batch shape at full resolution."""
    shown = []
    for step, b in zip(range(batches), loader.epoch(0)):
        n = min(MAX_TILES, b.real)
        h, w = b.images.shape[2:]
        labels = [f"{classes[int(y)]}\n{hh}x{ww}" + (" (padded)" if (hh, ww) != (h, w) else "")
                  for y, (hh, ww) in zip(b.labels[:n].tolist(), b.sizes[:n].tolist())]
        shown.append(Shown(denormalize(b.images[:n], b.sizes[:n] if b.padded else None), labels,
                           f"evaluation step {step + 1}: batch {b.images.shape[0]}x{h}x{w}"))
    return shown


def _target_label(t: torch.Tensor, classes: list[str]) -> str:
    """The class of a target row, or the two classes mixed in it with their weights."""
    w, i = t.float().topk(2)
    if w[1] < 5e-3:
        return classes[int(i[0])]
    return f"{classes[int(i[0])]} {w[0]:.2f}\n+ {classes[int(i[1])]} {w[1]:.2f}"


def tile_rows(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], title: str, path: Path, cols: int | None = None):
    """A figure of titled rows of labelled images, each image at its own aspect ratio."""
    plt = pyplot()
    cols = cols or max([len(tiles) for _, tiles in rows] + [1])
    fig = plt.figure(figsize=(cols * 2.1, max(1, len(rows)) * 2.7), layout="constrained")
    subs = fig.subfigures(max(1, len(rows)), 1, squeeze=False)[:, 0]
    for sub, (name, tiles) in zip(subs, rows):
        sub.suptitle(name, x=0.01, ha="left", fontsize=9)
        for a, k in zip(sub.subplots(1, cols, squeeze=False)[0], range(cols)):
            a.axis("off")
            if k < len(tiles):
                a.imshow(tiles[k][0])
                a.set_title(tiles[k][1], fontsize=7)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def plot_preview(shown: list[Shown], path: Path, title: str) -> Path:
    """One row per batch: its first tiles with their labels."""
    return tile_rows([(s.title, list(zip(s.tiles, s.labels))) for s in shown], title, path)


def preview(cfg, path: Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """What the network is fed under ``cfg``: training batches of each shape and evaluation batches, from the loader the
    run uses (built here for one process), in one figure."""
    from ..input import budget_at, build_loader, validation_data

    train = build_loader(cfg.data, "train", True, cfg.seed, device=device, dtype=dtype)
    val = build_loader(validation_data(cfg), "val", False, cfg.seed, device=device, dtype=dtype)
    try:
        classes = train.split.classes
        if cfg.data.ramped:  # a budget schedule: its first epoch's batches and those of the epoch it ends at
            shown = [x for e in (0, cfg.data.ramp_end) for x in train_batches(cfg, train, classes, e, 3, f"epoch {e + 1} "
                     + "".join(f"({k} {v:,}), " for k, v in budget_at(cfg.data, e).budget.items()))]
        else:
            shown = train_batches(cfg, train, classes)
        shown += eval_batches(val, classes)
    finally:
        train.close()
        val.close()
    return plot_preview(shown, path, f"What the network is fed: {plain_text(data_sentence(cfg.data))}, loader "
                                     f"{train.describe()}")


# -- where it errs, where it looks ----------------------------------------------------------------------------


@torch.no_grad()
def predictions(model, loader, rt) -> dict[str, np.ndarray]:
    """Per validation sample (by index in the split): true class, predicted class, its probability, and the
    probability of the true class."""
    model.eval()
    idx, true, pred, prob, p_true = [], [], [], [], []
    for b in loader.epoch(0):
        with rt.autocast():
            logits = model(b.images, b.sizes if b.padded else None)[: b.real].float()
        p = logits.softmax(-1)
        top = p.max(-1)
        y = b.labels[: b.real]
        idx.append(b.index.numpy())
        true.append(y.cpu().numpy())
        pred.append(top.indices.cpu().numpy())
        prob.append(top.values.cpu().numpy())
        p_true.append(p.gather(1, y[:, None])[:, 0].cpu().numpy())
    return {k: np.concatenate(v) for k, v in
            (("index", idx), ("true", true), ("pred", pred), ("prob", prob), ("p_true", p_true))}


def choose(pr: dict[str, np.ndarray], pairs: int = 4, per_pair: int = 3, confident: int = 12) -> dict:
    """The samples the pictures show: the most confused class pairs (from the confusion counts) with their most
    confident examples, the most confident mistakes overall, and per class its most confident right and wrong image."""
    wrong = pr["true"] != pr["pred"]
    counts: dict[tuple[int, int], int] = {}
    for t, p in zip(pr["true"][wrong], pr["pred"][wrong]):
        counts[(int(t), int(p))] = counts.get((int(t), int(p)), 0) + 1
    top_pairs = sorted(counts, key=lambda k: (-counts[k], k))[:pairs]
    order = np.argsort(-pr["prob"], kind="stable")
    by_pair = {pair: [int(i) for i in order if wrong[i] and (pr["true"][i], pr["pred"][i]) == pair][:per_pair]
               for pair in top_pairs}
    most = [int(i) for i in order if wrong[i]][:confident]
    per_class = {}
    for c in np.unique(pr["true"]):
        mine = [int(i) for i in order if pr["true"][i] == c]
        per_class[int(c)] = ([i for i in mine if not wrong[i]][:1], [i for i in mine if wrong[i]][:1])
    return {"pairs": [(p, counts[p], by_pair[p]) for p in top_pairs], "confident": most, "per_class": per_class}


def gather_images(loader, rows: set[int], pr: dict[str, np.ndarray]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each chosen row of ``pr``, its image as evaluated (normalized (3, H, W), padded to its batch's shape) and its
    valid size, read in one more pass over the split. Copies of single rows: whole batches at full resolution would
    hold gigabytes."""
    where = {int(pr["index"][r]): r for r in rows}
    found = {}
    for b in loader.epoch(0):
        for k, i in enumerate(b.index.tolist()):
            if i in where:
                found[where[i]] = (b.images[k].detach().clone(), b.sizes[k].clone())
    return found


def activation_maps(model, images: torch.Tensor, sizes: torch.Tensor, classes: list[int], rt) -> list[np.ndarray]:
    """Grad-CAM of ``classes`` for evaluated ``images`` (n, 3, H, W) of valid ``sizes`` (n, 2) (torchcam's, on the last
    block, or on the head when the spec has one), upsampled to (H, W) and zero outside each image's valid region:
    arrays in [0, 1]. The model sees the padded image with its size, as in evaluation."""
    from torchcam.methods import GradCAM

    model.eval()
    x = images.detach().clone()
    padded = bool((sizes != torch.tensor(x.shape[2:], device=sizes.device)).any())
    layer = "head" if getattr(model, "head", None) is not None else \
        f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"
    with torch.enable_grad(), GradCAM(model, target_layer=layer) as cam, rt.autocast():
        scores = model(x, sizes if padded else None).float()
        maps = cam(list(classes), scores)[0].float()
    if maps.dim() == 2:  # torchcam drops the batch axis of a single image
        maps = maps[None]
    maps = torch.nn.functional.interpolate(maps[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)
    maps = maps.clamp(0, 1) * valid_mask(sizes.to(maps.device), *x.shape[2:], maps.dtype)
    return list(maps[:, 0].detach().cpu().numpy())


def _valid(image: torch.Tensor, size: torch.Tensor) -> np.ndarray:
    """An evaluated image, its valid part only, as pixels."""
    h, w = size.tolist()
    return denormalize(image[None])[0, :h, :w]


def error_gallery(pr: dict, chosen: dict, images: dict, classes: list[str], path: Path) -> tuple[Path, list[dict]]:
    """The most confused pairs (a row each: the pair, its count, its most confident examples), then the most
    confident mistakes; each image labelled with its true and predicted class and the probability. Returns the
    figure and the list of what it shows."""
    shown = []

    def tiles(ex: list[int]) -> list[tuple[np.ndarray, str]]:
        out = []
        for i in ex:
            t, p, q = int(pr["true"][i]), int(pr["pred"][i]), float(pr["prob"][i])
            out.append((_valid(*images[i]), f"true {classes[t]}\npred {classes[p]} ({q:.0%})"))
            shown.append({"index": int(pr["index"][i]), "true": classes[t], "pred": classes[p], "prob": q})
        return out

    rows = [(f"{classes[t]} taken for {classes[p]}: {n} time{'s' * (n != 1)} (of the most confused pairs)", tiles(ex))
            for (t, p), n, ex in chosen["pairs"]]
    conf = chosen["confident"]
    rows += [("the most confident mistakes" if start == 0 else "", tiles(conf[start : start + 6]))
             for start in range(0, len(conf), 6)]
    if not rows:
        rows = [("no mistakes on the validation split", [])]
    fig = tile_rows(rows, "Where it errs: validation images as evaluated (their valid region), best weights", path, cols=6)
    return fig, shown


def plot_activation_maps(items: list[tuple[np.ndarray, np.ndarray, str]], path: Path, cols: int = 6) -> Path:
    """Each image (its valid region) with its class activation map overlaid, and a label."""
    plt = pyplot()
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.3, rows * 2.5), squeeze=False, layout="constrained")
    for a in axes.flat:
        a.axis("off")
    shown = None
    for a, (img, cam, label) in zip(axes.flat, items):
        a.imshow(img)
        shown = a.imshow(cam[: img.shape[0], : img.shape[1]], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        a.set_title(label, fontsize=7)
    if shown is not None:  # the scale the overlays share: 0 no evidence for the predicted class, 1 the most
        fig.colorbar(shown, ax=axes, shrink=0.6, label="Grad-CAM evidence for the predicted class (0 to 1)")
    fig.suptitle("Where it looks: Grad-CAM of the predicted class on validation images (best weights); the right ones "
                 "first, then the mistakes.\nDoes it look at the material, or at the frame, the background, a label?",
                 fontsize=9)
    return save_figure(fig, path)


def write_run_evidence(model, loader, rt, classes: list[str], out: Path) -> list[Path]:
    """The error gallery and the class activation maps of ``model`` (the run's best weights) over ``loader`` (the
    validation split, one process), into ``out`` (the run's plots/); what they show into ``out/evidence.json``."""
    pr = predictions(model, loader, rt)
    chosen = choose(pr)
    cam_rows = [i for right, wrong in chosen["per_class"].values() for i in right + wrong]
    wanted = {i for _, _, ex in chosen["pairs"] for i in ex} | set(chosen["confident"]) | set(cam_rows)
    images = gather_images(loader, wanted, pr)
    gallery, shown = error_gallery(pr, chosen, images, classes, out / RunDir.ERRORS)
    items = []
    for i in cam_rows:  # one image at a time: its own shape, as evaluated
        image, size = images[i]
        cam = activation_maps(model, image[None], size[None], [int(pr["pred"][i])], rt)[0]
        t, p = int(pr["true"][i]), int(pr["pred"][i])
        label = f"{classes[t]}: right ({pr['prob'][i]:.0%})" if t == p else \
            f"{classes[t]}\ntaken for {classes[p]} ({pr['prob'][i]:.0%})"
        items.append((int(pr["index"][i]), _valid(image, size), cam, label))
    items.sort(key=lambda it: ("taken for" in it[3], it[0]))  # the right ones first, then the mistakes
    cams = plot_activation_maps([it[1:] for it in items], out / RunDir.MAPS)
    atomic_write_text(out / RunDir.EVIDENCE, json.dumps({"gallery": shown, "count": len(pr["index"]),
                                                         "mistakes": int((pr["true"] != pr["pred"]).sum())}, indent=1))
    return [gallery, cams]

