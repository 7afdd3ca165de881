"""Where a sweep's members run: one after another in this process, N at a time in processes of their own
(``--parallel N``: one GPU each, or the CPU cores split), or as one SLURM array job (``--slurm``). Each member is an
ordinary run folder; whichever way they ran, the family card is computed from their folders by the same function
(``records/sweep.write_card_of``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from . import slurm
from .config import TrainConfig, save
from .files import usable_cores


@dataclass
class Member:
    setting: dict[str, str]
    cfg: TrainConfig
    name: str  # its run name (runs/<NNN>-<name>/)
    meta: dict  # after, hypothesis, sweep


def in_process(members: list[Member], train) -> None:
    """One after another; a member that diverges is recorded as such (its folder says so) and the others go on."""
    from .train.loop import TrainingDiverged

    for m in members:
        with contextlib.suppress(TrainingDiverged):
            train(m.cfg, m.name, m.meta)


def in_parallel(members: list[Member], n: int, say=print) -> list[int]:
    """``n`` members at a time, each in a process of its own: on a GPU machine one GPU each (CUDA_VISIBLE_DEVICES),
    on a CPU the cores split between them (OMP threads and loader threads). Returns each member's exit code."""
    cores = max(1, usable_cores() // n)
    gpus = _gpus()
    folder = slurm.jobs_folder(members[0].cfg)
    waiting, running, codes = list(enumerate(members)), {}, [0] * len(members)
    while waiting or running:
        while waiting and len(running) < n:
            i, m = waiting.pop(0)
            slot = next(k for k in range(n) if k not in {s for s, *_ in running.values()})
            config = folder / f"{m.name}.yaml"
            save(m.cfg, config)
            env = dict(os.environ, OMP_NUM_THREADS=str(cores))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            args = shlex.split(slurm.member_command(config, m.name, m.meta)) + ["--set", f"data.threads={cores}"]
            log = open(folder / f"{m.name}.out", "ab")  # noqa: SIM115 (closed when the process ends, below)
            p = subprocess.Popen([sys.executable, "-m", "mame_fast", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
            running[p.pid] = (slot, p, log, i)
            say(f"started {m.name} (pid {p.pid}, {cores} core(s){', GPU ' + env['CUDA_VISIBLE_DEVICES'] if gpus else ''}); "
                f"log {folder / f'{m.name}.out'}")
        time.sleep(0.2)
        for pid, (_, p, log, i) in list(running.items()):
            if p.poll() is not None:
                log.close()
                codes[i] = p.returncode
                del running[pid]
                say(f"{members[i].name} ended (exit {p.returncode})")
    return codes


def _gpus() -> list[str]:
    """The GPUs a parallel sweep may give its members (none on a CPU machine)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g]
    try:
        import torch

        return [str(k) for k in range(torch.cuda.device_count())]
    except ImportError:
        return []
