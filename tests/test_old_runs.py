"""Run folders written before the card became data still read: `runs`, `diagnose` and `report` on the folders that
commit 629ef3b wrote (tests/fixtures/runs_629ef3b: a range test, a 3-epoch run with its one test look, a 1 x 2 sweep;
checkpoints, plots and histograms left out to keep it small) say what that version said of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mame_fast.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "runs_629ef3b"

# What 629ef3b's `mame-fast diagnose` printed for each folder (its verdict and first reason).
DIAGNOSED = {
    "001-lr-find": ("range test", "the loss fell fastest at lr 0.000123 and was lowest at 0.0187 (per 256 images); "
                                  "suggested optim.lr 0.000123 (range 0.000123 to 0.00187)"),
    "002-tiny": ("underfitting", "training accuracy only 0.101 (< 0.6); losses plateaued (train 3.344, val 3.360)"),
    "003-lr-lr0.02-s0": ("underfitting", "training accuracy only 0.045 (< 0.6); losses plateaued (train 3.371, val 3.367)"),
    "004-lr-lr0.08-s0": ("underfitting", "training accuracy only 0.079 (< 0.6); losses plateaued (train 3.359, val 3.363)"),
}


def invoke(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())


@pytest.fixture
def old(tmp_path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    return root


def test_old_run_folders_list(old):
    code, out = invoke("runs", "--root", old)
    assert code == 0, out
    for name, cells in {"lr-find": ["range test", "finished"], "tiny": ["13.8% [5.5, 30.6]", "5.2% [1.8, 14.1]"],
                        "lr-lr0.02-s0": ["10.3% [3.6, 26.4]"], "lr-lr0.08-s0": ["10.3% [3.6, 26.4]"]}.items():
        assert name in out and all(c in out for c in cells), (name, out)


@pytest.mark.parametrize("folder", sorted(DIAGNOSED))
def test_old_run_folders_diagnose_as_before(old, folder):
    code, out = invoke("diagnose", old / folder)
    verdict, reason = DIAGNOSED[folder]
    assert code == 0 and out.startswith(verdict) and reason in out, out


def test_old_run_folders_report(old):
    code, out = invoke("report", "--root", old)
    assert code == 0, out
    md = (old / "report.md").read_text()
    for title in ("## #1: lr-find", "## #2: tiny", "## Test set: #2 tiny", "## Sweep: lr", "## #3: lr-lr0.02-s0"):
        assert title in md, title
    # The sweep's numbers, rebuilt from its members (its file named them by absolute path, elsewhere).
    assert "| optim.lr=0.02 | 1 | 10.3% +- inf | [#3](003-lr-lr0.02-s0/card.md) seed 0: 10.3% [3.6, 26.4] |" in md
    assert "#2 (tiny): best val top-1 13.8% [5.5, 30.6]" in md  # the sweep's part 1, as its old file said it
    assert "| TEST top-1 [95% interval] (run once) | 5.2% [1.8, 14.1] |" in md
    assert "learning-rate range test: 12 steps, sgd lr growing exponentially from 1e-05 to 10" in md
    html = (old / "report.html").read_text()
    assert html.count('<section class="card"') == md.count("\n## ") == 6
    assert (old / "002-tiny" / "plots" / "curves.png").is_file()  # drawn again: the fixture keeps none


def test_an_old_sweeps_family_card_is_rebuilt_by_name_without_shards(old):
    """`sweep --card NAME` reads the runs folder only (no shards, no model): on the old sweep, by --root or by the
    config's out."""
    (old / "sweep-lr.md").unlink()
    for args in (["--root", old], ["--set", f"out={old}"]):
        code, out = invoke("sweep", "--card", "lr", *args)
        assert code == 0 and (old / "sweep-lr.md").is_file(), out
        assert "| optim.lr=0.02 | 1 | 10.3% +- inf | #3 seed 0: 10.3% [3.6, 26.4] |" in (old / "sweep-lr.md").read_text()
    code, out = invoke("sweep", "--card", "nosuch", "--root", old)
    assert code == 2 and "no sweep named 'nosuch'" in out
