"""Stage 4e: the training loop, in one process or under torchrun (one or many nodes).

``run`` reads top to bottom: build everything that can fail on bad input (``build``), then open the run
folder (``start``: a new one, or the one being resumed), then ``train``: for each epoch, ``train_epoch``,
then ``end_epoch`` (validate, keep the best weights, checkpoint, record). Why the loop stopped is the
value it returns. Distributed setup comes only from torchrun's environment (``runtime.py``); only rank 0
writes; every rank runs the same steps (``input/plan.py``), and all ranks agree at log steps, the loop's
only host sync, on whether to stop (a step limit, a signal, a non-finite loss) or to checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import ConfigError, TrainConfig, diff, load, to_dict
from ..input import Loader, budget_at, build_loader, validation_data
from ..input.mixing import step_rng
from ..records import evidence, records
from ..records.live import Progress, TensorBoard
from ..records.plots import plot_run
from ..records.rundir import RunDir
from ..records.runrecord import RunRecord
from . import checkpoint as ckpt
from .evaluate import evaluate
from .model import build as build_model
from .model import for_evaluation, summary_rows
from .runtime import Runtime, scheduler_job, setup_runtime
from .spec import ModelSpec, check_for_data, load_spec, spec_dict
from .step import Ema, EpochMeter, StepGraphs, make_optimizer, make_schedule, train_step, warm_up


class Stop(str, Enum):
    FINISHED = "finished"
    STOPPED = "stopped"  # max_steps reached
    INTERRUPTED = "interrupted"  # SIGINT, SIGTERM or SIGUSR1: a resumable checkpoint was written


class TrainingDiverged(RuntimeError):
    run_status = "diverged"  # what the run record writes when it ends the run


@dataclass
class Session:
    """Everything a run uses, built before its folder exists."""

    cfg: TrainConfig
    rt: Runtime
    spec: ModelSpec
    train_loader: Loader
    val_loader: Loader
    classes: list[str]
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    ema: object | None
    opt: torch.optim.Optimizer
    state: ckpt.TrainState
    sched: object = None
    saved_at: float = field(default_factory=time.monotonic)
    seen: list[list[int]] = field(default_factory=list)  # sample indices per epoch (record_samples)
    compile_watch: CompileWatch | None = None  # with compile=true: what torch.compile did, for run.json
    graphs: StepGraphs | None = None  # with cuda_graphs=true: the step's captured graphs
    reported: dict[str, dict] = field(default_factory=dict)  # what report_changed last wrote to run.json, per key
    notices: list[str] = field(default_factory=list)  # said when training starts (what a resume repaired)
    record: RunRecord | None = None  # the run folder's life: lock, status, heartbeat (set by start)

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.rt.world

    def close(self) -> None:
        """The loaders' workers and pipelines end with the run, not whenever the garbage collector finds them."""
        self.train_loader.close()
        self.val_loader.close()


def run(cfg: TrainConfig, name: str = "run", resume: Path | None = None, meta: dict | None = None, console=None,
        on_start=None) -> Path:
    """Train per ``cfg``; returns the run folder, whose run.json says how the run ended. ``resume``: a run folder
    to continue exactly where its last.pt stopped. ``on_start(folder)`` is called once the folder exists (the
    caller writes the card, whatever happens next). Raises TrainingDiverged on a non-finite loss."""
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever happens
        rt = setup_runtime(cfg.precision, cfg.cudnn_benchmark)
        cleanup.callback(rt.close)
        # From here on a stop signal sets a flag that the loop reads, also while the loaders and the model are built.
        signalled = cleanup.enter_context(signal_flag())
        # A resume takes the folder first: a second trainer of a live run is refused before the seconds of building.
        resumed = RunRecord.reopen(resume, "train", rt.master) if resume else None
        if resumed is not None:
            cleanup.callback(resumed.release)
        s = build(cfg, rt)
        cleanup.callback(s.close)
        with start(s, name, resumed, meta or {}) as record:
            if on_start is not None:
                on_start(record.path)
            try:
                record.finish(train(s, record.dir, console, signalled).value)
            finally:
                record_samples(s, record.dir)
        return record.path


def budget_schedule(cfg: TrainConfig, loader: Loader) -> list[dict]:
    """The training budgets of a ramped run, each with the epochs it serves (1-based, as the log counts) and its batch
    shapes, all known before step 0 (run.json's ``budget_schedule``)."""
    phases: list[dict] = []
    for e in range(cfg.epochs):
        value = budget_at(cfg.data, e).budget
        if phases and {k: phases[-1][k] for k in value} == value:
            phases[-1]["epochs"][1] = e + 1
        else:
            phases.append({**value, "epochs": [e + 1, e + 1], "shapes": loader.shapes(e), "steps": loader.steps(e)})
    return phases


def build(cfg: TrainConfig, rt: Runtime) -> Session:
    """The model spec, both loaders (their shards checked), the model, optimizer and EMA: whatever can fail on bad
    config or data fails here, before a run folder exists."""
    spec = load_spec(cfg.model)
    check_for_data(spec, cfg)
    torch.manual_seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)
    train_loader = build_loader(cfg.data, "train", True, cfg.seed, rt.rank, rt.world, rt.device, rt.dtype)
    val_loader = build_loader(validation_data(cfg), "val", False, cfg.seed, rt.rank, rt.world, rt.device, rt.dtype)
    classes = train_loader.split.classes
    spec = replace(spec, num_classes=len(classes))
    model = build_model(spec).to(rt.device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and rt.world > 1:
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    ema = None
    if cfg.optim.ema:
        ema = Ema(model, decay=cfg.optim.ema)
    net = model
    if rt.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    watch = CompileWatch(cfg.compile_mode) if cfg.compile else None
    net = compiled(net, cfg)
    opt = make_optimizer(model, cfg, cfg.data.batch_size * rt.world)
    graphs = StepGraphs(net, opt, rt, cfg.optim.clip_grad) if cfg.cuda_graphs else None
    state = ckpt.TrainState(model, opt, rt.scaler, ema, EpochMeter(rt.device, rt.scaler.is_enabled()))
    return Session(cfg, rt, spec, train_loader, val_loader, classes, model, net, ema, opt, state, compile_watch=watch,
                   graphs=graphs)


def compiled(net: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The module the training step runs: ``net`` itself, or torch.compile's wrapper in ``cfg.compile_mode``, which
    compiles at its first step and again when a new batch shape needs it (with CUDA graphs: one graph per shape)."""
    return torch.compile(net, mode=cfg.compile_mode) if cfg.compile else net


@functools.lru_cache(maxsize=1)
def _cudagraph_skips() -> list[str]:
    """Every message in which inductor says it skips CUDA graphs, in this process. Its "cudagraphs" log is on by
    default and reaches the "torch._inductor" logger; without this it would only be a line on stderr."""
    skipped: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (msg := record.getMessage().strip()).startswith("skipping cudagraphs"):  # inductor's wording, e.g.
                skipped.append(msg)  # "skipping cudagraphs due to mutated inputs (2 instances)"

    logging.getLogger("torch._inductor").addHandler(Keep(logging.WARNING))
    return skipped


class CompileWatch:
    """What torch.compile did since the watch started: graphs compiled (one per batch shape, one more per
    recompilation) and, in the modes with CUDA graphs (reduce-overhead, max-autotune), compilations that run without
    them, with inductor's reasons (it gives them for GPU graphs; on a CPU there are none to skip and it counts them
    silently). A user who asked for CUDA graphs can see in run.json whether they run. Counted from the start, so
    that runs sharing a process (a sweep, the tests) each get their own figures."""

    def __init__(self, mode: str):
        from torch._dynamo.utils import counters  # loaded by torch.compile anyway

        self.mode, self.counters, self.reasons = mode, counters, _cudagraph_skips()
        self.start = (counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"], len(self.reasons))

    def summary(self) -> dict:
        graphs, skips, reasons = self.start
        return {"mode": self.mode, "graphs": self.counters["stats"]["unique_graphs"] - graphs,
                "cudagraph_skips": self.counters["inductor"]["cudagraph_skips"] - skips,
                "cudagraph_skip_reasons": sorted(set(self.reasons[reasons:]))}

    @staticmethod
    def describe(c: dict) -> str:
        line = f"compiled in mode {c['mode']}: {c['graphs']} graph{'s' * (c['graphs'] != 1)}"
        if c["mode"] in ("reduce-overhead", "max-autotune"):  # the modes that use CUDA graphs
            line += f"; CUDA graphs skipped in {c['cudagraph_skips']} compilation{'s' * (c['cudagraph_skips'] != 1)}"
            if c["cudagraph_skip_reasons"]:
                line += ": " + "; ".join(c["cudagraph_skip_reasons"])
            elif c["cudagraph_skips"]:
                line += " (no reason logged: inductor gives one for GPU graphs only)"
        return line


def report_changed(s: Session, run_dir: RunDir, progress: Progress, key: str, now: dict, describe) -> None:
    """``now`` into run.json under ``key`` and ``describe(now)`` onto the console, when it changed since the last
    report: what torch.compile compiled, or which shapes the step's CUDA graphs captured (the first epoch, a resume)."""
    if s.reported.get(key) != now:
        s.reported[key] = now
        records.update_run_info(run_dir, {key: now})
        progress.say(describe(now))


def start(s: Session, name: str, resumed: RunRecord | None, meta: dict) -> RunRecord:
    """The run's record: a new folder with the resolved config, or the resumed one with its state loaded and the
    overrides of this resume recorded; then marked running, on this machine."""
    cfg, rt = s.cfg, s.rt
    if resumed is not None:
        record = resumed
        state = ckpt.load(record.dir / RunDir.LAST, rt.device)
        check_resumable(state, s, record.dir)
        s.state.restore(state, rt.rank)
        if rt.master:
            if (cut := records.repair_jsonl(record.dir / RunDir.METRICS)) is not None:
                s.notices.append(f"{record.dir / RunDir.METRICS}: cut a torn last line (a crash while it was written): "
                                 f"{cut[:60]!r}")
            record_resume(record, cfg)
    else:
        shapes = {"train": s.train_loader.shapes(), "val": s.val_loader.shapes()}
        made = RunRecord.create(cfg.out, name, to_dict(cfg), spec_dict(s.spec), {
            **meta, "world_size": rt.world, "device": str(rt.device), "version": __version__, "torch": torch.__version__,
            "classes": s.classes, "train_samples": len(s.train_loader.split), "batch_shapes": shapes,
            "shape_count": {k: len(v) for k, v in shapes.items()}, "flops": model_cost(s.spec, cfg.data),
            **({"budget_schedule": budget_schedule(cfg, s.train_loader)} if cfg.data.ramped else {})}) \
            if rt.master else None
        path = rt.broadcast(str(made.path) if made else None)
        record = made or RunRecord(path, master=False)
    # What this process runs on (a resume may run on another machine, in another precision or loader).
    record.start({"device": str(rt.device), "precision": {"chosen": rt.precision, "why": rt.precision_reason},
                  "loader": {"chosen": s.train_loader.describe(), "why": s.train_loader.why},
                  **({"slurm": job} if (job := scheduler_job()) else {})})  # its job, and how often SLURM requeued it
    record.on_end = lambda: best_facts(s.state)
    s.record = record
    s.sched = make_schedule(s.opt, cfg, [s.train_loader.steps(e) for e in range(cfg.epochs)], s.global_batch,
                            start_step=s.state.global_step)
    return record


def model_cost(spec: ModelSpec, data) -> dict:
    """Forward FLOPs per image at the run's crop and at its full-resolution budget, for the card and the diagnosis."""
    r = summary_rows(spec, data.crop, data.pixels)
    return {"crop": r["flops_256"], "full": r["flops_full"], "full_pixels": data.pixels}


def check_resumable(state: dict, s: Session, run_dir: RunDir) -> None:
    """A resume continues the network and classes of its checkpoint: a different model spec or class list would fail
    deep inside load_state_dict (a size mismatch), or worse, load and train on mislabelled outputs."""
    last = run_dir / RunDir.LAST
    if state["spec"] != spec_dict(s.spec):
        changed = diff(state["spec"], spec_dict(s.spec))
        changes = "; ".join(f"{k}: {_brief(a)} -> {_brief(b)}" for k, (a, b) in list(changed.items())[:3]) + \
            (f"; {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{last}: its model spec differs from model={s.cfg.model} ({changes}). A resume continues the "
                          f"same network: drop the model change, or start a new run (--after {run_dir.number})")
    if state["classes"] != s.classes:
        raise ConfigError(f"{last}: its {len(state['classes'])} classes differ from the {len(s.classes)} of "
                          f"{s.cfg.data.shards}. A resume trains on the same classes: use the shards it was trained on")


def _brief(v, width: int = 40) -> str:
    s = str(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def record_resume(record: RunRecord, cfg: TrainConfig) -> None:
    """config.yaml becomes the config now in effect; run.json keeps what each resume changed (when, key, from, to)."""
    old = to_dict(load(record.dir / RunDir.CONFIG))
    changes = {k: [a, b] for k, (a, b) in diff(old, to_dict(cfg)).items()}
    record.update({"resumes": record.info().get("resumes", []) + [{"time": records.now(), "changes": changes}]})
    if changes:
        record.write_config(to_dict(cfg))


def train(s: Session, run_dir: RunDir, console, signalled) -> Stop:
    """For each epoch: train it, then validate, checkpoint and record it. Stops early at a step limit or a signal
    (saving a resumable checkpoint inside the epoch, or at an epoch's start for a signal that came while the run was
    set up or validated), or raises on a non-finite loss."""
    cfg, rt, st = s.cfg, s.rt, s.state
    progress = Progress(rt.master, console, cfg.epochs, [s.train_loader.steps(e) for e in range(cfg.epochs)])
    tb = TensorBoard(run_dir.path if cfg.tensorboard and rt.master else None)
    shapes = (s.train_loader.shapes(), s.val_loader.shapes())
    for notice in [f"precision {rt.precision}: {rt.precision_reason}",
                   f"loader {s.train_loader.describe()}: {s.train_loader.why}", *s.notices]:
        progress.say(notice)
    every = "over the budget schedule" if cfg.data.ramped else "the same in every epoch"
    progress.say(f"batch shapes (rows x height x width), {every}: training {describe_shapes(shapes[0])}; "
                 f"validation {describe_shapes(shapes[1])} (cuDNN autotuning {'on' if rt.cudnn_benchmark else 'off'})")
    if st.epoch < cfg.epochs:  # the loader's start-up and first batches overlap with the warm-up
        s.train_loader.prime(st.epoch, st.step)
    if cfg.warmup == "always" or (cfg.warmup == "auto" and rt.cudnn_benchmark):
        cost = warm_up(s.model, *shapes, rt)
        progress.say(f"warm-up: {cost:.2f} s for {len(shapes[0]) + len(shapes[1])} shapes")
        if rt.master:
            records.update_run_info(run_dir, {"warmup_s": cost})
    if rt.master and cfg.evidence and st.global_step == 0:
        tb.images(record_batches(s, run_dir, progress))
    # One validation batch, taken once and kept for every epoch's histograms (taking it later restarts the pipeline).
    hist_batch = next(iter(s.val_loader.epoch(0))) if rt.master and cfg.hist_epochs > 0 else None
    try:
        while st.epoch < cfg.epochs:
            if rt.any([signalled()])[0]:  # a signal while the run was set up or validated: stop at the epoch's start
                save_last(s, run_dir)
                return Stop.INTERRUPTED
            stop = train_epoch(s, run_dir, progress, tb, signalled)
            if stop is not Stop.FINISHED and st.step < s.train_loader.steps(st.epoch):  # left inside the epoch
                save_last(s, run_dir)
                return stop
            end_epoch(s, run_dir, progress, tb, hist_batch, last=stop is not Stop.FINISHED)
            if stop is not Stop.FINISHED:
                return stop
        if rt.master:
            tb.images(plot_run(run_dir.path, s.classes) + record_evidence(s, run_dir, progress))
        return Stop.FINISHED
    finally:
        progress.close()
        tb.close()


def record_batches(s: Session, run_dir: RunDir, progress: Progress) -> list[Path]:
    """What the network is fed (plots/batches.png), when a run starts; its cost into run.json."""
    t = time.perf_counter()
    path = evidence.preview(s.cfg, run_dir.plot(RunDir.BATCHES), s.rt.device, s.rt.dtype)
    seconds = time.perf_counter() - t
    records.update_run_info(run_dir, {"evidence_s": {"batches": round(seconds, 2)}})
    progress.say(f"what the network is fed: {path} ({seconds:.1f} s)")
    return [path]


def record_evidence(s: Session, run_dir: RunDir, progress: Progress) -> list[Path]:
    """The error gallery and class activation maps of best.pt's weights over the whole validation split (rank 0; with
    one process its own validation loader), into plots/; their cost into run.json."""
    best = run_dir / RunDir.BEST
    if not (s.cfg.evidence and best.is_file()):
        return []
    t = time.perf_counter()
    model = for_evaluation(s.spec, ckpt.load(best, s.rt.device)["model"], s.rt.device, s.cfg.data.channels_last)
    val = s.val_loader if s.rt.world == 1 else build_loader(validation_data(s.cfg), "val", False, s.cfg.seed,
                                                             device=s.rt.device, dtype=s.rt.dtype)
    try:
        paths = evidence.write_run_evidence(model, val, s.rt, s.classes, run_dir / RunDir.PLOTS)
    finally:
        if val is not s.val_loader:
            val.close()
    seconds = time.perf_counter() - t
    info = records.read_run_info(run_dir)
    records.update_run_info(run_dir, {"evidence_s": {**info.get("evidence_s", {}), "errors_and_maps": round(seconds, 2)}})
    progress.say(f"where it errs and where it looks: {', '.join(str(p) for p in paths)} ({seconds:.1f} s)")
    return paths


def describe_shapes(shapes: list[tuple[int, int, int]]) -> str:
    """'3: 32x448x800, 32x512x704, 32x608x608', widest first."""
    return f"{len(shapes)}: " + ", ".join(f"{n}x{h}x{w}" for n, h, w in sorted(shapes, key=lambda s: s[1] / s[2]))


def train_epoch(s: Session, run_dir: RunDir, progress: Progress, tb: TensorBoard, signalled) -> Stop:
    """Steps from the state's position to the end of the epoch; at log steps, ``check_in``."""
    cfg, rt, st = s.cfg, s.rt, s.state
    steps = s.train_loader.steps(st.epoch)
    s.model.train()
    batches = iter(s.train_loader.epoch(st.epoch, st.step))
    seen: list[int] = []
    while (batch := st.meter.next(batches)) is not None:
        rng = step_rng(cfg.seed, st.epoch, st.step, rt.rank)  # mixup draws: no state to resume
        st.meter.add(*train_step(s.net, batch, s.opt, s.sched, s.ema, rt, cfg, rng, s.graphs), batch.real)
        seen += batch.index.tolist() if cfg.record_samples else []
        st.step, st.global_step = st.step + 1, st.global_step + 1
        at_limit = bool(cfg.max_steps) and st.global_step >= cfg.max_steps
        if st.step % cfg.log_every == 0 or st.step == steps or at_limit:
            stop = check_in(s, run_dir, progress, tb, signalled(), at_limit)
            if stop is not Stop.FINISHED:
                s.seen.append(seen)
                return stop
    s.seen.append(seen)
    return Stop.FINISHED


def check_in(s: Session, run_dir: RunDir, progress: Progress, tb: TensorBoard, signalled: bool, at_limit: bool) -> Stop:
    """The loop's only host sync. All ranks agree on a non-finite loss (raise), a signal or the step limit (stop), and a
    timed checkpoint (``ckpt_every_min``); rank 0 shows progress and refreshes the heartbeat."""
    cfg, rt, st = s.cfg, s.rt, s.state
    stats = {**st.meter.sync(), "images_per_s": st.meter.count * rt.world / max(1e-9, st.meter.elapsed())}
    due = bool(cfg.ckpt_every_min) and time.monotonic() - s.saved_at > 60 * cfg.ckpt_every_min
    diverged, signalled, due = rt.any([not math.isfinite(stats["loss_last"]), signalled, due])
    if diverged:
        last = run_dir / RunDir.LAST
        kept = (f"the last good checkpoint is {last}" if last.is_file() else
                "no checkpoint was written yet (it diverged in the first epoch): start a new run")
        raise TrainingDiverged(f"loss became {stats['loss_last']} at epoch {st.epoch + 1} step {st.step}; {kept}. Lower "
                               f"optim.lr, add optim.clip_grad, or check the data.")
    lr = s.sched.get_last_lr()[0]
    progress.update(st.epoch, st.step, stats, lr)
    tb.step(st.global_step, stats, lr)
    s.record.beat()
    if signalled:
        return Stop.INTERRUPTED
    if at_limit:
        return Stop.STOPPED
    if due:
        save_last(s, run_dir)
    return Stop.FINISHED


def end_epoch(s: Session, run_dir: RunDir, progress: Progress, tb: TensorBoard, hist_batch, last: bool) -> None:
    """Validate the model and its EMA, keep the winner in best.pt, checkpoint, and record the epoch."""
    cfg, rt, st = s.cfg, s.rt, s.state
    rt.sync_buffers(s.model, *([s.ema.module] if s.ema is not None else []))
    row = {"epoch": st.epoch + 1, "lr": s.sched.get_last_lr()[0], **st.meter.row(rt.world)}
    if cfg.data.ramped:  # the epoch's training budget, for training.png
        row["budget"] = budget_at(cfg.data, st.epoch).budget
    if (st.epoch + 1) % cfg.eval_every == 0 or st.epoch + 1 == cfg.epochs or last:
        row["val"] = evaluate(s.model, s.val_loader, rt, len(s.classes), st.epoch)
        if s.ema is not None:
            row["val_ema"] = evaluate(s.ema.module, s.val_loader, rt, len(s.classes), st.epoch)
        keep_best(s, run_dir, row)
    epoch = st.epoch
    st.epoch, st.step, st.meter = st.epoch + 1, 0, EpochMeter(rt.device, rt.scaler.is_enabled())
    save_last(s, run_dir)
    if rt.master:
        if epoch in records.hist_epochs(cfg.epochs, cfg.hist_epochs):
            records.save_histograms(run_dir.path, s.model, hist_batch, epoch + 1, rt.autocast)
            tb.histograms(run_dir.path, epoch + 1)
        records.append_metrics(run_dir.path, row)
        tb.epoch(row)
        progress.epoch_done(row)
        if s.compile_watch is not None:
            report_changed(s, run_dir, progress, "compile", s.compile_watch.summary(), CompileWatch.describe)
        if s.graphs is not None:
            report_changed(s, run_dir, progress, "cuda_graphs", s.graphs.summary(), StepGraphs.describe)


def keep_best(s: Session, run_dir: RunDir, row: dict) -> None:
    """best.pt: exactly the weights that won validation so far (the model's or the EMA's), with which and when."""
    st = s.state
    candidates = [("model", row["val"]["top1"], s.model)]
    if "val_ema" in row:
        candidates.append(("ema", row["val_ema"]["top1"], s.ema.module))
    weights, top1, module = max(candidates, key=lambda c: c[1])  # a tie goes to the raw weights
    if top1 > st.best["top1"]:
        st.best = {"top1": top1, "weights": weights, "epoch": st.epoch + 1}
        if s.rt.master:
            ckpt.save(run_dir / RunDir.BEST, {"model": module.state_dict(), **st.best, "classes": s.classes,
                                              "spec": spec_dict(s.spec), "config": to_dict(s.cfg)})


def save_last(s: Session, run_dir: RunDir) -> None:
    """A resumable last.pt at the state's position (every rank's RNG gathered: each draws its own dropout masks)."""
    rngs = s.rt.gather(ckpt.rng_state())
    if s.rt.master:
        ckpt.save(run_dir / RunDir.LAST, {**s.state.snapshot(rngs), "config": to_dict(s.cfg), "classes": s.classes,
                                          "spec": spec_dict(s.spec)})
    s.saved_at = time.monotonic()


def best_facts(st: ckpt.TrainState) -> dict:
    """What run.json says of the validation winner, whatever the ending."""
    best = st.best
    return {"best_val_top1": best["top1"] if best["top1"] >= 0 else None, "best_weights": best["weights"],
            "best_epoch": best["epoch"] or None}


def record_samples(s: Session, run_dir: RunDir) -> None:
    """With ``record_samples``: each rank's sample indices per epoch and its weights' digest (the tests' evidence that
    every sample came once and the ranks agree); never raises over the error that ended the run."""
    with contextlib.suppress(Exception):
        if s.cfg.record_samples:
            run_dir.rank_file(s.rt.rank).write_text(json.dumps({"seen": s.seen, "weights_sha256": weights_digest(s.model)}))


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def signal_flag(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)):
    """While inside: the signals (Ctrl-C; a cluster's time limit or pre-emption: SLURM sends SIGTERM, or SIGUSR1 with
    --signal) set a flag instead of killing the process; the loop saves and stops at its next log step."""
    caught: list[int] = []
    old = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in signals:
            old[sig] = signal.signal(sig, lambda n, f: caught.append(n))
    try:
        yield lambda: bool(caught)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
