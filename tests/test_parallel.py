"""`mame-fast sweep --parallel N`: the members run N at a time in processes of their own (the CPU's cores split between
them) and the family card holds the same numbers as the sweep run one member after another."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mame_fast.records.records import read_run_info
from mame_fast.records.rundir import list_runs

from .helpers import cli_env, train_sets


@pytest.mark.slow
def test_a_parallel_sweep_gives_the_sequential_sweeps_numbers(shards, tmp_path):
    def sweep(out: str, *more: str) -> dict:
        args = ["sweep", "optim.lr=0.02,0.05", "--name", "lr", *train_sets(shards, tmp_path / out, "epochs=2"), *more]
        r = subprocess.run([sys.executable, "-m", "mame_fast", *map(str, args)], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return json.loads((tmp_path / out / "sweep-lr.json").read_text())

    together, apart = sweep("parallel", "--parallel", "2"), sweep("sequential")
    assert together["mean_top1"] == apart["mean_top1"] and [m["best_val"] for m in together["members"]] == \
        [m["best_val"] for m in apart["members"]]
    runs = list_runs(tmp_path / "parallel")
    starts = sorted(read_run_info(r.path)["created"] for r in runs)
    ends = sorted(read_run_info(r.path)["ended"] for r in runs)
    assert len(runs) == 2 and starts[1] <= ends[0]  # the second started before the first ended: side by side
    assert (tmp_path / "parallel" / "jobs" / "lr-lr0.02-s0.out").is_file()
