"""Models and the trainer: specs build and are padding-invariant, configs reject unknown keys, training
learns, resume is exact, torchrun over two nodes agrees, the test set runs once, Ctrl-C and NaN stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mame_fast import checkpoint as ckpt
from mame_fast.config import ConfigError, TrainConfig, load, merge, parse_sets
from mame_fast.evaluate import AlreadyTested, evaluate_test_set
from mame_fast.model import ModelSpec, StageSpec, build, load_spec
from mame_fast.records import read_metrics, read_run_info
from mame_fast.reader import open_split
from mame_fast.train import TrainingDiverged, run

FAMILY = ["tiny", "small", "medium", "large"]


@pytest.mark.parametrize("name", FAMILY)
def test_family_builds_forward_backward(name):
    m = build(load_spec(name))
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()  # fixed size (256 mode)
    sizes = torch.tensor([[64, 40], [50, 72]])
    out = m(torch.randn(2, 3, 64, 72), sizes)  # padded variable-shape batch
    assert out.shape == (2, 29) and torch.isfinite(out).all()


def _randomize_norms(m):
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("block", ["residual", "inverted"])
def test_padding_does_not_change_a_samples_output(block):
    torch.manual_seed(0)
    spec = ModelSpec(stem_width=16, stem_depth=2, stages=(StageSpec(24, 2, 2, block, se=0.25), StageSpec(48, 2, 2, block, se=0.25)),
                     act="silu", head_width=64)
    m = build(spec).eval()
    _randomize_norms(m)
    imgs = [torch.randn(1, 3, 61, 83), torch.randn(1, 3, 96, 40)]
    batch = torch.zeros(2, 3, 96, 128)
    for i, im in enumerate(imgs):
        batch[i, :, : im.shape[2], : im.shape[3]] = im
    with torch.no_grad():
        padded = m(batch, torch.tensor([[61, 83], [96, 40]]))
        for i, im in enumerate(imgs):
            torch.testing.assert_close(padded[i], m(im)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m(batch)[0], m(imgs[0])[0], atol=1e-5)  # without the mask it would differ


def test_unknown_config_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; valid keys here: .*lr.*momentum"):
        merge(TrainConfig(), parse_sets(["optim.lrr=1"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*epochs"):
        load(None, ["epoch=3"])
    bad = tmp_path / "x.yaml"
    bad.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown config key 'data.batchsize'; valid keys here: .*batch_size"):
        load(bad)
    with pytest.raises(ConfigError, match=r"epochs: expected int"):
        load(None, ["epochs=many"])
    spec = tmp_path / "m.yaml"
    spec.write_text("stages:\n  - {width: 8, dpth: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown config key 'dpth'"):
        load_spec(spec)
    assert load(None, ["optim.lr=0.5", "data.res=full"]).optim.lr == 0.5


def cfg_for(shards: Path, out: Path, **kw) -> TrainConfig:
    sets = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "log_every=2", "hist_epochs=2", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01"]
    sets += [f"{k}={v}" for k, v in kw.items()]
    return load(None, sets)


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


@pytest.mark.parametrize("res", ["256", "full"])
def test_resume_is_exact(shards, tmp_path, res):
    extra = {"epochs": 2, "data.res": res, "data.pixels": 3000, "optim.mixup": 0.2, "optim.cutmix": 0.2}
    full = run(cfg_for(shards, tmp_path / "a", **extra), name="full")
    steps = open_split(shards, "train").__len__() // 16  # ~ a step count inside epoch 1
    cut = run(cfg_for(shards, tmp_path / "b", max_steps=steps, **extra), name="cut")
    st = ckpt.load(cut / "last.pt")
    assert (st["epoch"], st["step"]) != (2, 0)  # it really stopped early
    resumed = run(load(cut / "config.yaml", ["max_steps=0"]), name="cut", resume=cut)
    a, b = ckpt.load(full / "last.pt")["model"], ckpt.load(resumed / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_test_set_runs_once(shards, tmp_path):
    d = run(cfg_for(shards, tmp_path, epochs=1), name="once")
    first = evaluate_test_set(d)
    assert first["count"] == 29 and 0 <= first["top1"] <= 1
    with pytest.raises(AlreadyTested, match=r"already evaluated on the test set at .* top-1"):
        evaluate_test_set(d)
    again = evaluate_test_set(d, again=True)
    assert again["top1"] == first["top1"]
    ledger = [json.loads(x) for x in (tmp_path / "test_ledger.jsonl").read_text().splitlines()]
    assert [x["again"] for x in ledger] == [False, True]


def test_nan_stops_with_a_clear_message(shards, tmp_path):
    cfg = cfg_for(shards, tmp_path, epochs=2, **{"optim.name": "sgd", "optim.lr": 1e12, "optim.label_smoothing": 0})
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*last good checkpoint"):
        run(cfg, name="nan")
    d = next(tmp_path.glob("*-nan"))
    assert read_run_info(d)["status"] == "diverged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_torchrun_two_nodes_over_loopback(shards, tmp_path):
    """Two torchrun 'nodes' (one process each, gloo) agree on the weights and split every epoch exactly."""
    port = _free_port()
    args = ["-m", "mame_fast", "train", "--name", "ddp", "--set", f"data.shards={shards}", "--set", f"out={tmp_path}",
            "--set", "data.res=full", "--set", "data.pixels=3000", "--set", "data.batch_size=8", "--set", "data.threads=1",
            "--set", "epochs=2", "--set", "record_samples=true", "--set", "hist_epochs=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    procs = [subprocess.Popen(torchrun + ["--node-rank", str(r)] + args, env=_cli_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    d = next(tmp_path.glob("*-ddp"))
    r0, r1 = (json.loads((d / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["weights_sha256"] == r1["weights_sha256"]
    n = len(open_split(shards, "train"))
    for e in range(2):
        seen = r0["seen"][e] + r1["seen"][e]
        assert sorted(seen) == list(range(n))  # every training sample once per epoch in total
        assert r0["seen"][e] and r1["seen"][e]
    assert len(read_metrics(d)) == 2


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(shards, tmp_path):
    cmd = [sys.executable, "-m", "mame_fast", "train", "--name", "intr", "--set", f"data.shards={shards}", "--set", f"out={tmp_path}",
           "--set", "data.res=256", "--set", "data.crop=48", "--set", "data.batch_size=4", "--set", "data.threads=1",
           "--set", "epochs=50", "--set", "hist_epochs=0", "--set", "log_every=1"]
    p = subprocess.Popen(cmd, env=_cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*-intr/metrics.jsonl")):
        time.sleep(0.2)  # wait for one finished epoch, so that training is under way
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    d = next(tmp_path.glob("*-intr"))
    assert read_run_info(d)["status"] == "interrupted", out
    st = ckpt.load(d / "last.pt")
    assert st["epoch"] >= 1 and st["epoch"] < 50
    assert "--resume" in out


def test_bf16_life_of_a_full_resolution_run(shards, tmp_path):
    """The GPU's dtype path, on CPU (issue 10: it crashed at the end of epoch 1 on the H200, and here with
    precision=bf16): bf16 batches and autocast at full resolution with EMA, histograms and the shape warm-up,
    then `test` and `report`, through the command line."""
    from typer.testing import CliRunner

    from mame_fast.cli import app
    from mame_fast.pipeline import build_loader

    cli = CliRunner()
    sets = [f"out={tmp_path}", "precision=bf16", "optim.ema=0.9", "epochs=2", "hist_epochs=2", "warmup=always", "data.pixels=3000",
            "data.batch_size=16", "data.threads=1", "log_every=2"]
    r = cli.invoke(app, ["train", "--res", "full", "--shards", str(shards), "--name", "bf16"] + [a for s in sets for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    d = next(tmp_path.glob("*-bf16"))
    info = read_run_info(d)
    assert info["status"] == "finished" and info["warmup_s"] > 0
    cfg = load(d / "config.yaml")
    assert cfg.precision == "bf16"
    want = {s: [list(x) for x in build_loader(cfg.data, s, s == "train", 0).shapes()] for s in ("train", "val")}
    assert info["batch_shapes"] == want and info["shape_count"] == {k: len(v) for k, v in want.items()}
    assert f"batch shapes per epoch: {len(want['train'])} in training, {len(want['val'])} in validation" in r.output
    assert sorted(p.name for p in (d / "hist").glob("*.npz")) == ["epoch_001.npz", "epoch_002.npz"]
    assert "val_ema" in read_metrics(d)[-1]
    r = cli.invoke(app, ["test", str(d)])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "test.json").read_text())["count"] == len(open_split(shards, "test"))
    r = cli.invoke(app, ["report", "--root", str(tmp_path)])
    assert r.exit_code == 0 and "bf16" in (tmp_path / "report.md").read_text()


def test_warm_up_leaves_the_run_untouched():
    """The shape warm-up runs a copy of the model under a forked RNG: weights, BatchNorm statistics, gradients and
    the random stream of the run are as before (a model with dropout and drop-path, where the RNG matters)."""
    from mame_fast.runtime import setup_runtime
    from mame_fast.train import warm_up

    torch.manual_seed(0)
    model = build(ModelSpec(stem_width=8, stages=(StageSpec(16, 2, 2),), drop_path=0.2, dropout=0.3)).to(memory_format=torch.channels_last)
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

    from mame_fast.pipeline import Batch, build_loader
    from mame_fast.runtime import setup_runtime
    from mame_fast.train import make_optimizer, make_schedule, train_step

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
        loss, correct, _ = train_step(model, batch, opt, make_schedule(opt, cfg, 10), None, rt, cfg, np.random.default_rng(0))
        out.append((loss, correct, copy.deepcopy(model.state_dict())))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]
    for k in out[0][2]:
        torch.testing.assert_close(out[0][2][k], out[1][2][k], msg=k)
