"""The trainer: training learns, resume is exact, torchrun over two nodes agrees, the test set runs once, Ctrl-C
and NaN stop cleanly, the bf16 path runs whole, fillers weigh nothing, and the step's parts do what they say."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mame_fast.config import load
from mame_fast.input.reader import open_split
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.train import checkpoint as ckpt
from mame_fast.train.loop import TrainingDiverged, run
from mame_fast.train.model import build
from mame_fast.train.spec import ModelSpec, StageSpec

from .helpers import Dispatched, cfg_for, cli_env


def test_training_reduces_the_loss(shards, tmp_path):
    d = run(cfg_for(shards, tmp_path, epochs=4, **{"optim.ema": 0.9}), name="learn")
    rows = read_metrics(d)
    assert len(rows) == 4 and rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05
    assert {"top1", "top5", "balanced_acc", "per_class", "confusion"} <= set(rows[-1]["val"])
    assert "val_ema" in rows[-1] and sum(map(sum, rows[-1]["val"]["confusion"])) == 29
    for name in ("curves", "training", "confusion", "per_class", "histograms"):
        assert (d / "plots" / f"{name}.png").stat().st_size > 5000
    assert (d / "config.yaml").is_file() and (d / "best.pt").is_file() and (d / "last.pt").is_file()
    assert read_run_info(d)["status"] == "finished"


def cut_inside_epoch_2_then_resumed(shards, folder, steps_per_epoch: int, **extra) -> Path:
    """A run stopped by max_steps inside epoch 2, after epoch 1's validation and checkpoint, then resumed to its end."""
    cut = run(cfg_for(shards, folder, max_steps=steps_per_epoch + steps_per_epoch // 2, **extra), name="cut")
    st = ckpt.load(cut / "last.pt")
    assert st["epoch"] == 1 and 0 < st["step"] < steps_per_epoch  # inside epoch 2, after epoch 1 was validated
    assert len(read_metrics(cut)) == 1
    return run(load(cut / "config.yaml", ["max_steps=0"]), name="cut", resume=cut)


@pytest.mark.parametrize("res", ["256", "full"])
def test_resume_is_exact(shards, tmp_path, res, dropout_spec):
    """Cut inside epoch 2, after epoch 1's validation and checkpoint, then resumed: the weights, the EMA weights, the
    optimizer state and every validation result equal an uninterrupted run's, bit for bit. Dropout and drop-path
    make the RNG matter; mixup, cutmix and colour jitter make the loader's per-step draws matter."""
    extra = {"epochs": 3, "data.res": res, "data.pixels": 3000, "optim.mixup": 0.2, "optim.cutmix": 0.2, "optim.ema": 0.9,
             "model": dropout_spec, "data.color_jitter": 0.2}
    full = run(cfg_for(shards, tmp_path / "a", **extra), name="full")
    resumed = cut_inside_epoch_2_then_resumed(shards, tmp_path / "b", ckpt.load(full / "last.pt")["global_step"] // 3, **extra)
    a, b = ckpt.load(full / "last.pt"), ckpt.load(resumed / "last.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert all(torch.equal(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for x, y in zip(s.values(), t.values()))
    va, vb = read_metrics(full), read_metrics(resumed)
    assert [r["val"] for r in va] == [r["val"] for r in vb] and [r["val_ema"] for r in va] == [r["val_ema"] for r in vb]
    # Whole-epoch training metrics, also for the epoch cut in the middle (its running sums were checkpointed).
    for key in ("train_loss", "train_top1", "grad_norm"):
        assert [r[key] for r in va] == pytest.approx([r[key] for r in vb], rel=1e-12), key
def test_nan_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    """A run whose loss becomes non-finite in epoch 2 (resumed with an absurd learning rate) stops with a message
    naming its last good checkpoint, which is epoch 1's, untouched."""
    d = run(cfg_for(shards, tmp_path, epochs=1, **{"optim.name": "sgd", "optim.label_smoothing": 0}), name="nan")
    good = (d / "last.pt").read_bytes()
    cfg = load(d / "config.yaml", ["epochs=3", "optim.lr=1e12", "optim.warmup_epochs=0", "optim.schedule=constant"])
    with pytest.raises(TrainingDiverged, match=rf"loss became (nan|inf) at epoch 2 .*last good checkpoint is {d / 'last.pt'}"):
        run(cfg, name="nan", resume=d)
    assert read_run_info(d)["status"] == "diverged"
    assert (d / "last.pt").read_bytes() == good and ckpt.load(d / "last.pt")["epoch"] == 1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, args: list[str]) -> list[str]:
    """Two torchrun 'nodes' of one process each over loopback (gloo), running `mame-fast` with ``args``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    procs = [subprocess.Popen(torchrun + ["--node-rank", str(r), "-m", "mame_fast"] + args, env=cli_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


@pytest.mark.slow
def test_torchrun_two_nodes_over_loopback(shards, tmp_path, dropout_spec):
    """Two torchrun 'nodes' agree on the weights and split every epoch exactly; rank 0 draws the evidence pictures over
    the whole validation split; a run cut inside epoch 2 and resumed under torchrun ends with the weights of the
    uninterrupted one (each rank's dropout RNG restored)."""
    sets = [f"data.shards={shards}", "data.res=full", "data.pixels=3000", "data.batch_size=8", "data.threads=1", "epochs=2",
            "record_samples=true", "hist_epochs=0", f"model={dropout_spec}", "evidence=false"]
    args = lambda name, *more: ["train", "--name", name] + [a for s in sets + [f"out={tmp_path}", *more] for a in ("--set", s)]  # noqa: E731
    _torchrun(tmp_path, args("ddp", "evidence=true"))
    d = next(tmp_path.glob("*-ddp"))
    assert all((d / "plots" / f"{p}.png").is_file() for p in ("batches", "errors", "activation_maps"))
    assert json.loads((d / "plots" / "evidence.json").read_text())["count"] == len(open_split(shards, "val"))
    r0, r1 = (json.loads((d / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["weights_sha256"] == r1["weights_sha256"]
    n = len(open_split(shards, "train"))
    for e in range(2):
        seen = r0["seen"][e] + r1["seen"][e]
        assert sorted(seen) == list(range(n))  # every training sample once per epoch in total
        assert r0["seen"][e] and r1["seen"][e]
    assert len(read_metrics(d)) == 2
    steps = ckpt.load(d / "last.pt")["global_step"] // 2
    _torchrun(tmp_path, args("cut", f"max_steps={steps + 2}"))
    cut = next(tmp_path.glob("*-cut"))
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (1, 2)
    _torchrun(tmp_path, ["train", "--resume", str(cut), "--set", "max_steps=0"])
    for r in range(2):
        assert json.loads((cut / f"rank{r}.json").read_text())["weights_sha256"] == r0["weights_sha256"], r
def _train_cli(shards: Path, out: Path, name: str, *more: str) -> list[str]:
    sets = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=4", "data.threads=1",
            "epochs=2", "hist_epochs=0", "log_every=1", "evidence=false", *more]
    return [sys.executable, "-m", "mame_fast", "train", "--name", name] + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_ctrl_c_sigterm_and_sigusr1_raise_the_same_flag(sig):
    """Ctrl-C, SIGTERM and SIGUSR1 (what SLURM's --signal sends) all set the flag the loop checks at its log steps
    (the whole path, checkpoint and exit code 3, runs in the SIGTERM test above), and the old handlers come back."""
    from mame_fast.train.loop import signal_flag

    before = signal.getsignal(sig)
    with signal_flag() as signalled:
        assert not signalled()
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
        assert signalled()
    assert signal.getsignal(sig) is before


def test_bf16_life_of_a_full_resolution_run(shards, tmp_path):
    """The GPU's dtype path, on CPU (issue 10: it crashed at the end of epoch 1 on the H200, and here with
    precision=bf16): bf16 batches and autocast at full resolution with EMA, histograms and the shape warm-up,
    then `test` and `report`, through the command line."""
    from typer.testing import CliRunner

    from mame_fast.cli import app
    from mame_fast.input import build_loader

    cli = CliRunner()
    sets = [f"out={tmp_path}", "precision=bf16", "optim.ema=0.9", "epochs=2", "hist_epochs=2", "warmup=always",
            "data.pixels=3000", "data.batch_size=16", "data.threads=1", "log_every=2"]
    args = ["train", "--res", "full", "--shards", str(shards), "--name", "bf16"] + [a for s in sets for a in ("--set", s)]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    d = next(tmp_path.glob("*-bf16"))
    info = read_run_info(d)
    assert info["status"] == "finished" and info["warmup_s"] > 0
    cfg = load(d / "config.yaml")
    assert cfg.precision == "bf16"
    want = {s: [list(x) for x in build_loader(cfg.data, s, s == "train", 0).shapes()] for s in ("train", "val")}
    assert info["batch_shapes"] == want and info["shape_count"] == {k: len(v) for k, v in want.items()}
    out = " ".join(r.output.split())
    assert f"batch shapes (rows x height x width), the same in every epoch: training {len(want['train'])}: " in out
    assert all(f"{n}x{h}x{w}" in out for n, h, w in want["train"] + want["val"])
    assert sorted(p.name for p in (d / "hist").glob("*.npz")) == ["epoch_001.npz", "epoch_002.npz"]
    assert "val_ema" in read_metrics(d)[-1]
    assert all((d / "plots" / f"{p}.png").is_file() for p in ("batches", "errors", "activation_maps"))  # in bf16 too
    r = cli.invoke(app, ["test", str(d)])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "test.json").read_text())["count"] == len(open_split(shards, "test"))
    r = cli.invoke(app, ["report", "--root", str(tmp_path)])
    assert r.exit_code == 0 and "bf16" in (tmp_path / "report.md").read_text()


def inject_overflow(monkeypatch, at_backward: int) -> None:
    """Every model the trainer builds from now on gets an infinite gradient in its classifier at backward pass number
    ``at_backward`` (counted over the process): what an fp16 overflow does to a step."""
    from mame_fast.train import loop

    real, calls = loop.build_model, [0]

    def build(spec):
        model = real(spec)

        def hook(grad):
            calls[0] += 1
            return grad * float("inf") if calls[0] == at_backward else grad

        model.fc.weight.register_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", build)


@pytest.mark.slow
def test_fp16_life_of_a_full_resolution_run(shards, tmp_path, monkeypatch, dropout_spec):
    """The pre-Ampere GPUs' dtype path, on the CPU: fp16 autocast with a GradScaler at full resolution with EMA and
    histograms; an overflowing gradient in epoch 1, which the scaler skips (the weights stay, the scale halves, the run
    goes on, the epoch's row counts the skip); a cut inside epoch 2 and a resume equal to the run never cut, bit for bit,
    the scaler's state included; then `test` and `report`."""
    from typer.testing import CliRunner

    from mame_fast.cli import app

    extra = {"epochs": 3, "precision": "fp16", "data.res": "full", "data.pixels": 3000, "optim.ema": 0.9, "hist_epochs": 2,
             "model": dropout_spec, "optim.name": "sgd", "optim.lr": 0.1, "evidence": "true"}
    with monkeypatch.context() as m:
        inject_overflow(m, at_backward=3)
        ref = run(cfg_for(shards, tmp_path / "ref", **extra), name="fp16")
    steps = ckpt.load(ref / "last.pt")["global_step"] // 3
    with monkeypatch.context() as m:
        inject_overflow(m, at_backward=3)
        cut = run(cfg_for(shards, tmp_path / "cut", max_steps=steps + 2, **extra), name="fp16")
    assert ckpt.load(cut / "last.pt")["epoch"] == 1
    run(load(cut / "config.yaml", ["max_steps=0"]), name="fp16", resume=cut)  # no overflow after the cut: none was due
    rows = read_metrics(ref)
    assert [r["skipped_steps"] for r in rows] == [1, 0, 0] and all(math.isfinite(r["grad_norm"]) for r in rows)
    assert read_run_info(ref)["precision"]["chosen"] == "fp16" and read_run_info(ref)["status"] == "finished"
    a, b = ckpt.load(ref / "last.pt"), ckpt.load(cut / "last.pt")
    assert a["scaler"]["scale"] == 2.0**15 and a["scaler"] == b["scaler"]  # halved once, from 2**16
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [r["val"] for r in rows] == [r["val"] for r in read_metrics(cut)]
    assert sorted(p.name for p in (ref / "hist").glob("*.npz")) == ["epoch_001.npz", "epoch_003.npz"]
    assert all((ref / "plots" / f"{p}.png").is_file() for p in ("batches", "errors", "activation_maps"))  # in fp16 too
    cli = CliRunner()
    r = cli.invoke(app, ["test", str(ref)])
    assert r.exit_code == 0 and json.loads((ref / "test.json").read_text())["count"] == len(open_split(shards, "test"))
    r = cli.invoke(app, ["report", "--root", str(tmp_path / "ref")])
    assert r.exit_code == 0 and "precision fp16" in (tmp_path / "ref" / "report.md").read_text()


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_one(shards, tmp_path):
    """compile=true in mode reduce-overhead (CUDA graphs on a GPU; on a CPU inductor's kernels alone), in bf16, at full
    resolution: padded batches, so the masks, through a residual block, squeeze-excite and the pools. The run completes, and its
    training loss, validation and weights follow the eager run's: compiling changes how the step runs, not what it
    computes. One bucket: a second shape doubles the cold compile (59 s here), for torch's own dynamic-shape path."""
    spec = tmp_path / "small.yaml"  # a residual stage with squeeze-excite and a pool: every masked path, quick to compile
    spec.write_text("stem_width: 8\nstages:\n  - {width: 16, depth: 1, stride: 2, se: 0.25}\n"
                    "  - {width: 24, depth: 1, stride: 2}\n")
    extra = {"epochs": 1, "data.res": "full", "data.pixels": 3000, "data.buckets": 1, "hist_epochs": 0, "model": spec,
             "precision": "bf16"}
    eager = run(cfg_for(shards, tmp_path / "a", **extra), name="eager")
    fast = run(cfg_for(shards, tmp_path / "b", compile=True, compile_mode="reduce-overhead", **extra), name="compiled")
    (a,), (b,) = read_metrics(eager), read_metrics(fast)
    assert read_run_info(fast)["status"] == "finished"
    # run.json says what compiling did: here one graph set for the one shape, and no CUDA graphs (a CPU has none: inductor
    # counts them as skipped, silently); an eager run records nothing of it.
    c = read_run_info(fast)["compile"]
    assert c["mode"] == "reduce-overhead" and c["graphs"] >= 1 and c["cudagraph_skips"] >= 1, c
    assert c["cudagraph_skip_reasons"] == [] and "compile" not in read_run_info(eager)
    # In bf16, the GPU's dtype path, inductor rounds to bf16 at other points than eager does (measured: 1e-6 in the
    # losses, 2e-4 in any weight; in fp32, 1e-7 and 3e-6).
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], rel=1e-4)
    wa, wb = ckpt.load(eager / "last.pt")["model"], ckpt.load(fast / "last.pt")["model"]
    assert wa.keys() == wb.keys()  # the compiled wrapper's names (_orig_mod.) stay out of the checkpoint
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-2, atol=1e-3), k


def test_the_compile_account_names_inductors_reasons_and_counts_from_its_start():
    """What a GPU run's compile account holds when inductor skips CUDA graphs: inductor's own logging call (the one it
    makes on a GPU) reaches the watch with its reason, other inductor warnings do not, and a watch started later (the
    next run in the same process) counts from zero."""
    import logging

    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from mame_fast.train.loop import CompileWatch

    first = CompileWatch("reduce-overhead")
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
    logging.getLogger("torch._inductor.graph").warning("CUDAGraph supports dynamic shapes by recording a new graph")
    c = first.summary()
    assert c["cudagraph_skips"] == 1
    assert c["cudagraph_skip_reasons"] == ["skipping cudagraphs due to mutated inputs (2 instances)"]
    assert CompileWatch.describe(c).endswith("CUDA graphs skipped in 1 compilation: skipping cudagraphs due to mutated "
                                             "inputs (2 instances)")
    later = CompileWatch("default")
    assert later.summary() == {"mode": "default", "graphs": 0, "cudagraph_skips": 0, "cudagraph_skip_reasons": []}
    assert CompileWatch.describe(later.summary()) == "compiled in mode default: 0 graphs"


def test_warm_up_leaves_the_run_untouched():
    """The shape warm-up runs a copy of the model under a forked RNG: weights, BatchNorm statistics, gradients and
    the random stream of the run are as before (a model with dropout and drop-path, where the RNG matters)."""
    from mame_fast.train.runtime import setup_runtime
    from mame_fast.train.step import warm_up

    torch.manual_seed(0)
    model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 2, 2),), drop_path=0.2, dropout=0.3))
    model = model.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cost = warm_up(model, [(4, 32, 64), (4, 64, 32)], [(4, 32, 64)], setup_runtime("bf16"))
    assert cost > 0 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_fillers_weigh_nothing(shards):
    """A batch completed with fillers trains exactly as its real rows alone: the same loss, accuracy and update.
    (LayerNorm, so that rows do not see each other through batch statistics.)"""
    import copy

    import numpy as np

    from mame_fast.input import Batch, build_loader
    from mame_fast.train.runtime import setup_runtime
    from mame_fast.train.step import make_optimizer, make_schedule, train_step

    cfg = load(None, [f"data.shards={shards}", "data.res=256", "data.crop=48", "data.batch_size=16", "optim.label_smoothing=0.1"])
    b = list(build_loader(cfg.data, "val", False, 0).epoch(0))[-1]  # 29 images: 16, then 13 and 3 fillers
    assert b.real == 13 and len(b.images) == 16
    alone = Batch(b.images[:13], b.labels[:13], b.sizes[:13], b.index, b.padded, 13)
    rt = setup_runtime("fp32")
    out = []
    for batch in (b, alone):
        torch.manual_seed(0)
        model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2),), norm="layernorm2d"))
        opt = make_optimizer(model, cfg, 16)
        loss, correct, _ = train_step(model, batch, opt, make_schedule(opt, cfg, 10, 16), None, rt, cfg, np.random.default_rng(0))
        out.append((loss, correct, copy.deepcopy(model.state_dict())))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]
    for k in out[0][2]:
        torch.testing.assert_close(out[0][2][k], out[1][2][k], msg=k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_step_equals_the_eager_step(precision):
    """``StepGraphs`` (cuda_graphs=true) through ``train_step``, on batches of two shapes, some with fillers, each shape
    past its eager steps, its capture and several replays: every step's loss, correct count and grad norm, and the
    weights, BatchNorm statistics, EMA and optimizer state after, equal the eager step's bit for bit. Without CUDA the
    capture itself is left out; what is checked is the data flow a replay depends on (the batch copied into the shape's
    static tensors, one set of gradients zeroed by every step and read by the optimizer, the outputs cloned). On a GPU,
    tests/test_gpu.py compares a captured step with the eager one."""
    import numpy as np

    from mame_fast.input import Batch
    from mame_fast.train.runtime import Runtime
    from mame_fast.train.step import Ema, StepGraphs, make_optimizer, make_schedule, train_step

    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    rt = Runtime(0, 1, 0, torch.device("cpu"), dtype, torch.amp.GradScaler("cpu", enabled=False), True)
    cfg = load(None, ["optim.clip_grad=1.0", "optim.mixup=0.2", "optim.cutmix=0.2", "optim.label_smoothing=0.1",
                      "optim.ema=0.9", "optim.name=sgd"])
    gen = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randn(8, 3, 32, 32 + 16 * (i % 2), generator=gen).to(rt.dtype),
                     torch.randint(0, 29, (8,), generator=gen), torch.full((8, 2), 32, dtype=torch.int32), torch.arange(8),
                     False, 5 if i % 3 == 0 else 8) for i in range(12)]
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2),)))  # BatchNorm: its statistics must follow too
        opt = make_optimizer(model, cfg, 8)
        sched, ema = make_schedule(opt, cfg, 12, 8), Ema(model, decay=0.9)
        graphs = StepGraphs(model, opt, rt, cfg.optim.clip_grad) if graphed else None
        outs = [train_step(model, b, opt, sched, ema, rt, cfg, np.random.default_rng([0, i]), graphs)
                for i, b in enumerate(batches)]
        runs.append((outs, model.state_dict(), ema.module.state_dict(), opt.state_dict()["state"]))
    assert graphs.summary() == {"captured": False, "shapes": 2, "eager_steps": 4, "capture_s": 0.0}
    (eager, *want), (graphed, *got) = runs
    for i, (a, b) in enumerate(zip(eager, graphed, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (i, a, b)
    for a, b in zip(want[:2], got[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in zip(want[2].values(), got[2].values()))


def test_cuda_graphs_refuse_what_they_cannot_capture(shards, tmp_path):
    """compile=true (which captures on its own), more than one process (DDP's all-reduce), fp16 (the grad scaler's host
    bookkeeping): each a clear error before any run folder exists."""
    from mame_fast.config import ConfigError
    from mame_fast.train.runtime import Runtime
    from mame_fast.train.step import StepGraphs

    with pytest.raises(ConfigError, match="cuda_graphs=true and compile=true"):
        cfg_for(shards, tmp_path, cuda_graphs=True, compile=True)
    cfg = cfg_for(shards, tmp_path, cuda_graphs=True)
    cpu, off = torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="more than one process"):
        StepGraphs(model, opt, Runtime(0, 2, 0, cpu, torch.bfloat16, off, True), cfg.optim.clip_grad)
    with pytest.raises(ConfigError, match="fp16"):
        StepGraphs(model, opt, Runtime(0, 1, 0, cpu, torch.float16, torch.amp.GradScaler("cpu"), True), cfg.optim.clip_grad)
    StepGraphs(model, opt, Runtime(0, 1, 0, cpu, torch.bfloat16, off, True), cfg.optim.clip_grad)
    assert not list(tmp_path.iterdir())


def test_a_run_with_cuda_graphs_trains_as_the_eager_one(shards, tmp_path):
    """cuda_graphs=true through the trainer, at full resolution in bf16 (several shapes, fillers, mixup, EMA),
    uninterrupted and also cut inside epoch 2 and resumed: the same weights and metrics as the eager run, every training
    shape captured once its eager steps are done, and run.json saying so."""
    from mame_fast.input import build_loader

    extra = {"epochs": 3, "data.res": "full", "data.pixels": 3000, "precision": "bf16", "optim.mixup": 0.2,
             "optim.ema": 0.9, "optim.clip_grad": 1.0, "hist_epochs": 0, "record_samples": True}
    eager = run(cfg_for(shards, tmp_path / "a", **extra), name="eager")
    graphed = run(cfg_for(shards, tmp_path / "b", cuda_graphs=True, **extra), name="graphed")
    # Also cut inside epoch 2 and resumed: the resumed process captures its graphs anew, and the run stays exact.
    resumed = cut_inside_epoch_2_then_resumed(shards, tmp_path / "c", ckpt.load(eager / "last.pt")["global_step"] // 3,
                                              cuda_graphs=True, **extra)
    shapes = build_loader(load(graphed / "config.yaml").data, "train", True, 0).shapes()
    want = {"captured": False, "shapes": len(shapes), "eager_steps": 2 * len(shapes), "capture_s": 0.0}
    assert read_run_info(graphed)["cuda_graphs"] == want
    assert "cuda_graphs" not in read_run_info(eager)
    learnt = lambda d: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s", "data_wait")}  # noqa: E731
                        for r in read_metrics(d)]
    assert learnt(eager) == learnt(graphed) == learnt(resumed)
    digest = lambda d: json.loads((d / "rank0.json").read_text())["weights_sha256"]  # noqa: E731
    assert digest(eager) == digest(graphed) == digest(resumed)


def test_label_smoothing_spreads_the_target():
    from mame_fast.input.mixing import soft_targets

    t = soft_targets(torch.tensor([0, 3, 28]), 29, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[1, 3], torch.tensor(0.9 + 0.1 / 29)) and torch.allclose(t[1, 0], torch.tensor(0.1 / 29))
    assert torch.equal(soft_targets(torch.tensor([2]), 5, 0.0), torch.tensor([[0.0, 0, 1, 0, 0]]))


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    """Mixup: every image is lam * itself + (1 - lam) * its partner (the batch reversed), and so is its target.
    CutMix: a box of the partner is pasted, and the target weight is the area that stayed."""
    import numpy as np

    from mame_fast.config import OptimConfig
    from mame_fast.input.mixing import mix, soft_targets

    x = torch.rand(6, 3, 12, 20)
    t = soft_targets(torch.arange(6), 29, 0.0)
    xm, tm = mix(x, t, OptimConfig(mixup=0.4), np.random.default_rng(0))
    lam = float(tm[0, 0])
    assert 0 < lam < 1 and torch.allclose(tm, lam * t + (1 - lam) * t.flip(0))
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0))
    xc, tc = mix(x, t, OptimConfig(cutmix=1.0), np.random.default_rng(3))
    pasted = (xc != x).any(1)[0]  # where image 0 took its partner's pixels
    assert pasted.any() and torch.equal(xc[:, :, pasted], x.flip(0)[:, :, pasted])
    assert torch.equal(xc[:, :, ~pasted], x[:, :, ~pasted])
    keep = 1 - float(pasted.float().mean())
    assert torch.allclose(tc, keep * t + (1 - keep) * t.flip(0))
    assert mix(x, t, OptimConfig(), np.random.default_rng(0))[0] is x  # both off: untouched


def test_no_weight_decay_on_norms_and_biases():
    """One SGD step with zero gradients: only weight decay moves the parameters. Conv and linear weights shrink by
    exactly lr * (1 + momentum) * wd (Nesterov's first step); norm weights and all biases do not move."""
    from mame_fast.train.step import make_optimizer

    cfg = load(None, ["optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=0.01", "optim.momentum=0.9"])
    model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2),)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model, cfg, 256)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {k for k, v in before.items() if v.dim() > 1}  # conv and linear weights only
    for k in moved:
        torch.testing.assert_close(dict(model.named_parameters())[k], before[k] * (1 - 0.1 * 1.9 * 0.01))


def test_resume_with_overrides_records_them(shards, tmp_path):
    """--resume --set: the change applies (a new peak learning rate from the resume point), config.yaml becomes the
    config in effect, run.json keeps when and what changed, and the card's part 3 shows it."""
    from typer.testing import CliRunner

    from mame_fast.cli import app

    d = run(cfg_for(shards, tmp_path, epochs=1, **{"optim.lr": 0.01}), name="ovr")
    r = CliRunner().invoke(app, ["train", "--resume", str(d), "--set", "epochs=2", "--set", "optim.lr=0.02"])
    assert r.exit_code == 0, r.output
    info = read_run_info(d)
    assert info["resumes"][-1]["changes"] == {"epochs": [1, 2], "optim.lr": [0.01, 0.02]}
    assert load(d / "config.yaml").optim.lr == 0.02 and len(read_metrics(d)) == 2
    assert "`epochs` 1 -> 2, `optim.lr` 0.01 -> 0.02" in (d / "card.md").read_text()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_step_reads_nothing_back_and_updates_in_a_fixed_number_of_operations(name, precision):
    """The whole training step (targets, mixup, autocast forward and backward, clipping, the grad scaler's unscale,
    check and step, the optimizer, the schedule, EMA) asks no tensor for a host value: on a GPU that read is a sync
    (a parameter's step count in AdamW's bias correction, the scaler's found-inf check for fp16). And the optimizer's
    update takes as many operations for two stages as for one: a fixed count per step, not one or more per parameter.
    fp16's scaler runs here on the CPU, through the same GradScaler code as on a GPU."""
    import numpy as np

    from mame_fast.input import Batch
    from mame_fast.train.runtime import Runtime
    from mame_fast.train.step import Ema, make_optimizer, make_schedule, train_step

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    rt = Runtime(0, 1, 0, torch.device("cpu"), dtype, scaler, True)
    cfg = load(None, [f"optim.name={name}", "optim.clip_grad=1.0", "optim.mixup=0.2", "optim.label_smoothing=0.1",
                      "optim.ema=0.9"])
    update_ops = []
    for depth in (1, 2):
        torch.manual_seed(0)
        model = build(ModelSpec(stem_width=8, stages=tuple(StageSpec(16, 1, 2) for _ in range(depth))))
        opt = make_optimizer(model, cfg, 8)
        sched, ema, rng = make_schedule(opt, cfg, 10, 8), Ema(model, decay=0.9), np.random.default_rng(0)
        x = torch.randn(8, 3, 32, 32, dtype=dtype)
        batch = Batch(x, torch.arange(8), torch.full((8, 2), 32, dtype=torch.int32), torch.arange(8), False, 8)
        train_step(model, batch, opt, sched, ema, rt, cfg, rng)  # the first step creates the optimizer's state
        with Dispatched() as step:
            loss, _, _ = train_step(model, batch, opt, sched, ema, rt, cfg, rng)
        assert torch.isfinite(loss)
        read = [op for op in step.ops if op in ("aten._local_scalar_dense", "aten.is_nonzero")]
        assert not read, f"the step read {len(read)} values back to the host"
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        with Dispatched() as update:
            opt.step()
        update_ops.append(len(update.ops))
    assert update_ops[0] == update_ops[1] < 10, update_ops


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_step_clips_the_norm_of_every_gradient(name):
    """The step's grad norm is that of every parameter's gradient, both weight-decay groups (weights; norms and
    biases), and clipping scales them all: after a step, the gradients' total norm is the returned one when it is
    under optim.clip_grad, and optim.clip_grad when it is over."""
    import numpy as np

    from mame_fast.input import Batch
    from mame_fast.train.runtime import Runtime
    from mame_fast.train.step import make_optimizer, make_schedule, train_step

    rt = Runtime(0, 1, 0, torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False), True)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    batch = Batch(x, y, torch.full((8, 2), 32, dtype=torch.int32), torch.arange(8), False, 8)
    for clip in (1e6, 1e-3):
        torch.manual_seed(0)
        model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2), StageSpec(16, 1, 2))))
        cfg = load(None, [f"optim.name={name}", f"optim.clip_grad={clip}", "optim.weight_decay=0.05"])
        opt = make_optimizer(model, cfg, 8)
        assert len(opt.param_groups) == 2 and all(g["params"] for g in opt.param_groups)
        _, _, gnorm = train_step(model, batch, opt, make_schedule(opt, cfg, 10, 8), None, rt, cfg, np.random.default_rng(0))
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
        assert float(gnorm) > 1e-2
        torch.testing.assert_close(after, torch.as_tensor(min(float(gnorm), clip)), rtol=1e-4, atol=0)


def test_the_ema_averages_as_timms_in_two_operations():
    """``Ema`` (its tensor pairs gathered once) against timm's ModelEmaV3 over training steps of a BatchNorm model:
    every parameter and buffer equal (floats averaged, BatchNorm's counters copied), also after a state was loaded
    into both (a resume writes into the tensors the pairs hold); and, once its pairs are gathered, its update is two
    operations at any depth."""
    from timm.utils import ModelEmaV3

    from mame_fast.train.step import Ema

    for depth in (1, 2):
        torch.manual_seed(0)
        model = build(ModelSpec(stem_width=8, stages=tuple(StageSpec(16, 1, 2) for _ in range(depth))))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ours, timms = Ema(model, decay=0.8), ModelEmaV3(model, decay=0.8)
        for k in range(4):
            model(torch.randn(4, 3, 32, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if k == 2:  # as a resume does: another state loaded into both, after ours gathered its pairs
                other = {n: v + 1 if v.is_floating_point() else v + 5 for n, v in timms.state_dict().items()}
                ours.load_state_dict(other)
                timms.load_state_dict(other)
            with Dispatched() as update:
                ours.update(model)
            timms.update(model)
            assert k == 0 or len(update.ops) == 2, update.ops  # the first gathers the pairs
            for (name, a), b in zip(ours.state_dict().items(), timms.state_dict().values(), strict=True):
                assert torch.equal(a, b), (k, name)
        assert int(ours.module.stem[0].bn.num_batches_tracked) == 4  # copied from the model: its 4 forwards


def test_fp16_skips_are_counted_in_every_epoch_and_the_scale_survives_a_resume(shards, tmp_path, monkeypatch):
    """fp16 on the CPU, an overflow in epoch 2: the scaler skips it and epoch 2's row counts it (a new epoch's meter
    still counts skips); a cut after it, resumed, continues at the halved scale, as the run never cut."""
    extra = {"epochs": 2, "precision": "fp16", "optim.name": "sgd", "optim.lr": 0.05}
    plain = run(cfg_for(shards, tmp_path / "plain", **extra), name="fp16")
    per_epoch = ckpt.load(plain / "last.pt")["global_step"] // 2
    with monkeypatch.context() as m:
        inject_overflow(m, at_backward=per_epoch + 2)
        ref = run(cfg_for(shards, tmp_path / "ref", **extra), name="fp16")
    with monkeypatch.context() as m:
        inject_overflow(m, at_backward=per_epoch + 2)
        cut = run(cfg_for(shards, tmp_path / "cut", max_steps=per_epoch + 3, **extra), name="fp16")
    assert ckpt.load(cut / "last.pt")["scaler"]["scale"] == 2.0**15  # the overflow came before the cut
    run(load(cut / "config.yaml", ["max_steps=0"]), name="fp16", resume=cut)
    assert [r["skipped_steps"] for r in read_metrics(ref)] == [0, 1]
    a, b = ckpt.load(ref / "last.pt"), ckpt.load(cut / "last.pt")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0**15
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
