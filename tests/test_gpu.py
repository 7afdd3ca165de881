"""What only CUDA can check (``pytest -m gpu``; skipped without a GPU, run by benchmarks/gpu_check.sh):
DALI's GPU batches equal the CPU path's, a full-resolution run completes in bf16, autocast is in use,
neither the loader nor the training step makes the host wait for the GPU, and the step captured as CUDA
graphs (cuda_graphs=true) trains as the eager one, beside the loaders' threads."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mame_fast.config import DataConfig, load
from mame_fast.input import build_loader, dali_available
from mame_fast.input.dali import DaliLoader
from mame_fast.input.reader import open_split
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.records.report import write_report
from mame_fast.train.loop import run
from mame_fast.train.model import build
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.spec import load_spec
from mame_fast.train.step import StepGraphs, make_optimizer, make_schedule, train_step
from mame_fast.train.testset import evaluate_test_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("res", ["256", "full"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_dali_gpu_batches_equal_the_cpu_path(shards, res, train, decode):
    """DALI on the GPU (nvJPEG, or libjpeg-turbo on its CPU threads, then resize/normalize/pad on the GPU) against
    libjpeg-turbo + the torch CPU tail: one plan, so the same samples, labels, sizes and padding, and pixels that
    differ only by decoder and resampling details."""
    cfg = DataConfig(shards=str(shards), res=res, loader="dali", pixels=20_000, crop=64, batch_size=8, threads=2, side_multiple=8,
                     decode=decode)
    split = open_split(shards, "val")
    gpu = DaliLoader(split, cfg, train, 0, 0, 1, CUDA, torch.float32)
    cpu = DaliLoader(split, cfg, train, 0, 0, 1, torch.device("cpu"), torch.float32)
    n = 0
    for a, b in zip(gpu.epoch(0), cpu.epoch(0), strict=True):
        assert a.images.is_cuda and a.images.shape == b.images.shape and a.real == b.real
        assert torch.equal(a.index, b.index) and torch.equal(a.labels.cpu(), b.labels) and torch.equal(a.sizes.cpu(), b.sizes)
        x = a.images.float().cpu()
        for k, (h, w) in enumerate(a.sizes.tolist()):
            assert x[k, :, h:].abs().sum() == 0 and x[k, :, :, w:].abs().sum() == 0
        assert (x - b.images).abs().mean() < 0.05
        n += a.real
    assert n == len(split)


def test_full_resolution_run_completes_in_bf16(shards, tmp_path):
    """The crash found on the H200: a full-resolution run with EMA and histograms, then test and report."""
    cfg = load(None, [f"data.shards={shards}", f"out={tmp_path}", "data.res=full", "data.pixels=20000", "data.batch_size=8",
                      "epochs=2", "hist_epochs=2", "optim.ema=0.9", "log_every=2", "cudnn_benchmark=true"])
    d = run(cfg, name="gpu-full")
    info = read_run_info(d)
    assert info["status"] == "finished" and info["device"].startswith("cuda") and info["warmup_s"] > 0
    assert len(read_metrics(d)) == 2 and "val_ema" in read_metrics(d)[-1]
    assert len(list((d / "hist").glob("epoch_*.npz"))) == 2
    assert evaluate_test_set(d)["count"] == len(open_split(shards, "test"))
    md, _ = write_report(tmp_path)
    assert "gpu-full" in md.read_text()


def _one_step_setup(shards, loader="auto", precision="auto"):
    cfg = load(None, [f"data.shards={shards}", "data.res=full", "data.pixels=20000", "data.batch_size=8", f"data.loader={loader}",
                      "data.color_jitter=0.2", "optim.mixup=0.2", "optim.clip_grad=1.0", f"precision={precision}"])
    rt = setup_runtime(cfg.precision)
    loader = build_loader(cfg.data, "train", True, 0, device=rt.device, dtype=rt.dtype)
    model = build(load_spec(cfg.model)).to(rt.device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, 8)
    return cfg, rt, loader, model, opt, make_schedule(opt, cfg, loader.steps(0), 8)


def test_bf16_autocast_is_in_use(shards):
    cfg, rt, loader, model, opt, sched = _one_step_setup(shards)
    assert rt.amp_dtype == torch.bfloat16  # precision=auto on a GPU
    seen = []
    model.stem[0].conv.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    b = next(iter(loader.epoch(0)))
    assert b.images.dtype == torch.bfloat16 and b.images.is_contiguous(memory_format=torch.channels_last)
    train_step(model, b, opt, sched, None, rt, cfg, np.random.default_rng(0))
    assert seen == [(torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("loader_kind,precision,graphed", [
    ("dali", "auto", False), ("pil", "auto", False), ("pil", "fp16", False), ("dali", "auto", True), ("pil", "auto", True)])
def test_no_host_sync_in_the_loader_or_the_step(shards, loader_kind, precision, graphed):
    """torch's sync debug mode turns any synchronizing call (.item(), a pageable copy, bincount, one_hot's
    checks) into an error, over steady steps: the host keeps queueing work ahead of the GPU. fp16: the grad
    scaler's found-inf check too (it stays on the GPU with a fused optimizer). graphed: the replayed step, once
    every shape is captured (a capture itself synchronizes, once per shape)."""
    if loader_kind == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    cfg, rt, loader, model, opt, sched = _one_step_setup(shards, loader_kind, precision)
    graphs = StepGraphs(model, opt, rt, cfg.optim.clip_grad) if graphed else None
    for e in range(1 + StepGraphs.EAGER * graphed):  # every shape once (lazy initialization), or until captured
        for b in loader.epoch(e):
            train_step(model, b, opt, sched, None, rt, cfg, np.random.default_rng(0), graphs)
    assert not graphed or graphs.summary()["shapes"] == len(loader.shapes())
    it = iter(loader.epoch(9))
    train_step(model, next(it), opt, sched, None, rt, cfg, np.random.default_rng(0), graphs)  # the epoch's one upload
    torch.cuda.synchronize()
    checked = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in it:
            train_step(model, b, opt, sched, None, rt, cfg, np.random.default_rng(0), graphs)
            checked += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked >= 5


def test_a_captured_step_trains_as_the_eager_one(shards):
    """cuda_graphs: the same batches (full resolution, several shapes, fillers, mixup, clipping, bf16) through the eager
    step and through StepGraphs, from the same weights: every shape captured, and every step's loss and the weights
    after follow the eager run's. A replay that read stale inputs, or gradients that one shape's graph left to the next,
    would drift far outside these bounds."""
    cfg, rt, loader, model, opt, sched = _one_step_setup(shards, "pil")
    # Each shape at least 4 times (eager, eager, capture, replay); copies, as a loader may reuse its device buffers.
    batches = [dataclasses.replace(b, images=b.images.clone(), labels=b.labels.clone())
               for e in range(4) for b in loader.epoch(e)]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for graphed in (False, True):
        model.load_state_dict(start)
        opt = make_optimizer(model, cfg, 8)
        sched = make_schedule(opt, cfg, len(batches), 8)
        graphs = StepGraphs(model, opt, rt, cfg.optim.clip_grad) if graphed else None
        torch.manual_seed(0)
        losses = [train_step(model, b, opt, sched, None, rt, cfg, np.random.default_rng([0, i]), graphs)[0]
                  for i, b in enumerate(batches)]
        runs.append((torch.stack(losses).cpu(), {k: v.float().cpu() for k, v in model.state_dict().items()}))
    g = graphs.summary()
    assert g["captured"] and g["shapes"] == len(loader.shapes()) and g["eager_steps"] == 2 * g["shapes"], g
    (la, wa), (lb, wb) = runs
    torch.testing.assert_close(lb, la, rtol=2e-3, atol=2e-3)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-2, atol=1e-3), k
    assert any(not torch.equal(wb[k], start[k].float().cpu()) for k in wb)


def test_a_run_with_cuda_graphs_completes_beside_the_loaders_threads(shards, tmp_path):
    """A trainer run with cuda_graphs=true at full resolution: each shape is captured while the loader's threads (DALI's
    where it is installed, else the fallback's pinned copies; the no-sync test above captures beside the fallback too)
    keep calling CUDA; the run finishes and run.json says every shape was captured."""
    cfg = load(None, [f"data.shards={shards}", f"out={tmp_path}", "data.res=full", "data.pixels=20000", "data.batch_size=8",
                      "epochs=3", "hist_epochs=0", "optim.ema=0.9", "log_every=2", "cuda_graphs=true"])
    d = run(cfg, name="gpu-graphs")
    info = read_run_info(d)
    assert info["status"] == "finished" and info["device"].startswith("cuda")
    g = info["cuda_graphs"]
    assert g["captured"] and g["shapes"] == info["shape_count"]["train"] and g["capture_s"] > 0, g
    assert len(read_metrics(d)) == 3


# A model that reads a value back to the host in its forward: fine eagerly, impossible inside a CUDA graph's capture.
_SYNCING_MODEL = """
import torch
from mame_fast.train.runtime import setup_runtime
from mame_fast.train.step import StepGraphs

class Syncs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, sizes):
        return self.fc(x) * (1.0 if x.abs().max().item() >= 0 else 0.0)

rt = setup_runtime("fp32")
model = Syncs().to(rt.device)
graphs = StepGraphs(model, torch.optim.SGD(model.parameters(), lr=0.1), rt, 0.0)
x = torch.randn(2, 4, device=rt.device)
labels = torch.tensor([0, 2], device=rt.device)
for _ in range(StepGraphs.EAGER + 1):
    graphs(x, torch.nn.functional.one_hot(labels, 3).float(), labels, torch.ones(2, dtype=torch.bool, device=rt.device))
"""


def test_a_step_that_cannot_be_captured_says_which_setting_to_drop(tmp_path):
    """A capture that fails (here a host sync in the model's forward) names the setting and how to go on without it,
    not only CUDA's words. In a process of its own: a failed capture may leave CUDA's state unfit for the next test."""
    script = tmp_path / "syncing.py"
    script.write_text(_SYNCING_MODEL)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert p.returncode != 0, p.stdout + p.stderr
    assert "capturing the training step as a CUDA graph (batch shape (2, 4)) failed" in p.stderr, p.stderr
    assert "--set cuda_graphs=false" in p.stderr, p.stderr


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_a_primed_gpu_loader_gives_the_same_batches(shards, decode):
    """prime() on the GPU path (outputs bound to torch's stream): the primed pipeline's batches are a fresh one's."""
    cfg = DataConfig(shards=str(shards), res="full", loader="dali", pixels=20_000, batch_size=8, threads=2, side_multiple=8,
                     decode=decode)
    split = open_split(shards, "train")
    primed, fresh = (DaliLoader(split, cfg, True, 0, 0, 1, CUDA, torch.bfloat16) for _ in range(2))
    primed.prime(1, 1)
    torch.cuda.synchronize()  # the primed runs finish before anything else is queued: the worst case for buffer reuse
    got = [(b.index, b.images.clone()) for b in primed.epoch(1, 1)]
    want = [(b.index, b.images.clone()) for b in fresh.epoch(1, 1)]
    assert len(got) == len(want) == primed.steps(1) - 1
    for (i1, x1), (i2, x2) in zip(got, want):
        assert torch.equal(i1, i2) and (x1.float() - x2.float()).abs().max() < 1e-2


def _sum_on(device: str) -> float:
    return float(torch.ones(1024, device=device).sum())


def test_a_benchmark_configuration_can_use_cuda_in_its_forked_process(monkeypatch):
    """The benchmarks measure each configuration in a process forked from a server that imported torch and timm
    (benchmarks/_common.fresh_process). CUDA works there only if the server never called the driver (the CPU suite
    checks that with a stand-in libcuda); this is the same check on the real driver."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import fresh_process

    for _ in range(2):  # a second child of the same server too
        with fresh_process() as ex:
            assert ex.submit(_sum_on, "cuda").result() == 1024.0
