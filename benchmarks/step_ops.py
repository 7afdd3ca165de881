"""Operations per training step: the host's share of a step that is host-bound (`small` at 256 on a GPU).

Where the GPU waits for the host (benchmarks/results/gpu_check_nvidia-h100_2026-11-26_run2.md: 46-67% busy at 256),
every operation the forward and backward dispatch costs host time: Python, the dispatcher, a kernel launch. This counts
them, per shipped model spec, for one forward and backward over a batch of 64 at 224x224 (``--res 256``) and over a
padded batch of 64 at about 360 kpx (``--res full``, with its masks), on PyTorch's meta device: shapes only, no
arithmetic, so it takes seconds on any machine and counts what any device would be asked to run. Views and detaches
are left out (they launch nothing); autocast's weight casts too (the same in every column).

Side by side: the model as built now, and the baseline with every activation in place, as timm builds them. An
in-place SiLU (or GELU, Mish) has a gradient that reads its input, so autograd first saves a copy: an extra kernel
and an activation-sized copy (``aten.clone``; bytes in bf16, read and written once each) per layer.

Then the whole training step (``train_step``: targets, forward, backward, clipping, optimizer, schedule, EMA; and the
epoch's running sums), on the CPU in fp32 over a small batch (the count does not depend on the pixels), for each
optimizer: fused, as ``make_optimizer`` builds it now, and the EMA as ``step.Ema`` keeps it, against the defaults:
PyTorch's on a GPU (foreach) and timm's ModelEmaV3. Host reads are the ``.item()``-like operations: each a sync when
the tensor is on a GPU, host work when it is not. Last, the host time of the EMA update and of the gradient clipping,
per shipped spec slimmed to 8 channels everywhere (the same tensors and operations, next to no arithmetic).

    python benchmarks/step_ops.py [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from _common import write_results
from timm.utils import ModelEmaV3

from mame_fast.config import load
from mame_fast.input import Batch
from mame_fast.train.model import build
from mame_fast.train.runtime import Runtime
from mame_fast.train.spec import load_spec, shipped_specs
from mame_fast.train.step import Ema, EpochMeter, StepGraphs, make_optimizer, make_schedule, train_step, trained_params

READS = ("aten._local_scalar_dense", "aten.is_nonzero")
VIEWS = {"aten.detach", "aten.view", "aten._unsafe_view", "aten.t", "aten.expand", "aten.slice", "aten.select",
         "aten.as_strided", "aten.alias", "aten.unsqueeze", "aten.squeeze", "aten.permute", "aten.transpose"}


class Count(torch.utils._python_dispatch.TorchDispatchMode):
    """The operations dispatched inside, views left out, and the elements that ``aten.clone`` copied."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.cloned = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name not in VIEWS:
            self.ops[name] += 1
        if name == "aten.clone":
            self.cloned += out.numel()
        return out


def in_place_as_timm_builds(model: torch.nn.Module) -> torch.nn.Module:
    """The baseline: every activation module in place again (timm's default; Dropout is not an activation)."""
    for m in model.modules():
        if hasattr(m, "inplace") and not isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.inplace = True
    return model


def step_ops(model: torch.nn.Module, n: int, h: int, w: int, padded: bool) -> Count:
    """One training forward and backward over an (n, 3, h, w) meta batch; padded: every image 3/4 of the bucket wide."""
    x = torch.empty(n, 3, h, w, device="meta").contiguous(memory_format=torch.channels_last)
    sizes = torch.tensor([[h, w * 3 // 4]] * n, device="meta") if padded else None
    with Count() as c:
        model(x, sizes).float().sum().backward()
    return c


def as_a_gpu_defaults(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The baseline: the same optimizer over the same groups, as PyTorch runs it on a GPU by default (foreach)."""
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
    return type(opt)(groups, foreach=True)


def whole_step(spec: str, optim: str, baseline: bool, graphed: bool = False) -> tuple[Count, Count, Count]:
    """The operations of one steady training step (its fourth), of the optimizer's update and of the EMA's update alone.
    ``graphed``: the step with ``cuda_graphs=true``, counted without the operations that a GPU runs as the shape's one
    CUDA graph (here they run uncaptured, in ``StepGraphs._work``, and are subtracted)."""
    cfg = load(None, [f"model={spec}", f"optim.name={optim}", "optim.clip_grad=1.0", "optim.ema=0.9998"])
    torch.manual_seed(0)
    model = build(load_spec(spec)).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, 8)
    opt = as_a_gpu_defaults(opt) if baseline else opt
    ema = (ModelEmaV3 if baseline else Ema)(model, decay=cfg.optim.ema)
    sched, meter, rng = make_schedule(opt, cfg, 10, 8), EpochMeter(torch.device("cpu")), np.random.default_rng(0)
    rt = Runtime(0, 1, 0, torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False), True)
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.arange(8), torch.full((8, 2), 64, dtype=torch.int32), torch.arange(8), False, 8)
    graphs, replayed = (StepGraphs(model, opt, rt, cfg.optim.clip_grad) if graphed else None), []
    if graphs:
        work = graphs._work

        def _work(*args):  # what a replay launches on a GPU, counted on its own
            with Count() as c:
                out = work(*args)
            replayed.append(c)
            return out

        graphs._work = _work
    # The first step creates the optimizer's state and gathers the EMA's tensors; a graphed step's first 2 run eagerly
    # and its third captures.
    for _ in range(StepGraphs.EAGER + 2):
        with Count() as step:
            meter.add(*train_step(model, batch, opt, sched, ema, rt, cfg, rng, graphs), batch.real)
    if graphs:
        step.ops.subtract(replayed[-1].ops)
    with Count() as update:
        opt.step()
    with Count() as averaging:
        ema.update(model)
    return step, update, averaging


def slim(spec: str) -> torch.nn.Module:
    """The spec slimmed to 8 channels everywhere: the same tensors and operations, next to no arithmetic."""
    s = load_spec(spec)
    return build(replace(s, stem_width=8, stages=tuple(replace(t, width=8 * t.groups) for t in s.stages),
                         fc=tuple(8 for _ in s.fc)))


def host_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn`` (median of 5 rounds)."""
    fn()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls)
    return 1e6 * float(np.median(rounds))


def ema_host_us(spec: str, baseline: bool) -> float:
    """Microseconds per EMA update of the slimmed spec: the host's time."""
    model = slim(spec)
    ema = (ModelEmaV3 if baseline else Ema)(model, decay=0.9998)
    return host_us(lambda: ema.update(model))


def clip_host_us(spec: str, baseline: bool) -> float:
    """Microseconds per gradient clipping of the slimmed spec, over the optimizer's parameters as ``train_step`` clips
    (the list gathered from its groups each time), or over ``model.parameters()`` (a walk of every module)."""
    model = slim(spec)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt = make_optimizer(model, load(None, [f"model={spec}"]), 8)
    params = (lambda: model.parameters()) if baseline else (lambda: trained_params(opt))
    return host_us(lambda: torch.nn.utils.clip_grad_norm_(params(), 1e9, foreach=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    n = args.batch_size
    cases = [("256", 224, 224, False), ("full", 528, 688, True)]  # 688 x 528 = 363 kpx, the default bucket budget
    rows = ["| spec | res | operations per step: now (timm's in-place) | activation copies: now (in-place) "
            "| MB copied per step, bf16: now (in-place) |", "|---|---|---|---|---|"]
    for name in shipped_specs():
        for res, h, w, padded in cases:
            counts = []
            for baseline in (False, True):
                model = build(load_spec(name)).to(memory_format=torch.channels_last).to("meta").train()
                counts.append(step_ops(in_place_as_timm_builds(model) if baseline else model, n, h, w, padded))
            now, base = counts
            mb = [2 * 2 * c.cloned / 1e6 for c in counts]  # bf16, each copy written then read back in the backward
            rows.append(f"| {name} | {res} | {sum(now.ops.values())} ({sum(base.ops.values())}) | "
                        f"{now.ops['aten.clone']} ({base.ops['aten.clone']}) | {mb[0]:.0f} ({mb[1]:.0f}) |")
            print(rows[-1], flush=True)
    steps = ["| optimizer | operations per step: now (defaults) | of which the update | of which the EMA "
             "| host reads per step | with `cuda_graphs=true`: operations outside the graph |", "|---|---|---|---|---|---|"]
    for optim in ("sgd", "adamw"):
        now, base = (whole_step("small", optim, b) for b in (False, True))
        graphed = whole_step("small", optim, False, graphed=True)[0]
        ops = [[sum(c.ops.values()) for c in r] for r in (now, base)]
        reads = [sum(r[0].ops[k] for k in READS) for r in (now, base)]
        steps.append(f"| {optim} | {ops[0][0]} ({ops[1][0]}) | {ops[0][1]} ({ops[1][1]}) | {ops[0][2]} ({ops[1][2]}) "
                     f"| {reads[0]} ({reads[1]}) | {sum(graphed.ops.values())}, and one graph launch |")
        print(steps[-1], flush=True)
    torch.set_num_threads(1)
    emas = ["| spec | EMA update, host us: now (timm's ModelEmaV3) | clipping, host us: now (over model.parameters()) |",
            "|---|---|---|"]
    for name in shipped_specs():
        emas.append(f"| {name} | {ema_host_us(name, False):.0f} ({ema_host_us(name, True):.0f}) "
                    f"| {clip_host_us(name, False):.0f} ({clip_host_us(name, True):.0f}) |")
        print(emas[-1], flush=True)
    body = (f"One training forward and backward, batch {n}, channels-last, on the meta device (shapes only: the "
            f"operations any device is asked to run). 256: 224x224; full: 528x688 padded (images 3/4 of the bucket "
            f"wide: the masks' operations included). Views, detaches and autocast's casts left out.\n\n"
            + "\n".join(rows) + "\n\n"
            "The whole training step of `small` (clipping and EMA on; fp32 on the CPU over 8 images of 64x64: the count "
            "does not depend on the pixels; autocast would add its casts): the optimizer fused as `make_optimizer` builds "
            "it and the EMA as `step.Ema` keeps it, against the defaults: PyTorch's on a GPU (foreach) and timm's "
            "ModelEmaV3 (views and detaches are not counted: timm's EMA makes one per tensor of both models every step). "
            "Host reads: `.item()`-like operations, each a sync when the tensor is on a GPU, host work when it is not. "
            "With `cuda_graphs=true` (`step.StepGraphs`) the forward, loss, backward and clipping are one CUDA graph per "
            "batch shape; what the host still dispatches per step is the rest: targets, the mask of real rows, copies "
            "into the graph's inputs and out of its outputs, optimizer, schedule, EMA and running sums (counted here with "
            "the graph's part run uncaptured and subtracted).\n\n"
            + "\n".join(steps) + "\n\n"
            "The EMA update's and the gradient clipping's host time: each spec slimmed to 8 channels everywhere (the same "
            "tensors and operations, next to no arithmetic), one torch thread, median of 5 rounds of 200 calls.\n\n"
            + "\n".join(emas) + "\n")
    print("saved", write_results("step_ops", "Operations per training step: now against timm's in-place activations and "
                                 "PyTorch's default optimizers",
                                 body, ("torch", "timm")))


if __name__ == "__main__":
    main()
