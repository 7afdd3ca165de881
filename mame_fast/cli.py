"""The ``mame-fast`` command line: one sub-command per stage, each a thin layer over a module function.

One error path: an expected failure (bad config or option, bad data, a missing checkpoint, a full disk) ends
as one or two lines naming the file or key, what happened and what to do, with a distinct exit code; a
traceback appears only with ``--debug`` or for a real bug.

Exit codes: 0 done; 1 a bug (traceback); 2 bad input (options, config, data, files); 3 interrupted (a
resumable checkpoint was saved); 4 diverged (the loss became non-finite); 5 an I/O failure (full disk,
permissions).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import signal
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from .files import STOP_SIGNALS, usable_cores


class _NoHelpType:
    """typer shows --help as taking a ``<bool>`` value, as it does any flag (see ``flag``): a metavar of none."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_NoHelpType, TyperCommand):
    pass


class _Group(_NoHelpType, TyperGroup):
    pass


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="High-throughput from-scratch CNN training on MAMe.")
command = functools.partial(app.command, cls=_Command)
console = Console()
EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_DIVERGED, EXIT_IO = 2, 3, 4, 5
_options = {"debug": False}


# The options every command that builds a run's config takes (train, lr-find, sweep, preview), declared once.
ConfigOption = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config (a path, or a shipped one: demo, "
                                                                            "256, full).")]
ResOption = Annotated[Optional[str], typer.Option(help="'full' (variable shape) or '256' (fixed crops); same as --set "
                                                       "data.res=...")]
ShardsOption = Annotated[Optional[Path], typer.Option(help="Shard folder; same as --set data.shards=...")]
SetOption = Annotated[List[str], typer.Option("--set", help="Override a config key: --set optim.lr=0.05 (repeatable).")]
AfterOption = Annotated[List[int], typer.Option("--after", help="Number(s) of the experiment(s) this one follows (for "
                                                                "its card).")]


def flag(name: str, help: str):
    """An option that is present or not (``--verify``). typer would show it as taking a ``<bool>`` value, which it
    refuses (``--verify true``), so its help shows none."""
    return typer.Option(False, name, help=help, metavar="")


@app.callback()
def _main(debug: bool = flag("--debug", help="Show the traceback of expected errors too.")) -> None:
    _options["debug"] = debug
    if not console.is_terminal:  # a log file or a pipe: tables at full width rather than wrapped at 80 columns
        console.width = max(console.width, 160)


class _Rate(ProgressColumn):
    """images/s and MB/s of a task whose 'mb' field counts output megabytes."""

    def render(self, task) -> Text:
        el = task.elapsed or 0
        if el <= 0:
            return Text("-- img/s")
        return Text(f"{task.completed / el:6.1f} img/s {task.fields.get('mb', 0) / el:6.1f} MB/s")


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _expected() -> tuple[type[BaseException], ...]:
    # Every module's error class derives from errors.Expected: nothing heavy is imported to recognize them, so a config
    # typo is reported before torch is.
    from .errors import Expected

    return (Expected, OSError)


def io_sentence(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"{where}the disk is full. Nothing half-written was kept; free space and run the command again (it resumes)."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{e.strerror}: no permission to write there; choose another folder."
    return f"{where}{e.strerror or e}"


# What to do after an interruption, by command; the others say to run the command again.
_AFTER_INTERRUPT = {
    "shard": "the complete shards are kept and no partial one was left: run the same command again to resume",
    "sample": "nothing was published: run the same command again",
    "train": "no run had started: run the command again",
    "lr_find": "the range test stopped before its result (its folder says interrupted): run the same command again",
}


def expected_errors(fn):
    """Expected failures as one sentence and an exit code (see the module docstring); ``--debug`` shows the traceback.
    SIGTERM and SIGUSR1 stop a command as Ctrl-C does (the trainer catches all three itself, to save a checkpoint)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (the tests' CliRunner in a thread)
                signal.signal(sig, signal.default_int_handler)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if _options["debug"]:
                raise
            console.print(f"[yellow]interrupted:[/] {_AFTER_INTERRUPT.get(fn.__name__, 'run the same command again')}.",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except _expected() as e:
            if _options["debug"]:
                raise
            if isinstance(e, OSError):
                _fail(io_sentence(e), EXIT_IO)
            _fail(str(e))

    return wrapper


@command()
@expected_errors
def sample(
    out: Path = typer.Argument(..., help="Folder to write the miniature MAMe into (official layout)."),
    per_class: str = typer.Option("40,10,10", help="Images per class for train,val,test."),
    max_side: int = typer.Option(1000, min=16, help="Longest side of the written images in px."),
    large: int = typer.Option(2, min=0, help="How many images to keep large (4096 px) to exercise big-image handling."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(usable_cores(), min=1, help="Processes (default: the CPUs this process may use)."),
    zip: bool = flag("--zip", help="Write MAMe_data.zip, MAMe_data_256.zip, MAMe_metadata.zip instead."),
) -> None:
    """Generate a MAMe-faithful miniature dataset from the real metadata."""
    from .data import metadata as md
    from .data.sample import SampleSpec, choose_rows, write_sample

    spec = SampleSpec(per_class=_counts(per_class), max_side=max_side, large=large, seed=seed)
    n = len(choose_rows(md.load_dir(), spec, md.toy_files()))
    with Progress(TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as p:
        t = p.add_task("sample", total=n)
        rows = write_sample(out, spec, workers=workers, as_zip=zip, progress=lambda: p.advance(t))
    counts = ", ".join(f"{s} {sum(r.subset == s for r in rows)}" for s in md.SPLITS)
    console.print(f"wrote {len(rows)} images ({counts}) to {out}")


def _counts(per_class: str) -> tuple[int, int, int]:
    try:
        counts = tuple(int(x) for x in per_class.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0 or counts[0] < 1:
        _fail(f"--per-class wants three counts 'train,val,test' (train at least 1), got {per_class!r}")
    return counts


@command()
@expected_errors
def shard(
    src: Path = typer.Argument(..., help="MAMe root (CSVs + data/ or data_256/) or the folder with the official zips; "
                                         "with --verify, a shard folder."),
    out: Path = typer.Option(Path("shards"), help="Output root; shards go to OUT/<variant>/."),
    res: str = typer.Option("full", help="'full' (data/, downscaled to the budget) or '256' (data_256/)."),
    max_side: Optional[int] = typer.Option(None, min=1, help="Budget as longest side in px."),
    max_pixels: Optional[int] = typer.Option(None, min=1, help="Budget in pixels per image (default 1,000,000 for full)."),
    quality: int = typer.Option(90, min=1, max=100, help="JPEG quality of re-encoded images."),
    shard_size: float = typer.Option(128.0, "--shard-size", min=0.01, help="Shard size in MB."),
    workers: int = typer.Option(usable_cores(), min=1, help="Processes (default: the CPUs this process may use)."),
    splits: str = typer.Option("train,val,test"),
    seed: int = typer.Option(0),
    skip_bad: bool = flag("--skip-bad", help="Skip unusable images, listing them in rejects.jsonl."),
    verify: bool = flag("--verify", help="Re-read the shards in SRC against manifest and index."),
    reindex: bool = flag("--reindex", help="Rewrite the DALI indexes of the shard folder SRC from their tars "
                                                         "(a missing, damaged or stale index); the tars are checked first."),
) -> None:
    """Convert MAMe images into WebDataset shards with DALI index files and a manifest."""
    from .data import shard as sh

    if verify:
        return _verify(src)
    if reindex:
        fixed = sh.reindex(src)
        console.print(f"[green]ok:[/] rewrote {len(fixed)} index file(s) from their tars" + (
            f": {', '.join(p.name for p in fixed)}" if fixed else " (all matched already)"), highlight=False)
        return None
    if max_pixels is None and max_side is None and res == "full":
        max_pixels = 1_000_000
    settings = sh.ShardSettings(
        variant=res, max_pixels=max_pixels, max_side=max_side, quality=quality, shard_size_mb=shard_size,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), seed=seed, skip_bad=skip_bad,
    )
    t0 = time.time()
    cols = (TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn())
    with Progress(*cols, console=console) as p:
        tasks: dict[str, int] = {}

        def tick(split: str, rec: dict | None, total: int) -> None:
            if split not in tasks:
                tasks[split] = p.add_task(split, total=total, mb=0.0)
            if rec is None:
                return
            mb = p.tasks[tasks[split]].fields["mb"] + len(rec.get("jpg", b"")) / 2**20
            p.update(tasks[split], advance=1, mb=mb)

        folder = sh.write_shards(src, out, settings, workers=workers, progress=tick)
    m = sh.load_manifest(folder)
    table = Table(title=f"{folder} ({time.time() - t0:.1f} s)")
    for c in ("split", "samples", "shards", "MB", "classes"):
        table.add_column(c)
    for split, s in m["splits"].items():
        classes = sum(v > 0 for v in s["per_class"].values())
        table.add_row(split, str(s["count"]), str(len(s["shards"])), f"{s['bytes'] / 2**20:.1f}", str(classes))
    console.print(table)
    if m["rejected"]:
        console.print(f"[yellow]skipped {m['rejected']} bad image(s); see {folder / 'rejects.jsonl'}[/]")


def _verify(folder: Path) -> None:
    from .data import shard as sh

    problems = sh.verify(folder)
    m = sh.load_manifest(folder)
    for p in problems:
        console.print(f"[red]mismatch:[/] {p}", highlight=False, soft_wrap=True)
    if problems:
        _fail(f"{len(problems)} problem(s) in {folder}")
    n = sum(s["count"] for s in m["splits"].values())
    tars = sum(len(s["shards"]) for s in m["splits"].values())
    console.print(f"[green]ok:[/] {n} samples in {tars} shards match the manifest and index")


@command()
@expected_errors
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the sample data, shards, runs and report."),
    workers: int = typer.Option(usable_cores(), min=1, help="Processes (default: the CPUs this process may use)."),
    config: str = typer.Option("demo", help="Training config of the demo (a shipped config name or a YAML path)."),
    per_class: str = typer.Option("40,10,10", help="Images per class of the generated sample, for train,val,test."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of the demo's training config (repeatable)."),
) -> None:
    """The README's main job: sample data -> shards -> training (tiny, CPU) -> diagnosis -> report."""
    from .demo import run as run_demo
    from .train.loop import TrainingDiverged

    try:
        ended(run_demo(out, workers, config, _counts(per_class), set_, console,
                       say=lambda line: console.print(line, highlight=False)))
    except TrainingDiverged as e:
        _fail(str(e), EXIT_DIVERGED)


@command()
@expected_errors
def train(
    config: ConfigOption = None, res: ResOption = None, shards: ShardsOption = None, set_: SetOption = [],  # noqa: B006
    resume: Optional[str] = typer.Option(None, help="A run folder to continue exactly where it stopped; 'auto': the latest "
                                                    "unfinished run of this --name in the runs folder, or a new run if none."),
    name: str = typer.Option("run", help="Run name (folder runs/<NNN>-<name>/)."),
    after: AfterOption = [],  # noqa: B006
    hypothesis: str = typer.Option("", help="What this experiment tests (for its card)."),
    tensorboard: bool = flag("--tensorboard", help="Also log to TensorBoard (<run>/tb): --set tensorboard=true."),
    slurm: bool = flag("--slurm", help="Submit the run as a SLURM job (the config's slurm section) instead of training "
                                       "here; the job script is written to <runs>/jobs/<name>.sbatch."),
    dry_run: bool = flag("--dry-run", help="With --slurm: print the job script, submit nothing."),
) -> None:
    """Train a spec-built CNN (single process, under torchrun on one or many nodes, or submitted to SLURM)."""
    from .config import load
    from .records.rundir import RunDir, check_run_name, existing_run
    from .records.runrecord import resumable

    check_run_name(name)
    sets = option_sets(set_, res, shards) + (["tensorboard=true"] if tensorboard else [])
    cfg = load(config, sets)
    folder = resumable(cfg.out, name) if resume == "auto" else existing_run(resume).path if resume else None
    if folder is not None:
        cfg = load(folder / RunDir.CONFIG, sets)
    _preflight(cfg)
    meta = {"after": list(after), "hypothesis": hypothesis}
    if slurm or dry_run:
        return _submit_run(cfg, name, meta, resume, dry_run)
    _train(cfg, name, folder, meta)


def _submit_run(cfg, name: str, meta: dict, resume: str | None, dry_run: bool) -> None:
    from .config import ConfigError
    from .slurm import submit_run

    if resume not in (None, "auto"):
        raise ConfigError("--slurm submits the run by name and its job continues it (--resume auto): give --name "
                          f"{Path(resume).name.split('-', 1)[-1]} instead of --resume {resume}")
    job, script, text = submit_run(cfg, name, meta, dry_run)
    if dry_run:
        console.print(text, highlight=False, markup=False, end="")
        return
    console.print(f"submitted job {job}: {script} (log {script.parent / name}-{job}.out); follow it with "
                  f"`mame-fast runs --root {cfg.out}`", highlight=False)


def option_sets(set_: list[str], res: str | None, shards: Path | None) -> list[str]:
    """The --set overrides with --res and --shards as the data.res and data.shards they stand for; an option that
    contradicts a --set of the same key is refused rather than silently winning."""
    from .config import ConfigError, parse_sets

    given = parse_sets(set_).get("data", {})
    given = given if isinstance(given, dict) else {}
    for option, key, value in (("--res", "res", res), ("--shards", "shards", shards)):
        if value is not None and key in given and str(given[key]) != str(value):
            raise ConfigError(f"{option} {value} contradicts --set data.{key}={given[key]}: give one of them")
    return list(set_) + ([f"data.res={res}"] if res else []) + ([f"data.shards={shards}"] if shards else [])


def run_config(config: str | None, set_: list[str], res: str | None, shards: Path | None, extra: list[str] = ()):
    """A run's config from the shared options (and ``extra`` overrides), checked before torch is imported."""
    from .config import load

    cfg = load(config, option_sets(set_, res, shards) + list(extra))
    _preflight(cfg)
    return cfg


def _preflight(cfg) -> None:
    """What can be checked of a run's config without torch (the shard folder, the model spec against the data), before
    the seconds of importing it: a typo is reported at once."""
    from .config import ConfigError
    from .train.spec import check_for_data, load_spec

    spec = load_spec(cfg.model)
    if not Path(cfg.data.shards).is_dir():
        raise ConfigError(f"data.shards {cfg.data.shards}: no such folder; make shards with `mame-fast shard SRC --out "
                          f"DIR` and give DIR/full or DIR/256 (--shards)")
    check_for_data(spec, cfg)


@command()
@expected_errors
def preview(
    config: ConfigOption = None,
    res: Optional[str] = typer.Option(None, help="'full' or '256' (default: both, where the shards allow full)."),
    shards: ShardsOption = None, set_: SetOption = [],  # noqa: B006
    out: Path = typer.Option(Path("preview"), help="Folder for preview_<res>.png."),
) -> None:
    """What the network is fed: real training batches (crops, flips, jitter, mixup/cutmix as applied; each bucket shape
    at full resolution) and evaluation batches (padded), from the loader the run would use, de-normalized."""
    cfg = run_config(config, set_, res, shards)
    from .data.format import load_manifest
    from .records.evidence import preview as draw
    from .train.runtime import setup_runtime

    rt = setup_runtime(cfg.precision, training=False)
    variant = load_manifest(Path(cfg.data.shards))["variant"]
    for r in [res] if res else (["256", "full"] if variant == "full" else ["256"]):
        path = draw(run_config(config, set_, None, shards, [f"data.res={r}"]), out / f"preview_{r}.png", rt.device, rt.dtype)
        console.print(f"{r}: {path}")


@command("lr-find")
@expected_errors
def lr_find(
    config: ConfigOption = None, res: ResOption = None, shards: ShardsOption = None, set_: SetOption = [],  # noqa: B006
    name: str = typer.Option("lr-find", help="Name of its folder (runs/<NNN>-<name>/)."),
    after: AfterOption = [],  # noqa: B006
    hypothesis: str = typer.Option("", help="What the test is for (for its card)."),
    start: float = typer.Option(1e-5, min=0, help="First learning rate, per 256 images."),
    end: float = typer.Option(10.0, min=0, help="Last learning rate, per 256 images (the test stops sooner if the loss "
                                               "diverges)."),
    steps: int = typer.Option(100, min=5, help="Steps, the rate growing exponentially from --start to --end."),
) -> None:
    """The learning-rate range test through the trainer's own step: loss against an exponentially growing rate, a plot
    and a suggested range, recorded as a numbered folder that a later run cites with --after N. No checkpoint."""
    from .config import ConfigError
    from .records.rundir import RunDir, check_run_name

    check_run_name(name)
    if not 0 < start < end:
        raise ConfigError(f"--start {start:g} and --end {end:g}: want 0 < start < end")
    cfg = run_config(config, set_, res, shards)
    from .train.lrfind import NoUsableRange
    from .train.lrfind import run as range_test

    try:
        folder = range_test(cfg, name, {"after": list(after), "hypothesis": hypothesis}, console, start, end, steps)
    except NoUsableRange as e:
        _fail(str(e), EXIT_DIVERGED)
    console.print(f"run folder: {folder}\ncard: {folder / RunDir.CARD}")


@command()
@expected_errors
def sweep(
    grid: Optional[List[str]] = typer.Argument(None, help="KEY=V1,V2,... (one or more keys): the values to try, every "
                                                          "combination."),
    repeats: int = typer.Option(1, min=1, help="Seeds per setting: seed, seed+1, ... (intervals need at least 2)."),
    config: ConfigOption = None, res: ResOption = None, shards: ShardsOption = None, set_: SetOption = [],  # noqa: B006
    name: str = typer.Option("sweep", help="Sweep name: runs are <name>-<setting>-s<seed>, the card sweep-<name>.md."),
    after: AfterOption = [],  # noqa: B006
    hypothesis: str = typer.Option("", help="What the sweep tests (for the family card and each run's card)."),
    parallel: int = typer.Option(1, min=1, help="Members run at once, each in a process of its own (one GPU each, or "
                                                "the CPU cores split)."),
    slurm: bool = flag("--slurm", help="Submit the sweep as one SLURM array job (a task per member) and its family "
                                       "card as a job that runs when the last member ends."),
    dry_run: bool = flag("--dry-run", help="With --slurm: print the job scripts, submit nothing."),
    card: Optional[str] = typer.Option(None, "--card", help="Rebuild the family card of sweep NAME from what has ended "
                                                            "(naming members queued, running, failed or cancelled)."),
    root: Optional[Path] = typer.Option(None, help="With --card: the runs folder (default: the config's out)."),
) -> None:
    """Run a grid of values times N seeds as ordinary runs, then one family card: mean +- 95% interval per setting, and
    which differences are conclusive."""
    from .config import ConfigError
    from .records.sweep import parse_grid

    if card is not None:  # reads the runs folder only: no shards, no model
        from .config import load

        return _family_card(card, root or Path(load(config, option_sets(set_, res, shards)).out))
    if not grid:
        raise ConfigError("sweep: give the grid (KEY=V1,V2,...), or --card NAME to rebuild a sweep's family card")
    g = parse_grid(grid)
    members, base = _sweep_members(g, repeats, config, set_, res, shards, name, after, hypothesis)
    sets = option_sets(set_, res, shards)
    described = f"config {config or 'defaults'}" + (f" with {' '.join(sets)}" if sets else "")
    family = (Path(base.out), name, g, [(m.setting, m.cfg.seed, m.name) for m in members], hypothesis, list(after), described)
    if slurm or dry_run:
        return _submit_sweep(name, members, family, dry_run)
    from .launch import in_parallel, in_process
    from .records.sweep import write_family

    if parallel > 1:
        in_parallel(members, parallel, say=lambda line: console.print(line, highlight=False))
    else:
        in_process(members, lambda cfg, n, meta: _train(cfg, n, None, meta, diverged_ends=False))
    console.print(f"family card: {write_family(*family)}")


def _sweep_members(g, repeats, config, set_, res, shards, name, after, hypothesis):
    """Every member's config, checked before the first one starts (or anything is submitted)."""
    from .launch import Member
    from .records.sweep import label, plan

    base = run_config(config, set_, res, shards)
    members = []
    for setting, seed, run_name in plan(name, g, repeats, base.seed):
        cfg = run_config(config, set_, res, shards, [f"{k}={v}" for k, v in setting.items()] + [f"seed={seed}"])
        meta = {"after": list(after), "hypothesis": f"{hypothesis} [{label(setting)}, seed {seed}]".strip(), "sweep": name}
        members.append(Member(setting, cfg, run_name, meta))
    return members, base


def _submit_sweep(name: str, members, family: tuple, dry_run: bool) -> None:
    from .records.sweep import write_family
    from .slurm import submit_sweep

    jobs = submit_sweep(name, [(m.cfg, m.name, m.meta) for m in members], dry_run)
    if dry_run:
        for text in jobs["texts"]:
            console.print(text, highlight=False, markup=False)
        return
    write_family(*family, jobs={"array": jobs["array"], "card": jobs["card"]})
    console.print(f"submitted array job {jobs['array']} ({len(members)} member(s)) and the family card's job "
                  f"{jobs['card']} (after the last member); scripts: {', '.join(map(str, jobs['scripts']))}. Follow "
                  f"them with `mame-fast runs --root {family[0]}`; `mame-fast sweep --card {name}` rebuilds the card.",
                  highlight=False)


def _family_card(name: str, root: Path) -> None:
    import json

    from .config import ConfigError
    from .records.rundir import RunDir, existing_root
    from .records.sweep import write_card_of
    from .slurm import job_states

    path = RunDir.sweep_file(existing_root(root), name)
    if not path.is_file():
        raise ConfigError(f"{path}: no sweep named {name!r} in {root}")
    family = json.loads(path.read_text())
    jobs = [m["job"] for m in family["members"] if m.get("job")]  # a submitted sweep's array tasks
    console.print(f"family card: {write_card_of(root, family, job_states(jobs))}")


def _train(cfg, name: str, resume: Path | None, meta: dict, diverged_ends: bool = True) -> Path:
    """Run the trainer (it writes the run's card, whatever happens) and end with the status's exit code (a sweep's
    member that diverged, ``diverged_ends=False``, is said and the sweep goes on)."""
    from .train.loop import TrainingDiverged, run

    started: list[Path] = []
    try:
        run_dir = run(cfg, name=name, resume=resume, meta=meta, console=console, on_start=started.append)
    except TrainingDiverged as e:
        if not diverged_ends:
            console.print(f"[yellow]{name} diverged:[/] {e}", highlight=False, soft_wrap=True)
            raise
        _fail(str(e), EXIT_DIVERGED)
    except OSError as e:
        if _options["debug"] or not started:
            raise
        _fail(f"{io_sentence(e)} {_resume_hint(started[0])}", EXIT_IO)
    return ended(run_dir)


def ended(run_dir: Path) -> Path:
    """Say how a run ended (its master process only: the one that keeps its record); exit 3 if it was interrupted."""
    from .records.records import read_run_info
    from .train.runtime import is_master

    status = read_run_info(run_dir).get("status")
    if is_master():
        console.print(f"run folder: {run_dir} ({status})")
        if status == "interrupted":
            console.print(f"[yellow]interrupted: {_resume_hint(run_dir)}[/]")
    if status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    return run_dir


def _resume_hint(run_dir: Path) -> str:
    from .records.rundir import RunDir
    from .train import checkpoint as ckpt

    last = run_dir / RunDir.LAST
    if not last.is_file():
        return "No checkpoint was written: start the run again."
    st = ckpt.load(last)
    where = f"the end of epoch {st['epoch']}" if st["step"] == 0 else f"epoch {st['epoch'] + 1}, step {st['step']}"
    return f"{last} (at {where}) is intact; continue with `mame-fast train --resume {run_dir}`."


@command()
@expected_errors
def model(
    specs: List[str] = typer.Argument(None, help="Model spec names (configs/models/) or YAML paths; default: the shipped ones."),
    crop: int = typer.Option(224, min=8, help="Side of the square input of the fixed-size column: the crop a --res 256 "
                                              "run trains on (data.crop)."),
    pixels: int = typer.Option(360_000, min=64, help="Pixel budget of the full-resolution column (data.pixels)."),
) -> None:
    """Parameters and FLOPs of model specs at a square crop (--crop, 224 by default: what a --res 256 run feeds the
    model) and at the full-resolution budget; for the specs named, one row per stage with its output size, channels,
    parameters, FLOPs and receptive field."""
    from .train.model import stage_rows, summary_rows
    from .train.spec import load_spec, shipped_specs

    table = Table(title=f"models: FLOPs per image at {crop}x{crop} and at ~{pixels:,} px")
    for c in ("spec", "params", "blocks", "features", f"GFLOPs {crop}", "GFLOPs full"):
        table.add_column(c, justify="right")
    for s in specs or shipped_specs():
        r = summary_rows(load_spec(s), crop, pixels)
        table.add_row(s, f"{r['params'] / 1e6:.2f} M", str(r["blocks"]), str(r["features"]), f"{r['flops_256'] / 1e9:.2f}",
                      f"{r['flops_full'] / 1e9:.2f}")
    console.print(table)
    for s in specs or []:
        console.print(_stage_table(s, stage_rows(load_spec(s), crop, pixels), crop, pixels))


def _stage_table(name: str, rows: list[dict], crop: int, pixels: int) -> Table:
    side = int(pixels**0.5)
    t = Table(title=f"{name}: per stage, at {crop}x{crop} and at {side}x{side} (~{pixels:,} px); receptive field along the "
                    f"conv path (* exceeds the input; squeeze-excite and the global pooling see the whole image)")
    for c in ("stage", f"out {crop}", f"out {side}", "channels", "params", f"MFLOPs {crop}", f"MFLOPs {side}", "receptive field"):
        t.add_column(c, justify="right")
    for r in rows:
        flag = " *" + "/".join(r["rf_exceeds"]) if r["rf_exceeds"] else ""
        t.add_row(r["name"], "x".join(map(str, r["size_small"])), "x".join(map(str, r["size_full"])), str(r["channels"]),
                  f"{r['params']:,}", f"{r['flops_small'] / 1e6:.0f}", f"{r['flops_full'] / 1e6:.0f}", f"{r['rf']} px{flag}")
    return t


@command("test")
@expected_errors
def test_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    checkpoint: str = typer.Option("best", help="best: exactly the weights that won validation (the model's or the EMA's, "
                                                "at their epoch); last: the model at the end of training; ema: the EMA "
                                                "weights at the end of training."),
    again: bool = flag("--again", help="Evaluate even though this run was tested before (recorded)."),
    unfinished: bool = flag("--unfinished", help="Test a run that has not ended (running, died, "
                                                                "interrupted, failed) as it is (recorded)."),
) -> None:
    """Evaluate a run on the test split, once."""
    from .records.rundir import existing_run
    from .records.stats import pct
    from .train.testset import evaluate_test_set

    r = evaluate_test_set(existing_run(run_dir).path, checkpoint, again, unfinished)
    val = f", val top-1 {r['val_top1']:.1%}" if r.get("val_top1") is not None else ""
    budget = ", ".join(f"{k} {v:,}" for k, v in r["budget"].items() if k != "why") + f" ({r['budget']['why']})"
    console.print(f"test ({r['count']} images, {r['weights']} weights of epoch {r['epoch']}{val}, checkpoint {checkpoint}, "
                  f"at {budget}): top-1 {pct(r['top1'], r['count'])} (95% interval)  top-5 {r['top5']:.1%}  balanced "
                  f"{r['balanced_acc']:.1%}  -> {run_dir / 'test.json'}", highlight=False, soft_wrap=True)


@command("evaluate")
@expected_errors
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    pixels: str = typer.Option("", help="Budgets per image to try at res=full, e.g. 300000,360000,450000 (default: the "
                                        "training budget and 1.25x, 1.5x it)."),
    crop: str = typer.Option("", help="Crop sides to try at res=256, e.g. 224,256,288 (default: the training crop and "
                                      "+32, +64)."),
) -> None:
    """Validation top-1 of a run's best weights at several evaluation budgets, with intervals; the best is recorded and
    `test` then looks at the test set there (FixRes: trained on crops, a network often scores best a little larger)."""
    from .config import load
    from .records.report import write_card
    from .records.rundir import existing_run
    from .records.stats import pct
    from .train.budgets import BudgetError, evaluate_budgets

    run = existing_run(run_dir)
    cfg = load(run / "config.yaml")
    key = cfg.data.budget_key
    given, other = (pixels, crop) if key == "pixels" else (crop, pixels)
    if other:
        _fail(f"{run_dir} trained at res={cfg.data.res}: give --{key}")
    try:
        values = [int(v.replace("_", "")) for v in given.split(",") if v.strip()]
    except ValueError:
        raise BudgetError(f"--{key} {given}: not a list of whole numbers") from None
    if not values:
        base = getattr(cfg.data, key)
        values = [base, round(1.25 * base), round(1.5 * base)] if key == "pixels" else [base, base + 32, base + 64]
    r = evaluate_budgets(run.path, values)
    for row in r["results"]:
        mark = "  <- chosen" if row["value"] == r["chosen"] else ""
        console.print(f"{r['key']} {row['value']:>9,}: val top-1 {pct(row['top1'], row['count'])}{mark}", highlight=False)
    write_card(run.path)
    console.print(f"recorded in {run / 'run.json'} (eval_budgets); `mame-fast test {run_dir}` looks at {r['key']} "
                  f"{r['chosen']:,}", highlight=False, soft_wrap=True)


@command()
@expected_errors
def diagnose(run_dir: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Underfitting, overfitting, fitting, diverged, unstable or not converged, with the numbers and the next step."""
    from .records.kinds import diagnose_run
    from .records.rundir import existing_run

    d = diagnose_run(existing_run(run_dir).path)
    console.print(f"[bold]{d.verdict}[/]")
    for r in d.reasons:
        console.print(f"  - {r}")
    console.print(f"next: {d.next_step}")


@command()
@expected_errors
def note(run_dir: Path = typer.Argument(...), text: str = typer.Argument(..., help="An observation for the run's card.")) -> None:
    """Add an observation to a run (part 5 of its card)."""
    from .records.report import add_note
    from .records.rundir import existing_run

    add_note(existing_run(run_dir).path, text)
    console.print(f"noted in {run_dir / 'card.md'}")


@command()
@expected_errors
def runs(root: Path = typer.Option(Path("runs"), help="Folder holding the run folders.")) -> None:
    """A table of all runs: number, name, hypothesis, predecessor, best val, gap, diagnosis, epochs, images/s, test."""
    from .records.report import runs_table
    from .records.rundir import existing_root

    rows = runs_table(existing_root(root))
    waiting = _not_started(root, {r["name"] for r in rows})
    if not rows and not waiting:
        _fail(f"no runs in {root}{_elsewhere(root)}")
    if rows:
        t = Table()
        for c in rows[0]:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*[str(v) for v in r.values()])
        console.print(t)
    for line in waiting:
        console.print(line, highlight=False)


def _not_started(root: Path, started: set[str]) -> list[str]:
    """Submitted runs and sweep members that have no folder yet, with SLURM's word on their job."""
    import json

    from .records.rundir import RunDir
    from .slurm import job_states, submitted

    waiting = []  # (name, job, what)
    for s in submitted(root):
        if s["kind"] == "run" and s["name"] not in started:
            waiting.append((s["name"], s["job"], f"run {s['name']}"))
        elif s["kind"] == "sweep" and (path := RunDir.sweep_file(root, s["name"])).is_file():
            members = json.loads(path.read_text())["members"]
            waiting += [(m["name"], m["job"], f"sweep {s['name']} member {m['name']}") for m in members
                        if m["name"] not in started]
    states = job_states([job for _, job, _ in waiting])
    advice = {"PENDING": "queued", "RUNNING": "starting", "CANCELLED": "cancelled before it started: submit it again",
              "FAILED": "failed before it started: see its log in the runs folder's jobs/"}
    return [f"{what}: job {job} {advice.get(states.get(job, ''), states.get(job, 'state unknown (SLURM no longer knows it)'))}"
            for _, job, what in waiting]


@command()
@expected_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Two or more run folders."),
    out: Optional[Path] = typer.Option(None, help="Figure to write (default: compare-N-M.png beside the first run, in "
                                                  "its runs folder)."),
) -> None:
    """Curves of several runs overlaid in one figure, plus each config's diff against the first."""
    from .records.report import compare as cmp
    from .records.rundir import existing_run

    runs = [existing_run(d) for d in run_dirs]
    out = out or runs[0].root / f"compare-{'-'.join(str(r.number) for r in runs)}.png"
    path, diffs, verdicts = cmp([r.path for r in runs], out)
    for k, d in diffs.items():
        console.print(f"[bold]{k}[/] vs {run_dirs[0].name}:")
        for key, (a, b) in d.items():
            console.print(f"  {key}: {a} -> {b}", highlight=False)
        if k in verdicts:
            console.print(f"  best val top-1: {verdicts[k]}", highlight=False)
    console.print(f"figure: {path}")


@command()
@expected_errors
def report(root: Path = typer.Option(Path("runs"), help="Folder holding the run folders.")) -> None:
    """One Markdown and HTML document with every run's card in order, then the sweeps' family cards."""
    from .records.plots import plot_run
    from .records.records import read_run_info
    from .records.report import write_report
    from .records.rundir import RunDir, existing_root, list_runs

    if not list_runs(existing_root(root)):
        _fail(f"no runs in {root}{_elsewhere(root)}")
    for r in list_runs(root):
        classes = read_run_info(r.path).get("classes")  # as the run's shards named them
        if classes and not (r / RunDir.PLOTS).is_dir():  # a run that ended before its plots were drawn
            plot_run(r.path, classes)
    md, html = write_report(root)
    console.print(f"report: {md} and {html}")


@command()
@expected_errors
def slides(
    chosen: Optional[list[str]] = typer.Argument(None, metavar="[RUN]...", help="Runs to show, by number or folder "
                                                 "(default: every run, and every sweep)."),
    root: Path = typer.Option(Path("runs"), help="Folder holding the run folders."),
    runs: str = typer.Option("", "--runs", help="Run numbers and ranges to show, e.g. 2,5,7-9."),
    lineage: Optional[int] = typer.Option(None, help="Show one experiment and every run its --after chain follows."),
    out: Optional[Path] = typer.Option(None, help="The .pptx to write (default: ROOT/slides.pptx); its PDF goes beside it."),
    title: str = typer.Option("", help="The cover's title (default: the runs folder's name)."),
    no_pdf: bool = flag("--no-pdf", help="Write the .pptx only (by default LibreOffice, where installed, renders a PDF)."),
) -> None:
    """The interview's slides: the experiment log, each card in the lab's layout with its pictures on the slides after
    it, the test look and the sweeps, as an editable .pptx (and a PDF)."""
    from .records.rundir import existing_root, existing_run, list_runs
    from .records.slides import lineage as chain
    from .records.slides import parse_runs, write_deck

    numbers: list[int] = []
    for c in chosen or []:
        if c.isdigit():
            numbers.append(int(c))
        else:
            run = existing_run(c)
            root = run.path.parent if root == Path("runs") else root
            numbers.append(run.number)
    if not list_runs(existing_root(root)):
        _fail(f"no runs in {root}{_elsewhere(root)}")
    numbers += parse_runs(runs) if runs else []
    numbers += chain(root, lineage) if lineage is not None else []
    w = write_deck(root, out, sorted(set(numbers)) if numbers else None, title=title, pdf=not no_pdf)
    console.print(f"slides: {w.pptx} ({w.slides} slides)" + (f" and {w.pdf}" if w.pdf else f"; {w.note}"),
                  highlight=False, soft_wrap=True)


@command()
@expected_errors
def explore(
    src: Optional[Path] = typer.Argument(None, help="MAMe root or folder of CSVs (default: the vendored real metadata)."),
    out: Path = typer.Option(Path("explore"), help="Folder for explore.md and the PNGs."),
) -> None:
    """A data report: counts per class/split/museum, size and aspect histograms, a sample grid per class."""
    from .records.explore import explore as run_explore

    s = run_explore(src, out)
    console.print(f"{s['rows']:,} images: {s['splits']}; report in {out / 'explore.md'}")


def _elsewhere(root: Path) -> str:
    """Where runs are when the default folder has none: the demo's (``make demo`` trains into demo/runs)."""
    from .records.rundir import list_runs

    demo = Path("demo") / "runs"
    if root == Path("runs") and list_runs(demo):
        return f"; the demo's runs are in {demo}: add --root {demo}"
    return ""


def main() -> None:
    app()
