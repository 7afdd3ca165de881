"""One run record: a run folder's life (create, publish config and spec, status, lock, ending) in one place that the
trainer, the range test and the test look share; one process per run folder, whoever it is."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mame_fast.input import dali_available
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.records.rundir import RunDir, list_runs
from mame_fast.records.runrecord import RunBusy, RunRecord

from .helpers import cli_env, invoke, train_sets

PKG = Path(__file__).resolve().parent.parent / "mame_fast"
LOADERS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI")), "pil"]


def train_args(shards: Path, out: Path, *sets: str) -> list[str]:
    return ["train", *train_sets(shards, out, "epochs=2", *sets)]


def make_record(root: Path, name: str = "r") -> RunRecord:
    return RunRecord.create(root, name, {"model": "tiny"}, {"stem_width": 8}, {"hypothesis": "h"})


def test_a_held_run_folder_refuses_a_second_holder_naming_the_first(tmp_path):
    with make_record(tmp_path) as first:
        assert json.loads((first.dir / RunDir.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunBusy) as e:
            RunRecord.reopen(first.path, "test")
        said = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in said and "`mame-fast train`" in said, said
        assert "\n" not in said and "--resume" not in said  # one sentence, and no advice to start another trainer
        first.finish("finished")
    assert (first.dir / RunDir.LOCK).read_text() == ""  # a name left behind would be a later refusal's wrong answer
    with RunRecord.reopen(first.path, "test", owns_status=False):  # released when the first ended
        pass


def test_a_refusal_waits_for_the_new_holders_name_not_a_dead_ones(tmp_path):
    """The holder writes its name just after it takes the lock; a refusal in between must not name whoever held the
    folder before (here a process that died holding it, so its name is still in the file)."""
    rec = make_record(tmp_path)
    rec.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = rec.dir / RunDir.LOCK
    lock.write_text(json.dumps({"command": "train", "host": socket.gethostname(), "pid": int(dead.stdout),
                                "since": "then"}))
    code = (f"import fcntl, json, os, socket, time; f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(0.5); f.seek(0); f.truncate(); "
            "f.write(json.dumps({'command': 'test', 'host': socket.gethostname(), 'pid': os.getpid(), 'since': 'now'}));"
            " f.flush(); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusy, match=f"`mame-fast test`.*pid {child.pid} "):
            RunRecord.reopen(rec.path)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt(), "interrupted"), (ValueError("x"), "failed"),
                                            (type("Diverged", (RuntimeError,), {"run_status": "diverged"})("nan"),
                                             "diverged")])
def test_the_record_writes_how_the_run_ended_and_lets_go(tmp_path, raised, status):
    with pytest.raises(type(raised)), make_record(tmp_path) as rec:
        rec.start()
        assert read_run_info(rec.path)["status"] == "running"
        raise raised
    info = read_run_info(rec.path)
    assert info["status"] == status and info["error"].startswith(type(raised).__name__) and info["ended"]
    assert (rec.dir / RunDir.CARD).is_file()  # the card is written whatever the ending
    RunRecord.reopen(rec.path).release()


def test_a_test_look_that_fails_does_not_change_the_runs_status(tmp_path):
    rec = make_record(tmp_path)
    rec.finish("finished")
    rec.release()
    with pytest.raises(ValueError), RunRecord.reopen(rec.path, "test", owns_status=False):
        raise ValueError("the look failed")
    assert read_run_info(rec.path)["status"] == "finished"


def test_the_lock_dies_with_its_process(tmp_path):
    """A trainer killed with SIGKILL leaves no lock behind: the kernel releases it."""
    rec = make_record(tmp_path)
    rec.release()
    code = (f"from mame_fast.records.runrecord import RunRecord; r = RunRecord.reopen({str(rec.path)!r}); "
            "print('held', flush=True); import time; time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=f"pid {child.pid} "):
            RunRecord.reopen(rec.path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    RunRecord.reopen(rec.path).release()


@pytest.mark.parametrize("loader", LOADERS)
def test_a_second_trainer_of_a_live_run_is_refused(shards, tmp_path, loader):
    """`train --resume RUN` (and `test RUN`) while another process holds RUN: refused in one sentence naming it, fast,
    and nothing in the folder changes."""
    code, out = invoke(*train_args(shards, tmp_path, f"data.loader={loader}", "max_steps=3"))
    assert code == 0, out
    d = list_runs(tmp_path)[0].path
    before = ((d / RunDir.INFO).read_text(), (d / RunDir.METRICS).read_bytes() if (d / RunDir.METRICS).exists() else b"",
              (d / RunDir.LAST).read_bytes())
    with RunRecord.reopen(d, "train"):
        t = time.monotonic()
        code, out = invoke(*train_args(shards, tmp_path, f"data.loader={loader}"), "--resume", d)
        assert code == 2 and f"pid {os.getpid()} on {socket.gethostname()}" in out and "Traceback" not in out, out
        assert time.monotonic() - t < 10  # refused before the loaders and the model are built
        code, out = invoke("test", d, "--unfinished")
        assert code == 2 and "another `mame-fast train` of this run is training it right now" in out, out
    after = ((d / RunDir.INFO).read_text(), (d / RunDir.METRICS).read_bytes() if (d / RunDir.METRICS).exists() else b"",
             (d / RunDir.LAST).read_bytes())
    assert after == before
    code, out = invoke(*train_args(shards, tmp_path, f"data.loader={loader}", "max_steps=0"), "--resume", d)  # free: resumes
    assert code == 0 and [r["epoch"] for r in read_metrics(d)] == [1, 2], out


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_two_resumes_of_one_run_at_the_same_moment_train_once(shards, tmp_path, loader):
    """Two `mame-fast train --resume RUN` processes started together: one trains, the other is refused (rc 2) naming
    it; metrics.jsonl holds each epoch once and run.json one resume."""
    code, out = invoke(*train_args(shards, tmp_path, f"data.loader={loader}", "max_steps=3", "epochs=3"))
    assert code == 0, out
    d = list_runs(tmp_path)[0].path
    args = [sys.executable, "-m", "mame_fast",
            *map(str, train_args(shards, tmp_path, f"data.loader={loader}", "epochs=3", "max_steps=0")),
            "--resume", str(d)]
    procs = [subprocess.Popen(args, env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    refused = " ".join(outs[[p.returncode for p in procs].index(2)].split())
    winner = procs[[p.returncode for p in procs].index(0)]
    assert f"pid {winner.pid} " in refused, refused
    assert [r["epoch"] for r in read_metrics(d)] == [1, 2, 3]
    assert len(read_run_info(d)["resumes"]) == 1 and read_run_info(d)["status"] == "finished"


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            owner = f.value.id + "." if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            names.add(owner + f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_only_the_run_record_opens_and_ends_run_folders():
    """Creating a run folder, publishing its config and writing its status happen in runrecord.py alone: the trainer,
    the range test and the test look share it (no second copy of the folder's life)."""
    life = {"RunDir.create", "records.write_run_info", "write_run_info", "records.running_status", "running_status"}
    owners = {"runrecord.py", "records.py", "rundir.py"}
    copies = {p.relative_to(PKG).as_posix(): sorted(_calls(p) & life) for p in PKG.rglob("*.py") if p.name not in owners}
    assert {k: v for k, v in copies.items() if v} == {}
    for user in ("train/loop.py", "train/lrfind.py", "train/testset.py"):
        assert "RunRecord" in (PKG / user).read_text(), user
    # The range test saves and restores through TrainState, not a hand-made copy of each part.
    lrfind = (PKG / "train" / "lrfind.py").read_text()
    assert "snapshot(copy=True)" in lrfind and ".restore(" in lrfind
    hand_made = {"load_state_dict", "copy.deepcopy", "ckpt.set_rng_state", "set_rng_state", "write_text"}
    assert hand_made & {c.rsplit(".", 1)[-1] for c in _calls(PKG / "train" / "lrfind.py")} | \
        hand_made & _calls(PKG / "train" / "lrfind.py") == set()
