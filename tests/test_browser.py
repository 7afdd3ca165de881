"""The report as a reader sees it: loaded in headless Chromium (tools/chromium.sh), every picture loads, one column,
each picture as wide as the text with its caption under it, and a click on it opens it at full size."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mame_fast.cli import app

from .helpers import open_in_browser

FIXTURE = Path(__file__).parent / "fixtures" / "runs_629ef3b"
pytestmark = pytest.mark.browser


def test_the_report_loads_every_picture_in_a_browser(tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    r = CliRunner().invoke(app, ["report", "--root", str(root)])
    assert r.exit_code == 0, r.output
    page = root / "report.html"
    text = page.read_text()
    pictures = re.findall(r'<img src="([^"]+)"', text)
    assert len(pictures) >= 8 and all((root / p).is_file() for p in pictures)
    # Each picture links to itself (a click enlarges it) and has a caption; nothing floats beside it.
    assert len(re.findall(r'<figure><a href="([^"]+)"><img src="\1"', text)) == len(pictures)
    assert text.count("<figcaption>") == len(pictures) and "float" not in text and "48%" not in text
    shot = tmp_path / "report.png"
    assert open_in_browser(page, shot) == []
    im = Image.open(shot).convert("L")
    assert im.size == (1280, 2400) and max(im.getextrema()) - min(im.getextrema()) > 100  # drawn, not a blank page
