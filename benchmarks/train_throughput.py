"""Training throughput over whole epochs: the real loader against the same model on in-memory batches.

For each configuration (resolution, cuDNN autotuning on or off), in a process of its own so that no
kernel choice or cache carries over from one to the next:

- **first epoch**: a fresh loader and model. The loader is primed (its start-up and first batches begin) as the
  trainer does before its warm-up. The process's first use of CUDA, cuDNN and their kernels is paid on a
  throwaway shape, and reported on its own: it is paid once per process, whatever the data. Then a
  forward+backward pass over every batch shape, twice: the first minus the second is what new shapes cost
  (autotuning when on, heuristics, kernel loading and allocation when off). The first epoch minus a steady
  epoch is what is left; its time inside the loader's ``next()`` and the host time of its first 3 steps, each
  against a steady epoch's, say whether the loader or the step's first launches hold it. Both are extrapolated
  to the real MAMe train split (20,300 images, its own shape count from the real metadata).
- **steady state**: ``--epochs`` whole epochs with the real loader, which keeps its pipeline across epochs as
  in training, each followed by a whole pass over one real epoch's batches cached on the device (the model's
  speed with no loading cost: same shapes, same values). The ratio is the median over these adjacent pairs:
  where the step is host-bound (256 on a GPU) its speed drifts by more than the loader costs, and a pair sees
  one state of the machine. The data wait is the share of the loop spent inside the loader's ``next()``: on
  a GPU, the per-batch Python work the loader does on the training thread.
- **GPU busy**: the mean of ``nvidia-smi``'s utilization samples within the real-loader epochs, and within the
  in-memory passes.
- **reference CNN** (``--reference``): timm's ``resnet50`` on in-memory 224x224 batches, channels-last,
  bf16 autocast, cuDNN autotuning on: a tuned CNN's images/s and FLOP/s on the same card, to read our
  models' figures against.

Everything goes through the trainer's own ``train_step``, ``warm_up`` and runtime. Goals (issue 10), on a
GPU: real loader >= 95% of in-memory batches at 256 and full; first-epoch overhead <= 10% of an epoch at
the real MAMe train size.

    python benchmarks/train_throughput.py [--model small] [--per-class 100] [--batch-size 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace

import numpy as np
import torch
from _common import fresh_process, summary, write_results
from loader_throughput import prepare

from mame_fast.config import load
from mame_fast.data import metadata as md
from mame_fast.files import usable_cores
from mame_fast.input import build_loader
from mame_fast.input.loader import plan_config
from mame_fast.input.plan import batch_shapes
from mame_fast.train.loop import CompileWatch, compiled
from mame_fast.train.model import build, count_flops
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.spec import load_spec
from mame_fast.train.step import StepGraphs, make_optimizer, make_schedule, train_step, warm_up

REAL_TRAIN = 20_300
FIRST_STEPS = 3  # the first epoch's first steps, timed apart (run_epoch)


class GpuBusy:
    """Mean GPU utilization (%) sampled by nvidia-smi every 100 ms while the block runs; None without it."""

    def __enter__(self):
        self.samples: list[float] = []
        self.proc = None
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            gpu = str(torch.cuda.current_device())
            self.proc = subprocess.Popen(["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):  # a header or an empty line
                self.samples.append((time.perf_counter(), float(line.strip())))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    def mean_in(self, spans: list[tuple[float, float]]) -> float | None:
        """Mean utilization of the samples taken within the given (start, end) perf_counter spans."""
        inside = [v for t, v in self.samples if any(a <= t <= b for a, b in spans)]
        return float(np.mean(inside)) if len(inside) > 1 else None


def measure(cfg, epochs: int, prime: bool = True, also: tuple[int, ...] = ()) -> dict:
    """One configuration: start-up, per-shape first-use cost, first epoch, steady real-loader epochs, in-memory epochs.

    ``also``: thread counts of more loaders of the same kind in this process, whose steady epochs (each followed by its
    own in-memory pass) alternate with the first loader's: thread counts compared within one state of the machine."""
    t_build = time.perf_counter()
    watch = CompileWatch(cfg.compile_mode) if cfg.compile else None
    rt = setup_runtime(cfg.precision, cfg.cudnn_benchmark)
    loader = build_loader(cfg.data, "train", True, cfg.seed, device=rt.device, dtype=rt.dtype)
    spec = load_spec(cfg.model)
    model = build(spec).to(rt.device).to(memory_format=torch.channels_last)
    net = compiled(model, cfg)  # as the trainer does: compiled at its first step
    opt = make_optimizer(model, cfg, cfg.data.batch_size)
    graphs = StepGraphs(net, opt, rt, cfg.optim.clip_grad) if cfg.cuda_graphs else None  # captured in the first epoch
    passes = (2 * epochs + 2) * (1 + len(also)) + (StepGraphs.EAGER + 1 if graphs else 0)
    sched = make_schedule(opt, cfg, loader.steps(0) * passes, cfg.data.batch_size)
    rng = np.random.default_rng(0)
    shapes = loader.shapes()
    rt.synchronize()
    startup = time.perf_counter() - t_build
    if prime:
        loader.prime(0)
    # The process's first use of the GPU libraries and their kernels, on a shape no batch has.
    process_first = warm_up(model, [(cfg.data.batch_size, 96, 96)], [], rt)
    # Forward and backward once per shape, twice: the first pass pays what a shape costs the first time it is seen
    # (autotuning when on, heuristics, kernel loading and allocation when off), the second only the compute.
    first_use, again = warm_up(model, shapes, [], rt), warm_up(model, shapes, [], rt)

    def run_epoch(batches, head: list | None = None) -> tuple[float, float, int, int]:
        """Seconds, seconds inside next(), images and steps of one pass over ``batches``; ``head`` gets the host time
        of its first FIRST_STEPS steps (the step is asynchronous: what the host waits for, e.g. kernels loaded at
        their first launch, shows there; GPU work does not)."""
        t, wait, n, steps = time.perf_counter(), 0.0, 0, 0
        it = iter(batches)
        while True:
            tw = time.perf_counter()
            b = next(it, None)
            wait += time.perf_counter() - tw
            if b is None:
                break
            loss, _, _ = train_step(net, b, opt, sched, None, rt, cfg, rng, graphs)
            n, steps = n + b.real, steps + 1
            if head is not None and steps == FIRST_STEPS:
                head.append(time.perf_counter() - t)
        loss.item()  # the loop syncs at log steps; here once per epoch
        return time.perf_counter() - t, wait, n, steps

    first_head, steady_head = [], []
    first, first_wait, n, _ = run_epoch(loader.epoch(0), first_head)
    cached = list(loader.epoch(1))  # one real epoch's batches, kept on the device
    first_graphs, settling = graphs.summary() if graphs else None, 0
    # A sample's epoch may hold a shape fewer than 3 times (2 eager steps, then the capture), where a real MAMe epoch
    # holds each many times: the shapes still uncaptured are captured in untimed passes, not in the timed epochs.
    while graphs and len(graphs.shapes) < len(shapes):
        run_epoch(cached)
        settling += 1
    # Real-loader epochs and in-memory passes alternate, so that each pair sees the same state of the machine: at 256
    # the step is host-bound, and its speed drifts between and within processes by more than the loader costs.
    others = {t: build_loader(replace(cfg.data, threads=t), "train", True, cfg.seed, device=rt.device, dtype=rt.dtype)
              for t in also}
    for other in others.values():
        other.prime(2)
    real, waits, mem, spans = [], [], [], {"real": [], "memory": []}
    alt = {t: {"real_s": [], "memory_s": [], "waits": []} for t in others}
    with GpuBusy() as busy:
        for e in range(2, epochs + 2):
            t0 = time.perf_counter()
            dt, w, n, steps = run_epoch(loader.epoch(e), steady_head)
            t1 = time.perf_counter()
            mem.append(run_epoch(cached)[0])
            spans["real"].append((t0, t1))
            spans["memory"].append((t1, time.perf_counter()))
            real.append(dt)
            waits.append(w)
            for t, other in others.items():
                dt, w, _, _ = run_epoch(other.epoch(e))
                alt[t]["real_s"].append(dt)
                alt[t]["waits"].append(w)
                alt[t]["memory_s"].append(run_epoch(cached)[0])
    flops = {s: count_flops(model, s[1], s[2]) for s in shapes}  # forward, per image, on the device
    img_flops = float(np.mean([flops[(b.images.shape[0], b.images.shape[2], b.images.shape[3])] for b in cached]))
    return {
        "compiled": watch.summary() if watch else None, "graphs": graphs.summary() if graphs else None,
        "graphs_first_epoch": first_graphs, "graphs_settling_passes": settling,
        "device": str(rt.device), "loader": type(loader).__name__, "images": n, "steps": steps, "shapes": len(shapes),
        "startup_s": startup, "process_first_s": process_first, "first_use_s": first_use - again, "primed": prime,
        "first_epoch_s": first, "real_s": real, "memory_s": mem,
        # Where the first epoch's extra time goes: waiting for the loader, or the host in the first steps.
        "first_wait_s": first_wait, "steady_wait_s": float(np.median(waits)),
        "first_head_s": first_head[0] if first_head else None,
        "steady_head_s": float(np.median(steady_head)) if steady_head else None,
        "wait_ms_per_step": 1e3 * float(np.median(waits)) / steps, "step_ms": 1e3 * float(np.median(real)) / steps,
        "wait_share": float(np.median(waits) / np.median(real)), "gpu_busy": busy.mean_in(spans["real"]),
        "gpu_busy_memory": busy.mean_in(spans["memory"]),
        "train_flops_per_image": 3 * img_flops, "threads": cfg.data.threads,
        "also": {str(t): {"real_s": a["real_s"], "memory_s": a["memory_s"],
                          "wait_share": float(np.median(a["waits"]) / np.median(a["real_s"]))} for t, a in alt.items()},
    }


def reference(batch: int, steps: int) -> dict:
    """timm resnet50, in-memory 224x224 batches, channels-last, bf16, autotuned: a tuned CNN on this card."""
    import timm

    rt = setup_runtime("auto", cudnn_benchmark=True)
    model = timm.create_model("resnet50", num_classes=29).to(rt.device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 224, 224, device=rt.device, dtype=rt.dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 29, (batch,), device=rt.device)

    def step():
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    rt.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    rt.synchronize()
    dt = time.perf_counter() - t
    return {"ips": batch * steps / dt, "train_flops_per_image": 3 * count_flops(model, 224, 224), "device": str(rt.device)}


def real_shape_count(cfg) -> int:
    """Batch shapes of an epoch on the real MAMe train split with this data config (from the real metadata)."""
    rows = [r for r in md.load_dir().rows if r.subset == "train"]
    h, w = np.array([r.height for r in rows], float), np.array([r.width for r in rows], float)
    return len(batch_shapes(h, w, plan_config(cfg.data, True)))


def child(what: str, epochs: int, sets: list[str], prime: bool, also: list[int], reference_batch: int,
          reference_steps: int) -> dict:
    """One configuration's measurements (run in a fresh process)."""
    if what == "reference":
        return reference(reference_batch, reference_steps)
    cfg = load(None, sets)
    out = measure(cfg, epochs, prime=prime, also=tuple(also))
    out["real_shapes"] = real_shape_count(cfg)
    return out


def run_child(what: str, args, sets: list[str] | None = None, prime: bool = True, also: list[int] | None = None
              ) -> dict | None:
    t0 = time.perf_counter()
    try:
        with fresh_process() as ex:
            out = ex.submit(child, what, args.epochs, sets or [], prime, also or [], args.reference_batch,
                            args.reference_steps).result()
    except Exception:  # the child's exception with its own traceback, or BrokenProcessPool when it died
        print(f"{what} {sets} failed:\n{traceback.format_exc()}", flush=True)
        out = None
    # What gpu_check.sh's time limit goes on: the process's start, its warm-up and first epoch, the timed epochs.
    print(f"{what} {' '.join(sets or [])}: {time.perf_counter() - t0:.1f} s in all", flush=True)
    return out


def pairs_of(m: dict) -> list[float]:
    """In-memory time / real-loader time of each adjacent (real epoch, in-memory pass) pair."""
    return [t_mem / t_real for t_real, t_mem in zip(m["real_s"], m["memory_s"])]


def ratio_of(m: dict) -> float:
    return summary(pairs_of(m))[0]


def table(title: str, m: dict) -> str:
    n = m["images"]
    real, mem = [n / t for t in m["real_s"]], [n / t for t in m["memory_s"]]
    steady = float(np.median(m["real_s"]))
    # A shape's first use cannot cost less than nothing: a negative difference is the machine's noise (a 2-core VM's
    # passes over 17 full-resolution shapes vary by more than the CPU's first-use cost), and is reported as such.
    per_shape = max(0.0, m["first_use_s"]) / m["shapes"]
    fill = m["first_epoch_s"] - steady  # what the first epoch still costs once every shape has been seen
    real_epoch = REAL_TRAIN / summary(real)[0]
    real_overhead = per_shape * m["real_shapes"] + max(0.0, fill)
    if g := m.get("graphs"):  # the captures a real first epoch makes beyond those in the sample's (in its fill)
        captured_first = m["graphs_first_epoch"]["shapes"]
        real_overhead += g["capture_s"] / max(1, g["shapes"]) * max(0, m["real_shapes"] - captured_first)
    once = m["startup_s"] + m["process_first_s"]
    pairs, ratio = pairs_of(m), ratio_of(m)
    pct = lambda v: "n/a" if v is None else f"{v:.0f}%"  # noqa: E731
    tflops = summary(real)[0] * m["train_flops_per_image"] / 1e12
    return "\n".join([
        f"### {title}: {n} images per epoch, {m['steps']} steps, {m['shapes']} batch shapes, {m['loader']} on {m['device']}\n",
        "| measurement | images/s (median [min, max]) | GPU busy |", "|---|---|---|",
        f"| in-memory batches | {summary(mem)[0]:.0f} [{summary(mem)[1]:.0f}, {summary(mem)[2]:.0f}] | "
        f"{pct(m['gpu_busy_memory'])} |",
        f"| real loader | {summary(real)[0]:.0f} [{summary(real)[1]:.0f}, {summary(real)[2]:.0f}] | {pct(m['gpu_busy'])} |",
        *[f"| real loader, {t} threads (same process, alternating) | {med:.0f} [{lo:.0f}, {hi:.0f}] | |"
          for t, (med, lo, hi) in ((t, summary([n / x for x in a["real_s"]])) for t, a in m.get("also", {}).items())],
        "",
        f"- real loader / in-memory batches: **{ratio:.1%}** (median of {len(pairs)} adjacent pairs, "
        f"[{min(pairs):.1%}, {max(pairs):.1%}]); time inside the loader's next() {m['wait_share']:.1%} of the loop "
        f"({m['wait_ms_per_step']:.2f} ms per step of {m['step_ms']:.2f} ms); {tflops:.1f} TFLOP/s of training work "
        f"(3x forward FLOPs).",
        *[f"- with {t} threads instead of {m['threads']}: real loader / its adjacent in-memory pass **{ratio_of(a):.1%}** "
          f"(each pair [{min(pairs_of(a)):.1%}, {max(pairs_of(a)):.1%}]); time inside next() {a['wait_share']:.1%} of the loop."
          for t, a in m.get("also", {}).items()],
        *([f"- {CompileWatch.describe(c)}."] if (c := m.get("compiled")) else []),
        *([f"- {StepGraphs.describe(g)}; {m['graphs_first_epoch']['shapes']} in the first epoch"
           + (f", the others in {m['graphs_settling_passes']} untimed passes over the in-memory batches before the steady "
              f"epochs (the sample's epoch holds some shape fewer than 3 times; the real first epoch below is charged "
              f"for every capture)" if m["graphs_settling_passes"] else "") + "."] if (g := m.get("graphs")) else []),
        f"- once per process: start-up (CUDA, loader and model built) {m['startup_s']:.2f} s; first use of CUDA, cuDNN "
        f"and their kernels {m['process_first_s']:.2f} s (a forward+backward pass on a throwaway shape)"
        + ("; the loader primed before it, as the trainer does." if m["primed"] else "; the loader not primed.")
        + " First use of a shape: "
        + (f"{per_shape * 1e3:.0f} ms each ({m['first_use_s']:.2f} s for {m['shapes']}" if m["first_use_s"] >= 0 else
           f"below this machine's noise (the second pass took {-m['first_use_s']:.2f} s longer over {m['shapes']} shapes")
        + ", measured as a forward+backward pass over every shape minus a second such pass); the first epoch after that: "
        f"{m['first_epoch_s']:.2f} s against {steady:.2f} s steady, of which {m['first_wait_s']:.2f} s inside the "
        f"loader's next() ({m['steady_wait_s']:.2f} s steady)"
        + (f" and {m['first_head_s']:.2f} s in its first {FIRST_STEPS} steps ({m['steady_head_s']:.2f} s steady)"
           if m.get("first_head_s") is not None and m.get("steady_head_s") is not None else "") + ".",
        f"- On the real MAMe train split ({m['real_shapes']} shapes, an epoch of {real_epoch:.1f} s at this speed) the first "
        f"epoch costs {real_overhead:.2f} s more than the others: **{real_overhead / real_epoch:.1%}** of an epoch "
        f"(goal <= 10%); {real_overhead + once:.2f} s, {(real_overhead + once) / real_epoch:.1%}, with the once-per-process "
        f"costs.",
        "",
    ])


def bench_sets(args, res: str, shards: dict, batch: int, threads: int) -> list[str]:
    """The config overrides every training benchmark starts from: the model, the sample's shards at ``res`` (crops of
    ``--crop`` at 256, ``--pixels`` per image at full), the batch, the loader threads, SGD."""
    extra = [f"data.crop={args.crop}"] if res == "256" else [f"data.pixels={args.pixels}"]
    return [f"model={args.model}", f"data.res={res}", f"data.shards={shards[res]}", f"data.batch_size={batch}",
            f"data.threads={threads}", "optim.name=sgd"] + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3, help="steady epochs timed, for each of real loader and in-memory")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=usable_cores(), help="default: the CPUs this process may use")
    ap.add_argument("--res", default="256,full")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--pixels", type=int, default=360_000)
    ap.add_argument("--variants", default=None,
                    help="comma-separated res:cudnn:decode[:tN][:bN][:noprime][:pil][:compile][:graphs][:capture][:+N], e.g. "
                         "256:on:gpu:b128,full:off:cpu:t8 (tN: N loader threads instead of --workers; bN: batches of N "
                         "instead of --batch-size; noprime: the loader starts at the first epoch, not before the warm-up; "
                         "pil: the PIL fallback, as on a machine without DALI; compile: torch.compile the model, "
                         "compiled in the first epoch; graphs: the same in mode reduce-overhead (CUDA graphs); capture: the "
                         "eager step captured as CUDA graphs by hand (cuda_graphs=true); +N: also a "
                         "loader of N threads in the same process, its epochs alternating with the first's). Default: on "
                         "and off, decode auto; on a CPU: off")
    ap.add_argument("--reference", action="store_true", help="also time timm's resnet50 (GPU)")
    ap.add_argument("--reference-batch", type=int, default=128)
    ap.add_argument("--reference-steps", type=int, default=30)
    args = ap.parse_args()
    _, shards = prepare(args.per_class, args.workers)
    cuda = torch.cuda.is_available()
    default = [f"{r}:{m}:auto" for r in args.res.split(",") for m in (("on", "off") if cuda else ("off",))]
    sections, failed = [], []  # a failed child: the benchmark exits non-zero, after saving what it measured
    for variant in args.variants.split(",") if args.variants else default:
        res, mode, decode, *opts = variant.split(":")
        threads = next((int(o[1:]) for o in opts if o.startswith("t")), args.workers)
        batch = next((int(o[1:]) for o in opts if o.startswith("b")), args.batch_size)
        prime = "noprime" not in opts
        also = [int(o[1:]) for o in opts if o.startswith("+")]
        sets = bench_sets(args, res, shards, batch, threads) + [f"cudnn_benchmark={mode == 'on'}", f"data.decode={decode}"] + (
            ["data.loader=pil"] if "pil" in opts else []) + (["compile=true"] if {"compile", "graphs"} & set(opts) else []) + (
            ["compile_mode=reduce-overhead"] if "graphs" in opts else []) + (["cuda_graphs=true"] if "capture" in opts else [])
        m = run_child("measure", args, sets, prime, also)
        if m:
            where = f", JPEG decode {decode}" if cuda else ""
            title = (f"--res {res}, model `{args.model}`, batch {batch}, cuDNN autotuning {mode}{where}, "
                     f"{threads} loader threads{'' if prime else ', not primed'}{', compiled' if 'compile' in opts else ''}"
                     f"{', compiled with CUDA graphs (reduce-overhead)' if 'graphs' in opts else ''}"
                     f"{', CUDA graphs captured by hand' if 'capture' in opts else ''}")
            sections.append(table(title, m))
            print(sections[-1], flush=True)
            print("saved", save(args, sections))
        else:
            failed.append(variant)
    if args.reference and cuda:
        r = run_child("reference", args)
        if r:
            sections.append(f"### reference: timm `resnet50`, in-memory 224x224 batches of {args.reference_batch}, "
                            f"channels-last, "
                            f"bf16, autotuned, on {r['device']}\n\n{r['ips']:.0f} images/s, "
                            f"{r['ips'] * r['train_flops_per_image'] / 1e12:.1f} TFLOP/s of training work (3x forward FLOPs).\n")
            print(sections[-1], flush=True)
            print("saved", save(args, sections))
        else:
            failed.append("reference")
    if not sections:
        print("saved", save(args, sections))
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see above)")


def save(args, sections: list[str]):
    """The results file with the sections so far: saved after each one, so that a run stopped by a time limit
    (gpu_check.sh) keeps the tables it finished."""
    body = (f"{args.epochs} steady whole epochs with the real loader after the first, each followed by a pass over one "
            f"real epoch's batches cached on the device (in-memory); {args.workers} loader threads unless stated; SGD, bf16 "
            f"autocast on GPU / fp32 on CPU, channels-last; each configuration in a fresh process.\n\n" + "\n".join(sections))
    return write_results("train_throughput", "Training throughput over whole epochs: real loader vs in-memory batches",
                         body, ("torch", "timm", "nvidia-dali-cuda130"))


if __name__ == "__main__":
    main()
