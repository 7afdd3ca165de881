"""Shared by the tests: a training config for the tiny shards, small enough to run in seconds on 2 cores, the environment
of a `mame-fast` child process, and a record of the operations a block of code dispatches."""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from mame_fast.config import TrainConfig, load


def cfg_for(shards: Path, out: Path, **kw) -> TrainConfig:
    sets = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "log_every=2", "hist_epochs=2", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01",
            "evidence=false"]  # the pictures have tests of their own; in every other run they would cost seconds
    sets += [f"{k}={v}" for k, v in kw.items()]
    return load(None, sets)


def cli_env() -> dict:
    """The environment of a `mame-fast` child process: this checkout first, one OpenMP thread (as a pytest worker)."""
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")


class Dispatched(TorchDispatchMode):
    """The names of the operations dispatched inside (``aten.clone``, ``aten._local_scalar_dense``, ...), in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


_BROKEN_IMAGES = """<script>window.addEventListener("load", () => { const bad = [...document.images]
  .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.setAttribute("data-broken", JSON.stringify(bad)); });</script>"""


def chromium() -> str:
    """The headless browser (Debian's chromium, tools/chromium.sh). Missing: the test skips, unless CI asks for it
    (MAME_FAST_REQUIRE_BROWSER=1), where a missing browser fails instead of hiding the test."""
    import shutil

    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("MAME_FAST_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed: run tools/chromium.sh (CI must not skip the browser tests)")
    pytest.skip("needs chromium (tools/chromium.sh installs it)")


def open_in_browser(page: Path, screenshot: Path, width: int = 1280, height: int = 2400) -> list[str]:
    """Load ``page`` in headless Chromium as a reader would (file://, its pictures beside it): a screenshot of the top
    ``height`` px into ``screenshot``, and the src of every picture that did not load (a copy of the page with a
    load-time check runs in the same folder, so that relative paths resolve the same)."""
    import subprocess

    browser = chromium()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", _BROKEN_IMAGES + "</body>"))
    try:
        dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", f"--window-size={width},{height}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), shot.stderr[-2000:]
    import html
    import json
    import re

    found = re.search(r'data-broken="([^"]*)"', dom)
    assert found, f"the page did not finish loading: {dom[-500:]}"
    return json.loads(html.unescape(found.group(1)))


def invoke(*args) -> tuple[int, str]:
    """A `mame-fast` command in this process: its exit code and its output on one line, whatever the console's width."""
    from typer.testing import CliRunner

    from mame_fast.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())


def train_sets(shards: Path, out: Path, *more: str) -> list[str]:
    """--set options of a tiny one-epoch run at 48 px crops (``more`` overrides them: a later --set wins)."""
    base = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "hist_epochs=0", "epochs=1", "optim.name=sgd", "evidence=false", *more]
    return [a for s in base for a in ("--set", s)]


def soffice() -> str:
    """LibreOffice and poppler's pdftoppm/pdftotext (tools/libreoffice.sh). Missing: the test skips, unless CI asks for
    them (MAME_FAST_REQUIRE_OFFICE=1), where a missing renderer fails instead of hiding the test."""
    import shutil

    import pytest

    found = shutil.which("soffice")
    if found and shutil.which("pdftoppm") and shutil.which("pdftotext"):
        return found
    if os.environ.get("MAME_FAST_REQUIRE_OFFICE") == "1":
        pytest.fail("LibreOffice or poppler is not installed: run tools/libreoffice.sh (CI must not skip the slides' render)")
    pytest.skip("LibreOffice is not installed: tools/libreoffice.sh installs it")


_WORD = re.compile(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">(.*?)</word>')


def rendered_overflows(pptx: Path, pdf: Path, pages: Path, tolerance: float = 2.0) -> list[str]:
    """What LibreOffice drew where the deck did not plan it, measured on its PDF (every word's box, by pdftotext) and
    its pages as PNGs (pdftoppm): a word outside every shape's box, two words on top of each other, ink in the
    margins. Empty when the deck fits."""
    import subprocess

    import numpy as np
    from PIL import Image
    from pptx import Presentation

    deck = Presentation(str(pptx))
    xml = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages_xml = xml.split("<page ")[1:]
    problems = [] if len(pages_xml) == len(deck.slides) else [f"{len(pages_xml)} pages for {len(deck.slides)} slides"]
    for n, (slide, page) in enumerate(zip(deck.slides, pages_xml), 1):
        boxes = [(sh.name, sh.left / 12700, sh.top / 12700, (sh.left + sh.width) / 12700, (sh.top + sh.height) / 12700)
                 for sh in slide.shapes]
        words = [(float(a), float(b), float(c), float(d), t) for a, b, c, d, t in _WORD.findall(page)]
        for x0, y0, x1, y1, t in words:
            if not any(bx0 - tolerance <= x0 and x1 <= bx1 + tolerance and by0 - tolerance <= y0 and y1 <= by1 + tolerance
                       for _, bx0, by0, bx1, by1 in boxes):
                problems.append(f"page {n} ({slide.name}): {t!r} at ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) is outside "
                                "every box")
        for i, (ax0, ay0, ax1, ay1, at) in enumerate(words):
            for bx0, by0, bx1, by1, bt in words[i + 1:]:
                w, h = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
                if w > 0 and h > 0 and w * h > 0.25 * min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)):
                    problems.append(f"page {n} ({slide.name}): {at!r} and {bt!r} overlap")
    pages.mkdir(parents=True, exist_ok=True)
    subprocess.run(["pdftoppm", "-r", "36", "-png", str(pdf), str(pages / "page")], check=True)  # half a pixel per pt
    for png in sorted(pages.glob("page-*.png")):
        a = np.asarray(Image.open(png).convert("L"))
        k = a.shape[1] / 960  # pixels per point
        band = int(20 * k)  # the margins are 30 pt; nothing is drawn in their outer 20
        top = int(10 * k)  # the title starts 16 pt down
        edges = [a[:top], a[-band:], a[:, :band], a[:, -band:]]
        if any((e < 200).any() for e in edges):
            problems.append(f"{png.name}: ink in the margins")
    return problems
