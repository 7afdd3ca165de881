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

from ..config import ConfigError

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
    precision: str = "fp32"  # what choose_precision decided
    precision_reason: str = ""  # and why, for the console and run.json

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


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores and bf16 convolutions in cuDNN


class PrecisionError(ConfigError):
    """A precision this machine cannot train in; refused before the run folder exists."""


def choose_precision(request: str, device: str, capability: tuple[int, int] | None = None,
                     training: bool = True) -> tuple[str, str]:
    """(precision, why) for a run on ``device`` ('cuda' or 'cpu'; ``capability`` is a GPU's compute capability). A pure
    function of the hardware and the request, so that every GPU generation is tested without one.

    'auto': bf16 autocast on a GPU of compute capability 8.0 and up; fp16 autocast with a GradScaler below that (T4 7.5,
    V100 7.0, P100 6.0 have no bf16 tensor cores, and cuDNN no bf16 convolution engines: bf16 convolutions there fail or
    run slower than fp32, while fp16 is what their tensor cores do); fp32 on the CPU. An explicit bf16 on a GPU below 8.0
    is refused, naming fp16. (``torch.cuda.is_bf16_supported()`` answers True on those GPUs: it counts emulation.)
    Evaluating an fp16 run on a machine without a GPU is allowed too: evaluation needs no GradScaler."""
    if request not in PRECISIONS:
        raise PrecisionError(f"precision: {request!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    if device != "cuda":
        if request == "auto":
            return "fp32", "auto on the CPU: fp32 (bf16 and fp16 run there too when asked, slower)"
        return request, "as asked"
    cc = capability or (0, 0)
    native = cc >= BF16_MIN_CAPABILITY
    gpu = f"a GPU of compute capability {cc[0]}.{cc[1]}"
    if request == "auto":
        if native:
            return "bf16", f"auto on {gpu}: bf16 autocast (native bf16 tensor cores)"
        return "fp16", (f"auto on {gpu}: fp16 autocast with a GradScaler (no native bf16 below "
                        f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]})")
    if request == "bf16" and not native and training:
        raise PrecisionError(f"precision=bf16 on {gpu}: it has no bf16 tensor cores and cuDNN no bf16 convolutions below "
                             f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}, so bf16 would fail or run slower than "
                             f"fp32; use precision=fp16 (or auto, which picks it)")
    return request, "as asked"


def ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process: torchrun's environment, or one process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def scheduler_job() -> dict | None:
    """The SLURM job this process runs in: its id (an array task as <array>_<task>) and how many times SLURM has
    requeued it; None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {"job": f"{array}_{task}" if array and task else job, "requeues": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def is_master() -> bool:
    """Whether this process is the one that writes (rank 0), without setting anything up."""
    return ranks()[0] == 0


def setup_runtime(precision: str = "auto", cudnn_benchmark: bool = False, training: bool = True) -> Runtime:
    """Devices, ranks and precision for this process (from torchrun's environment when present)."""
    rank, local_rank, world = ranks()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    p, why = choose_precision(precision, device.type, torch.cuda.get_device_capability(device) if cuda else None, training)
    if cuda:
        torch.cuda.set_device(device)
        # Autotuning pays a kernel search per new batch shape (see TrainConfig.cudnn_benchmark and the warm-up
        # in train.py); TF32 for whatever still runs in fp32.
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=10))
    # fp16's gradients underflow without loss scaling: a GradScaler (on the CPU too, where torch has one), which skips a
    # step whose gradients overflowed and lowers its scale.
    scaler = torch.amp.GradScaler(device.type, enabled=p == "fp16" and training)
    return Runtime(rank, world, local_rank, device, _DTYPES[p], scaler, rank == 0, cuda and cudnn_benchmark,
                   precision=p, precision_reason=why)
