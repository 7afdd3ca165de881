"""Runs and sweeps as SLURM jobs (`mame-fast train --slurm`, `mame-fast sweep --slurm`).

What is submitted is a readable file: ``<runs>/jobs/<name>.sbatch``, built from the config's ``slurm`` section, next to
the config it trains (``<name>.yaml``, the resolved config) and its log (``<name>-<job>.out``). A student sees, keeps
and can adapt exactly what ran, and submits it again with ``sbatch`` alone. Generated scripts rather than a library
such as submitit: submitit pickles a Python callable into the job, so what ran is not a file one can read or edit, and
its requeue is driven from Python; here the job is the ordinary command line, and SLURM's own ``--signal``,
``--requeue`` and ``scontrol requeue`` do the rest.

The life of a job: SLURM sends SIGUSR1 ``slurm.signal_s`` seconds before the time limit; the trainer saves a resumable
``last.pt`` at its next log step and exits 3; the script then requeues itself (an array task requeues that task
alone), and the next start continues the same run folder (``--resume auto``). SLURM counts the starts
(``SLURM_RESTART_COUNT``) and the trainer records them in run.json. A requeued job that meets a hand-started resume of
the same run is refused by the run folder's lock (``records/runrecord.py``).

A sweep is one array job, one task per member, and a family-card job that runs after the last task ends
(``--dependency=afterany``); ``mame-fast sweep --card NAME`` rebuilds that card at any time from what has ended.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import __version__
from .config import TrainConfig, save
from .errors import Expected
from .files import atomic_write_text
from .records.records import now

JOBS = "jobs"  # <runs>/jobs/: job scripts, the configs they train, their logs (SLURM and --parallel)


class SlurmError(Expected, RuntimeError):
    """sbatch refused a job, or SLURM is not there."""


def jobs_folder(cfg: TrainConfig) -> Path:
    """<runs>/jobs/, refused when its path has whitespace: #SBATCH lines (--output, --chdir) cannot carry it."""
    folder = Path(cfg.out).resolve() / JOBS
    for path in (folder, Path.cwd()):
        if any(c.isspace() for c in str(path)):
            raise SlurmError(f"{path}: SLURM's #SBATCH lines cannot name a path with a space; choose a runs folder "
                             f"(--set out=...) and a working folder without spaces")
    return folder


def _header(cfg: TrainConfig, name: str, what: str, array: int | None = None, card: bool = False) -> list[str]:
    s, out = cfg.slurm, jobs_folder(cfg)
    lines = ["#!/bin/bash", f"# {what}",
             f"# Written by mame-fast {__version__}; submit it again with: sbatch {out / name}.sbatch",
             f"#SBATCH --job-name={name}", f"#SBATCH --output={out}/{name}-{'%A_%a' if array else '%j'}.out",
             "#SBATCH --open-mode=append", f"#SBATCH --chdir={Path.cwd()}"]
    if card:  # the family card: one core, a few minutes, no GPU
        lines += ["#SBATCH --time=00:10:00", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1", "#SBATCH --gres=none"]
    else:
        lines += [f"#SBATCH --time={s.time}", f"#SBATCH --signal=USR1@{s.signal_s}", "#SBATCH --requeue",
                  f"#SBATCH --nodes={s.nodes}", f"#SBATCH --ntasks-per-node={s.tasks_per_node}",
                  f"#SBATCH --cpus-per-task={s.cpus_per_task}", f"#SBATCH --gres={f'gpu:{s.gpus}' if s.gpus else 'none'}"]
    lines += [f"#SBATCH --{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos)) if v]
    if array:
        lines.append(f"#SBATCH --array=0-{array - 1}")
    return lines


def _body(cfg: TrainConfig, command: str) -> list[str]:
    """The job's shell: setup lines, then the training processes started by srun (one per task, ranks from SLURM), then
    a requeue when the trainer stopped at the time limit's signal (exit 3)."""
    python = cfg.slurm.python or sys.executable
    return [
        "set -uo pipefail", *cfg.slurm.setup,
        f"export OMP_NUM_THREADS={cfg.slurm.cpus_per_task} MASTER_PORT=${{MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# srun starts the tasks itself, so that SLURM's signal reaches the training processes; each gets torchrun's env.",
        f"srun --kill-on-bad-exit=1 bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; "
        f"exec {shlex.quote(python)} -m mame_fast \"$@\"' bash {command}",
        "rc=$?",
        'if [ "$rc" -eq 3 ]; then  # stopped at the time limit with a resumable checkpoint: this job (or array task) again',
        '  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}',
        '  echo "$(date -Iseconds) interrupted with a resumable checkpoint: requeueing ${job:-$SLURM_JOB_ID}"',
        '  scontrol requeue "${job:-$SLURM_JOB_ID}"',
        "fi",
        'exit "$rc"',
    ]


def member_command(config: Path, name: str, meta: dict) -> str:
    """The `mame-fast train` arguments of one run, as shell words: its resolved config, its name, --resume auto."""
    args = ["train", "-c", str(config), "--name", name, "--resume", "auto"]
    args += [a for n in meta.get("after", []) for a in ("--after", str(n))]
    if meta.get("hypothesis"):
        args += ["--hypothesis", meta["hypothesis"]]
    return " ".join(shlex.quote(a) for a in args)


def run_script(cfg: TrainConfig, name: str, meta: dict) -> tuple[Path, str]:
    """The job script of one run (and the resolved config it trains, written beside it); (path, text)."""
    out = jobs_folder(cfg)
    config = out / f"{name}.yaml"
    text = "\n".join(_header(cfg, name, f"mame-fast train: run {name!r}") +
                     _body(cfg, member_command(config, name, meta))) + "\n"
    return out / f"{name}.sbatch", text


def sweep_scripts(name: str, members: list[tuple[TrainConfig, str, dict]]) -> tuple[Path, str, Path, str]:
    """The array job of a sweep (task i trains member i) and its family-card job; (array path, text, card path, text)."""
    cfg = members[0][0]
    out = jobs_folder(cfg)
    cases = [f"  {i}) args=({member_command(out / f'{n}.yaml', n, meta)}) ;;" for i, (_, n, meta) in enumerate(members)]
    lines = _header(cfg, f"sweep-{name}", f"mame-fast sweep {name!r}: {len(members)} member(s), one array task each",
                    array=len(members))
    lines += ["case $SLURM_ARRAY_TASK_ID in", *cases, "esac", *_body(cfg, '"${args[@]}"')]
    card = _header(cfg, f"sweep-{name}-card", f"mame-fast sweep {name!r}: its family card, once every member has ended",
                   card=True)
    python = shlex.quote(cfg.slurm.python or sys.executable)
    card += ["set -uo pipefail", *cfg.slurm.setup,
             f"exec {python} -m mame_fast sweep --card {shlex.quote(name)} --root {shlex.quote(str(Path(cfg.out).resolve()))}"]
    return out / f"sweep-{name}.sbatch", "\n".join(lines) + "\n", out / f"sweep-{name}-card.sbatch", "\n".join(card) + "\n"


def submit_run(cfg: TrainConfig, name: str, meta: dict, dry_run: bool = False) -> tuple[str | None, Path, str]:
    """Write the run's job script and config, and submit it (not with ``dry_run``); (job id, script, its text)."""
    script, text = run_script(cfg, name, meta)
    if dry_run:
        return None, script, text
    save(cfg, script.with_suffix(".yaml"))
    atomic_write_text(script, text)
    job = sbatch(script)
    record(cfg, name, {"kind": "run", "name": name, "job": job, "script": str(script), "submitted": now()})
    return job, script, text


def submit_sweep(name: str, members: list[tuple[TrainConfig, str, dict]], dry_run: bool = False) -> dict:
    """Write the sweep's array script, its members' configs and its family-card script, and submit them (the card
    after the last member, whatever its ending); {"array": id, "card": id, "scripts": [...], "texts": [...]}."""
    array, text, card, card_text = sweep_scripts(name, members)
    if dry_run:
        return {"array": None, "card": None, "scripts": [array, card], "texts": [text, card_text]}
    for cfg, n, _ in members:
        save(cfg, jobs_folder(cfg) / f"{n}.yaml")
    atomic_write_text(array, text)
    atomic_write_text(card, card_text)
    job = sbatch(array)
    try:
        card_job = sbatch(card, dependency=job)
    except SlurmError:  # the members run anyway; their card can be rebuilt by hand
        subprocess.run(["scancel", job], capture_output=True)
        raise
    record(members[0][0], f"sweep-{name}", {"kind": "sweep", "name": name, "job": job, "card_job": card_job,
                                             "script": str(array), "submitted": now()})
    return {"array": job, "card": card_job, "scripts": [array, card], "texts": [text, card_text]}


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit ``script``; its job id. sbatch's refusal becomes one sentence."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: --slurm submits to a SLURM cluster (on this machine, tools/slurm.sh "
                         "starts one); without one, train in place or use `sweep --parallel N`")
    cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{dependency}"] if dependency else []) + [str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmError(f"sbatch refused {script}: {' '.join(r.stderr.split())}")
    return r.stdout.strip().split(";")[0]


def record(cfg: TrainConfig, name: str, facts: dict) -> Path:
    """What was submitted (job ids, scripts), beside the scripts: `runs` reads it for runs that have no folder yet."""
    path = jobs_folder(cfg) / f"{name}.json"
    return atomic_write_text(path, json.dumps(facts, indent=1))


def submitted(root: Path) -> list[dict]:
    """Every submission recorded under ``root``."""
    folder = Path(root) / JOBS
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def job_states(jobs: list[str]) -> dict[str, str]:
    """SLURM's state of each job (an array task as ``<array>_<task>``): PENDING, RUNNING, COMPLETED, CANCELLED,
    FAILED, ...; from squeue for live jobs and scontrol for those that ended recently. {} without SLURM."""
    if not jobs or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    r = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if len(parts := line.split()) == 2:
            states[parts[0]] = parts[1]
    for job in {j.split("_")[0] for j in jobs}:
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId", "").isdigit() else f.get("JobId", "")
            states.setdefault(key, f.get("JobState", "?"))
    return {j: states[j] for j in jobs if j in states}
