"""The ``mame-fast`` command line: one sub-command per stage, each a thin layer over a module function."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="High-throughput from-scratch CNN training on MAMe.")
console = Console()


class _Rate(ProgressColumn):
    """images/s and MB/s of a task whose 'mb' field counts output megabytes."""

    def render(self, task) -> Text:
        el = task.elapsed or 0
        if el <= 0:
            return Text("-- img/s")
        return Text(f"{task.completed / el:6.1f} img/s {task.fields.get('mb', 0) / el:6.1f} MB/s")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


@app.command()
def sample(
    out: Path = typer.Argument(..., help="Folder to write the miniature MAMe into (official layout)."),
    per_class: str = typer.Option("40,10,10", help="Images per class for train,val,test."),
    max_side: int = typer.Option(1000, help="Longest side of the written images in px."),
    large: int = typer.Option(2, help="How many images to keep large (4096 px) to exercise big-image handling."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(os.cpu_count() or 1),
    zip: bool = typer.Option(False, "--zip", help="Write MAMe_data.zip, MAMe_data_256.zip, MAMe_metadata.zip instead."),
) -> None:
    """Generate a MAMe-faithful miniature dataset from the real metadata."""
    from .sample import SampleSpec, choose_rows, write_sample
    from . import metadata as md

    try:
        counts = tuple(int(x) for x in per_class.split(","))
        assert len(counts) == 3
    except (ValueError, AssertionError):
        _fail(f"--per-class wants three integers 'train,val,test', got {per_class!r}")
    spec = SampleSpec(per_class=counts, max_side=max_side, large=large, seed=seed)
    n = len(choose_rows(md.load_dir(), spec, md.toy_files()))
    with Progress(TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as p:
        t = p.add_task("sample", total=n)
        rows = write_sample(out, spec, workers=workers, as_zip=zip, progress=lambda: p.advance(t))
    console.print(f"wrote {len(rows)} images ({', '.join(f'{s} {sum(r.subset == s for r in rows)}' for s in md.SPLITS)}) to {out}")


@app.command()
def shard(
    src: Path = typer.Argument(..., help="MAMe root (CSVs + data/ or data_256/) or the folder with the official zips; with --verify, a shard folder."),
    out: Path = typer.Option(Path("shards"), help="Output root; shards go to OUT/<variant>/."),
    res: str = typer.Option("full", help="'full' (data/, downscaled to the budget) or '256' (data_256/)."),
    max_side: Optional[int] = typer.Option(None, help="Budget as longest side in px."),
    max_pixels: Optional[int] = typer.Option(None, help="Budget in pixels per image (default 1,000,000 for full)."),
    quality: int = typer.Option(90, help="JPEG quality of re-encoded images."),
    shard_size: float = typer.Option(128.0, "--shard-size", help="Shard size in MB."),
    workers: int = typer.Option(os.cpu_count() or 1),
    splits: str = typer.Option("train,val,test"),
    seed: int = typer.Option(0),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unusable images, listing them in rejects.jsonl."),
    verify: bool = typer.Option(False, "--verify", help="Re-read the shards in SRC against manifest and index."),
) -> None:
    """Convert MAMe images into WebDataset shards with DALI index files and a manifest."""
    from . import shard as sh

    if verify:
        try:
            problems = sh.verify(src)
        except sh.ShardError as e:
            _fail(str(e))
        m = sh.load_manifest(src)
        for p in problems:
            console.print(f"[red]mismatch:[/] {p}")
        n = sum(s["count"] for s in m["splits"].values())
        if problems:
            _fail(f"{len(problems)} problem(s) in {src}")
        console.print(f"[green]ok:[/] {n} samples in {sum(len(s['shards']) for s in m['splits'].values())} shards match the manifest and index")
        return
    if max_pixels is None and max_side is None and res == "full":
        max_pixels = 1_000_000
    settings = sh.ShardSettings(
        variant=res, max_pixels=max_pixels, max_side=max_side, quality=quality, shard_size_mb=shard_size,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), seed=seed, skip_bad=skip_bad,
    )
    t0 = time.time()
    cols = (TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn())
    try:
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
    except (sh.ShardError, ValueError) as e:
        _fail(str(e))
    m = sh.load_manifest(folder)
    table = Table(title=f"{folder} ({time.time() - t0:.1f} s)")
    for c in ("split", "samples", "shards", "MB", "classes"):
        table.add_column(c)
    for split, s in m["splits"].items():
        table.add_row(split, str(s["count"]), str(len(s["shards"])), f"{s['bytes'] / 2**20:.1f}", str(sum(v > 0 for v in s["per_class"].values())))
    console.print(table)
    if m["rejected"]:
        console.print(f"[yellow]skipped {m['rejected']} bad image(s); see {folder / 'rejects.jsonl'}[/]")


def main() -> None:
    app()


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the sample data, shards, runs and report."),
    workers: int = typer.Option(os.cpu_count() or 1),
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", help="Training config of the demo."),
    per_class: str = typer.Option("40,10,10", help="Images per class of the generated sample, for train,val,test."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of the demo's training config (repeatable)."),
) -> None:
    """The README's main job: sample data -> shards -> training (tiny, CPU) -> diagnosis -> report."""
    from . import shard as sh
    from .config import ConfigError, load
    from .diagnose import diagnose_run
    from .report import write_report
    from .train import run

    t0 = time.time()
    root = out / "mame"
    if not (root / "MAMe_dataset.csv").exists():
        sample(root, per_class=per_class, max_side=1000, large=2, seed=0, workers=workers, zip=False)
    shard(root, out=out / "shards", res="full", max_side=None, max_pixels=None, quality=90, shard_size=32.0,
          workers=workers, splits="train,val,test", seed=0, skip_bad=False, verify=False)
    problems = sh.verify(out / "shards" / "full")
    if problems:
        _fail(f"shards do not verify: {problems[:3]}")
    console.print("[green]shards verified[/]")
    try:
        cfg = load(config, [f"data.shards={out / 'shards' / 'full'}", f"out={out / 'runs'}", *set_])
    except ConfigError as e:
        _fail(str(e))
    run_dir = run(cfg, name="demo-tiny", meta={"hypothesis": "A tiny CNN learns the sample's classes well above chance (3.4%) in a few CPU minutes.", "after": []}, console=console)
    d = diagnose_run(run_dir)
    console.print(f"diagnosis: [bold]{d.verdict}[/]: {'; '.join(d.reasons)}\nnext: {d.next_step}")
    md, html = write_report(out / "runs")
    console.print(f"card: {run_dir / 'card.md'}\nreport: {md} ({html})\nplots: {run_dir / 'plots'}\n"
                  f"demo finished in {time.time() - t0:.0f} s")


def _load_config(config: Optional[Path], sets: List[str], resume: Optional[Path]):
    from .config import ConfigError, load

    try:
        if resume:
            if not (resume / "config.yaml").is_file():
                _fail(f"{resume}: no config.yaml; not a run folder")
            return load(resume / "config.yaml", sets)
        return load(config, sets)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (configs/*.yaml); overrides the defaults."),
    res: Optional[str] = typer.Option(None, help="'full' (variable shape) or '256' (fixed crops); same as --set data.res=..."),
    shards: Optional[Path] = typer.Option(None, help="Shard folder; same as --set data.shards=..."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set optim.lr=0.05 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this run folder exactly where it stopped."),
    name: str = typer.Option("run", help="Run name (folder runs/<NNN>-<name>/)."),
    after: List[int] = typer.Option([], "--after", help="Number(s) of the experiment(s) this one follows (for its card)."),
    hypothesis: str = typer.Option("", help="What this experiment tests (for its card)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to TensorBoard (<run>/tb); same as --set tensorboard=true."),
) -> None:
    """Train a spec-built CNN (single process, or under torchrun on one or many nodes)."""
    from .pipeline import LoaderError
    from .records import MissingPackage
    from .train import TrainingDiverged, run

    sets = list(set_)
    if tensorboard:
        sets.append("tensorboard=true")
    if res:
        sets.append(f"data.res={res}")
    if shards:
        sets.append(f"data.shards={shards}")
    cfg = _load_config(config, sets, resume)
    try:
        run_dir = run(cfg, name=name, resume=resume, meta={"after": list(after), "hypothesis": hypothesis}, console=console)
    except TrainingDiverged as e:
        _fail(str(e))
    except (ValueError, LoaderError, MissingPackage) as e:
        _fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run folder: {run_dir}")


@app.command()
def model(
    specs: List[str] = typer.Argument(None, help="Model spec names (configs/models/) or YAML paths; default: the family."),
    crop: int = typer.Option(224, help="Side of the fixed-size input for the 256 column."),
    pixels: int = typer.Option(360_000, help="Pixel budget of the full-resolution column."),
) -> None:
    """Parameter counts and FLOPs of model specs at 256 (crop) and at the full-resolution budget."""
    from .config import ConfigError
    from .model import load_spec, summary_rows

    table = Table(title=f"models: FLOPs per image at {crop}x{crop} and at ~{pixels:,} px")
    for c in ("spec", "params", "blocks", "features", f"GFLOPs {crop}", "GFLOPs full"):
        table.add_column(c, justify="right")
    for s in specs or ["tiny", "small", "medium", "large"]:
        try:
            r = summary_rows(load_spec(s), crop, pixels)
        except ConfigError as e:
            _fail(str(e))
        table.add_row(s, f"{r['params'] / 1e6:.2f} M", str(r["blocks"]), str(r["features"]), f"{r['flops_256'] / 1e9:.2f}", f"{r['flops_full'] / 1e9:.2f}")
    console.print(table)


@app.command("test")
def test_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    checkpoint: str = typer.Option("best", help="best (by val), last, or ema (last EMA weights)."),
    again: bool = typer.Option(False, "--again", help="Evaluate even though this run was tested before (recorded)."),
) -> None:
    """Evaluate a run on the test split, once."""
    from .evaluate import AlreadyTested, evaluate_test_set

    try:
        r = evaluate_test_set(run_dir, checkpoint, again)
    except AlreadyTested as e:
        _fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"test ({r['count']} images, checkpoint {checkpoint} of epoch {r['epoch']}): top-1 {r['top1']:.4f}  "
                  f"top-5 {r['top5']:.4f}  balanced {r['balanced_acc']:.4f}  -> {run_dir / 'test.json'}")


@app.command()
def diagnose(run_dir: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Underfitting, overfitting, fitting, diverged, unstable or not converged, with the numbers and the next step."""
    from .diagnose import diagnose_run

    d = diagnose_run(run_dir)
    console.print(f"[bold]{d.verdict}[/]")
    for r in d.reasons:
        console.print(f"  - {r}")
    console.print(f"next: {d.next_step}")


@app.command()
def note(run_dir: Path = typer.Argument(...), text: str = typer.Argument(..., help="An observation for the run's card.")) -> None:
    """Add an observation to a run (part 5 of its card)."""
    from .report import add_note

    add_note(run_dir, text)
    console.print(f"noted in {run_dir / 'card.md'}")


@app.command()
def runs(root: Path = typer.Option(Path("runs"), help="Folder holding the run folders.")) -> None:
    """A table of all runs: number, name, hypothesis, predecessor, best val, gap, diagnosis, epochs, images/s, test."""
    from .report import runs_table

    rows = runs_table(root)
    if not rows:
        _fail(f"no runs in {root}")
    t = Table()
    for c in rows[0]:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(v) for v in r.values()])
    console.print(t)


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Two or more run folders."),
    out: Path = typer.Option(Path("compare.png"), help="Figure to write."),
) -> None:
    """Curves of several runs overlaid in one figure, plus each config's diff against the first."""
    from .report import compare as cmp

    path, diffs = cmp(run_dirs, out)
    for k, d in diffs.items():
        console.print(f"[bold]{k}[/] vs {run_dirs[0].name}:")
        for key, (a, b) in d.items():
            console.print(f"  {key}: {a} -> {b}")
    console.print(f"figure: {path}")


@app.command()
def report(root: Path = typer.Option(Path("runs"), help="Folder holding the run folders.")) -> None:
    """One Markdown and HTML document with every run's card, in order."""
    from .records import plot_run, read_run_info
    from .report import list_runs, write_report

    for p in list_runs(root):
        if not (p / "plots").is_dir():
            plot_run(p, read_run_info(p).get("classes") or [str(i) for i in range(29)])
    md, html = write_report(root)
    console.print(f"report: {md} and {html}")


@app.command()
def explore(
    src: Optional[Path] = typer.Argument(None, help="MAMe root or folder of CSVs (default: the vendored real metadata)."),
    out: Path = typer.Option(Path("explore"), help="Folder for explore.md and the PNGs."),
) -> None:
    """A data report: counts per class/split/museum, size and aspect histograms, a sample grid per class."""
    from .explore import explore as run_explore

    s = run_explore(src, out)
    console.print(f"{s['rows']:,} images: {s['splits']}; report in {out / 'explore.md'}")
