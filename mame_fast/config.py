"""Typed configuration: frozen dataclasses with a doc line per field, YAML overrides, ``--set`` overrides.

Precedence: dataclass defaults < ``configs/X.yaml`` < ``--set a.b=c``. An unknown key anywhere is an
error that lists the valid keys at that level; a choice outside its ``Literal`` or a number outside its
range (``RANGES``) is an error naming the key and what is allowed, raised when the config is built, so a
typo fails before any run folder exists. The resolved config is written into the run folder before
step 0 (``train/loop.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .errors import Expected


class ConfigError(Expected, ValueError):
    pass


# Valid ranges of numeric fields, by key: (low, high, low_open, high_open); None is unbounded.
RANGES: dict[str, tuple] = {
    "data.batch_size": (1, None, False, False), "data.crop": (8, None, False, False), "data.pixels": (64, None, False, False),
    "data.buckets": (1, None, False, False), "data.side_multiple": (1, None, False, False), "data.scale_min": (0, 1, True, False),
    "data.color_jitter": (0, 1, False, True), "data.eval_crop_fraction": (0, 1, True, False),
    "data.threads": (0, None, False, False), "data.prefetch": (1, None, False, False),
    "data.pixels_start": (0, None, False, False), "data.crop_start": (0, None, False, False),
    "data.ramp_start": (0, None, False, False), "data.ramp_end": (0, None, False, False),
    "data.ramp_levels": (2, None, False, False),
    "eval.pixels": (0, None, False, False), "eval.crop": (0, None, False, False),
    "optim.lr": (0, None, True, False), "optim.momentum": (0, 1, False, True), "optim.weight_decay": (0, None, False, False),
    "optim.warmup_epochs": (0, None, False, False), "optim.label_smoothing": (0, 1, False, True),
    "optim.mixup": (0, None, False, False), "optim.cutmix": (0, None, False, False), "optim.clip_grad": (0, None, False, False),
    "optim.ema": (0, 1, False, True),
    "epochs": (1, None, False, False), "log_every": (1, None, False, False), "eval_every": (1, None, False, False),
    "max_steps": (0, None, False, False), "hist_epochs": (0, None, False, False), "ckpt_every_min": (0, None, False, False),
    "slurm.signal_s": (0, None, False, False), "slurm.gpus": (0, None, False, False), "slurm.nodes": (1, None, False, False),
    "slurm.tasks_per_node": (1, None, False, False), "slurm.cpus_per_task": (1, None, False, False),
}
# SLURM's wall-clock formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")


def _in_range(key: str, v) -> None:
    lo, hi, lo_open, hi_open = RANGES[key]
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        left = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}"
        span = f"{left}, {'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
        raise ConfigError(f"{key}: {v!r} is out of range; it must lie in {span}")


class _Checked:
    """Checks choices (``Literal`` fields) and ranges when an instance is made, naming the key."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, v = f"{self._section}{f.name}", getattr(self, f.name)
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if choices and v not in choices:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(repr, choices))}")
            if key in RANGES:
                _in_range(key, v)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class DataConfig(_Checked):
    _section: ClassVar[str] = "data."
    shards: str = "shards/full"
    """Shard folder (with manifest.json) made by `mame-fast shard`."""
    res: Literal["256", "full"] = "256"
    """'256': fixed square crops of ``data.crop`` px (named after the official 256x256 release; shards of either variant
    serve it); 'full': variable-shape batches, each image at about ``data.pixels`` px in aspect-ratio buckets, never
    squashed (needs shards made with --res full)."""
    loader: Literal["auto", "dali", "pil"] = "auto"
    """'dali', 'pil' (fallback: PIL + torch DataLoader), or 'auto' (DALI when installed)."""
    batch_size: int = 32
    """Images per batch per rank."""
    crop: int = 224
    """Side of the square crops in res=256 mode, in pixels: the model sees crop x crop images."""
    pixels: int = 360_000
    """Pixel budget per image in res=full mode: each bucket has about this many pixels (360,000 is about 600x600)."""
    pixels_start: int = 0
    """res=full: the training budget of the first epochs, growing to ``data.pixels`` from epoch ``data.ramp_start`` to
    ``data.ramp_end`` (0: ``data.pixels`` from the first epoch). Progressive resizing: early epochs learn coarse
    features from few pixels, at a fraction of the cost (docs/training.md)."""
    crop_start: int = 0
    """res=256: the training crop side of the first epochs, growing to ``data.crop`` over the same ramp (0: no ramp)."""
    ramp_start: int = 0
    """The epoch (counted from 0) where the ramp starts: up to it, the budget is ``pixels_start`` / ``crop_start``."""
    ramp_end: int = 0
    """The epoch from which the training budget is ``data.pixels`` / ``data.crop``; in between it grows in side length."""
    ramp_levels: int = 4
    """How many budgets the ramp takes, its start and end included: each has its own fixed set of batch shapes."""
    buckets: int = 20
    """Number of aspect-ratio buckets in res=full mode, between 1:4 and 4:1 (fewer if some round to one shape)."""
    side_multiple: int = 32
    """Bucket sides are multiples of this (res=full); the model's total stride must divide it."""
    scale_min: float = 0.35
    """Training crops cover a random fraction in [scale_min, 1] of the largest crop of the bucket's shape."""
    flip: bool = True
    """Random horizontal flips in training."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation factors drawn from [1-j, 1+j] in training (0: off)."""
    eval_crop_fraction: float = 0.875
    """res=256 evaluation: centre square of this fraction of the short side (224/256)."""
    threads: int = 0
    """DALI threads / DataLoader workers per rank (0: the cores this rank may use, input/loader.py ``rank_cores``)."""
    prefetch: int = 4
    """Batches the loader prepares ahead (DALI prefetch queue depth; DataLoader prefetch factor)."""
    start_method: Literal["auto", "fork", "spawn", "forkserver"] = "auto"
    """How the fallback loader starts its worker processes: 'auto' (the platform's default: fork on Linux up to Python
    3.13, forkserver from 3.14, spawn on macOS and Windows), or one of Python's multiprocessing start methods."""
    decode: Literal["auto", "gpu", "cpu"] = "auto"
    """Where DALI decodes JPEGs on a GPU machine: 'gpu' (nvJPEG), 'cpu' (DALI's threads, leaving the GPU to training) or
    'auto': 'cpu' at res=full, where training keeps the GPU busy, 'gpu' at res=256, where the host is the bottleneck."""
    channels_last: bool = True
    """Hand batches over in channels-last memory format."""

    @property
    def budget_key(self) -> str:
        """What a budget per image is at this resolution: ``pixels`` (res=full) or the ``crop`` side (res=256)."""
        return "pixels" if self.res == "full" else "crop"

    @property
    def budget(self) -> dict[str, int]:
        """The budget per image this config trains at: ``{"pixels": n}`` or ``{"crop": side}``."""
        return {self.budget_key: getattr(self, self.budget_key)}

    @property
    def ramped(self) -> bool:
        """The training budget follows a schedule (``pixels_start`` at full resolution, ``crop_start`` at 256)."""
        return bool(getattr(self, f"{self.budget_key}_start"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, start, final in (("pixels", self.pixels_start, self.pixels), ("crop", self.crop_start, self.crop)):
            if start and start > final:
                raise ConfigError(f"data.{key}_start: {start} is above data.{key} ({final}); the budget grows to data.{key}")
        if self.ramped and self.ramp_end < self.ramp_start:
            raise ConfigError(f"data.ramp_end: {self.ramp_end} is before data.ramp_start ({self.ramp_start})")


@dataclass(frozen=True)
class EvalConfig(_Checked):
    _section: ClassVar[str] = "eval."
    pixels: int = 0
    """res=full: the budget per image of validation and the test (0: ``data.pixels``). A network trained on random
    crops scores best evaluated a little larger (FixRes): `mame-fast evaluate RUN --pixels ...` measures some."""
    crop: int = 0
    """res=256: the side of the evaluation crop (0: ``data.crop``)."""


@dataclass(frozen=True)
class OptimConfig(_Checked):
    _section: ClassVar[str] = "optim."
    name: Literal["sgd", "adamw"] = "sgd"
    """'sgd' (Nesterov momentum) or 'adamw'."""
    lr: float = 0.1
    """Peak learning rate per 256 images (scaled linearly to the global batch size)."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-5
    """Applied to conv/linear weights only, never to norms and biases."""
    warmup_epochs: float = 1.0
    """Linear warm-up from 0 to the peak, in epochs."""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    """'cosine' (to 0 after warm-up), 'onecycle' (linear up, cosine down) or 'constant'."""
    label_smoothing: float = 0.1
    """Share of the target spread evenly over all classes (0: one-hot targets)."""
    mixup: float = 0.0
    """Mixup Beta(a, a) parameter (0: off)."""
    cutmix: float = 0.0
    """CutMix Beta(a, a) parameter (0: off). With both on, each batch picks one at random."""
    clip_grad: float = 0.0
    """Clip the gradient norm to this value (0: off)."""
    ema: float = 0.0
    """EMA decay of the weights per step (0: off), e.g. 0.999."""


@dataclass(frozen=True)
class SlurmConfig(_Checked):
    _section: ClassVar[str] = "slurm."
    partition: str = ""
    """SLURM partition (#SBATCH --partition); empty: the cluster's default."""
    account: str = ""
    """Account to charge (#SBATCH --account); empty: your default."""
    qos: str = ""
    """Quality of service (#SBATCH --qos); empty: the default."""
    time: str = "02:00:00"
    """Wall-clock limit of one job (HH:MM:SS, MM, D-HH:MM...; quote it in YAML: "12:00:00"); a run that needs longer is
    requeued and resumes."""
    signal_s: int = 300
    """Seconds before the limit at which SLURM sends SIGUSR1: the run saves last.pt, exits 3 and is requeued."""
    gpus: int = 1
    """GPUs per node (#SBATCH --gres=gpu:N); 0: none (a CPU cluster, the tests)."""
    nodes: int = 1
    """Nodes of one run (#SBATCH --nodes)."""
    tasks_per_node: int = 1
    """Training processes per node, one per GPU (ranks from SLURM_PROCID, started by srun)."""
    cpus_per_task: int = 8
    """CPU cores per training process, for its loader (#SBATCH --cpus-per-task)."""
    setup: tuple[str, ...] = ()
    """Shell lines the job runs first: `module load ...`, `source .venv/bin/activate`."""
    python: str = ""
    """The Python that runs mame-fast in the job; empty: the one that submitted it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not SLURM_TIME.fullmatch(self.time):
            raise ConfigError(f"slurm.time: {self.time!r} is not a SLURM time limit (HH:MM:SS, MM, MM:SS or D-HH:MM:SS)")


@dataclass(frozen=True)
class TrainConfig(_Checked):
    model: str = "tiny"
    """Model spec: a name in configs/models/ or a path to a YAML spec."""
    epochs: int = 10
    """Passes over the training split."""
    seed: int = 0
    """Seeds the plan (order, crops, flips), the weights' initialization and dropout."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp16' (with GradScaler) or 'fp32'."""
    compile: bool = False
    """torch.compile the model (compiled at its first step; evaluation runs it uncompiled)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    """torch.compile's mode when ``compile`` is on. 'reduce-overhead' replays the forward and backward as CUDA graphs,
    one per batch shape: their Python and kernel-launch work leaves the host, for a step that is host-bound (a small
    model at 256 on a GPU, README "On a GPU"). Not yet timed on a GPU; under torchrun, run on CPUs only (gloo, DDP).
    Without CUDA it runs as 'default'."""
    cuda_graphs: bool = False
    """Capture the step's forward, backward and clipping by hand as one CUDA graph per batch shape and replay it
    (``train/step.py`` StepGraphs): the host launches one graph instead of ~250 operations, for a host-bound step,
    and nothing is compiled (a shape costs 2 eager steps and one capture). One process, bf16 or fp32, compile off.
    Not yet timed on a GPU. Without CUDA the same buffers and step run uncaptured."""
    cudnn_benchmark: bool = False
    """cuDNN autotuning on GPU: a kernel search for every new batch shape (see benchmarks/results for the measured trade)."""
    warmup: Literal["auto", "always", "never"] = "auto"
    """Forward and backward once per batch shape before step 0: 'auto' (when cudnn_benchmark is on), 'always', 'never'."""
    sync_bn: bool = False
    """SyncBatchNorm across ranks."""
    log_every: int = 10
    """Steps between progress updates (the only place the loop syncs with the device)."""
    eval_every: int = 1
    """Validate every this many epochs (and always after the last)."""
    max_steps: int = 0
    """Stop after this many steps in total (0: no limit); for smoke tests and benchmarks."""
    ckpt_every_min: float = 0.0
    """Also write a resumable last.pt every this many minutes inside an epoch (0: only at epoch ends)."""
    out: str = "runs"
    """Folder that holds the run folders."""
    record_samples: bool = False
    """Write each rank's per-epoch sample indices and final weights digest to rank<r>.json (checks)."""
    hist_epochs: int = 3
    """Save weight and activation histograms per stage at this many epochs (first, ..., last)."""
    evidence: bool = True
    """Draw the evidence pictures into plots/: the batches as fed (when the run starts), and from the best weights
    (when it ends) the error gallery and the class activation maps (records/evidence.py)."""
    tensorboard: bool = False
    """Also log scalars, histograms and plots to TensorBoard (<run>/tb; needs `pip install tensorboard`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, resolution and input pipeline."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule and regularization."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The budget at which validation and the test look (res=full pixels, res=256 crop)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """How `train --slurm` and `sweep --slurm` submit the run to a SLURM cluster (docs/training.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compile_mode != "default" and not self.compile:  # else the run would be eager, and look compiled
            raise ConfigError(f"compile_mode: {self.compile_mode!r} has no effect without compile=true; set compile=true too")
        if self.cuda_graphs and self.compile:
            raise ConfigError("cuda_graphs=true and compile=true both capture the step; for torch.compile's CUDA graphs "
                              "set compile_mode=reduce-overhead and cuda_graphs=false")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if origin is Literal:
        return str(value) if all(isinstance(a, str) for a in typing.get_args(tp)) and isinstance(value, (int, float)) else value
    if origin is tuple:  # tuple[X, ...]: each item as an X; one string given with --set is one item (a setup line)
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, key) for v in ([value] if isinstance(value, str) else value or ()))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value in (None, "none", "None") else _coerce(value, args[0], key)
    return value


def merge(cfg, overrides: dict, prefix: str = ""):
    """A copy of dataclass ``cfg`` with ``overrides`` (nested dicts) applied; unknown keys are errors."""
    hints = typing.get_type_hints(type(cfg))
    fields = _fields(type(cfg))
    changes = {}
    for k, v in (overrides or {}).items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}")
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give keys under it ({', '.join(sorted(_fields(type(cur))))})")
            changes[k] = merge(cur, v, f"{key}.")
        else:
            changes[k] = _coerce(v, hints[k], key)
    return dataclasses.replace(cfg, **changes)


def parse_sets(sets: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': '1'}, 'c': 'x'}; values are YAML scalars."""
    out: dict = {}
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        node = out
        parts = k.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {s}: the value is not valid YAML; quote it (--set '{k}=\"{v}\"')") from None
    return out


def read_yaml(path: Path):
    """The YAML document in ``path``; a syntax error is a ConfigError naming the file, line and column."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML ({problem})") from None


def shipped(name: str) -> Path:
    """A file of the configs that ship with the package (``configs/`` in the repository): ``demo.yaml``,
    ``models/tiny.yaml``. Found through importlib.resources, so an installed wheel has them too."""
    from importlib import resources

    try:
        return Path(str(resources.files("mame_fast.configs") / name))
    except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed (the GPU machine): the folder beside the package
        return Path(__file__).resolve().parent.parent / "configs" / name


def load(path: str | Path | None = None, sets: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) < the YAML at ``path`` (a file, or the name of a shipped config: ``full``)
    < ``sets`` (``["optim.lr=0.05", ...]``)."""
    cfg = base or TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file() and not p.suffix and shipped(f"{p.name}.yaml").is_file():
            p = shipped(f"{p.name}.yaml")
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        data = read_yaml(p)
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        try:
            cfg = merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    return merge(cfg, parse_sets(sets or []))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> Path:
    """A config (or a model spec), as a dict or a dataclass, written as YAML that ``load`` reads back; published
    atomically."""
    from .files import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """Flat {key: (a, b)} of the leaves that differ between two config dicts."""
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out[f"{prefix}{k}"] = (va, vb)
    return out


# -- the reference of every key, from the field docs (docs/configuration.md) -----------------------------------


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (the string literal after it), read from the
    source: the one text that both the code and docs/configuration.md show, so the two cannot drift."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: inspect.cleandoc(b.value.value) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def keys(cls=None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every settable key of a config dataclass, dotted (``data.res``), in declaration order; sections are not keys."""
    out = {}
    for f in dataclasses.fields(cls or TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(keys(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def reference_table(cls, prefix: str = "") -> list[str]:
    """Markdown rows ``| key | default | allowed | what it does |`` for every key of ``cls`` and its sections."""
    rows = []
    hints = _hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += reference_table(type(default), f"{prefix}{f.name}.")
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal:
            allowed = ", ".join(f"`{a}`" for a in typing.get_args(tp))
        elif key in RANGES:
            lo, hi, lo_open, hi_open = RANGES[key]
            allowed = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                       f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
        else:
            allowed = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | `{default!r}` | {allowed} | {doc} |")
    return rows
