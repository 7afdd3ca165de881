"""Stage 4: mixed-precision training of a spec-built CNN, single process or torchrun (multi-node).

Reads top to bottom: runtime (devices, precision, ranks) -> run folder -> data -> model -> optimizer
-> resume -> loop (step, log, validate, checkpoint). Distributed setup comes only from torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE); only rank 0 writes; every rank runs the same number of
steps per epoch (plan.py), so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from . import __version__
from . import checkpoint as ckpt
from . import records
from .config import ConfigError, TrainConfig, to_dict
from .model import build, load_spec, spec_dict, total_stride
from .pipeline import build_loader
from .runtime import Runtime, setup_runtime


class TrainingDiverged(RuntimeError):
    pass


# -- run folder ---------------------------------------------------------------------------------------


def new_run_dir(out: Path, name: str) -> Path:
    """runs/<NNN>-<name>/ with the next free number (the experiment number of the cards)."""
    out.mkdir(parents=True, exist_ok=True)
    nums = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.is_dir() and p.name.split("-", 1)[0].isdigit()]
    n = max(nums, default=0) + 1
    d = out / f"{n:03d}-{name}"
    d.mkdir()
    return d


def _broadcast(obj, rt: Runtime):
    if rt.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- the step -----------------------------------------------------------------------------------------


def soft_targets(y: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    # scatter_, not F.one_hot: one_hot may check the labels' range on the host, a sync in the step.
    onehot = torch.zeros(len(y), n, device=y.device).scatter_(1, y.view(-1, 1), 1.0)
    return onehot * (1 - smoothing) + smoothing / n


def mix(x: torch.Tensor, t: torch.Tensor, cfg, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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
    """One optimization step; returns device tensors (loss, correct count, grad norm): no host sync.
    Loss and accuracy cover the batch's real rows; its fillers (plan.py) go through the model but weigh nothing."""
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
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad or float("inf"))
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.detach(), (logits[:r].argmax(-1) == batch.labels[:r]).sum(), gnorm.detach()


def model_classes(model) -> int:
    m = model.module if hasattr(model, "module") else model
    return getattr(m, "_orig_mod", m).spec.num_classes


# -- evaluation ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, rt: Runtime, num_classes: int, epoch: int = 0) -> dict:
    """Loss, top-1, top-5, balanced accuracy, per-class accuracy and confusion matrix, summed over ranks."""
    was = model.training
    model.eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, top5 correct, count
    for b in loader.epoch(epoch):
        with rt.autocast():
            logits = model(b.images, b.sizes if b.padded else None)[: b.real].float()
        labels = b.labels[: b.real]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.topk(min(5, num_classes), -1).indices == labels[:, None]).any(-1).sum()
        sums[2] += b.real
        # index_add_, not bincount: bincount sizes its output from the data, a host sync per batch.
        conf.index_add_(0, labels * num_classes + logits.argmax(-1), torch.ones_like(labels, dtype=conf.dtype))
    if rt.world > 1:
        dist.all_reduce(conf)
        dist.all_reduce(sums)
    model.train(was)
    conf = conf.view(num_classes, num_classes).cpu().numpy()
    n = sums[2].item()
    support = conf.sum(1)
    per_class = np.divide(np.diag(conf), support, out=np.full(num_classes, np.nan), where=support > 0)
    return {
        "loss": sums[0].item() / n,
        "top1": float(np.trace(conf) / n),
        "top5": sums[1].item() / n,
        "balanced_acc": float(np.nanmean(per_class)),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "confusion": conf.astype(int).tolist(),
        "count": int(n),
    }


# -- optimizer and schedule ---------------------------------------------------------------------------


def make_optimizer(model, cfg: TrainConfig, global_batch: int):
    from timm.optim import param_groups_weight_decay

    o = cfg.optim
    lr = o.lr * global_batch / 256
    groups = param_groups_weight_decay(model, o.weight_decay)  # no decay on norms and biases (1-D params)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=True)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")


def restart_schedule(opt, sched, cfg: TrainConfig, global_batch: int) -> None:
    """After a resume: the learning rate of ``cfg`` (which ``--set`` may have changed) from the current step on, along
    the schedule of ``cfg`` (a changed ``epochs`` stretches or shortens the rest of the cosine). A restored scheduler
    would otherwise keep the old peak."""
    lr = cfg.optim.lr * global_batch / 256
    sched.base_lrs = [lr] * len(opt.param_groups)
    for g, f in zip(opt.param_groups, sched.lr_lambdas):
        g["lr"] = lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def make_schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    o = cfg.optim
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int((0.3 * cfg.epochs if o.schedule == "onecycle" else o.warmup_epochs) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        if o.schedule not in ("cosine", "onecycle"):
            raise ValueError(f"optim.schedule must be cosine, onecycle or constant, got {o.schedule!r}")
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- the run ------------------------------------------------------------------------------------------


def warm_up(model: torch.nn.Module, train_shapes: list, eval_shapes: list, rt: Runtime) -> float:
    """Forward and backward once per training shape, forward once per evaluation shape (padded, masked), so that
    cuDNN's autotuner has searched its kernels for every shape before step 0. Runs on a copy of the model
    under a forked RNG: BatchNorm statistics, weights and random streams of the run stay untouched.
    Returns the seconds it took."""
    import copy

    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    fmt = torch.channels_last if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    devices = [rt.device.index or 0] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for shapes, train in ((train_shapes, True), (eval_shapes, False)):
            m.train(train)
            for n, h, w in shapes:
                x = torch.zeros(n, 3, h, w, device=rt.device, dtype=rt.dtype).contiguous(memory_format=fmt)
                sizes = None if train else torch.tensor([[h, w]], device=rt.device).expand(n, 2)
                with torch.set_grad_enabled(train), rt.autocast():
                    out = m(x, sizes)
                if train:
                    out.float().sum().backward()
    del m
    rt.synchronize()
    return time.perf_counter() - t0


def any_rank(flags: list[bool], rt: Runtime) -> list[bool]:
    """Whether each flag is set on any rank (one all-reduce), so that all ranks take the same branch."""
    if rt.world == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sync_buffers(models, rt: Runtime) -> None:
    """Broadcast BatchNorm running statistics from rank 0. DDP only does so at the start of each forward,
    so after an epoch every rank holds the statistics of its own last batch: validation and checkpoints
    would differ by rank."""
    if rt.world > 1:
        for m in models:
            for b in m.buffers():
                dist.broadcast(b, 0)


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(cfg: TrainConfig, name: str = "run", resume: Path | None = None, meta: dict | None = None, console=None) -> Path:
    """Train per ``cfg``; returns the run folder. ``resume``: a run folder to continue exactly."""
    rt = setup_runtime(cfg.precision, cfg.cudnn_benchmark)
    try:
        return _run(cfg, name, resume, meta or {}, rt, console)
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, name: str, resume: Path | None, meta: dict, rt: Runtime, console) -> Path:
    # Run folder and resolved config, written before step 0.
    if resume:  # cfg comes from the run's config.yaml (plus any --set), see cli.train
        run_dir = Path(resume)
        state = ckpt.load(run_dir / "last.pt", rt.device)
    else:
        run_dir = Path(_broadcast(str(new_run_dir(Path(cfg.out), name)) if rt.master else None, rt))
        state = None
    spec = load_spec(cfg.model)
    if cfg.data.res == "full" and cfg.data.side_multiple % total_stride(spec):
        raise ConfigError(f"data.side_multiple={cfg.data.side_multiple} is not a multiple of model {cfg.model}'s total stride "
                          f"{total_stride(spec)}: bucket sides would leave ragged borders; set data.side_multiple to a multiple of it")
    if rt.master and not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "model.yaml").write_text(yaml.safe_dump(spec_dict(spec), sort_keys=False))
        records.write_run_info(run_dir, {**meta, "name": name, "created": dt.datetime.now().isoformat(timespec="seconds"),
                                         "world_size": rt.world, "device": str(rt.device), "version": __version__,
                                         "torch": torch.__version__, "status": "running"})
    torch.manual_seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)

    # Data: each rank reads its own part of every epoch (exact epochs across ranks, plan.py).
    train_loader = build_loader(cfg.data, "train", True, cfg.seed, rt.rank, rt.world, rt.device, rt.dtype)
    val_loader = build_loader(cfg.data, "val", False, cfg.seed, rt.rank, rt.world, rt.device, rt.dtype)
    classes = train_loader.split.classes
    spec = replace(spec, num_classes=len(classes))
    # Every batch shape of every epoch, known before step 0 (plan.batch_shapes).
    shapes = {"train": train_loader.shapes(), "val": val_loader.shapes()}
    if rt.master:
        records.update_run_info(run_dir, {"classes": classes, "train_samples": len(train_loader.split),
                                          "batch_shapes": shapes, "shape_count": {k: len(v) for k, v in shapes.items()}})
        if console is not None:
            console.print(f"batch shapes per epoch: {len(shapes['train'])} in training, {len(shapes['val'])} in validation "
                          f"(cuDNN autotuning {'on' if rt.cudnn_benchmark else 'off'})")

    # Model, optimizer, schedule, EMA.
    model = build(spec).to(rt.device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and rt.world > 1:
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    steps_per_epoch = train_loader.steps(0)
    opt = make_optimizer(model, cfg, cfg.data.batch_size * rt.world)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    ema = None
    if cfg.optim.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema)
    start_epoch, start_step, global_step, best = 0, 0, 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        restart_schedule(opt, sched, cfg, cfg.data.batch_size * rt.world)
        rt.scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"][rt.rank] if isinstance(state["rng"], list) else state["rng"])
        start_epoch, start_step, global_step, best = state["epoch"], state["step"], state["global_step"], state["best"]
    net = model
    if rt.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    if cfg.warmup == "always" or (cfg.warmup == "auto" and rt.cudnn_benchmark):
        cost = warm_up(model, shapes["train"], shapes["val"], rt)
        if rt.master:
            records.update_run_info(run_dir, {"warmup_s": cost})
            if console is not None:
                console.print(f"warm-up: {cost:.2f} s for {len(shapes['train']) + len(shapes['val'])} shapes")

    def save(kind: str, epoch: int, step: int) -> None:
        # RNG states differ per rank (dropout, drop-path): gather them all so that every rank resumes exactly.
        rngs = [None] * rt.world
        if rt.world > 1:
            dist.all_gather_object(rngs, ckpt.rng_state())
        else:
            rngs = [ckpt.rng_state()]
        if rt.master:
            ckpt.save(run_dir / f"{kind}.pt", {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": rt.scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None, "rng": rngs,
                "epoch": epoch, "step": step, "global_step": global_step, "best": best, "config": to_dict(cfg),
                "classes": classes, "spec": spec_dict(spec),
            })

    progress = records.Progress(rt.master, console, cfg.epochs, steps_per_epoch)
    tb = records.TensorBoard(run_dir if cfg.tensorboard and rt.master else None)
    interrupted = []
    # Ctrl-C sets a flag; at the next log step all ranks agree to stop and save a resumable checkpoint.
    old_handler = signal.signal(signal.SIGINT, lambda *a: interrupted.append(True))
    seen: list[list[int]] = []
    # One validation batch, taken once and kept for the histograms of every epoch (taking it later would restart
    # the validation pipeline each time).
    hist_batch = next(iter(val_loader.epoch(0))) if rt.master and cfg.hist_epochs > 0 else None
    status = "finished"
    halt = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            acc = records.EpochAccumulator(rt.device)
            t_wait, t0 = 0.0, time.perf_counter()
            step = start_step
            batches = iter(train_loader.epoch(epoch, start_step))
            epoch_seen = []
            while True:
                tw = time.perf_counter()
                batch = next(batches, None)
                t_wait += time.perf_counter() - tw
                if batch is None:
                    break
                rng = np.random.default_rng([cfg.seed, epoch, step, rt.rank])  # mixup draws: no state to resume
                loss, correct, gnorm = train_step(net, batch, opt, sched, ema, rt, cfg, rng)
                acc.add(loss, correct, gnorm, batch.real)
                epoch_seen += batch.index.tolist() if cfg.record_samples else []
                step += 1
                global_step += 1
                stop = bool(cfg.max_steps) and global_step >= cfg.max_steps  # the same on every rank
                if step % cfg.log_every == 0 or step == steps_per_epoch or stop:
                    stats = acc.sync()  # the loop's only host syncs: at log steps
                    diverged, stop_asked = any_rank([not math.isfinite(stats["loss_last"]), bool(interrupted)], rt)
                    if diverged:
                        status = "diverged"
                        raise TrainingDiverged(
                            f"loss became {stats['loss_last']} at epoch {epoch + 1} step {step}; the last good checkpoint is "
                            f"{run_dir / 'last.pt'}. Lower optim.lr, add optim.clip_grad, or check the data.")
                    wait = t_wait / (time.perf_counter() - t0)
                    progress.update(epoch, step, stats, sched.get_last_lr()[0], wait)
                    tb.step(global_step, stats, sched.get_last_lr()[0], wait)
                    if stop or stop_asked:
                        status, halt = ("interrupted" if stop_asked else "stopped"), True
                        if step < steps_per_epoch:
                            save("last", epoch, step)
                            return run_dir
                        break  # the epoch is complete: validate and checkpoint it below, then stop
            seen.append(epoch_seen)
            start_step = 0
            sync_buffers([model] + ([ema.module] if ema is not None else []), rt)
            elapsed = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0], "time_s": elapsed,
                   "images_per_s": acc.count * rt.world / elapsed, "data_wait": t_wait / elapsed, **acc.epoch_stats()}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or halt:
                row["val"] = evaluate(model, val_loader, rt, len(classes), epoch)
                if ema is not None:
                    row["val_ema"] = evaluate(ema.module, val_loader, rt, len(classes), epoch)
                top = max(row["val"]["top1"], row.get("val_ema", {}).get("top1", -1))
                if top > best:
                    best = top
                    save("best", epoch + 1, 0)
            save("last", epoch + 1, 0)
            if rt.master:
                if epoch in records.hist_epochs(cfg.epochs, cfg.hist_epochs):
                    records.save_histograms(run_dir, model, hist_batch, epoch + 1, rt.autocast)
                    tb.histograms(run_dir, epoch + 1)
                records.append_metrics(run_dir, row)
                tb.epoch(row)
                progress.epoch_done(row)
            if halt:
                break
        if rt.master:
            tb.images(records.plot_run(run_dir, classes))
        return run_dir
    finally:
        signal.signal(signal.SIGINT, old_handler)
        progress.close()
        tb.close()
        if cfg.record_samples:
            (run_dir / f"rank{rt.rank}.json").write_text(json.dumps({"seen": seen, "weights_sha256": weights_digest(model)}))
        if rt.master:
            records.update_run_info(run_dir, {"status": status, "best_val_top1": best if best >= 0 else None})
            from .report import write_card

            write_card(run_dir)  # the experiment card, from what this run measured
        if status == "interrupted" and rt.master and console is not None:
            console.print(f"[yellow]interrupted: saved {run_dir / 'last.pt'}; continue with `mame-fast train --resume {run_dir}`[/]")
        with contextlib.suppress(Exception):
            if rt.world > 1:
                dist.barrier()
