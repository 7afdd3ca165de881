"""Stage 5f: sweeps: a grid of config values times N seeds, run as ordinary runs, and one family card that says which
differences are conclusive.

A single run's val top-1 carries a binomial interval (``stats.py``); a setting run with several seeds carries
the interval of its mean over seeds, which also holds the seed-to-seed spread. The family card, in the lab's
five-part form, shows both, and calls a difference between two settings conclusive when the intervals of
their means do not overlap.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..config import ConfigError
from ..files import atomic_write_text
from .report import card_markdown, outcomes
from .rundir import RunDir
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


def family_card(path: Path, name: str, grid: dict[str, list[str]], members: list[tuple[dict, int, Path]], hypothesis: str,
                previous: list[str], base: str) -> Path:
    """The family card: ``members`` are (setting, seed, run folder). Writes ``path`` (.md) and its .json beside."""
    groups: dict[str, list[tuple[int, Path, dict]]] = {}
    for setting, seed, run_dir in members:
        groups.setdefault(label(setting), []).append((seed, run_dir, outcomes(run_dir)))
    rows, stats = [], {}
    for lab, runs in groups.items():
        tops = [o["best_val"] for _, _, o in runs if "best_val" in o]
        m, half = mean_interval(tops) if tops else (float("nan"), float("inf"))
        stats[lab] = (m, half)
        each = "; ".join(f"#{RunDir(d).number} seed {s}: {pct(o.get('best_val'), o.get('val_count'))}" for s, d, o in runs)
        rows.append([lab, len(runs), f"{100 * m:.1f}% +- {100 * half:.1f}", each])
    seeds = len(next(iter(groups.values())))
    sections = {
        "title": f"Sweep: {name}", "previous": previous or ["(none given)"],
        "hypothesis": hypothesis or "(not stated; give one with --hypothesis)",
        "setup": [f"Base: {base}. The runs differ only in the grid's keys and the seed.",
                  "Grid: " + "; ".join(f"`{k}` in {v}" for k, v in grid.items()) + f"; {seeds} seed(s) each."],
        "diff_against": None, "diff": [],
        "outcomes_note": "Best val top-1 per setting: mean +- the 95% t interval over seeds; then each run with its "
                         "binomial 95% interval.",
        "outcome_header": ["setting", "runs", "mean +- 95%", "runs [95% interval]"], "outcomes": rows, "plots": [],
        "observations": verdicts(stats),
    }
    atomic_write_text(path, card_markdown(sections))
    family = {"name": name, "grid": grid, "members": [{"setting": s, "seed": seed, "run": str(d)} for s, seed, d in members],
              "mean_top1": {k: v[0] for k, v in stats.items()}, "half_width": {k: v[1] for k, v in stats.items()},
              "card": sections}
    atomic_write_text(path.with_suffix(".json"), json.dumps(family, indent=1))
    return path


def verdicts(stats: dict[str, tuple[float, float]]) -> list[str]:
    """For each pair of settings: conclusive when the intervals of their means do not overlap."""
    out = []
    for (a, (ma, ha)), (b, (mb, hb)) in itertools.combinations(stats.items(), 2):
        apart = ma + ha < mb - hb or mb + hb < ma - ha
        better = b if mb > ma else a
        if apart:
            out.append(f"{b} vs {a}: {100 * (mb - ma):+.1f} points, conclusive ({better} is better; the intervals do not "
                       f"overlap).")
        else:
            out.append(f"{b} vs {a}: {100 * (mb - ma):+.1f} points, not conclusive (the intervals overlap: add seeds or a "
                       f"larger difference).")
    return out or ["A single setting: nothing to compare."]
