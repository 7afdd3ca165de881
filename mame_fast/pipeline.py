"""Stage 2c: batches for the training loop: NVIDIA DALI on the GPU or in CPU-only mode, or the PIL fallback.

One DALI pipeline definition serves both devices: the JPEG bytes of the planned samples go in through
``fn.external_source`` (one slice of a memory-mapped shard each, found through the DALI index), then
``decoders.image_slice`` decodes only the planned crop (``device="mixed"``: nvJPEG / the hardware
decoder; ``"cpu"``: libjpeg-turbo), ``resize`` scales it (antialiased), ``flip`` mirrors it, and
``crop_mirror_normalize`` normalizes, converts to fp16/fp32 in NCHW or NHWC and pads it to the batch's
bucket with zeros. On the GPU path the batch never returns to the host.

Why external_source and not ``fn.readers.webdataset``: the reader decides the order itself (a shuffle
buffer), so it cannot form aspect-ratio buckets, guarantee that each sample is seen exactly once per
epoch across ranks, or restart an epoch at step k. The plan (``plan.py``) decides all of that; the
index files still give random access without scanning the tars.

One pipeline serves consecutive epochs: the feed runs on into the next epoch's plan, so the prefetch queue
is already full when the next epoch starts and no pipeline is built per epoch (on the GPU, building one
initializes the decoders). A loader asked for anything else (a restore, an epoch left early) builds a fresh
pipeline at that step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import DataConfig
from .plan import BatchPlan, EpochPlans, PlanConfig, batch_shapes, make_buckets, square_bucket
from .reader import Split, open_split

# Normalization constants in 0-255 units (generic photographic statistics, no pretrained weights involved).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class LoaderError(RuntimeError):
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


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed memory (process-wide, Linux only).

    By default every allocation over 128 kB-32 MB is a fresh mmap, so each batch (up to 140 MB at
    full resolution) and each per-image temporary is paid again in page faults: on 2 cores that
    doubled the CPU tail of the DALI loader (2.15 s -> 1.13 s per epoch of 1,160 images). The cost is
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

    def __init__(self, split: Split, cfg: DataConfig, train: bool, seed: int, rank: int, world: int,
                 device: torch.device, dtype: torch.dtype):
        self.split, self.cfg, self.train, self.seed = split, cfg, train, seed
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype
        self.plan_cfg = plan_config(cfg, train)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads = cfg.threads or max(1, (os.cpu_count() or 1) // local)
        # A separate object, not a method: the DALI feed holds it, and a bound method would tie the loader into
        # a reference cycle, freed only by the cyclic GC, which may then run in a forked DataLoader worker, where
        # the pipeline's destructor waits forever for threads the fork did not copy.
        self.plan = EpochPlans(split.height, split.width, self.plan_cfg, seed, rank, world)
        self._rows: tuple[int | None, dict[str, torch.Tensor]] = (None, {})
        if device.type == "cpu":
            keep_freed_memory()  # batches are assembled in this process's memory on the CPU path

    def __len__(self) -> int:
        return len(self.plan(0))

    def steps(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every batch shape (rows, H, W) this loader gives, in any epoch (plan.batch_shapes)."""
        return batch_shapes(self.split.height, self.split.width, self.plan_cfg)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

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
            self._rows = (epoch, {k: (torch.from_numpy(v).pin_memory() if cuda else torch.from_numpy(v)).to(self.device, non_blocking=True)
                                  for k, v in host.items()})
        return self._rows[1]

    def _finish(self, images: torch.Tensor, epoch: int, step: int) -> Batch:
        """Common tail on the device: labels and sizes, colour jitter, dtype, memory format."""
        p, rows = self.plan(epoch)[step], self.rows(epoch)
        sizes = rows["sizes"][step]
        if self.plan_cfg.color_jitter:
            images = _color_jitter(images.float(), rows["color"][step]) * valid_mask(sizes, p.height, p.width, torch.float32)
        images = images.to(self.dtype)
        images = images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images.contiguous()
        return Batch(images=images, labels=rows["labels"][step], sizes=sizes, index=torch.from_numpy(p.samples),
                     padded=p.padded, real=p.real)


def _undecodable(split: Split, index: np.ndarray) -> list[str]:
    """``shard.tar:key`` of the samples among ``index`` that PIL cannot decode (after a DALI failure)."""
    import io

    from PIL import Image

    bad = []
    for i in index:
        try:
            Image.open(io.BytesIO(bytes(split.jpeg(int(i))))).load()
        except Exception:  # any failure is what we are looking for
            bad.append(f"{split.tars[int(split.shard[i])].name}:{split.keys[i]}")
    return bad


def _settle(pending: tuple[BatchPlan, Callable[[], torch.Tensor]] | None) -> None:
    """Wait for a batch's CPU tail to end, whatever its outcome (it is being abandoned)."""
    if pending is not None:
        with contextlib.suppress(Exception):
            pending[1]()


def valid_mask(sizes: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, 1, h, w) mask of the real pixels of a batch whose images have valid sizes (n, 2), top-left aligned."""
    hh = torch.arange(h, device=sizes.device).view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)
    ww = torch.arange(w, device=sizes.device).view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    return (hh & ww).unsqueeze(1).to(dtype)


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """Normalization and luma constants on a device, copied there once: a copy per batch would be a host wait."""
    t = {"mean": MEAN, "std": STD, "luma": (0.299, 0.587, 0.114)}
    return {k: torch.tensor(v, device=device).view(1, 3, 1, 1) for k, v in t.items()}


def _color_jitter(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
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


class _Feed:
    """external_source callback: the next planned batch as encoded bytes + one row of parameters per sample.

    It runs on from one epoch's plan into the next, so that a pipeline kept across epochs never drains.
    This is Python on the training thread, once per batch, so it is kept small: two inputs, the JPEGs and
    every per-sample number in one dense float32 array (the graph slices it). DALI checks and wraps each input,
    and each element of a list, in Python; the JPEGs are therefore wrapped once, as DALI tensors over the
    memory-mapped shards (no copy, ~3 us per sample), and handed over as they are. Per batch of 64 on 2 EPYC
    cores: 1.65 ms with eight inputs and JPEGs copied as numpy arrays, 0.82 ms like this.
    """

    COLUMNS = ("x", "y", "cw", "ch", "out_w", "out_h", "flip", "height", "width")

    def __init__(self, split: Split, plans: EpochPlans):
        self.split, self.plans = split, plans
        self.epoch = self.step = 0
        self._jpegs: list | None = None  # DALI TensorCPU per sample, views of the shards' memory maps

    def jpegs(self, index: np.ndarray) -> list:
        if self._jpegs is None:
            from nvidia.dali.tensors import TensorCPU

            # The views stay valid while the split (which holds the memory maps) lives: the feed holds both.
            self._jpegs = [TensorCPU(np.frombuffer(self.split.jpeg(i), np.uint8)) for i in range(len(self.split))]
        return [self._jpegs[i] for i in index]

    def start(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray]:
        plans = self.plans(self.epoch)
        if self.step >= len(plans):
            self.epoch, self.step = self.epoch + 1, 0
            plans = self.plans(self.epoch)
        p = plans[self.step]
        self.step += 1
        n = len(p.index)
        params = np.empty((n, len(self.COLUMNS)), np.float32)
        params[:, :7] = np.stack([p.x, p.y, p.cw, p.ch, p.out_w, p.out_h, p.flip], 1)
        params[:, 7], params[:, 8] = p.height, p.width
        return self.jpegs(p.index), params


@functools.lru_cache(maxsize=1)
def _live_dali_loaders() -> "weakref.WeakSet[DaliLoader]":
    """Every DALI loader alive, so that their pipelines and the DALI tensors over the shard maps are released while
    Python still runs: left to the interpreter's teardown, DALI's buffers (which hold Python objects when fed
    without a copy) were freed after it and the process aborted at exit ('free(): invalid pointer')."""
    import atexit
    import weakref

    loaders: weakref.WeakSet = weakref.WeakSet()

    def release() -> None:
        for loader in list(loaders):
            loader.pipe = None
            loader.feed._jpegs = None

    atexit.register(release)
    return loaders


def gpu_decodes(cfg: DataConfig) -> bool:
    """Whether DALI decodes on the GPU (when there is one). Measured on an H200 with the `small` model, batches of 64
    (benchmarks/results/gpu_check_nvidia-h200_2026-11-26_run2.md): at full resolution training keeps the GPU 97-99%
    busy and decoding on DALI's CPU threads frees it (95.3% of in-memory speed against 91.7%, 1,858 vs 1,785 img/s);
    at 256 the step is host-bound (GPU 40-46% busy) and nvJPEG, partly on the hardware decoder, spares the CPU
    (4,205 vs 3,930 img/s)."""
    return cfg.decode == "gpu" or (cfg.decode == "auto" and cfg.res == "256")


class DaliLoader(Loader):
    """The DALI implementation; GPU (mixed decode) when ``device`` is CUDA, CPU-only mode otherwise.

    In CPU-only mode the graph stops after the ROI decode and the decoded crops go through
    ``_cpu_tail`` (torch's antialiased uint8 resize, flip, normalize, pad on a thread pool): DALI's CPU
    resize costs ~10x torch's uint8 kernel (1.0 vs 0.1 ms for a 224x224 output, ~5 vs 0.7 ms at 360 kpx, measured
    on 2 EPYC cores), while its decoder runs at the libjpeg-turbo limit.
    """

    def __init__(self, *a, dali_tail: bool | None = None, **kw):
        super().__init__(*a, **kw)
        self.gpu = self.device.type == "cuda"
        # Resize/flip/normalize/pad inside DALI: always on the GPU; on the CPU only when asked, which is how
        # the tests run the GPU path's graph on machines without a GPU.
        self.dali_tail = self.gpu if dali_tail is None else dali_tail
        self.feed = _Feed(self.split, self.plan)
        _live_dali_loaders().add(self)
        self.pipe = None
        self._next: tuple[int, int] | None = None  # (epoch, step) of the batch the pipeline delivers next
        self._pool = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu, tail, gpu_decode = self.gpu, self.dali_tail, gpu_decodes(self.cfg)
        out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT

        layout = "HWC" if self.cfg.channels_last else "CHW"  # HWC seen as NCHW is channels-last: no transpose after

        @pipeline_def(batch_size=self.cfg.batch_size, num_threads=self.threads, prefetch_queue_depth=self.cfg.prefetch,
                      device_id=(self.device.index or 0) if gpu else None, seed=self.seed,
                      # Outputs stay valid while referenced: the CPU tail relies on it (with exec_dynamic=False,
                      # test_one_loader_over_epochs... and test_gpu_graph_on_cpu... fail at full resolution).
                      exec_dynamic=True)
        def pipe():
            # no_copy: the JPEGs stay in the shards' memory maps, which live as long as the split.
            jpeg, q = fn.external_source(source=self.feed, num_outputs=2, batch=True, parallel=False, no_copy=True,
                                         dtype=[types.UINT8, types.FLOAT])
            # Decode only the planned crop (ROI decode): fewer pixels to decode, colour-convert and resize.
            # nvJPEG on the GPU ("mixed"), or libjpeg-turbo on DALI's CPU threads, the crop then sent to the GPU.
            img = fn.decoders.image_slice(jpeg, q[0:2], q[2:4], device="mixed" if gpu and gpu_decode else "cpu",
                                          output_type=types.RGB, axis_names="WH", normalized_anchor=False, normalized_shape=False)
            if not tail:
                return img  # uint8 HWC crops of varying size: the tail runs in _cpu_tail
            if gpu and not gpu_decode:
                img = img.gpu()
            img = fn.resize(img, resize_x=q[4], resize_y=q[5], antialias=True)
            img = fn.flip(img, horizontal=fn.cast(q[6], dtype=types.INT32))
            return fn.crop_mirror_normalize(
                img, crop_h=q[7], crop_w=q[8], crop_pos_x=0.0, crop_pos_y=0.0, out_of_bounds_policy="pad", fill_values=0.0,
                mean=list(MEAN), std=list(STD), dtype=out_dtype, output_layout=layout,
            )

        p = pipe()
        p.build()
        return p

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        plans = self.plan(epoch)
        # The pipeline is kept while the batches asked for are the ones it has prefetched (the next epoch
        # after a finished one); otherwise (a restore, an epoch left early) a fresh one starts at the step.
        if self.pipe is None or self._next != (epoch, start_step):
            self.pipe = None  # frees the old pipeline and its prefetched batches first
            self.feed.start(epoch, start_step)
            self.pipe = self._build()
        self.rows(epoch)  # labels and sizes of the whole epoch to the device, before the first batch
        # GPU: outputs bound to torch's stream, so neither run() nor the copy waits on the host for the GPU.
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        pending = None  # CPU path: (step, batch in the making) whose tail the pool is still running
        try:
            for i in range(start_step, len(plans)):
                self._next = None  # unknown until this batch arrives
                try:
                    outs = self.pipe.run(stream) if self.gpu else self.pipe.run()
                except RuntimeError as e:
                    _settle(pending)  # its tail reads the outputs of the pipeline about to be dropped
                    pending, self.pipe = None, None
                    raise self._decode_error(plans, i, e) from e
                self._next = (epoch, i + 1) if i + 1 < len(plans) else (epoch + 1, 0)
                if not self.dali_tail:
                    # This batch's tail is queued behind the previous one's before that one is awaited, so the pool
                    # keeps working while this thread feeds DALI and finishes batches (+6% at 256 on 2 cores).
                    prev, pending = pending, (i, self._cpu_tail(outs[0], plans[i]))
                    if prev is not None:
                        yield self._finish(prev[1](), epoch, prev[0])
                    continue
                img_t = outs[0].as_tensor()
                images = torch.empty(img_t.shape(), dtype=to_torch_type[img_t.dtype], device=self.device)
                feed_ndarray(img_t, images, cuda_stream=stream)
                yield self._finish(images.permute(0, 3, 1, 2) if self.cfg.channels_last else images, epoch, i)
            if pending is not None:
                last, pending = pending, None
                yield self._finish(last[1](), epoch, last[0])
        finally:
            # Left early (a break, an error in the consumer): the pool may still be writing a batch from this
            # pipeline's outputs, and a restore is about to drop the pipeline.
            _settle(pending)

    def _decode_error(self, plans: list[BatchPlan], i: int, e: Exception) -> LoaderError:
        """The failing batch is this one or one being prefetched: name what PIL cannot decode among them."""
        window = np.concatenate([q.samples for q in plans[i : i + self.cfg.prefetch + 1]])
        bad = _undecodable(self.split, window)
        where = (f"samples {bad}" if bad else
                 f"a batch from the shards {sorted({self.split.tars[int(self.split.shard[j])].name for j in window})}")
        return LoaderError(f"DALI failed on {where} of {self.split.folder}: {e}\n"
                           f"Check them with `mame-fast shard {self.split.folder} --verify`.")

    def _cpu_tail(self, crops, p: BatchPlan) -> Callable[[], torch.Tensor]:
        """Start resizing, flipping, normalizing and padding the decoded crops into one (n, 3, H, W) float32
        batch on the thread pool; the returned function waits for it and gives the batch.

        Each thread writes its samples straight into the requested memory format of an uninitialized
        batch (zeroing only padding): allocating with zeros and converting the layout afterwards took
        longer than the resizing itself (2.1 s + 3.0 s of a 6 s epoch at full resolution).
        """
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)  # torch kernels release the GIL
        n, H, W = len(p.index), p.height, p.width
        out = torch.empty((n, H, W, 3) if self.cfg.channels_last else (n, 3, H, W), dtype=torch.float32)
        affine = normalize_rows(W)

        todo = iter(range(p.real))  # shared by the threads: each takes the next image when it is free

        def work() -> None:
            for k in todo:
                # A view of DALI's output buffer, no copy (copying cost 0.8 ms per crop at full resolution, as much
                # as the resize). The pipeline runs DALI's dynamic executor, where an output stays valid while it
                # is referenced (``crops`` here), however many runs later.
                crop = torch.from_numpy(np.asarray(crops[k]))
                tail_one(crop, int(p.out_h[k]), int(p.out_w[k]), bool(p.flip[k]), out[k], affine, self.cfg.channels_last)

        # One task per thread rather than per image: fewer futures and wake-ups under the GIL.
        done = [self._pool.submit(work) for _ in range(min(self.threads, p.real))]

        def result() -> torch.Tensor:
            for f in done:
                f.result()
            copy_fillers(out, p.real)
            return out.permute(0, 3, 1, 2) if self.cfg.channels_last else out

        return result


def copy_fillers(out: torch.Tensor, real: int) -> None:
    """Rows [real, n) of a batch become the copies plan.py made them (row k is row k % real): decoded once."""
    if real < len(out):
        out[real:] = out[torch.arange(real, len(out)) % real]


@functools.lru_cache(maxsize=64)  # one per bucket width; read-only, shared by the pool's threads
def normalize_rows(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and bias of the normalization repeated along HWC rows of up to ``width`` pixels.

    Normalizing is one multiply-add over whole rows: broadcasting a 3-vector over the innermost axis is not
    vectorized by torch (1.8 ms per 360 kpx image); a row-length vector is (0.34 ms).
    """
    return (1 / torch.tensor(STD)).repeat(width), (-torch.tensor(MEAN) / torch.tensor(STD)).repeat(width)


def resize_hwc(crop: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """A uint8 HWC image resized to (oh, ow, 3) (contiguous), bilinear with antialiasing.

    torch's antialiased uint8 kernel, the one torchvision's resize calls, without torchvision's 20 us of
    dispatch per call (a fifth of a 224 px resize, spent holding the GIL the tail's threads share). A 1HWC
    view seen as NCHW is unambiguously channels-last, so the output is too, with no repacking.
    """
    if crop.shape[:2] == (oh, ow):
        return crop
    x = torch.nn.functional.interpolate(crop[None].permute(0, 3, 1, 2), size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0)


def tail_one(crop: torch.Tensor, oh: int, ow: int, flip: bool, out: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor],
             channels_last: bool) -> None:
    """One decoded uint8 HWC crop resized to (oh, ow), flipped, normalized and written top-left into ``out``
    ((H, W, 3) if ``channels_last``, else (3, H, W)), the rest of ``out`` zeroed. The CPU tail's whole
    per-image work (the benchmark's augment limit runs it too)."""
    x = resize_hwc(crop, oh, ow)
    if flip:
        x = x.flip(1)
    scale, bias = affine
    hw = out if channels_last else out.permute(1, 2, 0)  # an (H, W, 3) view either way
    rows = x.reshape(oh, ow * 3)
    if channels_last:  # one fused pass from uint8 into the batch's rows (0.20 ms vs 0.34 with a temporary)
        torch.addcmul(bias[: ow * 3], rows, scale[: ow * 3], out=out[:oh, :ow].reshape(oh, ow * 3))
    else:  # the batch's rows are not contiguous in HWC order: normalize, then copy across
        hw[:oh, :ow].copy_(torch.addcmul(bias[: ow * 3], rows, scale[: ow * 3]).view(oh, ow, 3))
    H, W = hw.shape[:2]
    if oh < H:
        hw[oh:].zero_()
    if ow < W:
        hw[:oh, ow:].zero_()


def build_loader(cfg: DataConfig, split_name: str, train: bool, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Loader:
    """The loader the config asks for (``auto``: DALI when installed, else the PIL fallback)."""
    device = device or torch.device("cpu")
    if cfg.prefetch < 1:
        raise ValueError(f"data.prefetch must be at least 1, got {cfg.prefetch}")
    split = open_split(cfg.shards, split_name, cfg.res)
    kind = cfg.loader
    if kind == "auto":
        kind = "dali" if dali_available() else "pil"
    if kind == "dali":
        if not dali_available():
            raise LoaderError("data.loader=dali but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); use data.loader=pil")
        return DaliLoader(split, cfg, train, seed, rank, world, device, dtype)
    if kind == "pil":
        from .pilloader import PilLoader

        return PilLoader(split, cfg, train, seed, rank, world, device, dtype)
    raise ValueError(f"data.loader must be 'auto', 'dali' or 'pil', got {kind!r}")
