"""Stage 2c: the loaders' common contract: what a batch is, what every loader does with the plan, and the per-image
steps both implementations share.

A loader turns one split of a shard folder into the batches of the epoch plan (``plan.py``), for one rank:
``epoch(e, start_step)`` is a pure function of ``(seed, e)``, so a restart at step k replays exactly what an
uninterrupted run sees. A ``Batch`` has exactly ``batch_size`` rows, its images normalized and padded with zeros
right and bottom to the bucket, in the autocast dtype and memory format the trainer asks for, on the training
device. Two implementations, peers under this contract: ``dali.py`` (NVIDIA DALI, on the GPU or in CPU-only
mode) and ``fallback.py`` (torchvision/PIL decoding in DataLoader workers); ``build_loader`` (``input/__init__``)
picks one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from ..errors import Expected
from ..files import usable_cores
from ..tensors import MEAN, STD, valid_mask
from .plan import BatchPlan, EpochPlans, PlanConfig, batch_shapes, epoch_plan, make_buckets, square_bucket
from .reader import Split


class LoaderError(Expected, RuntimeError):
    pass


@dataclass
class Batch:
    """One planned batch on the training device. Its n rows are always ``batch_size``: the first ``real``
    are the batch's samples, the rest weightless fillers (copies of them, see plan.py) that keep the set of
    batch shapes small and fixed. Losses and metrics use ``[:real]``."""

    images: torch.Tensor  # (n, 3, H, W) normalized, padding = 0, on the training device
    labels: torch.Tensor  # (n,) int64, on the training device
    sizes: torch.Tensor  # (n, 2) int32 valid (h, w) of each image, top-left aligned, on the device
    index: torch.Tensor  # (real,) int64 sample index in the split of the real rows (CPU)
    padded: bool  # some image is smaller than the batch shape: the model should mask (see model.py)
    real: int  # rows [0, real) are samples, rows [real, n) fillers


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed memory (process-wide, Linux only).

    By default every allocation over 128 kB-32 MB is a fresh mmap, so each batch (up to 140 MB at
    full resolution) and each per-image temporary is paid again in page faults: that nearly doubled the
    CPU tail of the DALI loader (benchmarks/results/design_measurements_*.md). The cost is
    that the process keeps its peak memory instead of returning it to the OS.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def rank_cores(usable: int, machine: int, local_ranks: int, torchrun: bool) -> int:
    """The cores one rank's loader may take (``data.threads=0``): the ``usable`` CPUs of its affinity mask, shared with
    the node's other ranks when they have the same mask: under torchrun (its workers inherit the launcher's), or when
    nothing restricted it (``usable == machine``). A rank bound to CPUs of its own (Slurm's srun, one task per rank,
    as in tools/slurm_train.sbatch) keeps them all."""
    shared = torchrun or usable >= machine
    return max(1, usable // local_ranks if shared else usable)


def budget_at(cfg: DataConfig, epoch: int) -> DataConfig:
    """The training data config of ``epoch`` on the pixel-budget ramp: ``pixels_start`` (``crop_start`` at 256) up to
    ``ramp_start``, ``pixels`` (``crop``) from ``ramp_end`` on, and in between one of ``ramp_levels`` budgets spaced
    evenly in side length, each taken once the ramp has reached it (a budget's bucket shapes are fixed, so a ramp of a
    few levels is a few known sets of shapes). Without a ramp, ``cfg`` itself."""
    if not cfg.ramped:
        return cfg
    span = cfg.ramp_end - cfg.ramp_start
    t = min(1.0, max(0.0, (epoch - cfg.ramp_start) / span)) if span else float(epoch >= cfg.ramp_end)
    return at_level(cfg, math.floor(t * (cfg.ramp_levels - 1) + 1e-9))  # the final budget from ramp_end on, not before


def at_level(cfg: DataConfig, level: int) -> DataConfig:
    """Budget ``level`` of the ramp (0: the start, ``ramp_levels - 1``: the final budget), as a config without a ramp."""
    q = level / (cfg.ramp_levels - 1)
    if cfg.res == "full":
        side = math.sqrt(cfg.pixels_start) + q * (math.sqrt(cfg.pixels) - math.sqrt(cfg.pixels_start))
        return dataclasses.replace(cfg, pixels=cfg.pixels if q == 1 else round(side * side), pixels_start=0, crop_start=0)
    crop = cfg.crop_start + q * (cfg.crop - cfg.crop_start)
    if 0 < q < 1:  # between the ends, a multiple of the model's stride (160 -> 224: 160, 192, 224)
        crop = min(cfg.crop, max(cfg.crop_start, cfg.side_multiple * round(crop / cfg.side_multiple)))
    return dataclasses.replace(cfg, crop=int(round(crop)), pixels_start=0, crop_start=0)


def ramp_levels(cfg: DataConfig) -> list[DataConfig]:
    """The distinct budgets a training loader of ``cfg`` goes through, in order (one without a ramp): the levels some
    epoch reaches (a ramp of fewer epochs than levels skips some)."""
    if not cfg.ramped:
        return [cfg]
    out: list[DataConfig] = []
    for e in range(cfg.ramp_end + 1):
        d = budget_at(cfg, e)
        if not out or (d.pixels, d.crop) != (out[-1].pixels, out[-1].crop):
            out.append(d)
    return out


def eval_data(cfg: DataConfig, pixels: int = 0, crop: int = 0) -> DataConfig:
    """The data config of an evaluation (validation, the test) at ``pixels`` (full) or ``crop`` (256), 0 meaning the
    final training budget; never ramped."""
    return dataclasses.replace(cfg, pixels=pixels or cfg.pixels, crop=crop or cfg.crop, pixels_start=0, crop_start=0)


def validation_data(cfg: TrainConfig) -> DataConfig:
    """The data config validation looks at (``cfg``: the run's TrainConfig): the evaluation budget (``eval.pixels`` /
    ``eval.crop``, by default the final training budget), the same in every epoch, so that epochs compare."""
    return eval_data(cfg.data, cfg.eval.pixels, cfg.eval.crop)


class Budgets:
    """``epoch -> PlanConfig`` of a loader: the ramp's budget for training, the one config for evaluation. A plain
    object (the DALI feed holds it through ``EpochPlans``; a bound method of the loader would make a cycle)."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.plans = {(d.pixels, d.crop): plan_config(d, train) for d in (ramp_levels(cfg) if train else [cfg])}

    def data(self, epoch: int) -> DataConfig:
        return budget_at(self.cfg, epoch) if self.train else self.cfg

    def __call__(self, epoch: int) -> PlanConfig:
        d = self.data(epoch)
        return self.plans[(d.pixels, d.crop)]


def plan_config(cfg: DataConfig, train: bool) -> PlanConfig:
    if cfg.res == "full":
        buckets = make_buckets(cfg.pixels, cfg.buckets, multiple=cfg.side_multiple)
    elif cfg.res == "256":
        buckets = square_bucket(cfg.crop)
    else:
        raise ValueError(f"data.res must be 'full' or '256', got {cfg.res!r}")
    return PlanConfig(
        train=train, batch_size=cfg.batch_size, buckets=buckets, scale_min=cfg.scale_min, flip=cfg.flip,
        crop_fraction=cfg.eval_crop_fraction, color_jitter=cfg.color_jitter if train else 0.0, fixed=cfg.res == "256",
    )


class Loader:
    """Batches of one split for one rank; ``epoch(e, start_step)`` is a pure function of (seed, e)."""

    kind = ""  # 'dali' or 'pil'
    why = "built directly"  # why build_loader chose this kind (data.loader=auto says it at start)

    def __init__(self, split: Split, cfg: DataConfig, train: bool, seed: int, rank: int, world: int,
                 device: torch.device, dtype: torch.dtype):
        self.split, self.cfg, self.train, self.seed = split, cfg, train, seed
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype
        self.budgets = Budgets(cfg, train)
        self.plan_cfg = self.budgets(0)  # what every budget shares (batch size, augmentation); the shapes differ
        local, torchrun = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "TORCHELASTIC_RUN_ID" in os.environ
        self.threads = cfg.threads or rank_cores(usable_cores(), os.cpu_count() or 1, local, torchrun)
        # A separate object, not a method: the DALI feed holds it, and a bound method would tie the loader into
        # a reference cycle, freed only by the cyclic GC, which may then run in a forked DataLoader worker, where
        # the pipeline's destructor waits forever for threads the fork did not copy.
        self.plan = EpochPlans(split.height, split.width, self.budgets, seed, rank, world)
        self._budget_steps: dict[int, int] = {}  # id of a budget's PlanConfig -> steps per epoch (the same in every epoch)
        self._rows: tuple[int | None, dict[str, torch.Tensor]] = (None, {})
        self._pool: concurrent.futures.Executor | None = None  # the CPU tail's threads without TorchScript (start_tail)
        if device.type == "cpu":
            keep_freed_memory()  # batches are assembled in this process's memory on the CPU path

    def __len__(self) -> int:
        return len(self.plan(0))

    def steps(self, epoch: int) -> int:
        """Steps of ``epoch``: the same in every epoch of one budget (the plan cuts each bucket into batches; only the
        order is random), so it is counted once per budget."""
        pc = self.budgets(epoch)
        if id(pc) not in self._budget_steps:
            self._budget_steps[id(pc)] = len(epoch_plan(self.split.height, self.split.width, pc, self.seed, 0, self.rank,
                                                        self.world))
        return self._budget_steps[id(pc)]

    def shapes(self, epoch: int | None = None) -> list[tuple[int, int, int]]:
        """Every batch shape (rows, H, W) this loader gives in ``epoch``, or in any epoch (every budget of a ramp, in
        order) (plan.batch_shapes)."""
        plans = [self.budgets(epoch)] if epoch is not None else list(self.budgets.plans.values())
        out: list[tuple[int, int, int]] = []
        for pc in plans:
            out += [sh for sh in batch_shapes(self.split.height, self.split.width, pc) if sh not in out]
        return out

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

    def prime(self, epoch: int, start_step: int = 0) -> None:
        """Start preparing ``epoch(epoch, start_step)``'s first batches now (the pipeline's or the workers' start-up
        included), so that it overlaps with what the trainer does before step 0; that call then takes them over.
        Asking for any other batches first discards them."""
        raise NotImplementedError

    def describe(self) -> str:
        """What decodes: 'dali (CPU-only)', 'pil (torchcodec, 4 worker processes)', ..."""
        return self.kind

    def close(self) -> None:
        """Release what the loader holds beyond memory (threads, processes, pipelines) now. The trainer closes its loaders
        when a run ends, so that a process that goes on (a sweep, a notebook, the tests) does not wait for the garbage
        collector to find them."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def rows(self, epoch: int) -> dict[str, torch.Tensor]:
        """Labels (steps, n), valid sizes (steps, n, 2) and colour factors (steps, n, 3) of every batch of an epoch,
        on the training device, copied there in one go when the epoch starts.

        A batch then takes views of them: no host-to-device copy per step. A copy from pageable memory makes the
        training thread wait for it, and that wait keeps the host from queueing work ahead of the GPU."""
        if self._rows[0] != epoch:
            plans = self.plan(epoch)
            host = {
                "labels": np.stack([self.split.labels[p.index] for p in plans]),
                "sizes": np.stack([np.stack([p.out_h, p.out_w], 1) for p in plans]).astype(np.int32),
                "color": np.stack([p.color for p in plans]).astype(np.float32),
            }
            cuda = self.device.type == "cuda"
            pin = (lambda t: t.pin_memory()) if cuda else (lambda t: t)
            self._rows = (epoch, {k: pin(torch.from_numpy(v)).to(self.device, non_blocking=True) for k, v in host.items()})
        return self._rows[1]

    def cpu_tail(self, images: list[torch.Tensor], p: BatchPlan, flip: bool = True) -> Callable[[], torch.Tensor]:
        """Start resizing (to the plan's output sizes), flipping (as planned, if ``flip``), normalizing and padding a batch's
        decoded uint8 HWC images into one (n, 3, H, W) float32 batch in ``threads`` parallel tasks (``start_tail``); the
        returned function waits for it and gives the batch. Both loaders' CPU path ends here.

        Each task writes its samples straight into the requested memory format of an uninitialized batch (zeroing only
        padding): allocating with zeros and converting the layout afterwards took longer than the resizing itself."""
        cl = self.cfg.channels_last
        out = torch.empty((len(p.index), p.height, p.width, 3) if cl else (len(p.index), 3, p.height, p.width),
                          dtype=torch.float32)
        scale, bias = normalize_rows(p.width)
        flips = p.flip[: p.real].astype(bool).tolist() if flip else [False] * p.real
        wait = start_tail(images, p.out_h[: p.real].tolist(), p.out_w[: p.real].tolist(), flips, out, scale, bias, cl,
                          min(self.threads, p.real), self._tail_pool)

        def result() -> torch.Tensor:
            wait()
            return out.permute(0, 3, 1, 2) if cl else out

        return result

    def _tail_pool(self) -> concurrent.futures.Executor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)  # torch kernels release the GIL
        return self._pool

    @staticmethod
    def _settle(pending: tuple[int, Callable[[], torch.Tensor]] | None) -> None:
        """Wait for a batch's CPU tail or copy (``(step, function that waits for it)``) to end, whatever its outcome: it is
        being abandoned, and it still reads memory that is about to be dropped or reused."""
        if pending is not None:
            try:  # noqa: SIM105  (no module globals here: this also runs when an abandoned generator is finalized at exit)
                pending[1]()
            except Exception:  # it is being abandoned: its outcome does not matter
                pass

    def _finish(self, images: torch.Tensor, epoch: int, step: int) -> Batch:
        """Common tail on the device: labels and sizes, colour jitter, dtype, memory format."""
        p, rows = self.plan(epoch)[step], self.rows(epoch)
        sizes = rows["sizes"][step]
        if self.plan_cfg.color_jitter:
            images = color_jitter(images.float(), rows["color"][step])
            if p.padded:  # the jitter moved the padding off zero (training batches have none: plan.py)
                images = images * valid_mask(sizes, p.height, p.width, torch.float32)
        images = images.to(self.dtype)
        images = images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images.contiguous()
        return Batch(images=images, labels=rows["labels"][step], sizes=sizes, index=torch.from_numpy(p.samples),
                     padded=p.padded, real=p.real)


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """Normalization and luma constants on a device, copied there once: a copy per batch would be a host wait."""
    t = {"mean": MEAN, "std": STD, "luma": (0.299, 0.587, 0.114)}
    return {k: torch.tensor(v, device=device).view(1, 3, 1, 1) for k, v in t.items()}


def color_jitter(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation factors f (n, 3) applied in pixel space to normalized x (n,3,H,W)."""
    c = _constants(x.device)
    mean, std, luma = c["mean"], c["std"], c["luma"]
    p = x * std + mean
    p = p * f[:, 0].view(-1, 1, 1, 1)
    gray = (p * luma).sum(1, keepdim=True)
    p = (p - gray.mean((2, 3), keepdim=True)) * f[:, 1].view(-1, 1, 1, 1) + gray.mean((2, 3), keepdim=True)
    gray = (p * luma).sum(1, keepdim=True)
    p = gray + (p - gray) * f[:, 2].view(-1, 1, 1, 1)
    return (p.clamp(0, 255) - mean) / std


def copy_fillers(out: torch.Tensor, real: int) -> None:
    """Rows [real, n) of a batch become the copies plan.py made them (row k is row k % real): decoded once."""
    if real < len(out):
        out[real:] = out[torch.arange(real, len(out)) % real]


@functools.lru_cache(maxsize=64)  # one per bucket width; read-only, shared by the pool's threads
def normalize_rows(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and bias of the normalization repeated along HWC rows of up to ``width`` pixels.

    Normalizing is one multiply-add over whole rows: broadcasting a 3-vector over the innermost axis is not
    vectorized by torch; a row-length vector is, ~5x faster (benchmarks/results/design_measurements_*.md).
    """
    return (1 / torch.tensor(STD)).repeat(width), (-torch.tensor(MEAN) / torch.tensor(STD)).repeat(width)


def resize_hwc(crop: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """A uint8 HWC image resized to (oh, ow, 3) (contiguous), bilinear with antialiasing.

    torch's antialiased uint8 kernel, the one torchvision's resize calls, without torchvision's ~20 us of
    dispatch per call (a fifth of a 224 px resize, spent holding the GIL the tail's threads share). A 1HWC
    view seen as NCHW is unambiguously channels-last, so the output is too, with no repacking.
    """
    if crop.shape[:2] == (oh, ow):
        return crop
    x = torch.nn.functional.interpolate(crop[None].permute(0, 3, 1, 2), size=(oh, ow), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x[0].permute(1, 2, 0)


def _tail_images(crops: list[torch.Tensor], out_h: list[int], out_w: list[int], flips: list[bool], out: torch.Tensor,
                 scale: torch.Tensor, bias: torch.Tensor, channels_last: bool, start: int, step: int) -> None:
    """Images start, start + step, ... of ``crops`` (uint8 HWC) resized to (out_h, out_w), flipped, normalized and written
    top-left into their rows of ``out`` ((n, H, W, 3) if ``channels_last``, else (n, 3, H, W)), padding zeroed, and into
    the filler rows past ``len(crops)`` that copy them (row j is row j % len(crops), as in ``copy_fillers``): in the tasks,
    because on the thread that waits for them the copies took most of its time at full resolution.

    Written for TorchScript (``tail_images``): a scripted call runs its whole loop without the GIL, so the CPU tail's
    threads scale with the cores instead of queueing for the interpreter between small ops."""
    for k in range(start, len(crops), step):
        oh, ow = out_h[k], out_w[k]
        x = crops[k]
        if x.size(0) != oh or x.size(1) != ow:
            # torch's antialiased uint8 kernel (what torchvision's resize calls); a 1HWC view seen as NCHW is
            # channels-last, so the output is too, with no repacking.
            x = torch.ops.aten._upsample_bilinear2d_aa(x.unsqueeze(0).permute(0, 3, 1, 2), [oh, ow], False, None, None)
            x = x[0].permute(1, 2, 0)
        if flips[k]:
            x = x.flip([1])
        hw = out[k] if channels_last else out[k].permute(1, 2, 0)  # an (H, W, 3) view either way
        rows = x.reshape(oh, ow * 3)
        if channels_last:  # one fused pass from uint8 into the batch's rows: no temporary to write and read again
            torch.addcmul(bias[: ow * 3], rows, scale[: ow * 3], out=hw[:oh, :ow].reshape(oh, ow * 3))
        else:  # the batch's rows are not contiguous in HWC order: normalize, then copy across
            hw[:oh, :ow].copy_(torch.addcmul(bias[: ow * 3], rows, scale[: ow * 3]).view(oh, ow, 3))
        if oh < hw.size(0):
            hw[oh:].zero_()
        if ow < hw.size(1):
            hw[:oh, ow:].zero_()
        for j in range(k + len(crops), out.size(0), len(crops)):  # the plan's fillers of this image (copy_fillers)
            out[j].copy_(out[k])


@functools.lru_cache(maxsize=1)
def tail_images():
    """``_tail_images`` compiled by TorchScript (it releases the GIL while it runs); the plain function where TorchScript
    is unavailable (it is deprecated in recent torch): same results, threads then share the GIL."""
    return _script(_tail_images) or _tail_images


def _script(fn):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception:  # any failure to script: the caller has a plain-Python path that computes the same
        return None


def _fork_tail(crops: list[torch.Tensor], out_h: list[int], out_w: list[int], flips: list[bool], out: torch.Tensor,
               scale: torch.Tensor, bias: torch.Tensor, channels_last: bool, tasks: int) -> list[torch.jit.Future[None]]:
    """``_tail_images`` over a whole batch as ``tasks`` interleaved tasks on torch's inter-op thread pool (``jit.fork``
    inside a scripted function starts them there; called eagerly it would run them in turn)."""
    futures: list[torch.jit.Future[None]] = []
    for i in range(tasks):
        futures.append(torch.jit.fork(_tail_images, crops, out_h, out_w, flips, out, scale, bias, channels_last, i, tasks))
    return futures


@functools.lru_cache(maxsize=1)
def _forked_tail():
    return _script(_fork_tail)


def start_tail(crops: list[torch.Tensor], out_h: list[int], out_w: list[int], flips: list[bool], out: torch.Tensor,
               scale: torch.Tensor, bias: torch.Tensor, channels_last: bool, tasks: int,
               pool: Callable[[], concurrent.futures.Executor], fork: bool = True) -> Callable[[], None]:
    """Start ``_tail_images`` over a batch (``crops`` into rows ``[0, len(crops))`` of ``out``) in ``tasks`` parallel
    tasks; the returned function waits for all of them, then raises the first error if any.

    One scripted call starts every task on torch's inter-op pool and none of them takes the GIL: with a Python thread
    pool each task took it to start, to convert its arguments and to report back: two or three GIL handoffs per task,
    queued behind each other, more the more tasks (benchmarks/results/design_measurements_*.md). Without TorchScript,
    or with ``fork=False`` (the tests and benchmarks compare the two), ``pool()`` runs the same tasks.
    """
    forked = _forked_tail() if fork else None
    if forked is not None:
        futures = forked(crops, out_h, out_w, flips, out, scale, bias, channels_last, tasks)

        def wait_forked() -> None:
            # Every task ends before an error is raised: the others still read the crops and write the batch.
            # (torch.futures.collect_all fails as soon as one task does.)
            errors = []
            for f in futures:
                try:
                    f.wait()
                except RuntimeError as e:  # what a failed TorchScript task raises
                    errors.append(e)
            if errors:
                raise errors[0]

        return wait_forked
    tail = tail_images()  # scripted where TorchScript works: it releases the GIL for the whole call
    submitted = [pool().submit(tail, crops, out_h, out_w, flips, out, scale, bias, channels_last, i, tasks)
                 for i in range(tasks)]

    def wait_pooled() -> None:
        concurrent.futures.wait(submitted)
        for f in submitted:
            f.result()

    return wait_pooled


def _copy_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


def _fork_copy(src: torch.Tensor, dst: torch.Tensor) -> torch.jit.Future[None]:
    return torch.jit.fork(_copy_into, src, dst)


@functools.lru_cache(maxsize=1)
def _forked_copy():
    return _script(_fork_copy)


def start_copy(src: torch.Tensor, dst: torch.Tensor, pool: Callable[[], concurrent.futures.Executor],
               fork: bool = True) -> Callable[[], None]:
    """Start copying ``src`` into ``dst`` off this thread, as one task on torch's inter-op pool (forked as the CPU tail's
    tasks are; ``pool()`` runs it without TorchScript, or with ``fork=False``); the returned function waits for it."""
    forked = _forked_copy() if fork else None
    if forked is not None:
        return forked(src, dst).wait
    return pool().submit(dst.copy_, src).result


def tail_one(crop: torch.Tensor, oh: int, ow: int, flip: bool, out: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor],
             channels_last: bool) -> None:
    """One decoded uint8 HWC crop resized to (oh, ow), flipped, normalized and written top-left into ``out``
    ((H, W, 3) if ``channels_last``, else (3, H, W)), the rest of ``out`` zeroed: the CPU tail's whole per-image work
    (the benchmark's augment limit runs it too)."""
    tail_images()([crop], [oh], [ow], [flip], out[None], affine[0], affine[1], channels_last, 0, 1)
