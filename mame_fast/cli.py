"""The ``mame-fast`` command line: one sub-command per stage, each a thin layer over a module function."""

from __future__ import annotations

import json
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
) -> None:
    """The README's main job: sample data -> shards -> (training -> report, when those stages exist)."""
    from . import shard as sh

    root = out / "mame"
    if not (root / "MAMe_dataset.csv").exists():
        sample(root, per_class="40,10,10", max_side=1000, large=2, seed=0, workers=workers, zip=False)
    shard(root, out=out / "shards", res="full", max_side=None, max_pixels=None, quality=90, shard_size=32.0,
          workers=workers, splits="train,val,test", seed=0, skip_bad=False, verify=False)
    problems = sh.verify(out / "shards" / "full")
    console.print(f"verify: {'ok' if not problems else problems}")
