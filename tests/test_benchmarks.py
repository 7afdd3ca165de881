"""The prepared GPU check keeps working: ``SMOKE=1 benchmarks/gpu_check.sh`` runs every step of it on this
machine (a tiny sample, GPU rows skipped) and writes its report."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = (out / "gpu_check.md").read_text()
    for step in ("gpu_tests", "sample", "train_throughput", "demo", "loader_throughput"):
        assert f"- {step}: ok in" in report, report[:2000]
    assert "- phase 1 (side by side): " in report and "- in all: " in report and " skipped in " in report
    assert report.count("real loader / in-memory batches: **") == 2  # 256 and full
    assert report.count(" steady) and ") == 2 and report.count(" in its first 3 steps (") == 2  # the first epoch's parts
    assert "PilLoader on cpu" in report and "| real loader, 1 threads (same process, alternating) |" in report
    assert "| PIL fallback |" in report and "| augment limit |" in report and "demo finished in" in report
    # Cores busy counts the fallback's worker processes (2 of them here), not only the training process's threads.
    fallback_rows = [line.split("|") for line in report.splitlines() if line.startswith("| PIL fallback |")]
    assert fallback_rows and all(float(row[-2]) >= 1.0 for row in fallback_rows), fallback_rows
    assert sorted(p.name for p in (out / "results").iterdir()) == sorted(
        p.name for p in (out / "results").glob("*_throughput_*.md")) and len(list((out / "results").iterdir())) == 2
    with tarfile.open(out / "logs.tar.gz") as t:
        steps = ("gpu_tests", "sample", "train_throughput", "demo", "loader_throughput")
        assert {f"logs/{s}.log" for s in steps} <= set(t.getnames())


@pytest.mark.slow
def test_step_contention_runs(tmp_path):
    """The probe of the step's speed with each loader alive (its H100 figures are in benchmarks/results/)."""
    from mame_fast.input import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    env = dict(os.environ, MAME_FAST_BENCH_WORK=str(tmp_path / "work"), MAME_FAST_RESULTS=str(tmp_path / "results"))
    r = subprocess.run([sys.executable, "step_contention.py", "--model", "tiny", "--per-class", "3", "--batch-size", "8",
                        "--steps", "2", "--passes", "1", "--workers", "2", "--crop", "64"],
                       cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (saved,) = (tmp_path / "results").glob("step_contention_*.md")
    rows = [line.split("|") for line in saved.read_text().splitlines() if line.startswith("| ") and "stage" not in line]
    assert len(rows) == 8 and all(float(row[2].split()[0]) > 0 for row in rows), rows


def test_cpu_loader_probes_run(shards):
    """The probes of the CPU loaders' serial costs keep working (their figures are in benchmarks/results/)."""
    from mame_fast.input import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_loader_probes as probes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = probes.tail_dispatch([1, 2], batches=1, rounds=1)
    assert len(rows) == 2 and all(r.count("|") == 7 for r in rows)
    ips, own = probes._loader_run(str(shards), "full", 2, epochs=2)
    assert ips > 0 and own > 0
    assert probes._graph_run(str(shards), "full", 2, 4, iterations=5) > 0
