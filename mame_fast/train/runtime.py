"""Stage 3b: the one place that decides devices, ranks and precision, for training and evaluation alike.

Everything that runs the model (the training step, validation, EMA evaluation, histograms, ``mame-fast
test``) takes its autocast context from ``Runtime.autocast()``, so a GPU run and a CPU run with
``precision=bf16`` go through the same dtype path: the loader hands over batches in the autocast dtype,
and a model run outside autocast on such a batch fails (weights fp32, input bf16).

Distributed setup comes only from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = fp32
    scaler: torch.amp.GradScaler
    master: bool
    cudnn_benchmark: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the loader hands batches over in: the autocast dtype, else float32."""
        return self.amp_dtype or torch.float32

    def autocast(self, cache: bool = True):
        """The autocast context for running the model (a no-op context for fp32). ``cache=False`` for a CUDA graph's
        capture: autocast's cache of low-precision weight copies would outlive the capture that made them."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache)

    def synchronize(self) -> None:
        """Wait for the device (timing only: never in the training step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- across ranks (each a no-op in one process) ----------------------------------------------------

    def any(self, flags: list[bool]) -> list[bool]:
        """Whether each flag is set on any rank (one all-reduce), so that all ranks take the same branch."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def all_reduce(self, *tensors: torch.Tensor) -> None:
        """Sum tensors over ranks, in place."""
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, *models: torch.nn.Module) -> None:
        """Broadcast BatchNorm running statistics from rank 0. DDP only does so at the start of each forward, so after
        an epoch every rank holds the statistics of its own last batch: validation and checkpoints would differ."""
        if self.world > 1:
            for m in models:
                for b in m.buffers():
                    dist.broadcast(b, 0)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_precision(precision: str, cuda: bool, training: bool = True) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU. fp16 needs a GPU to train (GradScaler); to evaluate an fp16 run
    on a machine without one, fp32 is used (evaluation needs no scaler)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    if precision == "fp16" and not cuda:
        if training:
            raise ValueError("precision=fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU")
        return "fp32"
    return precision


def setup_runtime(precision: str = "auto", cudnn_benchmark: bool = False, training: bool = True) -> Runtime:
    """Devices, ranks and precision for this process (from torchrun's environment when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    p = resolve_precision(precision, cuda, training)
    if cuda:
        torch.cuda.set_device(device)
        # Autotuning pays a kernel search per new batch shape (see TrainConfig.cudnn_benchmark and the warm-up
        # in train.py); TF32 for whatever still runs in fp32.
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=10))
    scaler = torch.amp.GradScaler(device.type, enabled=p == "fp16")
    return Runtime(rank, world, local_rank, device, _DTYPES[p], scaler, rank == 0, cuda and cudnn_benchmark)
