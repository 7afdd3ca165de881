"""Shared by the tests: a training config for the tiny shards, small enough to run in seconds on 2 cores, the environment
of a `mame-fast` child process, and a record of the operations a block of code dispatches."""

from __future__ import annotations

import os
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
