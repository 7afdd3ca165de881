"""Faults and bad input as a user meets them, through the command line: each ends as one line naming the file or
key, with a distinct exit code (2 bad input, 3 interrupted, 4 diverged, 5 I/O), leaves no temporary file
behind, and run.json tells the truth."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mame_fast.cli import app
from mame_fast.records.records import read_run_info, run_status
from mame_fast.records.rundir import RunDir, list_runs
from mame_fast.train import checkpoint as ckpt

from .helpers import cli_env

cli = CliRunner()


def invoke(*args) -> tuple[int, str]:
    r = cli.invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())  # one line, whatever the console's width


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def train_args(shards: Path, out: Path, *sets: str) -> list[str]:
    base = [f"data.shards={shards}", f"out={out}", "data.res=256", "data.crop=48", "data.batch_size=16", "data.threads=1",
            "hist_epochs=0", "epochs=1", "optim.name=sgd", "evidence=false", *sets]
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
    ("data.shards=/nonexistent/shards", "data.shards /nonexistent/shards: no such folder; make shards with"),
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
    assert f"{run / 'last.pt'} (at the end of epoch 1) is intact; continue with `mame-fast train --resume {run.path}`" in out
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
    from .test_train import _train_cli

    p = subprocess.Popen(_train_cli(shards, tmp_path, "k", "epochs=20"), env=cli_env(), cwd=tmp_path,
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


# -- issue 33: each row of the fault report, as a user meets it -------------------------------------------------


def cli_process(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mame-fast ARGS`` in a process of its own (what a user runs: the whole start-up, nothing imported before)."""
    return subprocess.run([sys.executable, "-m", "mame_fast", *map(str, args)], env=cli_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_a_torn_metrics_line_is_cut_when_the_run_resumes(shards, tmp_path):
    """A crash in the middle of appending to metrics.jsonl, then --resume: the fragment is cut (and said), the resumed
    run appends whole rows after the whole ones, and runs, diagnose and report read the folder."""
    invoke(*train_args(shards, tmp_path, "epochs=1"))
    d = list_runs(tmp_path)[0]
    whole = (d / "metrics.jsonl").read_text()
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    code, out = invoke("train", "--resume", d.path, "--set", "epochs=3")
    assert code == 0 and "cut a torn last line" in out and "Traceback" not in out, out
    text = (d / "metrics.jsonl").read_text()
    assert text.startswith(whole) and [json.loads(x)["epoch"] for x in text.splitlines()] == [1, 2, 3]
    for args in (("runs", "--root", tmp_path), ("diagnose", d.path), ("report", "--root", tmp_path)):
        code, out = invoke(*args)
        assert code == 0 and "Traceback" not in out, (args, out)


@pytest.mark.slow
def test_two_concurrent_looks_at_the_test_set_make_one(shards, tmp_path):
    """Two `mame-fast test RUN` started at the same moment, again and again on fresh runs: exactly one looks (exit 0),
    the other is refused (exit 2, naming the other look or the earlier result), and the ledger holds one first look
    per run."""
    invoke(*train_args(shards, tmp_path / "runs"))
    first = list_runs(tmp_path / "runs")[0].path
    for i in range(4):
        d = tmp_path / "runs" / f"{first.name}-copy{i}"
        shutil.copytree(first, d, ignore=shutil.ignore_patterns("test*"))
        procs = [subprocess.Popen([sys.executable, "-m", "mame_fast", "test", str(d)], env=cli_env(), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 2], outs
        refused = outs[[p.returncode for p in procs].index(2)]
        assert "another `mame-fast test` of this run" in refused or "already evaluated" in refused, refused
    ledger = [json.loads(x) for x in (tmp_path / "runs" / "test_ledger.jsonl").read_text().splitlines()]
    assert sorted(x["run"] for x in ledger if not x["again"]) == sorted(f"{first.name}-copy{i}" for i in range(4))


@pytest.mark.parametrize("status", ["running", "interrupted", "failed"])
def test_test_refuses_a_run_that_has_not_ended(shards, tmp_path, status):
    """A run still training (or died, interrupted, failed): `test` says why and spends no look; --unfinished looks, and
    the ledger records the run's status then."""
    from mame_fast.records.records import update_run_info

    invoke(*train_args(shards, tmp_path))
    d = list_runs(tmp_path)[0].path
    update_run_info(d, {"status": status, "pid": os.getpid(), "host": os.uname().nodename})
    code, out = invoke("test", d)
    assert code == 2 and f"is {status}" in out and "--unfinished" in out and "Traceback" not in out, out
    assert not (d / "test.json").exists() and not (tmp_path / "test_ledger.jsonl").exists()
    code, out = invoke("test", d, "--unfinished")
    assert code == 0, out
    assert json.loads((tmp_path / "test_ledger.jsonl").read_text())["run_status"] == status


def test_a_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\noptim:\n  lr: [0.1\nepochs: 3\n")
    code, out = invoke("train", "-c", bad)
    assert code == 2 and f"{bad}: line 4, column 7: not valid YAML" in out and "Traceback" not in out, out
    spec = tmp_path / "spec.yaml"
    spec.write_text("stem_width: 16\nstages:\n  - {width: 24\n")
    code, out = invoke("train", "--set", f"model={spec}")
    assert code == 2 and f"{spec}: line" in out and "not valid YAML" in out, out


def test_a_resume_that_changes_the_model_is_refused(shards, tmp_path):
    invoke(*train_args(shards, tmp_path))
    d = list_runs(tmp_path)[0]
    before = read_run_info(d.path)
    code, out = invoke("train", "--resume", d.path, "--set", "model=small", "--set", "epochs=2")
    assert code == 2 and "its model spec differs from model=small" in out and "Traceback" not in out, out
    assert read_run_info(d.path)["status"] == before["status"] and ckpt.load(d / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("name, ok", [("my run", False), ("a/b", False), (".hidden", False), ("café-1", True),
                                      ("étude_2", True)])
def test_run_names_are_checked_at_parse_time(shards, tmp_path, name, ok):
    """Any name of letters (of any script), digits, '_', '.', '+' and '-' runs; others are refused at once with the
    rule and a name that would do, before anything is built."""
    code, out = invoke(*train_args(shards, tmp_path / "runs"), "--name", name)
    if ok:
        assert code == 0 and (tmp_path / "runs" / f"001-{name}" / "card.md").is_file(), out
    else:
        assert code == 2 and "a run name is up to 80 letters" in out and "Traceback" not in out, out
        assert not (tmp_path / "runs").exists()


def test_a_divergence_before_any_checkpoint_says_there_is_none(shards, tmp_path):
    code, out = invoke(*train_args(shards, tmp_path, "optim.lr=1e12", "optim.warmup_epochs=0", "optim.schedule=constant",
                                   "log_every=1"))
    d = list_runs(tmp_path)[0]
    assert code == 4 and "no checkpoint was written yet" in out and "last good checkpoint" not in out, out
    assert not (d / "last.pt").exists() and read_run_info(d.path)["status"] == "diverged"


def test_the_damaged_index_advice_repairs_it(shards, tmp_path):
    """An index whose header disagrees with its lines: the error gives a command; run as printed, it rewrites the index
    from its tar (byte for byte what the writer wrote), and training runs."""
    import re

    s = tmp_path / "s"
    shutil.copytree(shards, s)
    idx = sorted(s.glob("train-*.idx"))[1]
    good = idx.read_bytes()
    lines = good.decode().splitlines()
    idx.write_text(f"v1.2 {int(lines[0].split()[1]) + 5}\n" + "\n".join(lines[1:]) + "\n")
    code, out = invoke(*train_args(s, tmp_path / "runs"))
    assert code == 2 and str(idx) in out, out
    advice = re.search(r"`(mame-fast shard [^`]+)`", out).group(1).split()
    code, out = invoke(*advice[1:])
    assert code == 0 and idx.name in out, out
    assert idx.read_bytes() == good
    code, out = invoke(*train_args(s, tmp_path / "runs"))
    assert code == 0, out


def test_a_damaged_tar_is_not_reindexed(shards, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(shards, s)
    tar = sorted(s.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in s.glob("*.idx")}
    code, out = invoke("shard", s, "--reindex")
    assert code == 2 and f"{tar}: its bytes differ from the manifest" in out, out
    assert {p.name: p.read_bytes() for p in s.glob("*.idx")} == before


def test_res_and_a_conflicting_set_are_refused(shards, tmp_path):
    code, out = invoke(*train_args(shards, tmp_path / "runs"), "--res", "full", "--set", "data.res=fulll")
    assert code == 2 and "--res full contradicts --set data.res=fulll" in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_temporary_file_of_a_killed_writer_is_removed_when_the_run_resumes(shards, tmp_path):
    """kill -9 in the middle of a checkpoint write leaves its temporary file; the next write into that folder (here the
    resume) removes it, and never the temporary file of a writer that is alive."""
    from mame_fast.files import atomic_write_text

    invoke(*train_args(shards, tmp_path))
    d = list_runs(tmp_path)[0].path
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename.split(".")[0]
    stale, live = d / f".last.pt.{host}.{dead.pid}.tmp", d / f".run.json.{host}.{os.getpid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    r = cli_process("train", "--resume", d, "--set", "epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not stale.exists() and live.exists()
    live.unlink()
    atomic_write_text(d / "x.txt", "x")
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    """A typo in a key, a value, a YAML file or the run name is one sentence, and the command never imports torch to
    say it (it took 12 s on a slow machine)."""
    probe = ("import runpy, sys; sys.argv = ['mame-fast'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('mame_fast', run_name='__main__')\n"
             "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    for args in (["--set", "optim.lrr=1"], ["--set", "data.res=fulll"], ["--name", "my run"],
                 ["--set", "model=nosuch"], ["--res", "full", "--set", "data.res=256"]):
        r = subprocess.run([sys.executable, "-c", probe, "train", *args], env=cli_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "error:" in r.stdout and r.stdout.strip().endswith("NO-TORCH"), (args, r.stdout, r.stderr)


def test_make_clean_leaves_the_users_runs(tmp_path):
    """`make clean` removes what make made (the environment, the demo) and never runs/, where experiments, cards and
    the test ledger live."""
    repo = Path(__file__).resolve().parent.parent
    shutil.copy(repo / "Makefile", tmp_path / "Makefile")
    for folder in ("runs/001-mine", "demo/runs", ".venv/bin", "shards/full"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "runs" / "test_ledger.jsonl").write_text("{}\n")
    r = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "001-mine").is_dir() and (tmp_path / "runs" / "test_ledger.jsonl").is_file()
    assert (tmp_path / "shards" / "full").is_dir()  # the user's shards too
    assert not (tmp_path / "demo").exists() and not (tmp_path / ".venv").exists()
