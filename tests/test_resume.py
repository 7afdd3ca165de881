"""Resume is exact and interruptions are clean, on every loader.

The matrix: loader (DALI in CPU-only mode, the fallback) x model randomness (none; dropout + drop-path) x EMA, every
run with mixup, cutmix and colour jitter; each cut three times (inside an epoch at a log step, between two log steps,
during validation) and resumed to the end, then compared bit for bit with the run that was never cut. Then the same
promise through the command line, as a user meets it: Ctrl-C sent to the process group as a terminal sends it, and
SIGTERM, to a training run with either loader, and to `mame-fast shard`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mame_fast.config import load
from mame_fast.input import build_loader, dali_available
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.train import checkpoint as ckpt
from mame_fast.train import loop
from mame_fast.train.loop import run

from .helpers import cfg_for, cli_env

LOADERS = ["dali", "pil"] if dali_available() else ["pil"]
RANDOM = {"optim.mixup": 0.2, "optim.cutmix": 0.2, "data.color_jitter": 0.2}  # the step's and the loader's draws


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders ended with the same weights, EMA, optimizer state and metrics, bit for bit."""
    x, y = ckpt.load(a / "last.pt"), ckpt.load(b / "last.pt")
    for part in ("model", "ema"):
        assert (x[part] is None) == (y[part] is None)
        for k in x[part] or {}:
            assert torch.equal(x[part][k], y[part][k]), (part, k)
    for s, t in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(s[k], t[k]) for k in s)
    ma, mb = read_metrics(a), read_metrics(b)
    for key in ("val", "val_ema", "train_loss", "train_top1", "grad_norm"):
        assert [r.get(key) for r in ma] == [r.get(key) for r in mb], key


def signal_during_validation(monkeypatch, epoch: int) -> None:
    """SIGTERM to this process while epoch ``epoch`` (1-based) is validated: the run stops at the next epoch's start."""
    real = loop.evaluate

    def evaluate(model, loader, rt, classes, e=0):
        if e == epoch - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, loader, rt, classes, e)

    monkeypatch.setattr(loop, "evaluate", evaluate)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["no-ema", "ema"])
def test_resume_is_exact_after_any_cut(shards, tmp_path, monkeypatch, dropout_spec, loader, dropout, ema):
    """Three cuts of one run, each resumed in a fresh trainer (new loaders, the RNG restored from last.pt): at a log step
    inside epoch 2, between two log steps inside it, and by a signal during its validation; the end equals the run that
    was never cut. (A loader that drew from the global RNG as it started shifted every later dropout mask: issue 33.)"""
    extra = {"epochs": 3, "data.loader": loader, "optim.ema": ema, "log_every": 2, **RANDOM,
             **({"model": dropout_spec} if dropout else {})}
    ref = run(cfg_for(shards, tmp_path / "ref", **extra), name="ref")
    steps = ckpt.load(ref / "last.pt")["global_step"] // 3
    assert steps > 4
    cut = run(cfg_for(shards, tmp_path / "cut", max_steps=steps + 2, **extra), name="cut")  # epoch 2, at log step 2
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (1, 2)
    run(load(cut / "config.yaml", [f"max_steps={steps + 3}"]), name="cut", resume=cut)  # between log steps 2 and 4
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (1, 3)
    with monkeypatch.context() as m:
        signal_during_validation(m, epoch=2)
        run(load(cut / "config.yaml", ["max_steps=0"]), name="cut", resume=cut)
    assert read_run_info(cut)["status"] == "interrupted"
    assert (ckpt.load(cut / "last.pt")["epoch"], ckpt.load(cut / "last.pt")["step"]) == (2, 0)
    run(load(cut / "config.yaml"), name="cut", resume=cut)
    assert read_run_info(cut)["status"] == "finished" and len(read_run_info(cut)["resumes"]) == 3
    assert_same_run(ref, cut)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_loader_leaves_the_global_rng_alone(shards, loader):
    """Building, priming and reading a loader draws nothing from the RNGs that dropout, drop-path and the model's
    initialization draw from: where a resumed run starts its loaders is then irrelevant to its masks."""
    import random

    import numpy as np

    cfg = cfg_for(shards, Path("unused"), **{"data.loader": loader, "data.threads": 2}).data
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for train in (True, False):
        L = build_loader(cfg, "train" if train else "val", train, seed=0)
        L.prime(1, 2)
        for _ in zip(range(3), L.epoch(1, 2)):
            pass
        next(iter(L.epoch(0)))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


# -- through the command line, as a user meets it ------------------------------------------------------------


@contextlib.contextmanager
def as_terminal(cmd: list[str], cwd: Path) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` as a terminal starts a foreground job: its own process group, which a Ctrl-C reaches whole (the
    command and its worker processes), and SIGINT at its default disposition (a background job of a script inherits
    it ignored, which would hide what a user meets). Whatever is left of the group when the test ends is killed: a
    command that hangs on a signal (the failure these tests look for) must not outlive its test."""

    def foreground() -> None:
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen(cmd, env=cli_env(), cwd=cwd, preexec_fn=foreground, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def wait_for(pattern: str, folder: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(folder.glob(pattern)):
        assert p.poll() is None and time.time() < deadline, f"{pattern} never appeared: {p.communicate()[0][-2000:]}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def issue_spec(tmp_path_factory) -> Path:
    """The configuration the fault report used: 2 residual stages, dropout 0.2, drop-path 0.1."""
    p = tmp_path_factory.mktemp("spec") / "two_stages.yaml"
    p.write_text("stem_width: 16\nstages:\n  - {width: 24, depth: 1, stride: 2, block: residual}\n"
                 "  - {width: 48, depth: 1, stride: 2, block: residual}\ndropout: 0.2\ndrop_path: 0.1\n")
    return p


def train_cmd(shards: Path, out: Path, spec: Path, loader: str, *more: str) -> list[str]:
    sets = [f"data.shards={shards}", f"out={out}", "data.res=full", "data.pixels=40000", "data.batch_size=8",
            "data.threads=2", "epochs=4", "optim.ema=0.9", f"model={spec}", f"data.loader={loader}", "hist_epochs=0",
            "evidence=false", *more]
    return [sys.executable, "-m", "mame_fast", "train", "--name", "t"] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory, issue_spec) -> dict[str, Path]:
    refs = {}
    for loader in LOADERS:
        out = tmp_path_factory.mktemp(f"ref-{loader}")
        subprocess.run(train_cmd(shards, out, issue_spec, loader), env=cli_env(), cwd=out, check=True, capture_output=True)
        refs[loader] = next(out.glob("*-t"))
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_saves_and_resume_is_exact(shards, tmp_path, issue_spec, uninterrupted, loader, sig):
    """Ctrl-C (to the whole process group, DataLoader's workers included) or SIGTERM early in epoch 2: a resumable
    checkpoint, status interrupted, the resume command printed, exit code 3, no traceback; `--resume` then ends bit for
    bit where the run that was never interrupted ended, model and EMA weights alike."""
    with as_terminal(train_cmd(shards, tmp_path, issue_spec, loader, "log_every=3"), tmp_path) as p:
        wait_for("*-t/metrics.jsonl", tmp_path, p)
        os.killpg(p.pid, sig)
        out = p.communicate(timeout=120)[0]
    d = next(tmp_path.glob("*-t"))
    assert p.returncode == 3 and "Traceback" not in out and f"--resume {d}" in out.replace("\n", ""), out[-3000:]
    assert read_run_info(d)["status"] == "interrupted" and ckpt.load(d / "last.pt")["epoch"] >= 1
    r = subprocess.run([sys.executable, "-m", "mame_fast", "train", "--resume", str(d)], env=cli_env(), cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_run(uninterrupted[loader], d)


@pytest.mark.slow
def test_ctrl_c_stops_a_range_test_cleanly(shards, tmp_path):
    """Ctrl-C to `mame-fast lr-find` and its fallback loader's workers: exit code 3, no traceback, the folder says
    interrupted and holds no checkpoint, and its diagnosis says to run the test again (there is nothing to resume)."""
    from mame_fast.records.kinds import diagnose_run

    sets = [f"data.shards={shards}", f"out={tmp_path}", "data.res=256", "data.crop=48", "data.batch_size=8",
            "data.loader=pil", "data.threads=2"]
    cmd = [sys.executable, "-m", "mame_fast", "lr-find", "--start", "1e-7", "--end", "1e-6", "--steps", "100000",
           *[a for s in sets for a in ("--set", s)]]  # a rate too small to diverge: it runs until stopped
    with as_terminal(cmd, tmp_path) as p:
        wait_for("*-lr-find/run.json", tmp_path, p)
        time.sleep(1)  # into its steps
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=60)[0]
    d = next(tmp_path.glob("*-lr-find"))
    assert p.returncode == 3 and "Traceback" not in out and "the range test stopped" in " ".join(out.split()), out[-3000:]
    assert read_run_info(d)["status"] == "interrupted" and not list(d.glob("*.pt"))
    assert "Run `mame-fast lr-find` again" in diagnose_run(d).next_step


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_sharding_at_once_and_the_rerun_resumes(tmp_path, sig):
    """Ctrl-C to `mame-fast shard` and its pool: it stops at once (no second Ctrl-C), says how to resume and exits with
    3, leaving complete shards and no partial one; the same command then finishes, and the shards verify."""
    from mame_fast.data import metadata as md
    from mame_fast.data.sample import SampleSpec, write_sample

    root = tmp_path / "root"
    write_sample(root, SampleSpec(per_class=(6, 0, 0), max_side=900, large=0, seed=3), workers=2)
    cmd = [sys.executable, "-m", "mame_fast", "shard", str(root), "--out", str(tmp_path / "s"), "--max-pixels", "300000",
           "--shard-size", "0.05", "--workers", "2", "--splits", "train"]
    with as_terminal(cmd, tmp_path) as p:
        wait_for("s/full/train-*.tar", tmp_path, p)
        sent = time.time()
        os.killpg(p.pid, sig)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == 3 and time.time() - sent < 10 and "Traceback" not in out, out[-3000:]
    assert "interrupted: the complete shards are kept" in " ".join(out.split())
    folder = tmp_path / "s" / "full"
    assert not (folder / "manifest.json").exists() and not list(folder.glob("*.tmp")) and list(folder.glob("*.tar"))
    r = subprocess.run(cmd, env=cli_env(), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    r = subprocess.run([sys.executable, "-m", "mame_fast", "shard", str(folder), "--verify"], env=cli_env(), cwd=tmp_path,
                       capture_output=True, text=True)
    n = len(md.load_dir(root).split("train"))
    assert r.returncode == 0 and f"ok: {n} samples" in r.stdout, r.stdout
