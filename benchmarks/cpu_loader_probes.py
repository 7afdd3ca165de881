"""Probes of the CPU loaders' serial costs: what bounds them on more cores than this machine has (issue 14).

Each probe runs side by side with its baseline in one run:

1. **Tail dispatch**: one batch of 32 random 256 px crops resized to 224 px by the DALI CPU tail's ``start_tail`` in k
   tasks, forked on torch's inter-op pool against a Python thread pool running the same scripted function (the
   design before). Then, during one long call of each, a Python thread spins: its speed against spinning alone shows
   whether the tasks hold the GIL (a tail holding it leaves the spinner near 0; its fair share of the cores is given
   beside it).
2. **DALI CPU loader by thread count**: the loader at this machine's core count and at 16 threads (the GPU machines'
   core count, where the 16-core table measured it): images/s and the consuming thread's CPU time per image, the
   serial part that bounds it on more cores. Each configuration in a fresh process.
3. **DALI's graph alone** (feed + ROI decode, pipelined as in the loader, no tail) at batches of 4, 8 and 32: the time
   per iteration, fitted as a fixed part plus a part per image, and projected to a batch of 32 on 16 threads.

    python benchmarks/cpu_loader_probes.py [--per-class 40] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from _common import fresh_process, write_results
from loader_throughput import prepare

from mame_fast.config import DataConfig
from mame_fast.files import usable_cores
from mame_fast.input.loader import keep_freed_memory, normalize_rows, start_tail


class Spinner:
    """A Python thread counting as fast as it can: its rate shows how much of the time the GIL was free for it."""

    def __init__(self):
        self.count, self._stop = 0, False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop:
            self.count += 1

    def rate(self, seconds: float) -> float:
        c, t = self.count, time.perf_counter()
        time.sleep(seconds)
        return (self.count - c) / (time.perf_counter() - t)

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


def tail_dispatch(task_counts: list[int], batches: int = 20, rounds: int = 9) -> list[str]:
    """Per task count: ms per batch forked and pooled, then the spinner's speed during one long call of each (8
    batches' crops at once, so that the calling thread waits instead of taking the GIL back between batches)."""
    torch.set_num_threads(1)
    keep_freed_memory()  # as the loader does: a fresh batch's pages are not faulted in anew each time
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8, generator=g) for _ in range(32)]
    scale, bias = normalize_rows(224)

    def run(n: int, tasks: int, fork: bool, pool) -> None:
        out = torch.empty((n, 224, 224, 3))
        cs = (crops * (n // 32))[:n]
        start_tail(cs, [224] * n, [224] * n, [bool(k % 2) for k in range(n)], out, scale, bias, True, tasks, lambda: pool,
                   fork)()

    rows = []
    with ThreadPoolExecutor(max(task_counts)) as pool:
        for tasks in task_counts:
            ms: dict[bool, list[float]] = {True: [], False: []}
            for fork in (True, False):  # TorchScript's profiling runs, first allocations: not timed
                for _ in range(3):
                    run(32, tasks, fork, pool)
            for _ in range(rounds):  # the two modes alternate, so that drift hits both
                for fork in (True, False):
                    t = time.perf_counter()
                    for _ in range(batches):
                        run(32, tasks, fork, pool)
                    ms[fork].append(1e3 * (time.perf_counter() - t) / batches)
            spin = {}
            spinner = Spinner()
            alone = spinner.rate(0.5)
            for fork in (True, False):
                c, t = spinner.count, time.perf_counter()
                run(256, tasks, fork, pool)
                spin[fork] = (spinner.count - c) / (time.perf_counter() - t) / alone
            spinner.stop()
            busy = min(tasks, torch.get_num_interop_threads(), usable_cores())
            fair = min(1.0, usable_cores() / (busy + 1))
            cell = lambda xs: f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"  # noqa: E731
            rows.append(f"| {tasks} | {cell(ms[True])} | {cell(ms[False])} | "
                        f"{spin[True]:.0%} | {spin[False]:.0%} | {fair:.0%} |")
    return rows


def _loader_run(shards: str, res: str, threads: int, epochs: int = 4) -> tuple[float, float]:
    """(images/s, consuming-thread CPU microseconds per image) of the DALI CPU loader, median over epochs 1.."""
    from mame_fast.input import build_loader

    torch.set_num_threads(1)  # as in the loader benchmark: the cores belong to the loader
    cfg = DataConfig(shards=shards, res=res, batch_size=32, crop=224, pixels=360_000, threads=threads, loader="dali")
    loader = build_loader(cfg, "train", True, 0)
    ips, own = [], []
    for e in range(epochs):
        t, c = time.perf_counter(), time.thread_time()
        n = sum(b.real for b in loader.epoch(e))
        if e:
            ips.append(n / (time.perf_counter() - t))
            own.append(1e6 * (time.thread_time() - c) / n)
    return statistics.median(ips), statistics.median(own)


def _graph_run(shards: str, res: str, threads: int, batch: int, iterations: int = 200) -> float:
    """Median milliseconds per iteration of DALI's CPU graph alone, pipelined (prefetch as configured), no tail."""
    from mame_fast.input.dali import DaliLoader
    from mame_fast.input.reader import open_split

    torch.set_num_threads(1)
    split = open_split(shards, "train")
    cfg = DataConfig(shards=shards, res=res, batch_size=batch, crop=224, pixels=360_000, threads=threads, loader="dali")
    loader = DaliLoader(split, cfg, True, 0, 0, 1, torch.device("cpu"), torch.float32, dali_tail=False)
    loader.prime(0)
    for _ in range(50):  # the pipeline fills and settles
        loader.pipe.schedule_run()
        loader.pipe.outputs()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        loader.pipe.schedule_run()
        loader.pipe.outputs()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--workers", type=int, default=usable_cores(), help="default: the CPUs this process may use")
    ap.add_argument("--many", type=int, default=16, help="the thread count of the many-core machine to probe for")
    args = ap.parse_args()
    _, shards = prepare(args.per_class, args.workers)
    sections = []

    counts = sorted({1, 2, 4, 8, args.workers, args.many})
    rows = tail_dispatch(counts)
    sections.append(
        "### 1. The DALI CPU tail's dispatch: a batch of 32 crops (256 px) to 224 px\n\n"
        "| tasks | forked, ms per batch (median [min, max] of 9 rounds) | Python pool, the same "
        "| a spinning Python thread's speed meanwhile, forked "
        "| ... Python pool | its fair share of the cores |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(sections[-1], flush=True)

    rows = []
    for res in ("256", "full"):
        for threads in sorted({args.workers, args.many}):
            with fresh_process() as ex:
                ips, own = ex.submit(_loader_run, str(shards[res]), res, threads).result()
            rows.append(f"| {res} | {threads} | {ips:.0f} | {own:.0f} | {1e6 / own:,.0f} |")
    sections.append(
        "### 2. The DALI CPU loader by thread count (batch 32, 3 epochs after one, median)\n\n"
        "| res | threads | images/s | consuming thread, CPU us per image | the images/s that thread alone allows |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(sections[-1], flush=True)

    batches = (4, 8, 32)
    with fresh_process() as ex:
        ms = [ex.submit(_graph_run, str(shards["256"]), "256", args.workers, b).result() for b in batches]
    per_image, fixed = np.polyfit(batches, ms, 1)
    at_many = fixed + 32 * per_image * args.workers / args.many
    sections.append(
        f"### 3. DALI's CPU graph alone (feed + ROI decode, pipelined, no tail), --res 256, {args.workers} threads\n\n"
        "| batch | ms per iteration |\n|---|---|\n" + "\n".join(f"| {b} | {m:.2f} |" for b, m in zip(batches, ms)) +
        f"\n\nFitted: {fixed:.2f} ms per iteration plus {per_image:.3f} ms per image on {args.workers} threads. A batch of "
        f"32 on {args.many} threads, if the fixed part stays: {at_many:.2f} ms, {32e3 / at_many:,.0f} images/s.\n")
    print(sections[-1], flush=True)

    body = (f"{args.workers} cores; {args.per_class} images per class of the generated sample (loader_throughput.py's). "
            f"torch at one intra-op thread; {torch.get_num_interop_threads()} inter-op threads.\n\n" + "\n".join(sections))
    print("saved", write_results("cpu_loader_probes", "CPU loader probes: serial costs", body,
                                 ("torch", "nvidia-dali-cuda130")))


if __name__ == "__main__":
    main()
