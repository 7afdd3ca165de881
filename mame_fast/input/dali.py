"""Stage 2d: the DALI loader: NVIDIA DALI on the GPU or in CPU-only mode.

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

import functools
import importlib.util
import weakref
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import DataConfig
from ..tensors import MEAN, STD
from .loader import Batch, Loader, LoaderError
from .plan import BatchPlan, EpochPlans
from .reader import Split


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_missing() -> str:
    """Why DALI cannot be used here ('' where it can): said when ``data.loader=auto`` takes the fallback."""
    import platform

    if dali_available():
        return ""
    system, machine = platform.system(), platform.machine()
    if system != "Linux" or machine not in ("x86_64", "aarch64"):
        return f"NVIDIA publishes no DALI wheel for {system} {machine}"
    return "NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (or -cuda120)"


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


class _Feed:
    """external_source callback: the next planned batch as encoded bytes + one row of parameters per sample.

    It runs on from one epoch's plan into the next, so that a pipeline kept across epochs never drains.
    This is Python on the training thread, once per batch, so it is kept small: two inputs, the JPEGs and
    every per-sample number in one dense float32 array (the graph slices it). DALI checks and wraps each input,
    and each element of a list, in Python; the JPEGs are therefore wrapped once, as DALI tensors over the
    memory-mapped shards, and handed over as they are (DALI then copies their bytes, a memcpy): about half the
    time of eight inputs and numpy arrays (benchmarks/results/design_measurements_*.md).
    """

    COLUMNS = ("x", "y", "cw", "ch", "out_w", "out_h", "flip", "height", "width")

    def __init__(self, split: Split, plans: EpochPlans, fillers: bool = True):
        self.split, self.plans = split, plans
        # The GPU graph outputs whole batches, fillers included; the CPU-only graph decodes a batch's own samples
        # only, and the CPU tail copies them into the filler rows (plan.py).
        self.fillers = fillers
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
        n = len(p.index) if self.fillers else p.real
        params = np.empty((n, len(self.COLUMNS)), np.float32)
        params[:, :7] = np.stack([p.x, p.y, p.cw, p.ch, p.out_w, p.out_h, p.flip], 1)[:n]
        params[:, 7], params[:, 8] = p.height, p.width
        return self.jpegs(p.index[:n]), params


@functools.lru_cache(maxsize=1)
def _live_dali_loaders() -> weakref.WeakSet[DaliLoader]:
    """Every DALI loader alive, so that their pipelines and the DALI tensors over the shard maps are released while
    Python still runs: left to the interpreter's teardown, DALI's buffers (which hold Python objects when fed
    without a copy) were freed after it and the process aborted at exit ('free(): invalid pointer')."""
    import atexit

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
    busy and decoding on DALI's CPU threads frees it; at 256 the step is host-bound (the GPU under half busy) and
    nvJPEG, partly on the hardware decoder, spares the CPU. The figures are in benchmarks/results/."""
    return cfg.decode == "gpu" or (cfg.decode == "auto" and cfg.res == "256")


class DaliLoader(Loader):
    """The DALI implementation; GPU (mixed decode) when ``device`` is CUDA, CPU-only mode otherwise.

    In CPU-only mode the graph stops after the ROI decode and the decoded crops go through
    ``cpu_tail`` (torch's antialiased uint8 resize, flip, normalize, pad on a thread pool): DALI's CPU
    resize costs several times torch's uint8 kernel (benchmarks/results/design_measurements_*.md), while its
    decoder runs at the libjpeg-turbo limit.
    """

    kind = "dali"

    def __init__(self, *a, dali_tail: bool | None = None, **kw):
        super().__init__(*a, **kw)
        self.gpu = self.device.type == "cuda"
        # Resize/flip/normalize/pad inside DALI: always on the GPU; on the CPU only when asked, which is how
        # the tests run the GPU path's graph on machines without a GPU.
        self.dali_tail = self.gpu if dali_tail is None else dali_tail
        self.feed = _Feed(self.split, self.plan, fillers=self.dali_tail)
        _live_dali_loaders().add(self)
        self.pipe = None
        self._next: tuple[int, int] | None = None  # (epoch, step) of the batch the pipeline delivers next
        self._ahead = False  # prime() has already scheduled the run whose outputs come next

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
            # Copied at feed time (no_copy=False): DALI keeps no reference to what it is fed, and the shard maps must
            # not be needed by batches still prefetching when a loader is torn down.
            jpeg, q = fn.external_source(source=self.feed, num_outputs=2, batch=True, parallel=False, no_copy=False,
                                         dtype=[types.UINT8, types.FLOAT])
            # Decode only the planned crop (ROI decode): fewer pixels to decode, colour-convert and resize.
            # nvJPEG on the GPU ("mixed"), or libjpeg-turbo on DALI's CPU threads, the crop then sent to the GPU.
            img = fn.decoders.image_slice(jpeg, q[0:2], q[2:4], device="mixed" if gpu and gpu_decode else "cpu",
                                          output_type=types.RGB, axis_names="WH", normalized_anchor=False, normalized_shape=False)
            if not tail:
                return img  # uint8 HWC crops of varying size: the tail runs in cpu_tail
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

    def _pipeline_at(self, epoch: int, start_step: int) -> None:
        """The pipeline is kept while the batches asked for are the ones it has prefetched (the next epoch after a
        finished one, or what prime() started); otherwise (a restore, an epoch left early) a fresh one starts at the step."""
        if self.pipe is None or self._next != (epoch, start_step):
            self.pipe, self._ahead = None, False  # frees the old pipeline and its prefetched batches first
            self.feed.start(epoch, start_step)
            self.pipe = self._build()
            self._next = (epoch, start_step)

    def prime(self, epoch: int, start_step: int = 0) -> None:
        """Build the pipeline and start its first run (which prefetches ``prefetch`` batches), so that the decoders'
        start-up and the first batches overlap with what the trainer does before step 0 (the shape warm-up)."""
        self._pipeline_at(epoch, start_step)
        if not self._ahead:
            self.pipe.schedule_run()
            self._ahead = True

    def describe(self) -> str:
        return f"dali ({'on the GPU' if self.gpu else 'CPU-only'}, {self.threads} thread{'s' * (self.threads != 1)})"

    def close(self) -> None:
        """Free the pipeline (its threads and prefetched batches) now."""
        self.pipe, self._ahead, self._next = None, False, None
        super().close()

    def _run(self, stream):
        """What ``pipe.run()`` does (schedule the next run, take the oldest outputs), minus a run prime() scheduled."""
        if not self._ahead:
            self.pipe.schedule_run()
        self._ahead = False
        return self.pipe.outputs(stream) if self.gpu else self.pipe.outputs()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        plans = self.plan(epoch)
        self._pipeline_at(epoch, start_step)
        self.rows(epoch)  # labels and sizes of the whole epoch to the device, before the first batch
        # GPU: outputs bound to torch's stream, so neither run() nor the copy waits on the host for the GPU.
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        pending = None  # CPU path: (step, batch in the making) whose tail the pool is still running
        try:
            for i in range(start_step, len(plans)):
                self._next = None  # unknown until this batch arrives
                try:
                    outs = self._run(stream)
                except RuntimeError as e:
                    self._settle(pending)  # its tail reads the outputs of the pipeline about to be dropped
                    pending, self.pipe, self._ahead = None, None, False
                    raise self._decode_error(plans, i, e) from e
                self._next = (epoch, i + 1) if i + 1 < len(plans) else (epoch + 1, 0)
                if not self.dali_tail:
                    # This batch's tail is queued behind the previous one's before that one is awaited, so the pool
                    # keeps working while this thread feeds DALI and finishes batches (+6% at 256 on 2 cores).
                    prev, pending = pending, (i, self.cpu_tail(outs[0], plans[i]))
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
            self._settle(pending)

    def _decode_error(self, plans: list[BatchPlan], i: int, e: Exception) -> LoaderError:
        """The failing batch is this one or one being prefetched: name what PIL cannot decode among them."""
        window = np.concatenate([q.samples for q in plans[i : i + self.cfg.prefetch + 1]])
        bad = _undecodable(self.split, window)
        where = (f"samples {bad}" if bad else
                 f"a batch from the shards {sorted({self.split.tars[int(self.split.shard[j])].name for j in window})}")
        return LoaderError(f"DALI failed on {where} of {self.split.folder}: {e}\n"
                           f"Check them with `mame-fast shard {self.split.folder} --verify`.")

    def decoded_crops(self, epoch: int) -> Iterator[tuple[BatchPlan, object]]:
        """The epoch's planned crops, ROI-decoded by the DALI graph alone (CPU-only mode, without the tail and without
        prefetching into the next epoch): what the benchmark times apart from the tail. Each DALI output stays valid
        while referenced."""
        if self.gpu or self.dali_tail:
            raise ValueError("decoded_crops is the CPU-only graph's first part; use a CPU loader without dali_tail")
        saved, self.cfg = self.cfg, replace(self.cfg, prefetch=1)
        try:
            self.feed.start(epoch, 0)
            pipe = self._build()
        finally:
            self.cfg = saved
        for p in self.plan(epoch):
            yield p, pipe.run()[0]

    def cpu_tail(self, crops, p: BatchPlan, flip: bool = True) -> Callable[[], torch.Tensor]:
        """``Loader.cpu_tail`` over the pipeline's decoded crops (a DALI TensorListCPU)."""
        # Views of DALI's output buffers, no copy (a copy cost as much as the resize). The pipeline runs DALI's dynamic
        # executor, where an output stays valid while it is referenced (``crops`` here), however many runs later.
        images = [torch.from_numpy(np.asarray(crops[k])) for k in range(p.real)]
        keep = [crops]  # the views above do not keep DALI's output alive: this does, until the tail is done
        batch = super().cpu_tail(images, p, flip)

        def result() -> torch.Tensor:
            out = batch()
            del keep[:]  # DALI's outputs were read: they may go now
            return out

        return result
