"""A pixel-budget schedule against the constant budget, side by side in one invocation: the same model, epochs, seed and
learning rate, trained at full resolution once at ``--pixels`` from the first epoch to the last and once on a ramp
from ``--start`` (a quarter of the pixels: half the side) to ``--pixels``. For each: wall time, the training pixels
processed (from the runs' own plans: every row of every batch, fillers included), and the best and final val top-1
with their 95% intervals, validation at ``--pixels`` in both; then `mame-fast evaluate` on each finished run at 0.75,
1, 1.25 and 1.5 times ``--pixels`` (the evaluation-budget sweep its card shows).

    python benchmarks/budget_schedule.py                      # CPU: tiny model, 90 kpx, stand-in sample (~6 minutes)
    python benchmarks/budget_schedule.py --pixels 360000 --start 90000 --model small --per-class 100 --epochs 8

The sample is the stand-in one (generated textures, real metadata): the accuracies say whether the schedule costs
accuracy on these images, nothing about MAMe; the cost columns hold for any data.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import publish  # noqa: E402


def train(work: Path, shards: Path, name: str, args, *ramp: str) -> tuple[float, Path]:
    sets = [f"data.shards={shards}", f"out={work / 'runs'}", "data.res=full", f"data.pixels={args.pixels}",
            f"model={args.model}", f"data.batch_size={args.batch_size}", f"epochs={args.epochs}", "optim.name=adamw",
            f"optim.lr={args.lr}", "hist_epochs=0", "evidence=false", "log_every=1000", *ramp]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mame_fast", "train", "--name", name, *[a for s in sets for a in ("--set", s)]],
                       cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
    return time.perf_counter() - t, next((work / "runs").glob(f"*-{name}"))


def pixels_processed(run: Path) -> int:
    """Rows x height x width of every training batch of every epoch, as the run planned them."""
    from mame_fast.config import load
    from mame_fast.input import build_loader

    cfg = load(run / "config.yaml")
    loader = build_loader(cfg.data, "train", True, cfg.seed)
    try:
        return sum(len(p.index) * p.height * p.width for e in range(cfg.epochs) for p in loader.plan(e))
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=int, default=90_000, help="the final (and constant) budget per image")
    ap.add_argument("--start", type=int, default=0, help="the ramp's first budget (default: a quarter of --pixels)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--per-class", type=int, default=20, help="training images per class of the stand-in sample")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--shards", type=Path, help="shards to use instead of generating the stand-in sample")
    args = ap.parse_args()
    start = args.start or args.pixels // 4
    # The ramp of FFCV's recipe in proportion: the start budget for the first third, the final one for the last sixth.
    ramp = [f"data.pixels_start={start}", f"data.ramp_start={args.epochs // 3}",
            f"data.ramp_end={max(args.epochs // 3 + 1, args.epochs - max(1, args.epochs // 6))}", "data.ramp_levels=4"]
    from mame_fast.data.sample import SampleSpec, write_sample
    from mame_fast.data.shard import ShardSettings, write_shards
    from mame_fast.files import usable_cores
    from mame_fast.records.facts import outcomes
    from mame_fast.records.records import read_run_info
    from mame_fast.records.stats import pct

    work = Path(tempfile.mkdtemp(prefix="budget-bench-"))
    try:
        shards = args.shards
        if shards is None:
            write_sample(work / "mame", SampleSpec(per_class=(args.per_class, 10, 0), max_side=1000, large=0, seed=0),
                         workers=usable_cores())
            shards = write_shards(work / "mame", work / "shards", ShardSettings(max_pixels=1_000_000, shard_size_mb=32),
                                  workers=usable_cores())
        rows = []
        for label, name, more in (("constant", "constant", ()), ("schedule", "ramp", ramp)):
            seconds, run = train(work, shards, name, args, *more)
            oc, info = outcomes(run), read_run_info(run)
            phases = "; ".join(f"ep {p['epochs'][0]}-{p['epochs'][1]}: {p['pixels']:,}" for p in info.get("budget_schedule",
                                                                                                            []))
            rows.append((label, phases or f"{args.pixels:,} throughout", pixels_processed(run), seconds,
                         pct(oc.get("best_val"), oc.get("val_count")), pct(oc.get("final_val"), oc.get("val_count"))))
            print(f"{label}: {seconds:.0f} s, best val {rows[-1][4]}", flush=True)
        # The evaluation-budget sweep on both finished runs (FixRes): validation at the training budget and above.
        sweeps = []
        for (label, *_), name in zip(rows, ("constant", "ramp")):
            run = next((work / "runs").glob(f"*-{name}"))
            budgets = ",".join(str(round(f * args.pixels)) for f in (0.75, 1, 1.25, 1.5))
            r = subprocess.run([sys.executable, "-m", "mame_fast", "evaluate", str(run), "--pixels", budgets], cwd=work,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
            found = read_run_info(run)["eval_budgets"]
            sweeps.append(f"| {label} | " + " | ".join(pct(x["top1"], x["count"]) + (" (chosen)" if x["value"] ==
                                                                                     found["chosen"] else "")
                                                       for x in found["results"]) + " |")
            heads = [f"{x['value']:,} px" for x in found["results"]]
        base_px, base_s = rows[0][2], rows[0][3]
        body = [f"Model {args.model}, {args.epochs} epochs at full resolution, batch {args.batch_size}, adamw lr "
                f"{args.lr}, seed 0, validation at {args.pixels:,} px in both; the stand-in sample "
                f"({args.per_class} training images per class; generated images, not MAMe). Ramp: {', '.join(ramp)}.", "",
                "| run | training budget per image | training pixels processed | against constant | wall time (s) | "
                "against constant | best val top-1 [95%] | final val top-1 [95%] |", "|---|---|---|---|---|---|---|---|"]
        for label, phases, px, s, best, final in rows:
            body.append(f"| {label} | {phases} | {px / 1e9:.2f} G | {px / base_px:.2f}x | {s:.0f} | {s / base_s:.2f}x | "
                        f"{best} | {final} |")
        body += ["", "Evaluation budget (`mame-fast evaluate RUN --pixels ...`, validation, best weights; the table each "
                 "run's card now shows):", "", "| run | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads), *sweeps]
        publish("budget_schedule", "Pixel-budget schedule against the constant budget", body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
