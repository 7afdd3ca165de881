"""The prepared GPU check keeps working: ``SMOKE=1 benchmarks/gpu_check.sh`` runs every step of it on this
machine (a tiny sample, GPU rows skipped) and writes its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
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
    assert "CUDA graphs captured by hand" in report  # the 256 variant's title, and its account of the captures:
    assert "- CUDA graphs: 1 batch shape run uncaptured (no CUDA), after 2 eager steps; 1 in the first epoch." in report
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


def _state_of_a_fresh_process() -> dict:
    import multiprocessing
    import threading

    import torch

    return {"threads": len(os.listdir("/proc/self/task")), "python_threads": threading.active_count(),
            "cuda_initialized": torch.cuda.is_initialized(), "start_method": multiprocessing.get_start_method(),
            "parent": os.getppid()}


def test_a_measured_configuration_starts_in_a_clean_process(monkeypatch):
    """benchmarks' fresh_process(): one new process per configuration, forked from a server that imported torch, with
    one thread, CUDA not initialized, and its own processes (DataLoader workers) started as in a user's run."""
    import multiprocessing

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import fresh_process

    states = []
    for _ in range(2):
        with fresh_process() as ex:
            states.append(ex.submit(_state_of_a_fresh_process).result())
    for st in states:
        assert st["threads"] == 1 and st["python_threads"] == 1 and not st["cuda_initialized"], st
        assert st["start_method"] == multiprocessing.get_all_start_methods()[0], st
        assert st["parent"] != os.getpid(), st  # a child of the server, not of this process
    assert states[0]["parent"] == states[1]["parent"]  # one server for all


_STAND_IN = """
#include <stdio.h>
#include <stdlib.h>
static int note(const char *what) {
    FILE *f = fopen(getenv("CUDA_CALLS"), "a");
    if (f) { fprintf(f, "%s\\n", what); fclose(f); }
    return 100;  /* CUDA_ERROR_NO_DEVICE */
}
int cuInit(unsigned flags) { return note("cuInit"); }
int cuDriverGetVersion(int *v) { return note("cuDriverGetVersion"); }
int cuDeviceGetCount(int *n) { return note("cuDeviceGetCount"); }
int cuGetProcAddress(const char *s, void **p, int v, unsigned long long f) { *p = 0; return note(s); }
int cuGetProcAddress_v2(const char *s, void **p, int v, unsigned long long f, void *st) { *p = 0; return note(s); }
"""


def test_the_fresh_process_server_leaves_the_cuda_driver_untouched(tmp_path):
    """A process forked after any call into the CUDA driver cannot use CUDA. So fresh_process()'s server may import only
    what never calls it: checked with a stand-in libcuda that logs every call, which torch's own CUDA check does reach."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the stand-in libcuda")
    (tmp_path / "cuda.c").write_text(_STAND_IN)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(tmp_path / "cuda.c")], check=True)
    calls = tmp_path / "calls"
    code = textwrap.dedent(f"""
        import importlib, json, os, sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from _common import PRELOAD

        def calls():
            path = os.environ["CUDA_CALLS"]
            return open(path).read().split() if os.path.exists(path) else []

        for m in PRELOAD:
            importlib.import_module(m)
        after_imports = calls()
        import torch
        torch.cuda.is_available()
        print(json.dumps({{"imports": after_imports, "is_available": calls()}}))
    """)
    env = dict(os.environ, CUDA_CALLS=str(calls), LD_LIBRARY_PATH=f"{tmp_path}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    if not seen["is_available"]:
        pytest.skip("this torch does not reach the stand-in libcuda (a real driver found first, or a CPU-only build)")
    assert seen["imports"] == [], seen


def test_a_graphed_step_leaves_the_host_the_steps_ends_only(monkeypatch):
    """step_ops.py's count of what the host still dispatches per step with cuda_graphs=true: the targets, the mask, the
    graph's input copies and output clones, the optimizer, the EMA and the running sums; the forward, backward and
    clipping (most of an eager step) are the graph's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import step_ops

    eager = step_ops.whole_step("tiny", "sgd", False)[0].ops
    graphed = step_ops.whole_step("tiny", "sgd", False, graphed=True)[0].ops
    assert graphed["aten.convolution"] == 0 and graphed["aten.copy_"] == 4 and graphed["aten.clone"] == 3
    assert graphed["aten._fused_sgd_"] == eager["aten._fused_sgd_"] and graphed["aten._foreach_lerp_"] == 1
    assert sum(graphed.values()) < 30 < 100 < sum(eager.values())


@pytest.mark.slow
def test_budget_schedule_benchmark_runs(shards, tmp_path):
    """The schedule against the constant budget (its CPU figures are in benchmarks/results/): both rows, and the ramp
    processes fewer training pixels than the constant run of the same epochs."""
    env = dict(os.environ, MAME_FAST_RESULTS=str(tmp_path / "results"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "budget_schedule.py", "--shards", str(shards), "--pixels", "9216", "--epochs", "2",
                        "--batch-size", "8"], cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (saved,) = (tmp_path / "results").glob("budget_schedule_*.md")
    rows: dict[str, list[str]] = {}
    for line in saved.read_text().splitlines():  # the first table's rows (the evaluation-budget table follows)
        if line.startswith(("| constant", "| schedule")):
            rows.setdefault(line.split("|")[1].strip(), line.split("|"))
    assert set(rows) == {"constant", "schedule"} and "ep 1-1: 2,304; ep 2-2: 9,216" in rows["schedule"][2]
    assert float(rows["schedule"][4].strip().rstrip("x")) < 0.9 and rows["constant"][4].strip() == "1.00x"
    assert "| 6,912 px | 9,216 px | 11,520 px | 13,824 px |" in saved.read_text() and "(chosen)" in saved.read_text()
