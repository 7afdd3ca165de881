"""Stage 5d: each fact a run's outputs state, stated by one function.

A card, the report, the slides, a plot's title and the console all say what data a run saw, what a range test
found, where a rate lies against it and what a run measured; each says it through the function here, so two
outputs cannot disagree. Sentences are styled texts (``card.Text``); ``card.plain_text`` gives the console's.
"""

from __future__ import annotations

import json
from pathlib import Path

from .card import Text, code, text
from .records import read_metrics, read_run_info, run_status
from .rundir import RunDir


def data_sentence(data) -> Text:
    """What one image of the run's batches is (``data``: the config's DataConfig)."""
    if data.res == "256":
        return text(f"fixed {data.crop} px square crops (", code("data.res=256"), ")")
    return text(f"full resolution, ~{data.pixels:,} px per image in up to {data.buckets} aspect-ratio buckets (",
                code("data.res=full"), ")")


def budget_sentence(data, phases: list[dict]) -> Text:
    """A ramped run's training budgets (``data``: its DataConfig; ``phases``: run.json's ``budget_schedule``)."""
    key = data.budget_key
    unit, start, final = " px" if key == "pixels" else " px crops", getattr(data, f"{key}_start"), getattr(data, key)
    said = "; ".join(("epoch {0}" if a == b else "epochs {0}-{1}").format(a, b) + f" at {p[key]:,}{unit} "
                     f"({len(p['shapes'])} shape(s))" for p in phases for a, b in [p["epochs"]])
    return text("Budget schedule: ", code(f"data.{key}_start={start}"), f" growing to {final:,} from epoch "
                f"{data.ramp_start + 1} to epoch {data.ramp_end + 1} in {data.ramp_levels} budgets" +
                (f": {said}." if said else "."))


def range_test_sentence(f: dict) -> Text:
    """What a learning-rate range test found (``f``: run.json's ``lr_find``)."""
    return text(f"learning-rate range test: the loss fell fastest at lr {f['steepest_lr']:.3g} and was lowest at "
                f"{f['min_loss_lr']:.3g} (per 256 images); suggested optim.lr {f['suggested_lr']:.3g} "
                f"(range {f['range'][0]:.3g} to {f['range'][1]:.3g})")


def range_test_setup(f: dict, optimizer: str) -> str:
    """How a range test ran; whether it stopped on divergence is recorded since 0.2 (older folders: 'up to')."""
    until = {True: "until the loss diverged", False: "without the loss diverging"}.get(f.get("diverged"), "or until the "
                                                                                      "loss diverged")
    return (f"learning-rate range test: {f['steps']} steps, {optimizer} lr growing exponentially from "
            f"{f.get('start', 1e-5):g} to {f.get('end', 10):g} per 256 images {until}")


def rate_position(lr: float, found: dict) -> str:
    """'below', 'inside' or 'above' the range a range test suggested; ``lr`` per 256 images, as the range."""
    low, high = found["range"]
    return "below" if lr < low else "above" if lr > high else "inside"


def outcomes(run_dir: Path) -> dict:
    """What a run measured: best and final val top-1 (with ``val_count``, the size of the split they were measured
    on), the train/val gap, throughput, status and the test result when there is one."""
    rows = read_metrics(run_dir)
    vrows = [r for r in rows if r.get("val")]
    info = read_run_info(run_dir)
    out = {"epochs": len(rows), "status": run_status(info)}
    if vrows:
        best = max(vrows, key=lambda r: r["val"]["top1"])
        last = vrows[-1]
        out.update(best_val=best["val"]["top1"], best_epoch=best["epoch"], final_val=last["val"]["top1"],
                   final_train=last["train_top1"], gap=last["train_top1"] - last["val"]["top1"], val_count=last["val"]["count"],
                   final_val_loss=last["val"]["loss"], balanced=last["val"]["balanced_acc"])
        ema = [r for r in vrows if r.get("val_ema")]
        if ema:
            out["best_val_ema"] = max(r["val_ema"]["top1"] for r in ema)
    if rows:
        out["images_per_s"] = sum(r["images_per_s"] for r in rows) / len(rows)
        out["data_wait"] = sum(r["data_wait"] for r in rows) / len(rows)
    test = Path(run_dir) / RunDir.TEST
    if test.is_file():  # the one look: its top-1 and the number of test images it was measured on
        t = json.loads(test.read_text())
        out["test"], out["test_count"] = t["top1"], t.get("count")
    return out

