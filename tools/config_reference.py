"""Write docs/configuration.md: every training config key and every model spec key, with its default, what it allows
and its doc line, generated from the dataclasses (mame_fast/config.py, mame_fast/train/spec.py). A test checks that the
file is what this writes: edit the field docs, then run `python tools/config_reference.py`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mame_fast.config import TrainConfig, reference_table  # noqa: E402
from mame_fast.train.spec import ModelSpec, StageSpec  # noqa: E402

HEADER = ["| key | default | allowed | what it does |", "|---|---|---|---|"]


def text() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every key a run reads, with its default. Generated from the dataclasses' field docs by "
        "`python tools/config_reference.py` (a test fails when this page and the code disagree); do not edit it by hand.",
        "",
        "Precedence: the defaults below < `-c FILE.yaml` (a path, or a shipped config: `demo`, `256`, `full`) < "
        "`--set key=value` (repeatable). An unknown key, a choice outside the allowed ones or a number out of range "
        "is an error naming the key, before any run folder exists. The resolved config is written to the run "
        "folder as `config.yaml`.",
        "",
        "## Training config (`mame-fast train --set KEY=VALUE`)",
        "",
        *HEADER,
        *reference_table(TrainConfig),
        "",
        "## Model spec (YAML file; `model: NAME` or `--set model=path.yaml`)",
        "",
        "A spec describes a CNN built from `timm.layers` blocks (see [models.md](models.md)). Top-level keys:",
        "",
        *HEADER,
        *reference_table(ModelSpec),
        "",
        "Each entry of `stages`:",
        "",
        *HEADER,
        *reference_table(StageSpec),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "configuration.md").write_text(text())
    print(f"wrote {ROOT / 'docs' / 'configuration.md'}")
