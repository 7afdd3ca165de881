"""Stage 4b: one optimization step and what it needs: targets, mixing, the optimizer and its schedule, the shape
warm-up, the EMA of the weights, and the running sums of an epoch.

The step makes no host sync: it returns device tensors, summed on the device by ``EpochMeter``; the loop
reads them at log steps only. Loss and accuracy cover a batch's ``real`` rows: fillers (``input/plan.py``)
go through the model but weigh nothing.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from ..config import OptimConfig, TrainConfig
from .runtime import Runtime


def soft_targets(y: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    # scatter_, not F.one_hot: one_hot may check the labels' range on the host, a sync in the step.
    onehot = torch.zeros(len(y), n, device=y.device).scatter_(1, y.view(-1, 1), 1.0)
    return onehot * (1 - smoothing) + smoothing / n


def mix(x: torch.Tensor, t: torch.Tensor, cfg: OptimConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix with the batch reversed as partner; training batches are never padded."""
    if not (cfg.mixup or cfg.cutmix):
        return x, t
    use_cut = bool(cfg.cutmix) and (not cfg.mixup or rng.random() < 0.5)
    lam = float(rng.beta(cfg.cutmix, cfg.cutmix) if use_cut else rng.beta(cfg.mixup, cfg.mixup))
    if use_cut:
        H, W = x.shape[2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        x = x.clone()
        x[:, :, y0 : y0 + ch, x0 : x0 + cw] = x.flip(0)[:, :, y0 : y0 + ch, x0 : x0 + cw]
        lam = 1 - ch * cw / (H * W)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, t * lam + t.flip(0) * (1 - lam)


def train_step(model, batch, opt, sched, ema, rt: Runtime, cfg: TrainConfig, rng: np.random.Generator):
    """One optimization step; returns device tensors (loss, correct count, grad norm): no host sync."""
    o = cfg.optim
    target = soft_targets(batch.labels, model_classes(model), o.label_smoothing)
    x, target = mix(batch.images, target, o, rng)
    with rt.autocast():
        logits = model(x, batch.sizes if batch.padded else None)
    r = batch.real
    loss = torch.sum(-target[:r] * F.log_softmax(logits[:r].float(), -1), -1).mean()
    opt.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(opt)
    # foreach: a few multi-tensor operations, as PyTorch picks by default on a GPU only; on the CPU it would loop over
    # the parameters, so naming it keeps CPU runs on the GPU's path.
    gnorm = torch.nn.utils.clip_grad_norm_(trained_params(opt), o.clip_grad or float("inf"), foreach=True)
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.detach(), (logits[:r].argmax(-1) == batch.labels[:r]).sum(), gnorm.detach()


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


def make_schedule(opt, cfg: TrainConfig, steps_per_epoch: int, global_batch: int, start_step: int = 0):
    """Linear warm-up, then cosine, one-cycle or constant, as a pure function of the global step. A resumed run
    builds it at its step from its (possibly changed) config: a new ``optim.lr`` applies from there on, and a
    new ``epochs`` stretches or shortens the rest of the cosine. Nothing of it needs checkpointing."""
    o = cfg.optim
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int((0.3 * cfg.epochs if o.schedule == "onecycle" else o.warmup_epochs) * steps_per_epoch)

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

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, grad norm
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
        self.sums += torch.stack([loss.double() * n, correct.double(), gnorm.double()])
        self.last = loss
        self.count += n
        self.steps += 1

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self._t

    def sync(self) -> dict:
        """The running numbers (a host sync: at log steps only)."""
        s = self.sums.tolist()
        return {"loss_last": float(self.last), "loss": s[0] / max(1, self.count), "top1": s[1] / max(1, self.count),
                "grad_norm": s[2] / max(1, self.steps), "data_wait": self.wait / max(1e-9, self.elapsed())}

    def row(self, world: int) -> dict:
        s, t = self.sync(), self.elapsed()
        return {"time_s": t, "images_per_s": self.count * world / t, "data_wait": s["data_wait"], "train_loss": s["loss"],
                "train_top1": s["top1"], "grad_norm": s["grad_norm"]}

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "count": self.count, "steps": self.steps, "seconds": self.elapsed(), "wait": self.wait}

    def load_state_dict(self, d: dict) -> None:
        self.sums.copy_(d["sums"])
        self.count, self.steps, self.seconds, self.wait = d["count"], d["steps"], d["seconds"], d["wait"]
        self._t = time.perf_counter()
