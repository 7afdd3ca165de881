"""Wall time of one sweep (2 rates x 2 seeds = 4 members) run three ways, side by side in one invocation: one member
after another in one process, `--parallel 2` (two processes, the cores split), and as a SLURM array job on the local
single-node SLURM (tools/slurm.sh start). Each way trains the same 4 runs; the family cards must hold the same numbers.

    python benchmarks/sweep_throughput.py [--epochs 4] [--repeats 1]

On a 2-core machine the array job runs 2 members at a time (1 core each), as --parallel 2 does, plus SLURM's own
scheduling delay; on a 4-GPU node --parallel 4 or an array gives each member a GPU. The sample is the stand-in one
(generated images, real metadata): the wall times say how the ways compare, not what a real MAMe sweep costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import publish, summary  # noqa: E402


def sweep(work: Path, shards: Path, out: str, epochs: int, *more: str) -> tuple[float, dict]:
    sets = [f"data.shards={shards}", f"out={work / out}", "data.res=256", "data.crop=96", "model=small",
            "data.batch_size=16", "hist_epochs=0", "evidence=false", f"epochs={epochs}", "slurm.gpus=0",
            "slurm.cpus_per_task=1", "slurm.time=30"]
    args = [sys.executable, "-m", "mame_fast", "sweep", "optim.lr=0.02,0.05", "--repeats", "2", "--name", "b",
            *[a for s in sets for a in ("--set", s)], *more]
    t = time.perf_counter()
    r = subprocess.run(args, cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
    if "--slurm" in more:  # submitted: wait for the array and the family card's job to leave the queue
        while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            time.sleep(0.5)
    return time.perf_counter() - t, json.loads((work / out / "sweep-b.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="times each way is run (median and range reported)")
    args = ap.parse_args()
    from mame_fast.data.sample import SampleSpec, write_sample
    from mame_fast.data.shard import ShardSettings, write_shards

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        write_sample(work / "mame", SampleSpec(per_class=(3, 1, 2), max_side=320, large=1, large_side=1600, seed=0),
                     workers=1)
        shards = write_shards(work / "mame", work / "shards", ShardSettings(max_pixels=60_000, shard_size_mb=0.3), workers=1)
        ways = [("in one process, one member after another", (), "here"), ("--parallel 2", ("--parallel", "2"), "parallel")]
        if shutil.which("sbatch"):
            ways.append(("SLURM array (local single-node SLURM)", ("--slurm",), "slurm"))
        rows, cards = [], {}
        for k in range(args.repeats):
            for label, more, folder in ways:
                seconds, family = sweep(work, shards, f"{folder}-{k}", args.epochs, *more)
                rows.append((label, seconds))
                cards[label] = family["mean_top1"]
                print(f"{label}: {seconds:.1f} s", flush=True)
        same = len({json.dumps(c, sort_keys=True) for c in cards.values()}) == 1
        base = summary([s for lab, s in rows if lab == ways[0][0]])[0]
        body = [f"A sweep of 4 members (optim.lr 0.02, 0.05 x seeds 0, 1), model small, {args.epochs} epochs at 96 px "
                f"crops, 87 training images (the stand-in sample); {args.repeats} time(s) each way.", "",
                "| way | wall time, median [min, max] (s) | against one process |", "|---|---|---|"]
        for label, _, _ in ways:
            med, lo, hi = summary([s for lab, s in rows if lab == label])
            body.append(f"| {label} | {med:.1f} [{lo:.1f}, {hi:.1f}] | {base / med:.2f}x |")
        body += ["", f"Family cards identical across the ways: {'yes' if same else 'NO'} ({cards[ways[0][0]]})."]
        publish("sweep_throughput", "Sweep wall time: one process, --parallel 2, SLURM array", body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
