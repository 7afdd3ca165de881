"""An install that works anywhere: a wheel built from the checkout (without setuptools' warnings about undeclared
packages), installed outside it, carries the shipped model specs, configs and metadata; `mame-fast model` and a
one-epoch training run from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_runs(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    run = lambda *a, **kw: subprocess.run(a, check=True, capture_output=True, text=True, **kw)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(ROOT))
    assert "Package would be ignored" not in built.stdout + built.stderr  # every package and data folder declared
    wheel = next(dist.glob("mame_fast-*.whl"))
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel))
    # The installed package, not the checkout: PYTHONPATH's copy comes before the editable install's finder.
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    cli = lambda *a: run(sys.executable, "-m", "mame_fast", *a, cwd=work, env=env).stdout  # noqa: E731
    where = run(sys.executable, "-c", "import mame_fast; print(mame_fast.__file__)", cwd=work, env=env).stdout
    assert where.startswith(str(site))
    out = cli("model")
    for spec in ("plain", "tiny", "small", "medium", "wide"):
        assert spec in out
    cli("sample", "mame", "--per-class", "2,1,1", "--max-side", "320", "--large", "0", "--workers", "1")
    cli("shard", "mame", "--out", "shards", "--max-pixels", "60000", "--workers", "1")
    cli("train", "--shards", "shards/full", "--name", "wheel", "--set", "epochs=1", "--set", "data.crop=64",
        "--set", "data.batch_size=16", "--set", "hist_epochs=0", "--set", "data.threads=1")
    assert (work / "runs" / "001-wheel" / "card.md").is_file()
    assert "stem_width: 24" in (work / "runs" / "001-wheel" / "model.yaml").read_text()  # the shipped tiny spec


def test_a_checkout_on_pythonpath_finds_the_shipped_configs(tmp_path):
    """The GPU machine runs the project from a copied checkout on PYTHONPATH, not installed: the shipped specs and
    configs are found there too (mame_fast.configs exists only in an install). The editable install's finder is
    removed, so that only the checkout is seen."""
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(ROOT)!r}); "
        "import mame_fast.config as c; from mame_fast.train.spec import load_spec; "
        "assert c.__file__.startswith(sys.path[0]), c.__file__; "
        "print(load_spec('small').stem_width, c.load('demo').epochs)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.split()) == 2
