"""Shared tiny data: one generated MAMe root and its shards per test session (a few seconds)."""

from __future__ import annotations

import os

# Under pytest-xdist (`make test`: 2 processes on 2 cores) each process keeps to one OpenMP thread. With torch's default
# (a thread per core in each process) the threads spin-wait for each other across processes: the resume matrix took
# 165 s instead of 26 s on 2 cores. Set before torch is imported, as libgomp reads it when it loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

from mame_fast.data.sample import SampleSpec, write_sample
from mame_fast.data.shard import ShardSettings, write_shards

PACKAGE = str(Path(__file__).resolve().parent.parent / "mame_fast")
LIBRARIES = tuple({sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_warn = warnings.warn


def _raised_from_mame_fast() -> bool:
    """Whether the code that reached the warning through library frames only is mame_fast's: the frame nearest the
    warning that is not the standard library's or an installed package's."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARIES):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE)


def _warn_deprecations_from_mame_fast_as_errors(message, category=None, stacklevel=1, source=None, **kw):
    """A DeprecationWarning raised from mame_fast's own call of a library (torchvision's decoders warn from inside
    themselves, so a filter on the warning's module would not see it) fails the test: the next deprecation fails the
    suite instead of the users."""
    category = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(category, DeprecationWarning) and _raised_from_mame_fast():
        raise category(f"{message} (raised from mame_fast's own call: use the replacement)")
    return _warn(message, category, stacklevel + 1, source, **kw)


warnings.warn = _warn_deprecations_from_mame_fast_as_errors

# Split sizes that differ (87 train, 29 val, 58 test): a stage that reads the wrong split is caught by its count.
TINY = SampleSpec(per_class=(3, 1, 2), max_side=320, large=1, large_side=1600, seed=0)
BUDGET = 60_000  # pixels per stored image in the test shards: small, so every image is downscaled


@pytest.fixture(scope="session")
def mame_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mame") / "root"
    write_sample(root, TINY, workers=1)
    return root


@pytest.fixture(scope="session")
def shards(mame_root, tmp_path_factory) -> Path:
    """Full-variant shards of the tiny root: several shards per split (small shard size)."""
    out = tmp_path_factory.mktemp("shards")
    return write_shards(mame_root, out, ShardSettings(max_pixels=BUDGET, shard_size_mb=0.3), workers=1)


@pytest.fixture
def root_copy(mame_root, tmp_path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(mame_root, dst)
    return dst


@pytest.fixture(scope="session")
def dropout_spec(tmp_path_factory) -> Path:
    """A small model with dropout and drop-path: its training consumes the RNG, so resuming must restore it."""
    p = tmp_path_factory.mktemp("specs") / "dropout.yaml"
    p.write_text("stem_width: 16\nstages:\n  - {width: 24, depth: 1, stride: 2}\n  - {width: 48, depth: 2, stride: 2}\n"
                 "dropout: 0.3\ndrop_path: 0.2\n")
    return p
