"""The training step's own speed on in-memory batches, with and without each loader alive in the process.

On the H100 (2026-11-26, train_throughput.py, `small`, --res 256, batch 64) the step is host-bound, and the same
in-memory passes ran at 3,462 img/s in the process holding a DALI GPU loader and at 5,259 in the one holding the
PIL fallback. This separates what the process holds from what the loader delivers, in one process, in order
(on the H100 every stage ran within the step's own noise, 4,429-5,893 img/s: the difference was the processes'
drift, and the real loader's shortfall comes from the loader working beside the step, not from its presence;
benchmarks/results/step_contention_nvidia-h100_2026-11-26.md):

1. the model alone, on synthetic batches of the epoch's shape (nothing of DALI imported);
2. after ``import nvidia.dali``;
3. with a DALI loader built, primed, one epoch taken and the next prefetched, as between training epochs: the
   synthetic batches, then that loader's own epoch cached on the device;
4. after that loader is deleted;
5. the same as 3 for the PIL fallback.

For each pass it records the CPU time that the process's other threads took meanwhile (from /proc/self/task),
by thread name: a thread that burns CPU while the loader has nothing to do shows there. Also the training thread's
CPU affinity at each stage (a library that pins it would put it on the loaders' cores).

    python benchmarks/step_contention.py [--per-class 20] [--res 256] [--batch-size 64] [--passes 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import proc_cpu, summary, write_results
from loader_throughput import prepare
from train_throughput import bench_sets

from mame_fast.config import load
from mame_fast.files import usable_cores
from mame_fast.input import build_loader
from mame_fast.input.loader import Batch
from mame_fast.train.model import build
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.spec import load_spec
from mame_fast.train.step import make_optimizer, make_schedule, train_step, warm_up


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process, with its name."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        got = proc_cpu(task / "stat")
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if got is not None:
            out[int(task.name)] = (name, got[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--res", default="256")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=46, help="steps per pass (an epoch of train_throughput's sample)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--workers", type=int, default=usable_cores())
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--pixels", type=int, default=360_000)
    args = ap.parse_args()
    _, shards = prepare(args.per_class, args.workers)
    cfg = load(None, bench_sets(args, args.res, shards, args.batch_size, args.workers) + ["cudnn_benchmark=False"])
    rt = setup_runtime(cfg.precision, cfg.cudnn_benchmark)
    model = build(load_spec(cfg.model)).to(rt.device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, cfg.data.batch_size)
    sched = make_schedule(opt, cfg, 10**6, cfg.data.batch_size)
    rng = np.random.default_rng(0)
    me = threading.get_native_id()  # the training thread, as /proc/self/task names it
    rows = []

    def passes(stage: str, batches: list[Batch]) -> None:
        ips, own, others = [], [], Counter()
        for _ in range(args.passes):
            before, t = thread_cpu(), time.perf_counter()
            n = 0
            for k in range(args.steps):
                b = batches[k % len(batches)]
                loss, _, _ = train_step(model, b, opt, sched, None, rt, cfg, rng)
                n += b.real
            loss.item()
            wall = time.perf_counter() - t
            after = thread_cpu()
            ips.append(n / wall)
            own.append((after[me][1] - before[me][1]) / wall)
            for tid, (name, cpu) in after.items():
                if tid != me:
                    others[name] += (cpu - before.get(tid, (name, 0.0))[1]) / wall / args.passes
        top = ", ".join(f"{k} {v:.2f}" for k, v in others.most_common(4) if v >= 0.01) or "none"
        med, lo, hi = summary(ips)
        rows.append(f"| {stage} | {med:.0f} [{lo:.0f}, {hi:.0f}] | {np.median(own):.2f} | {sum(others.values()):.2f} | {top} | "
                    f"{len(os.sched_getaffinity(0))} |")
        print(rows[-1], flush=True)

    n, (h, w) = cfg.data.batch_size, ((args.crop, args.crop) if args.res == "256" else (600, 600))
    synthetic = [Batch(images=torch.randn(n, 3, h, w, device=rt.device).contiguous(memory_format=torch.channels_last),
                       labels=torch.randint(0, 29, (n,), device=rt.device),
                       sizes=torch.tensor([[h, w]] * n, dtype=torch.int32, device=rt.device),
                       index=torch.arange(n), padded=False, real=n) for _ in range(4)]
    warm_up(model, [(n, h, w)], [], rt)
    passes("model alone (nothing of DALI imported)", synthetic)
    import nvidia.dali  # noqa: F401
    import nvidia.dali.plugin.pytorch  # noqa: F401

    passes("after import nvidia.dali", synthetic)
    for kind in ("dali", "pil"):
        loader = build_loader(replace(cfg.data, loader=kind), "train", True, 0, device=rt.device, dtype=rt.dtype)
        loader.prime(0)
        cached = list(loader.epoch(0))  # the next epoch is being prefetched from here on, as between training epochs
        rt.synchronize()
        time.sleep(1.0)  # what the loader runs ahead has finished
        name = type(loader).__name__
        passes(f"{name} alive: synthetic batches", synthetic)
        if cached[0].images.shape == synthetic[0].images.shape:
            passes(f"{name} alive: its own epoch, cached", cached)
        del loader, cached
        gc.collect()
        passes(f"after the {name} was deleted", synthetic)
    body = (f"`{args.model}`, --res {args.res}, batches of {n}x3x{h}x{w} (channels-last), {args.steps} steps per pass, "
            f"median of {args.passes} passes; loaders of {args.workers} threads/workers on {rt.device}.\n\n"
            "| stage | images/s (median [min, max]) | training thread CPU s per s | other threads CPU s per s | "
            "busiest other threads | cores the training thread may use |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    print("saved", write_results("step_contention", "The step's speed with each loader alive in the process", body,
                                 ("torch", "nvidia-dali-cuda130")))


if __name__ == "__main__":
    main()
