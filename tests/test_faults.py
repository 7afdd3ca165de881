"""Faults and bad input as a user meets them, through the command line: each ends as one line naming the file or
key, with a distinct exit code (2 bad input, 3 interrupted, 4 diverged, 5 I/O), leaves no temporary file
behind, and run.json tells the truth."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mame_fast.cli import app
from mame_fast.records.records import read_run_info, run_status
from mame_fast.records.rundir import RunDir, list_runs
from mame_fast.train import checkpoint as ckpt

cli = CliRunner()


def invoke(*args) -> tuple[int, str]:
    r = cli.invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())  # one line, whatever the console's width


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def train_args(shards: Path, out: Path, *sets: str) -> list[str]:
    base = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "hist_epochs=0", "epochs=1", "optim.name=sgd", *sets]
    return ["train"] + [a for s in base for a in ("--set", s)]


@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs, mounted for the test (needs root; skipped elsewhere). ``small_disk(mb)`` mounts it."""
    mounted = []

    def mount(mb: float) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None or \
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mb * 1024)}k", "tmpfs", str(d)]).returncode:
            pytest.skip("needs root and mount to make a small disk")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)])


# -- bad config and options: refused before anything is written -----------------------------------------


@pytest.mark.parametrize("bad, message", [
    ("data.res=fulll", "data.res: 'fulll' is not one of '256', 'full'"),
    ("optim.schedule=cosin", "optim.schedule: 'cosin' is not one of 'cosine', 'onecycle', 'constant'"),
    ("data.loader=dalli", "data.loader: 'dalli' is not one of 'auto', 'dali', 'pil'"),
    ("data.shards=/nonexistent/shards", "/nonexistent/shards: no manifest.json"),
    ("model=nosuch", "model: 'nosuch' is neither a shipped spec"),
    ("data.batch_size=0", "data.batch_size: 0 is out of range; it must lie in [1, inf)"),
    ("data.batch_size=-1", "data.batch_size: -1 is out of range"),
    ("epochs=0", "epochs: 0 is out of range"),
    ("epochs=-1", "epochs: -1 is out of range"),
])
def test_bad_config_fails_before_any_run_folder(shards, tmp_path, bad, message):
    t = time.time()
    code, out = invoke(*train_args(shards, tmp_path / "runs", bad))
    assert code == 2 and message in out and "Traceback" not in out, out
    assert time.time() - t < 15
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", [("--max-pixels", "0"), ("--max-pixels", "-5"), ("--max-side", "0"), ("--shard-size", "-1"),
                                    ("--quality", "0"), ("--quality", "101")])
def test_out_of_range_shard_options_write_nothing(mame_root, tmp_path, option):
    code, out = invoke("shard", mame_root, "--out", tmp_path / "o", *option)
    assert code == 2 and option[0] in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_a_csv_row_with_missing_fields_is_named_with_its_line(root_copy, tmp_path):
    csv = root_copy / "MAMe_dataset.csv"
    lines = csv.read_text().splitlines()
    lines[5] = ",".join(lines[5].split(",")[:3])
    csv.write_text("\n".join(lines) + "\n")
    code, out = invoke("shard", root_copy, "--out", tmp_path / "o")
    assert code == 2 and f"{csv}:6: 3 field(s) where the header has 9" in out and not (tmp_path / "o").exists()


def test_a_damaged_index_is_named_with_its_line(shards, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(shards, s)
    idx = sorted(s.glob("train-*.idx"))[0]
    text = idx.read_text()
    cut = text.index("\n", text.index("\n") + 1) + 7  # two fields into the second sample's line
    idx.write_text(text[:cut] + "\n" + text[cut:].split("\n", 1)[1])
    for args in (train_args(s, tmp_path / "runs"), ["shard", s, "--verify"]):
        code, out = invoke(*args)
        assert code == 2 and f"{idx}:3: damaged line" in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()


# -- full disks: one sentence, no temporary file, what is intact said --------------------------------------


def test_disk_full_while_sharding(mame_root, small_disk):
    disk = small_disk(1)
    code, out = invoke("shard", mame_root, "--out", disk, "--workers", "1")
    assert code == 5 and "the disk is full" in out and str(disk / "full") in out and "Traceback" not in out, out
    assert not leftovers(disk) and not list(disk.rglob("manifest.json"))


def test_disk_full_while_training(shards, tmp_path, small_disk):
    """Room for epoch 1's checkpoints, not for epoch 2's: the error names the file, says that last.pt of epoch 1 is
    intact and how to resume; no temporary file is left; run.json says failed; resumed elsewhere, the run ends."""
    ref = tmp_path / "ref"
    code, _ = invoke(*train_args(shards, ref))
    d = list_runs(ref)[0]
    room = sum(p.stat().st_size for p in d.path.iterdir() if p.is_file()) + 64 * 1024
    disk = small_disk(room / 2**20)
    code, out = invoke(*train_args(shards, disk, "epochs=2"))
    run = list_runs(disk)[0]
    assert code == 5 and "the disk is full" in out and "Traceback" not in out, out
    assert f"{run / 'last.pt'} (epoch 2, step 0) is intact; continue with `mame-fast train --resume {run.path}`" in out
    assert not leftovers(disk)
    info = read_run_info(run.path)
    assert info["status"] == "failed" and "No space left" in info["error"] and ckpt.load(run / "last.pt")["epoch"] == 1
    moved = tmp_path / "moved" / run.path.name
    shutil.copytree(run.path, moved)
    code, out = invoke("train", "--resume", moved)
    assert code == 0 and read_run_info(moved)["status"] == "finished", out


# -- runs that cannot go on ------------------------------------------------------------------------------


def test_resume_of_a_run_killed_before_its_first_checkpoint(shards, tmp_path):
    invoke(*train_args(shards, tmp_path))
    d = list_runs(tmp_path)[0]
    (d / "last.pt").unlink()  # what a run killed in its first epoch leaves: config and run.json, no checkpoint
    code, out = invoke("train", "--resume", d.path)
    assert code == 2 and f"{d / 'last.pt'}: no checkpoint here" in out and "Traceback" not in out


def test_an_undecodable_sample_fails_the_run_truthfully(shards, tmp_path):
    """A JPEG damaged inside a shard that passes its checksum (sharded that way): the run stops naming shard and key,
    run.json says failed with the error, and the card and diagnosis give no training advice."""
    from .test_loaders import _damage_a_sample, _rewrite_checksum

    s = tmp_path / "s"
    shutil.copytree(shards, s)
    tar, key = _damage_a_sample(s, entropy_only=False)
    _rewrite_checksum(s, tar)
    code, out = invoke(*train_args(s, tmp_path / "runs", "data.loader=pil"))
    d = list_runs(tmp_path / "runs")[0]
    assert code == 2 and tar.name in out and key in out and "Traceback" not in out, out
    info = read_run_info(d.path)
    assert info["status"] == "failed" and key in info["error"]
    code, out = invoke("diagnose", d.path)
    assert code == 0 and out.startswith("failed") and "Grow the model" not in out and "Train longer" not in out
    card = (d / "card.md").read_text()
    assert "Automatic diagnosis: **failed**" in card and "epochs run / status | 0 / failed" in card


def _take_number(root: str, name: str, q) -> None:
    q.put(RunDir.create(root, name).number)


def test_run_numbers_are_taken_atomically(tmp_path):
    """Launches at the same moment into one folder never share or skip a number."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_take_number, args=(str(tmp_path), f"r{i % 2}", q)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    numbers = sorted(q.get(timeout=5) for _ in procs)
    assert numbers == list(range(1, 9)) and len(list(tmp_path.glob("00*-r*"))) == 8


def test_a_torn_last_line_of_metrics_is_skipped(shards, tmp_path):
    invoke(*train_args(shards, tmp_path, "epochs=2"))
    d = list_runs(tmp_path)[0]
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash in the middle of an append
    for args in (("runs", "--root", tmp_path), ("diagnose", d.path), ("report", "--root", tmp_path)):
        code, out = invoke(*args)
        assert code == 0 and "Traceback" not in out, (args, out)
    assert "| 2 |" in (tmp_path / "report.md").read_text() or "2 / finished" in (d / "card.md").read_text()


@pytest.mark.slow
def test_a_killed_run_shows_as_died(shards, tmp_path):
    """kill -9 leaves run.json at 'running': runs, diagnose and the card show 'died', and the checkpoint is intact."""
    from .test_train import _cli_env, _train_cli

    p = subprocess.Popen(_train_cli(shards, tmp_path, "k", "epochs=20"), env=_cli_env(), cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*-k/metrics.jsonl")):
        time.sleep(0.05)
    p.kill()
    p.wait()
    d = list_runs(tmp_path)[0]
    info = read_run_info(d.path)
    assert info["status"] == "running" and run_status(info) == "died"
    assert ckpt.load(d / "last.pt")["epoch"] >= 1
    code, out = invoke("runs", "--root", tmp_path)
    assert code == 0 and "died" in out
    code, out = invoke("diagnose", d.path)
    assert out.startswith("died") and "--resume" in out


@pytest.mark.parametrize("every, inside", [(0.0, False), (1e-6, True)])
def test_timed_checkpoints_inside_an_epoch(shards, tmp_path, monkeypatch, every, inside):
    """ckpt_every_min writes a resumable last.pt at log steps inside an epoch once that much time has passed; without
    it, last.pt is written at epoch ends only. (The writes are observed by wrapping the checkpoint writer.)"""
    from mame_fast.config import load
    from mame_fast.train import loop

    written = []
    real_save = loop.ckpt.save
    monkeypatch.setattr(loop.ckpt, "save", lambda path, state: (written.append((Path(path).name, state.get("step"))),
                                                                  real_save(path, state))[1])
    cfg = load(None, [a for a in train_args(shards, tmp_path, f"ckpt_every_min={every}", "log_every=1")[1:] if a != "--set"])
    loop.run(cfg, name="t")
    mid = [w for w in written if w[0] == "last.pt" and w[1]]
    assert bool(mid) == inside and ("last.pt", 0) in written
