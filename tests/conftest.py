"""Shared tiny data: one generated MAMe root and its shards per test session (a few seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mame_fast.data.sample import SampleSpec, write_sample
from mame_fast.data.shard import ShardSettings, write_shards

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
