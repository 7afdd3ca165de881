"""Stage 2e: the fallback loader: libjpeg-turbo decode in torch DataLoader workers, executing the same plan as DALI.

For machines without DALI (macOS, ARM, the GPU machines lent to this project) or on request
(``data.loader=pil``), and a baseline in ``benchmarks/loader_throughput.py``. Same plan (order, buckets,
crops, flips), same normalization and padding, so the training semantics do not depend on the loader;
pixels differ only by resampling details (torch's or PIL's antialiased bilinear vs DALI's). A DataLoader
item is a whole planned batch, so the batch shape comes from the plan, not from collation. Samples are read
through the shards' index (``reader.py``), not ``webdataset.WebDataset``: a streaming reader's shuffle
buffer cannot execute the plan (buckets, exact epochs across ranks, a restart at step k). The shards stay
readable by webdataset (``tests/test_shard.py``)."""

from __future__ import annotations

import functools
import io
import itertools
import math
import os
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ..files import ignore_stop_signals, shared_memory_free, stop_signals_held
from ..tensors import valid_mask
from .loader import Batch, Loader, LoaderError, copy_fillers, normalize_rows, resize_hwc, start_copy
from .plan import EpochPlans
from .reader import Split


def decode_planned(data: bytes | memoryview, x: float, y: float, cw: float, ch: float, ow: int, oh: int,
                   flip: bool) -> torch.Tensor:
    """One planned sample as uint8 HWC: crop (x, y, cw, ch) of the stored image, resized to (oh, ow).

    Two routes to the same result, up to resampling details. Where the output is less than half the crop's
    size, PIL decodes in the DCT domain at 1/2, 1/4 or 1/8 scale (``draft``), which skips most of the work.
    Otherwise a tensor decoder (``jpeg_decoder``: TorchCodec, else torchvision.io; libjpeg-turbo straight into a
    tensor) and the DALI CPU tail's own resize follow: over twice as fast as PIL's decode, conversion and resize
    (benchmarks/results/design_measurements_*.md).
    """
    decode = jpeg_decoder()
    if min(ow / cw, oh / ch) < 0.5 or decode is None:
        return torch.from_numpy(_decode_planned_pil(data, x, y, cw, ch, ow, oh, flip))
    out = resize_hwc(decode_crop(data, x, y, cw, ch, decode), oh, ow)
    return out.flip(1) if flip else out


def decode_crop(data: bytes | memoryview, x: float, y: float, cw: float, ch: float, decode=None) -> torch.Tensor:
    """The crop (x, y, cw, ch) (rounded to whole pixels) of a JPEG as contiguous uint8 HWC, decoded whole by ``decode``
    (``jpeg_decoder()`` by default: neither tensor decoder has a region-of-interest decode)."""
    img = (decode or jpeg_decoder())(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0)  # HWC memory
    x0, y0 = int(round(float(x))), int(round(float(y)))
    w, h = max(1, int(round(float(cw)))), max(1, int(round(float(ch))))
    # contiguous, as DALI's decoded crop: the resize takes twice as long on a strided view
    return img[y0 : y0 + h, x0 : x0 + w].contiguous()


DECODERS = ("torchcodec", "torchvision", "pil")


@functools.lru_cache(maxsize=1)
def jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The tensor JPEG decoder of this install, bytes (a uint8 tensor) to RGB uint8 CHW: TorchCodec's where it imports;
    else torchvision.io's, deprecated since torchvision 0.29 in favour of TorchCodec and to be removed; else None, and
    every sample takes PIL's route (slower, the same results up to resampling). ``MAME_FAST_JPEG_DECODER`` (one of
    ``DECODERS``) picks one: the decoder A/B of benchmarks/loader_throughput.py. Called once before the workers start,
    so that they inherit the import."""
    want = os.environ.get("MAME_FAST_JPEG_DECODER", "auto")
    if want not in ("auto", *DECODERS):
        raise LoaderError(f"MAME_FAST_JPEG_DECODER={want!r}: use one of {', '.join(DECODERS)} (or leave it unset)")
    if want in ("auto", "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg as torchcodec_decode
        except Exception:  # not installed, or built for another torch: the next decoder serves
            if want == "torchcodec":
                raise
        else:
            return functools.partial(torchcodec_decode, mode="RGB")
    if want in ("auto", "torchvision"):
        try:
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_jpeg as torchvision_decode
        except ImportError:
            if want == "torchvision":
                raise
        else:
            return functools.partial(torchvision_decode, mode=ImageReadMode.RGB)
    return None


def jpeg_decoder_name() -> str:
    """Which library ``jpeg_decoder`` decodes with: for the loader's line at start and the benchmark's table."""
    d = jpeg_decoder()
    return "PIL" if d is None else d.func.__module__.split(".")[0]


def _decode_planned_pil(data: bytes | memoryview, x: float, y: float, cw: float, ch: float, ow: int, oh: int,
                        flip: bool) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    scale = min(ow / cw, oh / ch)
    if im.format == "JPEG":
        im.draft("RGB", (math.ceil(W * scale), math.ceil(H * scale)))  # DCT-domain downscaling
    rx, ry = W / im.size[0], H / im.size[1]  # the draft's scale, per axis (its sizes are rounded up)
    im = im.convert("RGB")
    # Clamped: float32 plans and the draft's rounding can put the far edge a hair past the image.
    box = (x / rx, y / ry, min((x + cw) / rx, im.size[0]), min((y + ch) / ry, im.size[1]))
    im = im.resize((int(ow), int(oh)), Image.BILINEAR, box=box)  # crop + antialiased resize in one pass
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(im)  # writable copy: torch refuses read-only arrays


class _PlannedBatches(torch.utils.data.Dataset):
    """Item (epoch, step, seq): that planned batch, decoded in a worker; ``seq`` counts the items since the DataLoader
    iterator started. The workers compute the plan themselves (a pure function of seed and epoch), so one set of
    persistent workers serves every epoch.

    A worker writes the batch into slot ``seq % slots`` of the ``ring`` (``_ring_slots``), shared memory mapped once by
    every process, and hands back only where it is. A new shared-memory tensor per batch would be mapped, faulted in
    page by page and unmapped by the training process: at full resolution that was three quarters of its CPU time per
    image (2.6 of 3.5 ms, in the kernel) on a CPU run, and some 0.4 ms per image on the one thread that pins the batches
    for a GPU (benchmarks/results/design_measurements_*.md).

    The slot is not zeroed: the training process reads each sample's image only (top-left), or masks the padding. The
    filler rows are written only with ``fillers`` (the GPU path, which normalizes whole batches); the CPU tail writes
    them itself."""

    def __init__(self, split: Split, plans: EpochPlans, ring: torch.Tensor, fillers: bool):
        self.split, self.plans, self.ring, self.fillers = split, plans, ring, fillers

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, int, int, int] | str:
        """The planned batch's place in the ring (slot, rows, height, width), or the sentence saying which sample cannot
        be decoded: returned, not raised, because DataLoader re-raises a worker's exception wrapped in the worker's
        traceback text."""
        p = self.plans(key[0])[key[1]]
        slot = key[2] % len(self.ring)
        out = ring_slot(self.ring, slot, len(p.index), p.height, p.width)
        for k, i in enumerate(p.samples):
            try:
                a = decode_planned(self.split.jpeg(int(i)), p.x[k], p.y[k], p.cw[k], p.ch[k], p.out_w[k], p.out_h[k],
                                   bool(p.flip[k]))
            except (OSError, ValueError, SyntaxError, RuntimeError) as e:  # what PIL and torchvision.io raise for damaged images
                tar = self.split.tars[int(self.split.shard[i])]
                return (f"{tar}: sample {self.split.keys[i]} cannot be decoded ({e}). "
                        f"Check the shards with `mame-fast shard {self.split.folder} --verify`.")
            out[k, : a.shape[0], : a.shape[1]] = a
        if self.fillers:
            copy_fillers(out, p.real)
        return slot, len(p.index), p.height, p.width


def ring_slot(ring: torch.Tensor, slot: int, n: int, h: int, w: int) -> torch.Tensor:
    """Slot ``slot`` of the shared ring seen as an (n, h, w, 3) uint8 batch: the one layout the workers write and the
    training process reads."""
    return ring[slot, : n * h * w * 3].view(n, h, w, 3)


class _Steps(torch.utils.data.Sampler):
    """The (epoch, step, seq) items from a step of an epoch on. With ``run_on`` (a training loader) they run on into the
    following epochs without end, as the DALI loader's feed does: the workers keep decoding into the next epoch while
    the trainer finishes one (its last steps, validation), instead of idling until it asks for the next. Otherwise
    they stop at the epoch's end: an evaluation loader is asked for the same epoch twice (EMA) or skips some
    (``eval_every``), and what it decoded ahead would take cores from training for batches nobody asks for."""

    def __init__(self, plans: EpochPlans, run_on: bool):
        self.plans, self.run_on, self.epoch, self.start = plans, run_on, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, step = self.epoch, self.start
        for seq in itertools.count():
            while step >= len(self.plans(epoch)):
                if not self.run_on:
                    return
                epoch, step = epoch + 1, 0
            yield epoch, step, seq
            step += 1


def normalize_batch(raw: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """A uint8 NHWC batch on a GPU as normalized float32 (n, 3, H, W) channels-last, padding exactly 0 (as in DALI's
    output): one multiply-add kernel over whole NHWC rows (see normalize_rows), and a mask where the batch is padded.
    Per-image ops would be launches, and a launch counts where the step is host-bound. (A CPU run takes
    ``Loader.cpu_tail`` instead; the tests run both on a CPU and check they agree.)"""
    n, H, W, _ = raw.shape
    scale, bias = _normalize_rows_on(W, raw.device)
    x = torch.addcmul(bias, raw.view(n, H, W * 3), scale).view(n, H, W, 3).permute(0, 3, 1, 2)
    return x if sizes is None else x * valid_mask(sizes, H, W, x.dtype)


class PilLoader(Loader):
    """Decoding in DataLoader worker processes (no GIL to share), kept across epochs. The workers hand uint8 and the
    normalization runs in the training process: float32 batches are four times the bytes to write into, read from and
    free in shared memory, and normalizing in the workers made the loader half as fast at full resolution on 2 cores
    (145 vs 300 img/s; 1,600 vs 2,000 at 256), where its workers are the bottleneck. On a GPU it is one kernel
    (``normalize_batch``); on a CPU the DALI loader's CPU tail does it (``Loader.cpu_tail``) on torch's inter-op threads,
    started for one batch before the previous one is handed over: on the one thread every batch goes through, it took
    a quarter of that thread's time at 256 and at full resolution, which would have capped the loader at about 12,000
    and 1,600 img/s however many the cores (benchmarks/results/design_measurements_*.md)."""

    kind = "pil"

    def __init__(self, *a, tail_on_cpu: bool | None = None, **kw):
        super().__init__(*a, **kw)
        # Normalize in the CPU tail (a CPU run) or on the device (a GPU run): asked for on a CPU, the second is how the
        # tests run the GPU path's code on machines without a GPU (as DaliLoader's dali_tail).
        self.tail_on_cpu = self.device.type == "cpu" if tail_on_cpu is None else tail_on_cpu
        self._steps = _Steps(self.plan, run_on=self.train)
        self._dl = None
        self._ring: torch.Tensor | None = None
        # The workers' iterator and the (epoch, step) it gives next; None where that is not known (an epoch left early)
        self._items: tuple[tuple[int, int], Iterator] | None = None
        self._tail: tuple[int, Callable[[], torch.Tensor]] | None = None  # a task still reading a ring slot, if any

    def _loader(self) -> torch.utils.data.DataLoader:
        if self._dl is None:
            jpeg_decoder()  # imported once here, before the workers fork
            self._ring = self._ring_slots()
            # A generator of its own: without one, every iterator DataLoader starts draws its workers' base seed from
            # the process's global torch RNG, which dropout and drop-path draw from too. The trainer starts iterators
            # at other moments in a resumed run (prime, a restart inside an epoch) than in an uninterrupted one, so
            # the draw shifted every later dropout mask and resume was not exact (issue 33). The workers draw nothing
            # (the plan is a function of seed and epoch): what seeds them does not matter, that it is not global does.
            self._dl = torch.utils.data.DataLoader(
                _PlannedBatches(self.split, self.plan, self._ring, fillers=not self.tail_on_cpu), batch_size=None,
                sampler=self._steps, num_workers=self.threads, persistent_workers=self.threads > 0,
                prefetch_factor=self.cfg.prefetch if self.threads else None,
                generator=torch.Generator().manual_seed(self.seed), worker_init_fn=ignore_stop_signals,
                multiprocessing_context=None if self.cfg.start_method == "auto" or not self.threads else self.cfg.start_method)
        return self._dl

    def _ring_slots(self) -> torch.Tensor:
        """Shared memory for the batches in flight (``_PlannedBatches``), read by the CPU tail on a CPU run and copied into
        pinned memory for a GPU (``_on_device``; DataLoader's own pinning thread would fault in a new batch each time).

        Item ``seq`` of the workers' iterator goes to slot ``seq % slots``, rewritten only by the item ``slots`` later.
        DataLoader sends a new task only when it hands over an item, and at most ``workers * prefetch`` are outstanding.
        ``epoch`` takes item i + 1 (which sends the task for item ``i + 1 + workers * prefetch``) while item i's tail may
        still read its slot, and hands over item i's batch, whose tail has ended, only after that: with two slots more
        than the tasks outstanding, the slot being rewritten is never one a tail still reads. A restarted iterator
        starts only after every worker has finished what it was given (DataLoader waits for each to acknowledge the
        restart) and after the last tail has ended (``_items_at``). (The GPU path's copy out of the slot is such a tail.)"""
        largest = max(n * h * w * 3 for n, h, w in self.shapes())
        slots = self.threads * self.cfg.prefetch + 2
        free = shared_memory_free()
        if free is not None and slots * largest > free:  # refused here, not a SIGBUS in the middle of an epoch
            raise LoaderError(
                f"{self.split.folder}: the fallback loader needs {slots * largest / 1e9:.2f} GB of shared memory for its "
                f"{slots} batches in flight ({self.threads} workers x data.prefetch={self.cfg.prefetch}, + 2) and /dev/shm "
                f"has {free / 1e9:.2f} GB free. Lower data.prefetch or data.threads (or data.batch_size), or give the "
                f"machine more shared memory (docker run --shm-size).")
        return torch.empty((slots, largest), dtype=torch.uint8).share_memory_()

    def _items_at(self, epoch: int, start_step: int) -> Iterator:
        """The workers' iterator, kept while it gives next what is asked for (the next epoch after a finished one, or what
        prime() started); otherwise (a restore, an epoch left early) restarted at the step, which sends the workers their
        first requests.

        A tail still reading a ring slot (from an epoch left early whose generator is not yet closed) ends first: a restart
        may rewrite any slot, and the slot order that keeps one from being rewritten while read holds within one epoch's
        generator (``_ring_slots``)."""
        self._settle(self._tail)
        self._tail = None
        if self._items is None or self._items[0] != (epoch, start_step):
            self._steps.epoch, self._steps.start = epoch, start_step
            with stop_signals_held():  # the first iterator starts the workers: they must not die of a Ctrl-C
                self._items = ((epoch, start_step), iter(self._loader()))
        return self._items[1]

    def prime(self, epoch: int, start_step: int = 0) -> None:
        """Start the workers (the first time) and their first batches now, so that it overlaps with what the trainer does
        before step 0."""
        self._items_at(epoch, start_step)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        rows = self.rows(epoch)  # labels and sizes of the whole epoch to the device, before the first batch
        plans = self.plan(epoch)
        items = self._items_at(epoch, start_step)
        self._items = None  # unknown until the epoch's last item is taken
        pending = None  # (step, batch in the making) whose tail or copy still reads a ring slot
        try:
            for i in range(start_step, len(plans)):
                raw = next(items)
                if i + 1 == len(plans) and self.train:
                    self._items = ((epoch + 1, 0), items)  # what the workers are already decoding
                if isinstance(raw, str):
                    raise LoaderError(raw)
                slot, p = ring_slot(self._ring, *raw), plans[i]  # its place in the ring (DataLoader makes the tuple a list)
                if self.tail_on_cpu:
                    sizes = zip(p.out_h[: p.real].tolist(), p.out_w[: p.real].tolist())
                    crops = [slot[k, :h, :w] for k, (h, w) in enumerate(sizes)]  # each sample's image, top-left
                    batch = self.cpu_tail(crops, p, flip=False)  # already flipped: not flipped again
                else:
                    batch = self._on_device(slot, rows["sizes"][i] if p.padded else None)
                # Started before the previous batch is awaited, as in the DALI loader: the work goes on while this thread
                # waits for the workers and hands batches over.
                prev, pending = pending, (i, batch)
                self._tail = pending  # for _items_at: the workers must not rewrite the slot before it is read
                if prev is not None:
                    yield self._finish(prev[1](), epoch, prev[0])
            if pending is not None:
                last, pending = pending, None
                batch = last[1]()
                if self._tail is last:
                    self._tail = None
                yield self._finish(batch, epoch, last[0])
        finally:
            self._settle(pending)  # left early: its tail or copy still reads a ring slot that the workers will reuse
            if self._tail is pending:
                self._tail = None  # nothing reads the ring: the batch it made may be freed

    def describe(self) -> str:
        return f"pil ({jpeg_decoder_name()} and PIL decoding, {self.threads} worker process{'es' * (self.threads != 1)})"

    def close(self) -> None:
        """Stop the workers now. Left to the garbage collector, which finds DataLoader's iterator in a reference cycle, the
        iterator's own shutdown asks each worker to stop through a queue whose feeder thread the collector may have
        finalized first, then waits 5 s for it before killing it: 20 s between two runs of a sweep with 2 workers
        per loader, measured here."""
        self._settle(self._tail)
        self._tail, self._items = None, None
        workers = getattr(self._dl, "_iterator", None)  # the persistent workers' iterator that DataLoader keeps
        self._dl = self._ring = None
        if workers is not None:
            workers._shutdown_workers()  # what its __del__ calls, at a moment when its queues are alive
        super().close()

    def _on_device(self, slot: torch.Tensor, sizes: torch.Tensor | None) -> Callable[[], torch.Tensor]:
        """A ring slot's batch on the device: copied off this thread into a new host batch (pinned on a GPU, so that the
        copy to the device runs asynchronously; the pinned block is reused only once that copy is done), then sent to
        the device and normalized there in one kernel (``normalize_batch``). The returned function waits for the copy
        and gives the batch."""
        host = torch.empty(slot.shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        copied = start_copy(slot, host, self._tail_pool)

        def result() -> torch.Tensor:
            copied()
            return normalize_batch(host.to(self.device, non_blocking=True), sizes)

        return result


@functools.lru_cache(maxsize=128)
def _normalize_rows_on(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize_rows on the training device: repeated there from one copy of the 3-vectors per device, so a
    new bucket width costs no host-to-device copy (a copy from pageable memory makes the host wait)."""
    scale, bias = _normalize_rows_on(1, device) if width > 1 else (t.to(device) for t in normalize_rows(1))
    return scale.repeat(width), bias.repeat(width)
