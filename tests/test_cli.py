"""The command line is wired to the stages: each command on a real tiny run, exit codes and messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mame_fast.cli import app
from mame_fast.config import load
from mame_fast.records.rundir import list_runs
from mame_fast.records.stats import pct
from mame_fast.train.loop import run

cli = CliRunner()


@pytest.fixture(scope="module")
def runs_root(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cliruns")
    sets = [f"data.shards={shards}", f"out={root}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "epochs=2", "hist_epochs=0", "optim.name=adamw", "optim.lr=0.01", "evidence=false"]
    run(load(None, sets), name="a")
    run(load(None, sets + ["optim.lr=0.02"]), name="b", meta={"after": [1], "hypothesis": "a higher lr"})
    return root


def invoke(*args):
    r = cli.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_run_commands(runs_root, tmp_path):
    a, b = [r.path for r in list_runs(runs_root)]
    code, out = invoke("diagnose", b)
    assert code == 0 and "next:" in out
    code, out = invoke("note", b, "looks fine")
    assert code == 0 and "Note: looks fine" in (b / "card.md").read_text()
    code, out = invoke("runs", "--root", runs_root)
    assert code == 0 and re.search(r"│\s*1\s*│", out) and re.search(r"│\s*2\s*│", out)  # one row per run
    code, out = invoke("compare", a, b, "--out", tmp_path / "cmp.png")
    assert code == 0 and "optim.lr: 0.01 -> 0.02" in out and (tmp_path / "cmp.png").is_file()
    code, out = invoke("compare", a, b)  # by default beside the runs, not in the folder it was started from
    assert code == 0 and (runs_root / "compare-1-2.png").is_file() and not Path("compare.png").exists()
    code, out = invoke("report", "--root", runs_root)
    assert code == 0 and (runs_root / "report.html").is_file()
    code, out = invoke("test", a)
    assert code == 0 and re.search(r"top-1 \d+\.\d% \[\d+\.\d, \d+\.\d\] \(95% interval\)", out), out
    code, out = invoke("test", a)
    assert code == 2 and "already evaluated" in out
    invoke("report", "--root", runs_root)  # the test top-1 and its interval on the card, in the table and the report
    t = json.loads((a / "test.json").read_text())
    shown = pct(t["top1"], t["count"])
    assert "[" in shown and f"| TEST top-1 [95% interval] (run once) | {shown} |" in (a / "card.md").read_text()
    assert (runs_root / "report.md").read_text().count(shown) >= 2  # the runs table and the card
    code, out = invoke("runs", "--root", runs_root)
    assert shown in " ".join(out.split())


def test_flags_show_no_value_in_help():
    """A flag takes no value (`--verify`, not `--verify true`, nor `--help`): no command's help shows one."""
    code, out = invoke("shard", "--help")
    assert code == 0 and "--verify" in out and not re.search(r"--(verify|reindex|skip-bad)\s+<bool>", out)
    for name in ["", *sorted(c.name for c in typer.main.get_command(app).commands.values())]:
        code, out = invoke(*name.split(), "--help")
        assert code == 0 and "--help" in out and "<bool>" not in out, (name, out)


def test_other_commands(shards, tmp_path):
    code, out = invoke("model", "tiny")
    assert code == 0 and "tiny" in out and "GFLOPs" in out
    code, out = invoke("shard", shards, "--verify")
    assert code == 0 and "ok:" in out
    code, out = invoke("explore", "--out", tmp_path / "ex")
    assert code == 0 and "37,407 images" in out
    code, out = invoke("train", "--set", "optim.lrr=1")
    assert code == 2 and "unknown config key 'optim.lrr'" in out
    code, out = invoke("shard", tmp_path, "--verify")
    assert code == 2 and "no manifest.json" in out


def test_preview_draws_what_the_network_is_fed_at_both_resolutions(shards, tmp_path):
    sets = [f"data.shards={shards}", "data.pixels=3000", "data.crop=48", "data.batch_size=8", "data.threads=1"]
    code, out = invoke("preview", "--out", tmp_path / "p", *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    assert (tmp_path / "p" / "preview_256.png").stat().st_size > 5000 and (tmp_path / "p" / "preview_full.png").is_file()


def test_lr_find_is_recorded_for_a_later_runs_card(shards, tmp_path):
    """The range test through the command line: a numbered folder with its plot and suggestion, no checkpoint, no change
    to the shards; a run that follows it (--after) cites it in part 1 of its card."""
    shard_files = lambda: {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if not p.name.startswith(".")}  # noqa: E731
    before = shard_files()  # (a hidden memo of verified checksums may be written by whichever run opens them first)
    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.res=256", "data.crop=48", "data.batch_size=16",
            "data.threads=1", "epochs=1", "hist_epochs=0", "evidence=false"]
    code, out = invoke("lr-find", "--steps", "12", *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    d = list_runs(tmp_path)[0].path
    assert (d / "plots" / "lr_find.png").is_file() and not (d / "last.pt").exists() and not (d / "best.pt").exists()
    assert "suggested optim.lr" in out and "learning-rate range test" in (d / "card.md").read_text()
    found = json.loads((d / "run.json").read_text())["lr_find"]
    assert re.search(rf"learning-rate range test: {found['steps']} steps, sgd lr growing exponentially from 1e-05 to 10 ",
                     (d / "card.md").read_text())  # not the epochs and schedule that the test does not use
    said = "until the loss diverged" if found["diverged"] else "without the loss diverging"  # what it recorded, in words
    assert f"per 256 images {said}" in (d / "card.md").read_text()
    assert shard_files() == before
    # Twice the top of the range, per 256 images: above it. At this batch of 16 the rate the optimizer uses is an eighth of
    # that, inside or below the range: the card must judge the rate per 256 images, as the range is given.
    low, high = found["range"]
    code, out = invoke("train", "--after", "1", "--name", "next", *[a for s in sets for a in ("--set", s)],
                       "--set", f"optim.lr={2 * high!r}")
    assert code == 0, out
    card = (list_runs(tmp_path)[1] / "card.md").read_text()
    assert "#1 (lr-find): learning-rate range test: the loss fell fastest at lr" in card
    assert f"optim.lr {2 * high:g} per 256 images lies above the range suggested by the range test #1 ({low:.3g} to " in card


@pytest.mark.parametrize("lr, where", [(0.001, "below"), (0.01, "inside"), (0.05, "inside"), (0.1, "inside"),
                                       (0.100001, "above"), (3.0, "above")])
def test_a_rate_lies_below_inside_or_above_a_range(lr, where):
    from mame_fast.records.facts import rate_position

    assert rate_position(lr, {"range": [0.01, 0.1]}) == where


def test_sweep_runs_the_grid_and_writes_a_family_card(shards, tmp_path):
    """2 values x 2 seeds: four ordinary runs with their cards, and one family card with a mean, an interval and a
    verdict per value."""
    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "epochs=1", "hist_epochs=0", "optim.name=adamw", "evidence=false"]
    code, out = invoke("sweep", "optim.lr=0.001,0.01", "--repeats", "2", "--name", "lr", "--hypothesis", "a larger lr",
                       *[a for s in sets for a in ("--set", s)])
    assert code == 0, out
    runs = list_runs(tmp_path)
    assert len(runs) == 4 and all((r / "card.md").is_file() for r in runs)
    names = sorted(r.path.name.split("-", 1)[1] for r in runs)
    assert names == ["lr-lr0.001-s0", "lr-lr0.001-s1", "lr-lr0.01-s0", "lr-lr0.01-s1"]
    card = (tmp_path / "sweep-lr.md").read_text()
    for value in ("optim.lr=0.001", "optim.lr=0.01"):
        assert re.search(rf"\| {re.escape(value)} \| 2 \| \d+\.\d% \+- \d+\.\d \| #\d+ seed 0: \d+\.\d% \[", card), card
    assert re.search(r"optim\.lr=0\.01 vs optim\.lr=0\.001: [+-]\d+\.\d points, (not )?conclusive", card)
    assert "**5 - Observations**" in card and "a larger lr" in card
    code, out = invoke("report", "--root", tmp_path)  # the family card is part of the report, after its runs
    assert code == 0 and "## Sweep: lr" in (tmp_path / "report.md").read_text(), out
    assert "<h2>Sweep: lr</h2>" in (tmp_path / "report.html").read_text()


def test_resume_auto_continues_the_unfinished_run_of_that_name(shards, tmp_path):
    """What a requeued cluster job does: the latest unfinished run of its --name continues; a finished one does not."""
    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "epochs=2", "hist_epochs=0", "evidence=false"]
    args = ["train", "--name", "job", "--resume", "auto"] + [a for s in sets for a in ("--set", s)]
    code, out = invoke(*args, "--set", "max_steps=3")  # nothing to resume yet: a new run, cut at step 3
    assert code == 0 and [r.path.name for r in list_runs(tmp_path)] == ["001-job"]
    code, out = invoke(*args, "--set", "max_steps=0")
    assert code == 0 and [r.path.name for r in list_runs(tmp_path)] == ["001-job"] and "finished" in out
    code, out = invoke(*args)
    assert code == 0 and [r.path.name for r in list_runs(tmp_path)] == ["001-job", "002-job"]
