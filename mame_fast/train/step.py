"""Stage 4b: one optimization step and what it needs: targets, mixing, the optimizer and its schedule, the shape
warm-up, the step's CUDA graphs (``cuda_graphs=true``), the EMA of the weights, and the running sums of an epoch.

The step makes no host sync: it returns device tensors, summed on the device by ``EpochMeter``; the loop
reads them at log steps only. Loss and accuracy cover a batch's ``real`` rows: fillers (``input/plan.py``)
go through the model but weigh nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from ..config import ConfigError, TrainConfig
from ..input.mixing import mix, soft_targets
from .runtime import Runtime


def train_step(model, batch, opt, sched, ema, rt: Runtime, cfg: TrainConfig, rng: np.random.Generator,
               graphs: StepGraphs | None = None):
    """One optimization step; returns device tensors (loss, correct count, grad norm): no host sync. With ``graphs``
    the device work from the forward to the clipped gradients runs as the batch shape's CUDA graph."""
    o = cfg.optim
    target = soft_targets(batch.labels, model_classes(model), o.label_smoothing)
    x, target = mix(batch.images, target, o, rng)
    # Which rows are real: a mask, so that one graph serves a batch with fillers and one without; eagerly only where
    # there are fillers (the mask's operations are host time in a step that is host-bound at 256).
    real = torch.arange(len(x), device=x.device) < batch.real if graphs or batch.real < len(x) else None
    if graphs is None:
        opt.zero_grad(set_to_none=True)
        out = forward_backward(model, x, target, batch.labels, real, batch.sizes if batch.padded else None, opt, rt, o.clip_grad)
    elif batch.padded:  # training crops fill their bucket (input/plan.py); a graph runs the model unmasked
        raise ValueError("a padded batch in a graphed training step: StepGraphs runs the model without masks")
    else:
        out = graphs(x, target, batch.labels, real)
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return out


def forward_backward(model, x, target, labels, real, sizes, opt, rt: Runtime, clip: float, cache: bool = True):
    """Forward, loss over the ``real`` rows (a mask, or None for all; fillers, ``input/plan.py``, go through the model
    but weigh nothing), backward and clipping: the part of the step that ``StepGraphs`` captures. Returns (loss,
    correct, grad norm)."""
    with rt.autocast(cache):
        logits = model(x, sizes)
    loss = torch.sum(-target * F.log_softmax(logits.float(), -1), -1)
    loss = loss.mean() if real is None else torch.sum(real * loss) / real.sum()
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(opt)
    # foreach: a few multi-tensor operations, as PyTorch picks by default on a GPU only; on the CPU it would loop over
    # the parameters, so naming it keeps CPU runs on the GPU's path.
    gnorm = torch.nn.utils.clip_grad_norm_(trained_params(opt), clip or float("inf"), foreach=True)
    hits = logits.argmax(-1) == labels
    return loss.detach(), (hits if real is None else hits & real).sum(), gnorm.detach()


class StepGraphs:
    """``forward_backward`` captured by hand as one CUDA graph per batch shape (``cuda_graphs=true``) and replayed:
    the host then launches one graph instead of the ~250 operations of an eager forward and backward, for a step
    that is host-bound (a small model at 256; README "On a GPU"). Unlike torch.compile's CUDA graphs it compiles
    nothing: a shape costs its first ``EAGER`` steps (run eagerly, on the capture stream, so that cuDNN's and
    cuBLAS's lazy set-up happens outside the capture) and one capture, a fraction of a second, so the first epoch
    stays short. Targets, mixing, the optimizer, the schedule and the EMA stay eager: a few operations, and the
    host values that change from step to step (learning rate, mixing draws) never enter a graph.

    What a replay needs to stay right:
    - inputs are copied into the shape's static tensors; outputs are cloned, as the next replay overwrites them;
    - the gradients are made once, outside every graph, and each graph zeroes them and accumulates into them, so
      that all shapes' graphs and the eager optimizer share the same tensors (``zero_grad(set_to_none=True)``
      inside a capture would leave each graph its own, freed when the next capture rebinds ``.grad``);
    - the shapes' graphs share one memory pool: they replay one at a time on one stream and nothing they allocate
      outlives a replay, as their outputs are cloned;
    - capture mode "thread_local": the loader's threads (DALI's, the fallback's pinned copies) keep calling CUDA
      during a capture, which the default "global" mode would turn into a failed capture;
    - autocast without its weight cache (``Runtime.autocast``).
    Needs one process (DDP's hooks are not captured here), no torch.compile, and no GradScaler (bf16 or fp32):
    the constructor says so, as a ConfigError, before a run starts.

    Without CUDA (the CPU suite) everything runs the same way except the capture itself: the static tensors, the
    shared gradients and the cloned outputs, with ``forward_backward`` called eagerly where a GPU replays."""

    EAGER = 2

    def __init__(self, model, opt: torch.optim.Optimizer, rt: Runtime, clip: float):
        # Checked here, where every user (the trainer, the benchmarks) makes one, before anything is captured.
        why = ("more than one process: DDP's gradient all-reduce is not captured" if rt.world > 1 else
               "precision=fp16: the grad scaler's per-step bookkeeping runs on the host; use bf16" if rt.scaler.is_enabled()
               else "")
        if why:
            raise ConfigError(f"cuda_graphs=true cannot run with {why}")
        self.model, self.opt, self.rt, self.clip = model, opt, rt, clip
        self.cuda = rt.device.type == "cuda"
        self.shapes: dict[tuple, tuple] = {}  # shape -> (replay: () -> outputs, static inputs)
        self.eager: dict[tuple, int] = {}
        self.capture_s = 0.0
        self.grads: list[torch.Tensor] | None = None
        if self.cuda:
            self.stream, self.pool = torch.cuda.Stream(rt.device), torch.cuda.graph_pool_handle()

    def __call__(self, x, target, labels, real):
        key = tuple(x.shape)
        if key not in self.shapes:
            if self.eager.get(key, 0) < self.EAGER:
                self.eager[key] = self.eager.get(key, 0) + 1
                with self._on_capture_stream():
                    return self._work(x, target, labels, real)
            self.shapes[key] = self._capture(x, target, labels, real)
        replay, inputs = self.shapes[key]
        for static, t in zip(inputs, (x, target, labels, real), strict=True):
            static.copy_(t)
        return tuple(t.clone() for t in replay())

    def _work(self, x, target, labels, real):
        if self.grads is None:  # once, before the first step of any shape, so outside every capture
            for p in trained_params(self.opt):
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            self.grads = [p.grad for p in trained_params(self.opt)]
        torch._foreach_zero_(self.grads)
        return forward_backward(self.model, x, target, labels, real, None, self.opt, self.rt, self.clip, cache=False)

    def _capture(self, *args) -> tuple:
        t0 = time.perf_counter()
        inputs = tuple(t.clone() for t in args)  # clone keeps the memory format (channels-last)
        if not self.cuda:
            return (lambda: self._work(*inputs)), inputs
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                outputs = self._work(*inputs)
        except RuntimeError as e:
            # CUDA's own words ("operation not permitted when stream is capturing") do not name the setting to drop.
            raise RuntimeError(f"capturing the training step as a CUDA graph (batch shape {tuple(args[0].shape)}) "
                               f"failed: {e}. cuda_graphs=true only saves host time: train with --set cuda_graphs=false "
                               "(a run past its first checkpoint: --resume RUN --set cuda_graphs=false)") from e
        self.capture_s += time.perf_counter() - t0

        def replay():
            graph.replay()
            return outputs

        return replay, inputs

    @contextlib.contextmanager
    def _on_capture_stream(self):
        if not self.cuda:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream().wait_stream(self.stream)

    def summary(self) -> dict:
        """For run.json: how many shapes were captured, after how many eager steps, in how many seconds."""
        return {"captured": self.cuda, "shapes": len(self.shapes), "eager_steps": sum(self.eager.values()),
                "capture_s": round(self.capture_s, 3)}

    @staticmethod
    def describe(g: dict) -> str:
        return (f"CUDA graphs: {g['shapes']} batch shape{'s' * (g['shapes'] != 1)} "
                + (f"captured in {g['capture_s']:.2f} s" if g["captured"] else "run uncaptured (no CUDA)")
                + f", after {g['eager_steps']} eager steps")


def trained_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates (all the model's trainable ones), from its groups: what clipping goes over.
    ``model.parameters()`` would walk every module in Python each step: clipping `small` takes 227-240 us of host time
    this way instead of 390-419 on the 2-core VM (benchmarks/step_ops.py), in a step host-bound at 256."""
    return [p for g in opt.param_groups for p in g["params"]]


class Ema(ModelEmaV3):
    """timm's EMA of the weights (ModelEmaV3: parameters and float buffers averaged, integer buffers copied), with
    the pairs of tensors it updates gathered once. timm gathers them every step by walking both models'
    ``state_dict()`` (0.3 ms each for `small` on the 2-core VM: a detach per tensor) and copies each integer buffer
    (BatchNorm's counters) in an operation of its own; here the update is two multi-tensor operations, and its host
    time for `small` 60 us instead of 792-858 us (benchmarks/step_ops.py).

    The pairs stay valid because nothing replaces the models' tensors after the EMA is built: training and
    ``load_state_dict`` write into them in place. ``model`` may be the training module or its DDP or compiled wrapper
    (the same tensors, in the same order)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, decay=decay)
        self._pairs: tuple | None = None

    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        if self._pairs is None:
            ema, live = self.module.state_dict().values(), model.state_dict().values()
            floats = [(e, m) for e, m in zip(ema, live, strict=True) if e.is_floating_point()]
            ints = [(e, m) for e, m in zip(ema, live, strict=True) if not e.is_floating_point()]
            self._pairs = tuple(([e for e, _ in p], [m for _, m in p]) for p in (floats, ints))
        (ema_f, live_f), (ema_i, live_i) = self._pairs
        # Both fp32 (the EMA keeps the model's dtype; autocast leaves weights fp32): timm's plain lerp, without the
        # stochastic rounding newer timm applies to bf16 EMA tensors.
        torch._foreach_lerp_(ema_f, live_f, weight=1.0 - decay)
        if ema_i:
            torch._foreach_copy_(ema_i, live_i)


def model_classes(model) -> int:
    m = model.module if hasattr(model, "module") else model
    return getattr(m, "_orig_mod", m).spec.num_classes


def make_optimizer(model, cfg: TrainConfig, global_batch: int):
    """SGD (Nesterov) or AdamW; the learning rate is per 256 images, scaled to the global batch. No weight decay on
    norms and biases (timm's 1-D parameter rule).

    Fused: the whole update is one kernel per parameter group (4 operations per step with SGD, 6 with AdamW).
    PyTorch's default on a GPU (foreach) dispatches 11 per SGD step and 163 per AdamW step, 142 of them a host-side
    ``.item()`` of a parameter's step count for its bias correction: host time, in a step that is host-bound at 256
    (benchmarks/step_ops.py).
    The CPU has the same fused kernels, so CPU runs take the GPU's path. A run resumed from a checkpoint keeps the
    implementation it was saved with (torch restores it with the parameter groups)."""
    from timm.optim import param_groups_weight_decay

    o = cfg.optim
    lr = o.lr * global_batch / 256
    groups = param_groups_weight_decay(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)


def make_schedule(opt, cfg: TrainConfig, steps_per_epoch: int | list[int], global_batch: int, start_step: int = 0):
    """Linear warm-up, then cosine, one-cycle or constant, as a pure function of the global step. A resumed run
    builds it at its step from its (possibly changed) config: a new ``optim.lr`` applies from there on, and a
    new ``epochs`` stretches or shortens the rest of the cosine. Nothing of it needs checkpointing. Under a
    pixel-budget schedule the epochs' step counts differ a little (``steps_per_epoch`` per epoch): the cosine spans
    their sum."""
    o = cfg.optim
    steps = steps_per_epoch if isinstance(steps_per_epoch, list) else [steps_per_epoch] * cfg.epochs
    total = max(1, sum(steps))
    warm = int((0.3 * cfg.epochs if o.schedule == "onecycle" else o.warmup_epochs) * total / cfg.epochs)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    for g in opt.param_groups:
        g["initial_lr"] = o.lr * global_batch / 256
    return torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=start_step - 1)


def warm_up(model: torch.nn.Module, train_shapes: list, eval_shapes: list, rt: Runtime) -> float:
    """Forward and backward once per training shape, forward once per evaluation shape (padded, masked), so that
    cuDNN's autotuner has searched its kernels for every shape before step 0. Runs on a copy of the model
    under a forked RNG: BatchNorm statistics, weights and random streams of the run stay untouched.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if last else torch.contiguous_format
    devices = [rt.device.index or 0] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for shapes, train in ((train_shapes, True), (eval_shapes, False)):
            m.train(train)
            # Largest first: the caching allocator then serves every smaller shape from blocks it already holds,
            # where smallest first would allocate anew for each larger one.
            for n, h, w in sorted(shapes, key=lambda s: s[0] * s[1] * s[2], reverse=True):
                x = torch.zeros(n, 3, h, w, device=rt.device, dtype=rt.dtype).contiguous(memory_format=fmt)
                sizes = None if train else torch.tensor([[h, w]], device=rt.device).expand(n, 2)
                with torch.set_grad_enabled(train), rt.autocast():
                    out = m(x, sizes)
                if train:
                    out.float().sum().backward()
    del m
    rt.synchronize()
    return time.perf_counter() - t0


class EpochMeter:
    """An epoch's running sums, on the device (no sync per step), with its wall and data-wait time. Its state is
    checkpointed, so an epoch resumed in the middle reports whole-epoch numbers."""

    def __init__(self, device: torch.device, skips: bool = False):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct, grad norm, skipped steps
        self.skips = skips  # a GradScaler may skip steps (fp16): count them
        self._none = torch.zeros((), dtype=torch.float64, device=device)  # no step skipped, made once
        self.last = torch.zeros((), device=device)
        self.count = self.steps = 0
        self.seconds = self.wait = 0.0
        self._t = time.perf_counter()

    def next(self, batches):
        """The next batch (None at the end), its wait counted as data wait."""
        t = time.perf_counter()
        b = next(batches, None)
        self.wait += time.perf_counter() - t
        return b

    def add(self, loss: torch.Tensor, correct: torch.Tensor, gnorm: torch.Tensor, n: int) -> None:
        if self.skips:
            # A non-finite gradient norm is a step the GradScaler skipped (the scaled gradients overflowed: the scale is
            # lowered and the weights stay): counted, and left out of the mean norm. Told on the device: no sync per step.
            # Only with a scaler: 3 more operations per step, for a step that is host-bound at 256.
            finite = torch.isfinite(gnorm)
            self.sums += torch.stack([loss.double() * n, correct.double(), torch.where(finite, gnorm, 0).double(),
                                      (~finite).double()])
        else:
            self.sums += torch.stack([loss.double() * n, correct.double(), gnorm.double(), self._none])
        self.last = loss
        self.count += n
        self.steps += 1

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self._t

    def sync(self) -> dict:
        """The running numbers (a host sync: at log steps only)."""
        s = self.sums.tolist()
        return {"loss_last": float(self.last), "loss": s[0] / max(1, self.count), "top1": s[1] / max(1, self.count),
                "grad_norm": s[2] / max(1, self.steps - s[3]), "skipped_steps": int(s[3]),
                "data_wait": self.wait / max(1e-9, self.elapsed())}

    def row(self, world: int) -> dict:
        s, t = self.sync(), self.elapsed()
        return {"time_s": t, "images_per_s": self.count * world / t, "data_wait": s["data_wait"], "train_loss": s["loss"],
                "train_top1": s["top1"], "grad_norm": s["grad_norm"], "skipped_steps": s["skipped_steps"]}

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "count": self.count, "steps": self.steps, "seconds": self.elapsed(), "wait": self.wait}

    def load_state_dict(self, d: dict) -> None:
        self.sums.zero_()
        self.sums[: len(d["sums"])] = d["sums"]  # checkpoints from before the skipped-step count hold 3 sums
        self.count, self.steps, self.seconds, self.wait = d["count"], d["steps"], d["seconds"], d["wait"]
        self._t = time.perf_counter()
