"""The documents stay honest: the README is a front page of at most 12,000 characters that links its docs; every
`mame-fast` command and option, every config key and every link the README and docs/ name exists; and
docs/configuration.md is what the config's field docs generate."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
import typer

from mame_fast.cli import app
from mame_fast.config import keys

from .helpers import open_in_browser, rendered_overflows

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["install", "shards", "input-pipeline", "models", "training", "configuration", "experiments", "benchmarks",
        "testing", "architecture"]
PAGES = [ROOT / "README.md"] + [ROOT / "docs" / f"{d}.md" for d in DOCS]
SECTIONS = {"data", "optim"}


def commands() -> dict[str, set[str]]:
    """Every command of the CLI with the options it takes."""
    group = typer.main.get_command(app)
    with click.Context(group) as ctx:
        return {name: {o for p in group.get_command(ctx, name).params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
                for name in group.list_commands(ctx)}


def code_of(text: str) -> list[str]:
    """The code a document shows: its fenced blocks' lines and its inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for b in blocks for line in b.splitlines()] + inline


def problems(text: str, where: str = "text") -> list[str]:
    """What a document names that does not exist: commands, their options, config keys."""
    found = []
    cmds, known = commands(), set(keys())
    for code in code_of(text):
        code = code.replace("\\|", "|")
        for m in re.finditer(r"(?:\bmame-fast|-m mame_fast)((?:\s+[^\s#|;]+)*)", code):
            words = [w for w in shlex.split(m.group(1).replace("'", "").replace('"', ""), comments=False)]
            words = [w for w in words if w not in ("--debug",)]
            if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):  # `mame-fast --debug ...`, `mame-fast && cd`
                continue
            cmd = words[0]
            if cmd not in cmds:
                found.append(f"{where}: `mame-fast {cmd}` is not a command ({code!r})")
                continue
            found += [f"{where}: `mame-fast {cmd}` has no option {w} ({code!r})" for w in words[1:]
                      if w.startswith("--") and w.split("=")[0] not in cmds[cmd]]
        for key in re.findall(r"--set\s+'?\"?([A-Za-z_][\w.]*)=", code):
            if key not in known and key.upper() != key and key != "key":  # KEY=VALUE, key=value: placeholders
                found.append(f"{where}: config key {key} does not exist ({code!r})")
        for key in re.findall(r"(?<![\w.])((?:data|optim)\.[a-z_]+)\b", code):
            if key not in known:
                found.append(f"{where}: config key {key} does not exist ({code!r})")
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_option_and_key_a_document_names_exists(page):
    assert page.is_file(), f"{page} is missing"
    assert problems(page.read_text(), page.name) == []


def test_the_settings_the_readme_lists_exist():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The settings you will touch"):].split("\n\n")
    table = next(block for block in section if block.startswith("| key |"))  # its first table; the next lists specs
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = [k for cell in rows for k in re.findall(r"`([^`]+)`", cell)]
    assert len(named) > 10 and [k for k in named if k not in keys()] == []


def test_the_checker_catches_what_does_not_exist():
    made_up = ("Run `mame-fast trian --set optim.lr=1` or `mame-fast train --sed x=1`, then `mame-fast test RUN "
               "--twice`, with `data.resolution` and `--set optim.lrr=3`.\n```bash\nmame-fast runs --rooot x\n```\n")
    found = " ".join(problems(made_up))
    for bad in ("`mame-fast trian` is not a command", "has no option --sed", "has no option --twice",
                "config key data.resolution", "config key optim.lrr", "has no option --rooot"):
        assert bad in found, (bad, found)
    assert problems("`mame-fast train --res full --set data.res=full --set epochs=3` and `optim.lr`") == []


def test_links_between_the_documents_resolve():
    for page in PAGES + [ROOT / "benchmarks" / "results" / "history.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md has {len(text)} characters"
    for heading in ("## Install", "## Quick start", "## Your first experiments on MAMe", "## Commands",
                    "## The settings you will touch", "## What a run writes", "## When something goes wrong",
                    "## Performance", "## Licence and citation"):
        assert heading in text, heading
    for d in DOCS:
        assert f"docs/{d}.md" in text, f"the README does not link docs/{d}.md"
    assert "make demo" in text and "make test" in text


def test_the_configuration_page_is_generated_from_the_field_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == ref.text(), "docs/configuration.md is stale: run `python tools/config_reference.py`"
    for key in keys():
        assert f"| `{key}` |" in page, key


@pytest.mark.slow
@pytest.mark.browser
def test_the_quick_starts_next_commands_run_as_printed(tmp_path):
    """After the demo (here a smaller one, same folders), its report shows the four evidence pictures (the range test,
    the batches as fed, the error gallery, the class activation maps), and each command the README's quick start prints
    next runs as written, from the folder where `make demo` ran."""
    import subprocess
    import sys

    from .helpers import cli_env

    run = lambda *a: subprocess.run(a, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run(sys.executable, "-m", "mame_fast", "demo", "--out", "demo", "--per-class", "3,1,1", "--set", "epochs=2",
            "--set", "data.crop=64")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "demo" / "runs" / "report.md").read_text()
    for picture in ("lr_find", "batches", "errors", "activation_maps"):  # the four pictures of the evidence
        assert f"plots/{picture}.png)" in report, picture
    # The demo follows its own range test: run #2 trains at #1's suggested rate, and its card says so.
    suggested = json.loads((tmp_path / "demo/runs/001-lr-find/run.json").read_text())["lr_find"]["suggested_lr"]
    assert f"optim.lr {suggested:g} per 256 images lies inside the range" in report
    # The demo's report as a reader opens it: every picture loads in a browser (MAME_FAST_SHOTS keeps the screenshot).
    shot = Path(os.environ.get("MAME_FAST_SHOTS", tmp_path)) / "demo_report.png"
    assert open_in_browser(tmp_path / "demo" / "runs" / "report.html", shot) == []
    # The demo's deck: the report links it, and where LibreOffice rendered it, nothing runs past its box.
    runs = tmp_path / "demo" / "runs"
    assert (runs / "slides.pptx").is_file() and "[slides.pptx](slides.pptx)" in report
    if shutil.which("soffice") or os.environ.get("MAME_FAST_REQUIRE_OFFICE") == "1":
        assert rendered_overflows(runs / "slides.pptx", runs / "slides.pdf", tmp_path / "pages") == []
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Quick start"):].split("```bash\n")[2].split("```")[0]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    commands = [line for line in lines if line.startswith(("mame-fast", "cat "))]
    assert len(commands) >= 3, block
    for line in commands:
        words = shlex.split(line)
        if words[0] == "mame-fast":
            r = run(sys.executable, "-m", "mame_fast", *words[1:])
        else:
            r = run(*words)
        assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, (line, r.stdout[-2000:], r.stderr[-2000:])
