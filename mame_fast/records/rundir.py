"""Stage 5a: a run folder, ``<runs>/<NNN>-<name>/``: its number, and the name of everything in it.

The one owner of those names: the trainer, the test look, the records and the report all ask a ``RunDir``.
Numbers are the experiment numbers of the cards (#17 follows #16); they are taken atomically, by an exclusive
create in ``<runs>/.numbers/``, so runs launched at the same moment into one folder never share or skip one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import ConfigError

_NAME = re.compile(r"^(\d+)-(.+)$")
_RUN_NAME = re.compile(r"\w[\w.+-]{0,79}")  # \w: letters and digits of any script, and '_'


def check_run_name(name: str) -> str:
    """A run name is a folder name on every file system and in every shell: refused, with the rule, before anything
    starts."""
    if not _RUN_NAME.fullmatch(name):
        example = re.sub(r"[^\w.+-]+", "-", name).strip("-.+")[:80] or "run"
        raise ConfigError(f"--name {name!r}: a run name is up to 80 letters (any script), digits, '_', '.', '+' or '-', "
                          f"starting with a letter, digit or '_' (no spaces or slashes): e.g. --name {example}")
    return name


class RunDir:
    CONFIG = "config.yaml"  # the resolved config in effect (rewritten by a resume that changes it)
    SPEC = "model.yaml"  # the resolved model spec
    INFO = "run.json"  # name, status, heartbeat, hypothesis, predecessors, resumes, measured facts
    METRICS = "metrics.jsonl"  # one row per epoch, appended
    METRICS_CSV = "metrics.csv"  # the same, flat, for spreadsheets
    LAST, BEST = "last.pt", "best.pt"  # resumable checkpoint; the weights that won validation
    CARD = "card.md"
    TEST = "test.json"  # the one look at the test set
    HIST, PLOTS, TB = "hist", "plots", "tb"  # folders
    LOCK = "run.lock"  # held by the one process working on the run: its trainer, range test or test look (runrecord.py)
    LR_FIND = "lr_find.json"  # a range test's rates and losses
    # Pictures, in plots/.
    CURVES, TRAINING, CONFUSION, PER_CLASS = "curves.png", "training.png", "confusion.png", "per_class.png"
    HISTOGRAMS, BATCHES, ERRORS, MAPS = "histograms.png", "batches.png", "errors.png", "activation_maps.png"
    LR_PLOT = "lr_find.png"
    EVIDENCE = "evidence.json"  # what errors.png and activation_maps.png show, as numbers
    # In the runs folder.
    LEDGER = "test_ledger.jsonl"  # every look at the test set, of every run
    REPORT = "report"  # report.md and report.html
    SLIDES = "slides"  # slides.pptx and slides.pdf

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def number(self) -> int:
        m = _NAME.match(self.path.name)
        return int(m.group(1)) if m else 0

    @property
    def root(self) -> Path:
        return self.path.parent

    def plot(self, name: str) -> Path:
        """A picture of the run (one of the names above), in plots/."""
        return self.path / self.PLOTS / name

    def hist_file(self, epoch: int) -> Path:
        return self.path / self.HIST / f"epoch_{epoch:03d}.npz"

    def rank_file(self, rank: int) -> Path:
        return self.path / f"rank{rank}.json"

    @property
    def ledger(self) -> Path:
        return self.root / self.LEDGER

    @staticmethod
    def sweep_file(root: str | Path, name: str, suffix: str = ".json") -> Path:
        """A sweep's numbers (.json) and its family card (.md), in the runs folder."""
        return Path(root) / f"sweep-{name}{suffix}"

    @classmethod
    def create(cls, root: str | Path, name: str) -> RunDir:
        """``root/<NNN>-<name>/`` with the next free number, taken atomically."""
        check_run_name(name)
        root = Path(root)
        taken = root / ".numbers"
        taken.mkdir(parents=True, exist_ok=True)
        n = max([r.number for r in list_runs(root, complete=False)] + [int(p.name) for p in taken.iterdir() if p.name.isdigit()],
                default=0) + 1
        while True:
            try:
                os.close(os.open(taken / f"{n:03d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                n += 1  # another launch took it first
        d = cls(root / f"{n:03d}-{name}")
        d.path.mkdir()
        return d


def existing_run(path: str | Path) -> RunDir:
    """A run folder a command was given, or a one-sentence refusal: nothing is read from, or written into, a path that
    is not one (a verdict for a folder that does not exist would be a lie)."""
    p = Path(path)
    if not p.is_dir():
        where = p.parent if str(p.parent) not in ("", ".") else Path("runs")
        raise ConfigError(f"{p}: no such run folder; `mame-fast runs --root {where}` lists the runs there")
    if not (p / RunDir.CONFIG).is_file():
        raise ConfigError(f"{p}: not a run folder (it has no {RunDir.CONFIG}); give a folder that `mame-fast runs` lists")
    return RunDir(p)


def existing_root(root: str | Path) -> Path:
    """A folder of runs a command was given, or a one-sentence refusal."""
    if not Path(root).is_dir():
        raise ConfigError(f"{root}: no such folder of runs (runs go to the config's `out`, `runs` by default; the demo's "
                          f"are in demo/runs)")
    return Path(root)


def list_runs(root: str | Path, complete: bool = True) -> list[RunDir]:
    """The run folders in ``root`` by number (``complete``: only those whose run started, with a config)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted((r for r in runs if not complete or (r / RunDir.CONFIG).is_file()), key=lambda r: r.number)


def find_run(root: str | Path, number: int) -> RunDir | None:
    return next((r for r in list_runs(root) if r.number == number), None)
