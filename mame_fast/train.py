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
from .config import TrainConfig, to_dict
from .model import build, load_spec, spec_dict
from .pipeline import build_loader


class TrainingDiverged(RuntimeError):
    pass


# -- runtime: the one place that decides devices, precision and ranks ---------------------------------


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = fp32
    scaler: torch.amp.GradScaler
    master: bool


def setup_runtime(cfg: TrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one kernel search per bucket shape, then reused
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=10))
    p = cfg.precision
    if p == "auto":
        p = "bf16" if cuda else "fp32"
    if p not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {cfg.precision!r}")
    if p == "fp16" and not cuda:
        raise ValueError("precision=fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]
    scaler = torch.amp.GradScaler(device.type, enabled=p == "fp16")
    return Runtime(rank, world, local_rank, device, amp, scaler, rank == 0)


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
    return F.one_hot(y, n).float() * (1 - smoothing) + smoothing / n


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
    """One optimization step; returns device tensors (loss, correct count, grad norm): no host sync."""
    o = cfg.optim
    target = soft_targets(batch.labels, model_classes(model), o.label_smoothing)
    x, target = mix(batch.images, target, o, rng)
    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
        logits = model(x, batch.sizes if batch.padded else None)
    loss = torch.sum(-target * F.log_softmax(logits.float(), -1), -1).mean()
    opt.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad or float("inf"))
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.detach(), (logits.argmax(-1) == batch.labels).sum(), gnorm.detach()


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
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            logits = model(b.images, b.sizes if b.padded else None).float()
        sums[0] += F.cross_entropy(logits, b.labels, reduction="sum")
        sums[1] += (logits.topk(min(5, num_classes), -1).indices == b.labels[:, None]).any(-1).sum()
        sums[2] += len(b.labels)
        conf += torch.bincount(b.labels * num_classes + logits.argmax(-1), minlength=num_classes**2)
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
    rt = setup_runtime(cfg)
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
    if rt.master and not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "model.yaml").write_text(yaml.safe_dump(spec_dict(spec), sort_keys=False))
        records.write_run_info(run_dir, {**meta, "name": name, "created": dt.datetime.now().isoformat(timespec="seconds"),
                                         "world_size": rt.world, "device": str(rt.device), "version": __version__,
                                         "torch": torch.__version__, "status": "running"})
    torch.manual_seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)

    # Data: each rank reads its own part of every epoch (exact epochs across ranks, plan.py).
    dtype = rt.amp_dtype or torch.float32
    train_loader = build_loader(cfg.data, "train", True, cfg.seed, rt.rank, rt.world, rt.device, dtype)
    val_loader = build_loader(cfg.data, "val", False, cfg.seed, rt.rank, rt.world, rt.device, dtype)
    classes = train_loader.split.classes
    spec = replace(spec, num_classes=len(classes))
    if rt.master:
        records.update_run_info(run_dir, {"classes": classes, "train_samples": len(train_loader.split)})

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
                acc.add(loss, correct, gnorm, len(batch.labels))
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
                            f"loss became {stats['loss_last']} at epoch {epoch} step {step}; the last good checkpoint is "
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
                    records.save_histograms(run_dir, model, val_loader, epoch + 1)
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
