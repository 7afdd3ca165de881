"""The interview's deck, read back with python-pptx: the slides in the report's order, each card's five parts holding
the card's own words (the same words as card.md and the report: one source), each picture the run's PNG byte for byte
at its own aspect within the margins, a sweep's numbers, the selection by runs and by lineage; and, rendered by
LibreOffice, no text past its box or the slide."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mame_fast.records import card as cards
from mame_fast.records.card import Picture
from mame_fast.records.kinds import LR_PICTURE
from mame_fast.records.plots import plot_run, pyplot, save_figure
from mame_fast.records.records import read_run_info, update_run_info
from mame_fast.records.report import add_note, report_cards
from mame_fast.records.rundir import RunDir, list_runs
from mame_fast.records.slides import MARGIN, PART_SHAPE, SlidesError, lineage, parse_runs, write_deck
from mame_fast.records.sweep import read_families
from mame_fast.train.lrfind import plot as plot_range_test

from .helpers import cli_env, rendered_overflows, soffice

FIXTURE = Path(__file__).parent / "fixtures" / "runs_629ef3b"
EMU = 12700  # per point
LONG = ("The gap closed only after the colour jitter was removed, which suggests that the materials are told apart "
        "by their hue as much as by their texture; " * 9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The runs folder written by 629ef3b (a range test, a trained and tested run, a two-run sweep), with its plots
    drawn from its own metrics, a tall picture, and a note long enough to push #4's card onto a second slide."""
    root = tmp_path_factory.mktemp("deck") / "runs"
    shutil.copytree(FIXTURE, root)
    for r in list_runs(root):
        plot_run(r.path, read_run_info(r.path).get("classes") or [f"class {i}" for i in range(29)])
    found = root / "001-lr-find"
    plot_range_test(json.loads((found / RunDir.LR_FIND).read_text()), found / RunDir.PLOTS / LR_PICTURE[0])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 9))  # much taller than the slide: it must keep its aspect, not fill the width
    ax.plot(range(10))
    save_figure(fig, root / "002-tiny" / RunDir.PLOTS / RunDir.BATCHES)
    for note in (LONG, LONG, LONG + "/" + "x" * 160):  # the last with a word wider than a column
        add_note(root / "004-lr-lr0.08-s0", note)
    update_run_info(root / "003-lr-lr0.02-s0", {"hypothesis": LONG[:400]})
    # An evaluation-budget table (`mame-fast evaluate`), with its empty cells: an empty cell took 18 pt in Impress.
    update_run_info(root / "002-tiny", {"eval_budgets": {
        "time": "2026-12-07T03:57:57", "key": "pixels", "weights": "model", "epoch": 3, "chosen": 40000, "trained_at": 40000,
        "results": [{"value": v, "top1": t, "count": 58, "interval": [0, 1]} for v, t in ((30000, 0.1), (40000, 0.14),
                                                                                        (50000, 0.12))]}})
    return root


def _pt(emu: int) -> float:
    return emu / EMU


def _read(pptx: Path):
    from pptx import Presentation

    return Presentation(str(pptx))


def _words(s: str) -> list[str]:
    return [w for w in s.split() if w not in ("-", "\u2022")]


def _part_words(slides, part: int) -> list[str]:
    """The words of a card's part over its slides, in reading order: its text boxes (without the heading) and its
    tables (a continued piece's repeated header left out)."""
    out: list[str] = []
    for s in slides:
        for sh in s.shapes:
            if sh.name == PART_SHAPE.format(part):
                paras = [p.text for p in sh.text_frame.paragraphs]
                if paras and paras[0] == cards.PARTS[part - 1]:
                    paras = paras[1:]
                out += _words(" ".join(paras))
            elif sh.name.startswith(PART_SHAPE.format(part) + " table"):
                rows = list(sh.table.rows)[1 if "continued" in sh.name else 0:]
                out += _words(" ".join(c.text for r in rows for c in r.cells))
    return out


def _without_pictures(card: cards.Card) -> cards.Card:
    keep = lambda blocks: tuple(b for b in blocks if not isinstance(b, Picture))  # noqa: E731
    return dataclasses.replace(card, previous=keep(card.previous), hypothesis=keep(card.hypothesis),
                               setup=keep(card.setup), outcomes=keep(card.outcomes), observations=keep(card.observations))


def _plain_part_words(card: cards.Card, part: int) -> list[str]:
    chunks = re.split(r"^(\d - .+)$", cards.plain(_without_pictures(card)), flags=re.M)
    return _words(chunks[2 * part])


def test_a_text_wraps_at_spaces_only_as_the_renderers_wrap_it():
    """A line breaks at a space, never where a bracket meets a code span; a word wider than the box breaks inside."""
    from mame_fast.records.slides import _width, lines

    t = cards.text("crops (", cards.code("data.res=256"), "), batch")
    unit = _width("(", 12) + _width("data.res=256", 12, mono=True) + _width("),", 12)
    room = (_width("crops ", 12) + unit) / 0.98 + 1  # the whole of "crops (data.res=256)," and no more
    assert lines(t, 12, room + 0.5) == 2 and lines(t, 12, room - 0.5) == 3  # "(" never ends the first line alone
    assert lines(cards.text("x" * 100), 10, 100) == -(-int(_width("x" * 100, 10)) // 98)


def test_the_deck_shows_every_card_then_its_pictures_in_the_reports_order(runs):
    w = write_deck(runs, pdf=False)
    deck = _read(w.pptx)
    names = [s.name for s in deck.slides]
    assert w.slides == len(names) and names[:2] == ["cover", "log 1"]
    # Every card of the report, in its order, each followed by its pictures: the run's PNGs, byte for byte.
    expected, i = [], 2
    for c in report_cards(runs):
        assert names[i] == f"card {c.title}", (i, names[i])
        card_slides = [deck.slides[i]]
        i += 1
        while names[i].startswith(f"card {c.title} ("):  # a card too long for one slide continues on the next
            card_slides.append(deck.slides[i])
            i += 1
        for part in range(1, 6):  # the card's own words: card.md, the report and the deck render one object
            assert _part_words(card_slides, part) == _plain_part_words(c, part), (c.title, part)
        folder = runs / c.folder if c.folder else runs
        for p in c.pictures():
            s = deck.slides[i]
            assert names[i] == f"picture {c.title} {p.path}"
            pic = next(sh for sh in s.shapes if sh.name == "picture")
            assert pic.image.blob == (folder / p.path).read_bytes()
            caption = next(sh for sh in s.shapes if sh.name == "caption")
            assert caption.text_frame.text == p.caption
            expected.append(p.path)
            i += 1
    assert i == len(names)
    assert any(n.startswith("card #4: lr-lr0.08-s0 (") for n in names)  # the long note made #4's card continue
    assert {"plots/curves.png", "plots/lr_find.png", "sweep-lr.png"} <= set(expected)


def test_every_picture_keeps_its_aspect_within_the_margins(runs):
    from PIL import Image

    deck = _read(write_deck(runs, pdf=False).pptx)
    seen = 0
    for s in deck.slides:
        for sh in s.shapes:
            left, top, width, height = (_pt(v) for v in (sh.left, sh.top, sh.width, sh.height))
            assert left >= MARGIN - 0.5 and left + width <= 960 - MARGIN + 0.5, (s.name, sh.name)
            assert top >= 0 and top + height <= 540 - MARGIN + 0.5, (s.name, sh.name, top + height)
            if sh.name == "picture":
                import io

                iw, ih = Image.open(io.BytesIO(sh.image.blob)).size
                assert abs(width / height - iw / ih) < 0.01 * iw / ih, s.name
                seen += 1
    assert seen >= 9


def test_the_log_and_the_sweep_slide_hold_the_numbers(runs):
    deck = _read(write_deck(runs, pdf=False).pptx)
    log = next(sh for sh in deck.slides[1].shapes if sh.name == "log table").table
    rows = [[c.text for c in r.cells] for r in list(log.rows)[1:]]
    assert [r[0] for r in rows] == [str(r.number) for r in list_runs(runs)]
    tiny = rows[1]
    assert tiny[1] == "tiny" and tiny[2] == "#1" and tiny[4].startswith("13.8% [5.5, 30.6]")
    assert rows[2][3].endswith("\u2026")  # a long hypothesis takes one line in the log
    family = read_families(runs)[0]
    sweep = next(s for s in deck.slides if s.name == f"card Sweep: {family['name']}")
    table = next(sh for sh in sweep.shapes if sh.name == PART_SHAPE.format(4) + " table").table
    cells = " ".join(c.text for r in table.rows for c in r.cells)
    for mean in family["mean_top1"].values():
        assert f"{100 * mean:.1f}%" in cells


def _jumps(slide) -> list[tuple[str, str | None]]:
    """(text, name of the slide it jumps to, or None) of every text run of the slide that names an experiment (#N, or
    the log's number column) or carries a click action."""
    from pptx.oxml.ns import qn

    frames = [sh.text_frame for sh in slide.shapes if sh.has_text_frame]
    frames += [c.text_frame for sh in slide.shapes if sh.has_table for r in sh.table.rows for c in r.cells]
    out = []
    for f in frames:
        for p in f.paragraphs:
            for r in p.runs:
                link = r._r.rPr.find(qn("a:hlinkClick")) if r._r.rPr is not None else None
                if link is None:
                    if re.fullmatch(r"#\d+", r.text):
                        out.append((r.text, None))
                    continue
                assert link.get("action") == "ppaction://hlinksldjump", link.attrib
                out.append((r.text, slide.part.related_part(link.get(qn("r:id"))).slide.name))
    return out


def test_a_mention_of_a_shown_experiment_jumps_to_its_card(runs, tmp_path):
    deck = _read(write_deck(runs, pdf=False).pptx)
    jumps = [j for s in deck.slides for j in _jumps(s)]
    numbers = [r.number for r in list_runs(runs)]
    log = [j for j in _jumps(deck.slides[1]) if j[0].isdigit()]
    assert [t for t, _ in log] == [str(n) for n in numbers] and all(
        to.startswith(f"card #{t}: ") for t, to in log), log
    mentions = [(t, to) for t, to in jumps if t.startswith("#")]
    assert len(mentions) > len(numbers)  # the log's "follows" and the cards' own mentions
    assert all(to is not None and to.startswith(f"card {t}: ") for t, to in mentions), mentions
    alone = _read(write_deck(runs, tmp_path / "two.pptx", [2], pdf=False).pptx)  # #1 is not shown: no jump to it
    follows = [j for s in alone.slides for j in _jumps(s) if j[0] == "#1"]
    assert follows and all(to is None for _, to in follows), follows


def test_a_selection_by_runs_or_lineage_shows_those_runs_and_the_range_test_they_cite(runs, tmp_path):
    assert parse_runs("2,5,7-9") == [2, 5, 7, 8, 9]
    for bad in ("2,x", "9-7", "3-"):
        with pytest.raises(SlidesError, match="not a run number or a range"):
            parse_runs(bad)
    assert lineage(runs, 4) == [1, 2, 4]
    names = [s.name for s in _read(write_deck(runs, tmp_path / "two.pptx", [2], pdf=False).pptx).slides]
    assert "card #2: tiny" in names and "card Test set: #2 tiny" in names
    assert not any("#1: lr-find" in n or "#3" in n or "Sweep" in n for n in names)
    assert f"picture #2: tiny 001-lr-find/plots/{LR_PICTURE[0]}" in names  # #2 follows the range test #1: it cites it
    names = [s.name for s in _read(write_deck(runs, tmp_path / "l.pptx", lineage(runs, 4), pdf=False).pptx).slides]
    cards_shown = [n for n in names if n.startswith("card ") and "(" not in n]
    assert cards_shown == ["card #1: lr-find", "card #2: tiny", "card Test set: #2 tiny", "card #4: lr-lr0.08-s0",
                           "card Sweep: lr"]


def test_the_command_refuses_runs_that_are_not_there_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "deck.pptx"
    for args, said in ((["--runs", "2,9"], "run(s) #9 not in"), (["--lineage", "7"], "run #7 is not in"),
                       (["--runs", "2,x"], "'x' is not a run number")):
        r = subprocess.run([sys.executable, "-m", "mame_fast", "slides", "--root", str(runs), "--out", str(out),
                            "--no-pdf", *args], env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 2 and said in " ".join(r.stdout.split()) and "Traceback" not in r.stderr, r.stdout
        assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "mame_fast", "slides", str(runs / "002-tiny"), "--out", str(out),
                        "--no-pdf"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0 and out.is_file(), r.stdout + r.stderr
    assert "card #2: tiny" in [s.name for s in _read(out).slides]


@pytest.mark.slow
@pytest.mark.office
def test_rendered_by_libreoffice_no_text_runs_past_its_box_or_the_slide(runs, tmp_path):
    """The deck as LibreOffice draws it (PDF, then PNG pages): every word inside a shape's box, no two words on top of
    each other, nothing drawn in the margins; with a card long enough to continue and a word wider than a column."""
    soffice()
    w = write_deck(runs, tmp_path / "deck.pptx")
    assert w.pdf is not None and w.pdf.is_file(), w.note
    assert rendered_overflows(w.pptx, w.pdf, tmp_path / "pages") == []
    # The jumps survive into the PDF: each linked "#N" goes to the page of #N's card (pdftohtml names links' pages).
    subprocess.run(["pdftohtml", "-xml", "-i", "-q", str(w.pdf), str(tmp_path / "links")], check=True)
    xml = (tmp_path / "links.xml").read_text()
    pages = {int(m[0]): m[1] for m in re.findall(r'<page number="(\d+)"(.*?)</page>', xml, flags=re.S)}
    links = re.findall(r'<a href="[^"]*#(\d+)">[^<]*?#?(\d+)\b[^<]*</a>', xml)
    numbers = [r.number for r in list_runs(runs)]
    assert {int(n) for _, n in links} == set(numbers), links
    for page, n in links:
        assert re.search(rf"<b>#{n}: ", pages[int(page)]), (page, n)
