"""Runs and sweeps as SLURM jobs, on a real single-node SLURM (tools/slurm.sh start): cut by the time limit's signal,
requeued, resumed exactly; a sweep as one array job with its family card; what a diverged, cancelled or refused
member says; two tasks of one job train as torchrun's two processes do. Jobs run on this machine's cores, so each run
is small; SLURM's own hold on a requeued job (BeginTime, about two minutes) is shortened by the test to 5 s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.records.rundir import list_runs

from .helpers import cli_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A run of about 2 s an epoch on one core; a job lives 1 minute and is signalled 45 s before its end.
RUN = ["--res", "256", "--set", "data.crop=96", "--set", "model=small", "--set", "data.batch_size=16", "--set",
       "data.threads=1", "--set", "hist_epochs=0", "--set", "evidence=false", "--set", "log_every=2", "--set",
       "record_samples=true", "--set", "slurm.gpus=0", "--set", "slurm.cpus_per_task=1", "--set", "slurm.time=1",
       "--set", "slurm.signal_s=45"]


@pytest.fixture(scope="module")
def cluster():
    """The running SLURM, or a skip (a failure where CI asks for SLURM: it must not skip)."""
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    if not up:
        if os.environ.get("MAME_FAST_REQUIRE_SLURM") == "1":
            pytest.fail("SLURM is not running: bash tools/slurm.sh start (CI must not skip the slurm tests)")
        pytest.skip("needs a running SLURM (bash tools/slurm.sh start, as root)")


def mame(cwd: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mame_fast", *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True,
                       text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def queue(user_filter: str = "") -> list[tuple[str, str, str]]:
    """(job, state, reason) of every job in the queue, array tasks one by one."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return [tuple(line.split(None, 2)) for line in out.splitlines() if line.strip() and user_filter in line]


def wait_for(jobs: list[str], timeout: float = 500, on_running=None) -> None:
    """Until none of ``jobs`` (ids or array ids) is queued or running; a requeued job's BeginTime hold (about two
    minutes) is released after 5 s, the time its previous start needs to be cleaned up on the node (released at once,
    the node refuses the new start: "Job credential revoked"); ``on_running(job)`` is called for each task seen
    running."""
    t, held = time.monotonic(), {}
    while time.monotonic() - t < timeout:
        mine = [q for q in queue() if q[0].split("_")[0] in jobs]
        if not mine:
            return
        for job, state, reason in mine:
            if state == "PENDING" and "BeginTime" in reason and time.monotonic() - held.setdefault(job, time.monotonic()) > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
                held.pop(job)
            if state == "RUNNING" and on_running is not None:
                on_running(job)
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} still queued after {timeout} s: {queue()}")


def job_of(out: str) -> str:
    return out.split("submitted job ")[1].split(":")[0] if "submitted job " in out else out.split("array job ")[1].split()[0]


def digest(run: Path) -> str:
    return json.loads((run / "rank0.json").read_text())["weights_sha256"]


def test_a_run_cut_twice_is_requeued_and_ends_as_if_never_cut(cluster, shards, tmp_path):
    """`train --slurm`: the time limit's signal (SIGUSR1, sent here as SLURM sends it, by scancel, once the run has 4 and
    then 12 epochs, so that the cuts do not depend on when SLURM checks its limits), last.pt, exit 3, the job requeues
    itself and resumes; twice. It ends finished, run.json counts the requeues, and its weights equal those of the same
    config trained without a cut, bit for bit."""
    r = mame(tmp_path, "train", "--slurm", "--shards", shards, *RUN, "--set", "epochs=24", "--set", "slurm.time=5",
             "--set", "out=runs", "--name", "cut")
    job = job_of(r.stdout)
    script = tmp_path / "runs" / "jobs" / "cut.sbatch"
    assert script.is_file() and "#SBATCH --signal=USR1@45" in script.read_text() and "--resume auto" in script.read_text()
    sent: list[int] = []

    def cut_at(_job: str) -> None:  # only while a trainer runs (its status is running): then its handler is in place
        runs = list_runs(tmp_path / "runs")
        if not runs or read_run_info(runs[0].path).get("status") != "running":
            return
        done = len(read_metrics(runs[0].path))
        mark = next((m for m in (4, 12) if m not in sent), None)
        if mark is not None and done >= mark:
            subprocess.run(["scancel", "--signal=USR1", job], capture_output=True)
            sent.append(mark)

    wait_for([job], timeout=600, on_running=cut_at)
    run = list_runs(tmp_path / "runs")[0].path
    info = read_run_info(run)
    assert sent == [4, 12] and info["status"] == "finished" and info["slurm"]["requeues"] == 2, info
    assert len(info["resumes"]) == 2 and [r["epoch"] for r in read_metrics(run)] == list(range(1, 25))
    assert (tmp_path / "runs" / "jobs" / f"cut-{job}.out").read_text().count("requeueing") == 2
    mame(tmp_path, "train", "-c", tmp_path / "runs" / "jobs" / "cut.yaml", "--name", "ref")  # the same, never cut
    assert digest(run) == digest(list_runs(tmp_path / "runs")[1].path)
    out = " ".join(mame(tmp_path, "runs", "--root", "runs").stdout.split())
    assert "finished, requeued 2" in out


def test_the_time_limit_itself_cuts_a_run_that_then_finishes(cluster, shards, tmp_path):
    """A 30-epoch run (about 70 s) in jobs of 1 minute, signalled 45 s before the end: SLURM's own signal cuts it at
    least once (a job never reaches its limit unsignalled), and the run finishes."""
    r = mame(tmp_path, "train", "--slurm", "--shards", shards, *RUN, "--set", "epochs=30", "--set", "out=runs",
             "--set", "record_samples=false", "--name", "limit")
    wait_for([job_of(r.stdout)], timeout=600)
    info = read_run_info(list_runs(tmp_path / "runs")[0].path)
    assert info["status"] == "finished" and info["slurm"]["requeues"] >= 1, info


def test_a_sweep_is_one_array_job_whose_family_card_equals_the_sweep_run_here(cluster, shards, tmp_path):
    """A 2 x 2 sweep (two rates, two seeds) submitted as one array job; one task gets the time limit's signal mid-run
    (as SLURM sends it) and is requeued alone; the family card is written by the job that runs after the last member,
    and its numbers equal those of the same sweep run in one process."""
    # A 5-minute limit: only the signal sent below cuts a member.
    args = ["optim.lr=0.02,0.05", "--repeats", "2", "--shards", shards, *RUN, "--set", "epochs=4", "--set", "slurm.time=5",
            "--name", "lr"]
    r = mame(tmp_path, "sweep", *args, "--set", "out=slurm-runs", "--slurm")
    array = job_of(r.stdout)
    text = (tmp_path / "slurm-runs" / "jobs" / "sweep-lr.sbatch").read_text()
    assert "#SBATCH --array=0-3" in text and text.count(" args=(train -c ") == 4
    signalled: list[str] = []

    def signal_one(job: str) -> None:  # the first task seen training gets SLURM's time-limit signal, once
        run = [r.path for r in list_runs(tmp_path / "slurm-runs")]
        if not signalled and run and read_metrics(run[0]) and job.endswith("_0"):
            subprocess.run(["scancel", "--signal=USR1", job], capture_output=True)
            signalled.append(job)

    wait_for([array], timeout=600, on_running=signal_one)
    wait_for([array], timeout=120)  # the card's job, which depends on the array
    time.sleep(1)
    card_job = json.loads((tmp_path / "slurm-runs" / "sweep-lr.json").read_text())["slurm"]["card"]
    wait_for([card_job], timeout=120)
    mame(tmp_path, "sweep", *args, "--set", "out=here")  # the same sweep, one member after another, here
    submitted, here = (json.loads((tmp_path / d / "sweep-lr.json").read_text()) for d in ("slurm-runs", "here"))
    assert signalled and submitted["mean_top1"] == here["mean_top1"] and submitted["half_width"] == here["half_width"]
    assert [m["best_val"] for m in submitted["members"]] == [m["best_val"] for m in here["members"]]
    requeued = [read_run_info(r.path).get("slurm", {}).get("requeues", 0) for r in list_runs(tmp_path / "slurm-runs")]
    assert sorted(requeued) == [0, 0, 0, 1], requeued
    assert (tmp_path / "slurm-runs" / "sweep-lr.md").read_text().count("seed") >= 4


def test_a_diverged_a_cancelled_and_a_refused_member_are_named_with_what_to_do(cluster, shards, tmp_path):
    """A sweep whose rate 1e6 diverges and whose third member is cancelled before it starts: the family card (written
    after the last member) and `runs` name each with what to do. A sweep with a bad value is refused before anything
    is submitted."""
    bad = mame(tmp_path, "sweep", "optim.lr=0.02,-1", "--shards", shards, *RUN, "--set", "out=bad", "--slurm",
               check=False)
    assert bad.returncode == 2 and "optim.lr: -1.0 is out of range" in bad.stdout and "Traceback" not in bad.stdout
    assert not (tmp_path / "bad").exists() and not [q for q in queue() if "sweep-bad" in q[0]]
    r = mame(tmp_path, "sweep", "optim.lr=0.02,1e6,0.05", "--shards", shards, *RUN, "--set", "epochs=2", "--set",
             "out=runs", "--name", "mix", "--slurm")
    array = job_of(r.stdout)
    subprocess.run(["scancel", f"{array}_2"], check=True)  # the third member, still queued behind the first two
    wait_for([array], timeout=400)
    card_job = json.loads((tmp_path / "runs" / "sweep-mix.json").read_text())["slurm"]["card"]
    wait_for([card_job], timeout=120)
    card = " ".join((tmp_path / "runs" / "sweep-mix.md").read_text().split())
    assert "mix-lr1e6-s0 (optim.lr=1e6, seed 0): diverged: its loss became non-finite; lower optim.lr" in card, card
    assert f"mix-lr0.05-s0 (optim.lr=0.05, seed 0): CANCELLED (job {array}_2): it never started; resubmit" in card, card
    out = " ".join(mame(tmp_path, "runs", "--root", "runs").stdout.split())
    assert "diverged" in out and f"sweep mix member mix-lr0.05-s0: job {array}_2 cancelled before it started" in out


def test_a_hand_started_resume_of_a_running_job_is_refused(cluster, shards, tmp_path):
    """While the job trains the run, `mame-fast train --resume RUN` by hand is refused, naming the job's trainer."""
    r = mame(tmp_path, "train", "--slurm", "--shards", shards, *RUN, "--set", "epochs=40", "--set", "slurm.time=5",
             "--set", "out=runs", "--name", "long")
    job = job_of(r.stdout)
    try:
        t = time.monotonic()
        while time.monotonic() - t < 120:
            runs = list_runs(tmp_path / "runs")
            if runs and read_metrics(runs[0].path):
                break
            time.sleep(1)
        info = read_run_info(runs[0].path)
        assert info["status"] == "running" and info["slurm"]["job"] == job
        hand = mame(tmp_path, "train", "--resume", runs[0].path, check=False)
        said = " ".join(hand.stdout.split())
        assert hand.returncode == 2 and f"another `mame-fast train` of this run is training it right now (pid {info['pid']}" \
            in said, said
    finally:
        subprocess.run(["scancel", job])
        wait_for([job], timeout=120)


def test_two_tasks_of_one_job_train_as_torchruns_two_processes(cluster, shards, tmp_path):
    """slurm.tasks_per_node=2: srun starts two ranks (RANK from SLURM_PROCID, gloo on the CPU); the weights equal those
    of `torchrun --nproc-per-node 2` on the same config."""
    r = mame(tmp_path, "train", "--slurm", "--shards", shards, *RUN, "--set", "epochs=2", "--set", "slurm.tasks_per_node=2",
             "--set", "out=runs", "--name", "two")
    wait_for([job_of(r.stdout)], timeout=300)
    run = list_runs(tmp_path / "runs")[0].path
    assert read_run_info(run)["status"] == "finished" and read_run_info(run)["world_size"] == 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29611",
                "-m", "mame_fast", "train", "-c", str(tmp_path / "runs" / "jobs" / "two.yaml"), "--name", "tr"]
    p = subprocess.run(torchrun, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ref = list_runs(tmp_path / "runs")[1].path
    assert digest(run) == digest(ref) and digest(run) == json.loads((run / "rank1.json").read_text())["weights_sha256"]
