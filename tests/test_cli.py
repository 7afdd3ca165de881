"""The command line is wired to the stages: each command on a real tiny run, exit codes and messages."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from mame_fast.cli import app
from mame_fast.config import load
from mame_fast.records.rundir import list_runs
from mame_fast.train.loop import run

cli = CliRunner()


@pytest.fixture(scope="module")
def runs_root(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cliruns")
    sets = [f"data.shards={shards}", f"out={root}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "epochs=2", "hist_epochs=0", "optim.name=adamw", "optim.lr=0.01"]
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
    code, out = invoke("report", "--root", runs_root)
    assert code == 0 and (runs_root / "report.html").is_file()
    code, out = invoke("test", a)
    assert code == 0 and "top-1" in out
    code, out = invoke("test", a)
    assert code == 2 and "already evaluated" in out


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
