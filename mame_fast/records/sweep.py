"""Stage 5i: sweeps: a grid of config values times N seeds, run as ordinary runs, and one family card that says which
differences are conclusive.

A single run's val top-1 carries a binomial interval (``stats.py``); a setting run with several seeds carries
the interval of its mean over seeds, which also holds the seed-to-seed spread. The family card, in the lab's
five-part form, shows both, and calls a difference between two settings conclusive when the intervals of
their means do not overlap.

On disk a sweep is numbers (``sweep-<name>.json``: the grid, each member's folder, setting, seed and best val top-1,
each setting's mean and half-width); its card is built from them (``sweep_card``) and rendered like any card, with
a plot of setting against val top-1 drawn from the same numbers (``sweep-<name>.png``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

from ..config import ConfigError
from ..files import atomic_write_text
from . import card as cards
from .card import Bullets, Card, Para, Picture, Span, code, ref, table, text
from .facts import outcomes
from .kinds import previous_state
from .plots import pyplot, save_figure
from .records import now, read_run_info
from .rundir import RunDir, check_run_name, find_run, list_runs
from .stats import mean_interval, pct


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['optim.ema=0.9,0.99', 'model=tiny,small'] -> {'optim.ema': ['0.9', '0.99'], 'model': ['tiny', 'small']}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"sweep: {item!r} is not KEY=V1,V2,...")
        grid[key.strip()] = vals
    return grid


def settings(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in order."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def label(setting: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def plan(name: str, grid: dict[str, list[str]], repeats: int, base_seed: int) -> list[tuple[dict, int, str]]:
    """(setting, seed, run name) of every member, in order: each setting times ``repeats`` seeds from ``base_seed``."""
    check_run_name(name)
    out = []
    for setting in settings(grid):
        tag = re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in setting.items()))
        for i in range(repeats):
            out.append((setting, base_seed + i, check_run_name(f"{name}-{tag}-s{base_seed + i}")))
    return out


def measured(members: list[dict], root: Path) -> list[tuple[dict, Path | None, dict]]:
    """Each member with its run folder (None until its job starts) and what that folder measured: read once."""
    out = []
    for m in members:
        folder = member_folder(m, root)
        out.append((m, folder, outcomes(folder) if folder is not None else {}))
    return out


def family_numbers(seen: list[tuple[dict, Path | None, dict]]) -> dict:
    """Each setting's mean best val top-1 and its 95% half-width over seeds (``seen``: ``measured``'s)."""
    groups: dict[str, list[float]] = {}
    for m, _, o in seen:
        values = groups.setdefault(label(m["setting"]), [])
        if o.get("best_val") is not None:
            values.append(o["best_val"])
    stats = {k: mean_interval(v) if v else (math.nan, math.inf) for k, v in groups.items()}
    return {"mean_top1": {k: v[0] for k, v in stats.items()}, "half_width": {k: v[1] for k, v in stats.items()}}


def write_family(root: Path, name: str, grid: dict[str, list[str]], members: list[tuple[dict, int, str]],
                 hypothesis: str, after: list[int], base: str, jobs: dict | None = None) -> Path:
    """The sweep's numbers (sweep-<name>.json) and its family card (sweep-<name>.md) in the runs folder ``root``;
    ``members`` are (setting, seed, run name); ``jobs``: the SLURM jobs of a submitted sweep (its array's tasks by
    member, the card's job)."""
    family = {"name": name, "grid": grid, "hypothesis": hypothesis, "after": list(after), "base": base,
              "created": now(), "members": [{"setting": s, "seed": seed, "name": n} for s, seed, n in members],
              **({"slurm": jobs} if jobs else {})}
    return write_card_of(root, family)


def write_card_of(root: Path, family: dict, states: dict[str, str] | None = None) -> Path:
    """(Re)write a sweep's numbers and family card from what its members have measured so far. A submitted sweep's
    members get their array task's job id here, the one place that names it (``<array>_<task>``)."""
    seen = measured(family["members"], root)
    for i, (m, folder, o) in enumerate(seen):
        m.update(best_val=o.get("best_val"), val_count=o.get("val_count"))
        if folder is not None:
            m.update(run=folder.name, number=RunDir(folder).number)
        if family.get("slurm"):
            m["job"] = f"{family['slurm']['array']}_{i}"
    family.update(family_numbers(seen))
    atomic_write_text(RunDir.sweep_file(root, family["name"]), json.dumps(family, indent=1))
    return atomic_write_text(RunDir.sweep_file(root, family["name"], ".md"),
                             cards.markdown(_card(family, seen, root, states or {})))


def read_families(root: Path) -> list[dict]:
    """Every sweep of a runs folder, by name."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).glob(RunDir.sweep_file("", "*").name))]


def member_folder(m: dict, root: Path) -> Path | None:
    """A member's run folder in ``root``: the one recorded (by name: a sweep file from before 0.2 recorded an absolute
    path), else the latest run of the member's name (a submitted member's folder appears when its job starts)."""
    if m.get("run"):
        return Path(root) / Path(m["run"]).name
    mine = [r.path for r in list_runs(root) if r.path.name.split("-", 1)[1] == m.get("name")]
    return mine[-1] if mine else None


# What a member that has not finished needs, by its state (run.json's status, or SLURM's for one without a folder).
ADVICE = {
    "running": "running: wait, then `mame-fast sweep --card {sweep}` again",
    "PENDING": "queued (job {job}): wait, then `mame-fast sweep --card {sweep}` again",
    "RUNNING": "starting (job {job})",
    "interrupted": "interrupted with a resumable checkpoint: `mame-fast train --resume {folder}`",
    "died": "its process ended without a word: `mame-fast train --resume {folder}`",
    "failed": "failed ({error}): fix it, then `mame-fast train --resume {folder}`",
    "diverged": "diverged: its loss became non-finite; lower optim.lr for this setting (or add optim.clip_grad)",
    "stopped": "stopped at max_steps: `mame-fast train --resume {folder} --set max_steps=0`",
}


def sweep_card(family: dict, root: Path, states: dict[str, str] | None = None) -> Card:
    """The family card of a sweep, from its numbers and its members' folders; ``states``: SLURM's state of members'
    jobs (a member that never started has no folder: the card says where it is and what to do)."""
    return _card(family, measured(family["members"], Path(root)), Path(root), states or {})


def _card(family: dict, seen: list[tuple[dict, Path | None, dict]], root: Path, states: dict[str, str]) -> Card:
    groups: dict[str, list[tuple[dict, Path | None, dict]]] = {}
    for item in seen:
        groups.setdefault(label(item[0]["setting"]), []).append(item)
    numbers = family_numbers(seen)
    stats = {k: (numbers["mean_top1"][k], numbers["half_width"][k]) for k in groups}
    rows, pending = [], []
    for lab, ms in groups.items():
        each: list = []
        for m, folder, o in ms:
            if folder is None:
                o = {"status": states.get(m.get("job", ""), "not started")}
            if folder is not None and o.get("best_val") is not None:
                each += (["; "] if each else []) + [ref(RunDir(folder).number),
                                                     f" seed {m['seed']}: {pct(o.get('best_val'), o.get('val_count'))}"]
            if o["status"] != "finished":
                pending.append(_unfinished(m, folder, o["status"], family["name"]))
        m_, half = stats[lab]
        mean = f"{100 * m_:.1f}% +- {100 * half:.1f}" if m_ == m_ else "-"
        rows.append((lab, str(len(ms)), mean, text(*each) if each else text("-")))
    seeds = len(next(iter(groups.values()))) if groups else 0
    after = [r.path for r in (find_run(root, k) for k in family.get("after", [])) if r is not None]
    previous = tuple(previous_state(p) for p in after) or tuple(_legacy(t) for t in family.get("card", {}).get(
        "previous", [])) or (text("(none given)"),)
    grid = [x for k, v in family["grid"].items() for x in (code(k), f" in {v}; ")]
    return Card(
        title=f"Sweep: {family['name']}", kind="sweep",
        previous=(Bullets(previous),),
        hypothesis=(Para(text(family.get("hypothesis") or "(not stated; give one with --hypothesis)")),),
        setup=(Para(text(f"Base: {family.get('base') or _legacy_base(family)}. The runs differ only in the grid's keys "
                         "and the seed.")),
               Para(text("Grid: ", *grid, f"{seeds} seed(s) each."))),
        outcomes=(Para(text("Best val top-1 per setting: mean +- the 95% t interval over seeds; then each run with its "
                            "binomial 95% interval.")),
                  table(["setting", "runs", "mean +- 95%", "runs [95% interval]"], rows),
                  *_family_plot(family["name"], groups, stats, root)),
        observations=(Bullets(tuple(pending) + tuple(text(v) for v in verdicts(
            {k: v for k, v in stats.items() if v[0] == v[0]}))),))  # settings without a number yet: none


PLOT_CAPTION = ("Best val top-1 per setting: each seed's run (dots) and their mean with its 95% interval (bar); a "
                "bracket marked * joins a conclusive pair (intervals apart).")


def _family_plot(name: str, groups: dict, stats: dict[str, tuple[float, float]], root: Path) -> tuple[Picture, ...]:
    """``sweep-<name>.png`` beside the family card, redrawn from the same numbers: setting against val top-1 (() while
    no member has one)."""
    measured_ = {k: v for k, v in stats.items() if v[0] == v[0]}
    if not measured_:
        return ()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(groups)
    for i, lab in enumerate(names):
        seeds = [o["best_val"] for _, _, o in groups[lab] if o.get("best_val") is not None]
        ax.plot([i] * len(seeds), [100 * v for v in seeds], "o", color="0.55", ms=5, zorder=2)
        if lab in measured_:
            m, h = measured_[lab]
            ax.errorbar([i], [100 * m], yerr=[[100 * h if math.isfinite(h) else 0]], fmt="s", color="C0", ms=8,
                        capsize=6, lw=2, zorder=3)
    top = max(100 * (m + (h if math.isfinite(h) else 0)) for m, h in measured_.values())
    low = min(100 * (m - (h if math.isfinite(h) else 0)) for m, h in measured_.values())
    step, level = max(1.0, 0.06 * (top - low)), top
    for a, b in itertools.combinations(names, 2):
        if a in measured_ and b in measured_ and _apart(measured_[a], measured_[b]):
            level += step
            i, j = names.index(a), names.index(b)
            ax.plot([i, i, j, j], [level - step / 3, level, level, level - step / 3], "k-", lw=1)
            ax.text((i + j) / 2, level, "*", ha="center", va="bottom", fontsize=14)
    ax.set_xticks(range(len(names)), names, rotation=15 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set(title=f"Sweep {name}", ylabel="best val top-1 (%)", xlim=(-0.5, len(names) - 0.5))
    ax.set_ylim(top=level + 2 * step)
    ax.grid(axis="y", alpha=0.3)
    path = save_figure(fig, RunDir.sweep_file(root, name, ".png"))
    return (Picture(path.name, PLOT_CAPTION),)


def _apart(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two settings' intervals do not overlap: their difference is conclusive."""
    (ma, ha), (mb, hb) = a, b
    return ma + ha < mb - hb or mb + hb < ma - ha


def _unfinished(m: dict, folder: Path | None, status: str, sweep: str) -> cards.Text:
    """A member that has not finished, by name, with what it needs."""
    error = (read_run_info(folder).get("error") or "see its run.json") if folder is not None else ""
    said = ADVICE.get(status, f"{status} (job {{job}}): it never started; resubmit the sweep's array task, or train "
                              f"it by hand with the config in the runs folder's jobs/").format(
        job=m.get("job", "?"), folder=folder, sweep=sweep, error=error)
    who = [ref(RunDir(folder).number), f" {m.get('name')}"] if folder is not None else [f"{m.get('name')}"]
    return text("Not in the numbers: ", *who, f" ({label(m['setting'])}, seed {m['seed']}): {said}.")


def verdicts(stats: dict[str, tuple[float, float]]) -> list[str]:
    """For each pair of settings: conclusive when the intervals of their means do not overlap."""
    out = []
    for (a, (ma, ha)), (b, (mb, hb)) in itertools.combinations(stats.items(), 2):
        better = b if mb > ma else a
        if _apart((ma, ha), (mb, hb)):
            out.append(f"{b} vs {a}: {100 * (mb - ma):+.1f} points, conclusive ({better} is better; the intervals do not "
                       f"overlap).")
        else:
            out.append(f"{b} vs {a}: {100 * (mb - ma):+.1f} points, not conclusive (the intervals overlap: add seeds or a "
                       f"larger difference).")
    return out or ["A single setting: nothing to compare."]


def _legacy(s: str) -> cards.Text:
    """A sentence a sweep file from before 0.2 saved as Markdown: its **bold** parts as bold spans."""
    return tuple(Span(p, "bold" if i % 2 else "plain") for i, p in enumerate(s.split("**")) if p)


def _legacy_base(family: dict) -> str:
    setup = family.get("card", {}).get("setup", [""])[0]
    return setup.removeprefix("Base: ").split(". The runs differ")[0] or "(not recorded)"
