"""The README's main job, ``make demo``: a generated stand-in sample -> shards -> a learning-rate range test -> training
at the rate it suggests -> diagnosis -> report, all under one folder, through the same functions the commands use.

The demo follows its own evidence, as a student should: run #2 trains at the rate the range test #1 suggests (its
card's diff against #1 shows the change and where the rate lies in the suggested range). A ``--set optim.lr`` wins.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load

HYPOTHESES = {
    "lr-find": "The range test shows where the demo's learning rate lies: a rate that learns, below divergence.",
    "train": "At the rate the range test #{n} suggests, a tiny CNN learns the generated stand-in images' classes well "
             "above chance (3.4%) in a few CPU minutes.",
}


def run(out: Path, workers: int, config: str, per_class: tuple[int, int, int], sets: list[str], console=None,
        say=print) -> Path:
    """Everything the demo makes goes under ``out``; returns the trained run's folder, whose run.json says how it ended
    (an interrupted demo stops there). ``console``: the trainer's live display; ``say``: one line per stage."""
    from .data import metadata as md
    from .data.sample import SampleSpec, choose_rows, write_sample
    from .data.shard import ShardSettings, verify, write_shards
    from .records.kinds import diagnose_run
    from .records.records import read_run_info
    from .records.report import write_report
    from .records.rundir import RunDir
    from .records.slides import write_deck
    from .train import loop, lrfind

    t0 = time.time()
    root, shards = out / "mame", out / "shards"
    cfg = load(config, [f"data.shards={shards / 'full'}", f"out={out / 'runs'}", *sets])
    if not (root / "MAMe_dataset.csv").exists():
        spec = SampleSpec(per_class=per_class, max_side=1000, large=2, seed=0)
        say(f"sample: {len(choose_rows(md.load_dir(), spec, md.toy_files()))} stand-in images into {root}")
        write_sample(root, spec, workers=workers)
    say(f"shard: {root} -> {shards / 'full'}")
    folder = write_shards(root, shards, ShardSettings(variant="full", max_pixels=1_000_000, shard_size_mb=32.0),
                          workers=workers)
    if problems := verify(folder):
        from .data.format import ShardError

        raise ShardError(f"{folder}: the demo's shards do not verify: {problems[:3]}")
    say("shards verified")
    found = lrfind.run(cfg, "lr-find", {"after": [], "hypothesis": HYPOTHESES["lr-find"]}, console)
    n = RunDir(found).number
    if not any(s.split("=", 1)[0].strip() == "optim.lr" for s in sets):
        cfg = load(None, [f"optim.lr={read_run_info(found)['lr_find']['suggested_lr']!r}"], base=cfg)  # unrounded
    trained = loop.run(cfg, "demo-tiny", meta={"after": [n], "hypothesis": HYPOTHESES["train"].format(n=n)},
                       console=console)
    if read_run_info(trained).get("status") != "finished":
        return trained
    d = diagnose_run(trained)
    say(f"diagnosis: {d.verdict}: {'; '.join(d.reasons)}\nnext: {d.next_step}")
    title = "Demo on generated stand-in images (not MAMe photographs)"
    deck = write_deck(out / "runs", title=title)  # before the report, which links it
    md_path, html_path = write_report(out / "runs", title=title)
    say(f"card: {trained / RunDir.CARD}\nreport: {md_path} ({html_path})\nplots: {trained / RunDir.PLOTS}\n"
        f"slides: {deck.pptx}" + (f" and {deck.pdf}" if deck.pdf else f" ({deck.note})") + "\n"
        f"demo finished in {time.time() - t0:.0f} s")
    return trained
