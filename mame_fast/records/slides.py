"""Stage 5k: the interview's slides: every experiment card and its pictures as an editable deck.

The lab's experiment card is a slide ("#N: name", then its five parts) with the support visuals on separate slides.
``write_deck`` renders the same ``Card`` objects as card.md and the report (``report.report_cards``), in the same
order, as a 16:9 PowerPoint file (python-pptx: PowerPoint, LibreOffice Impress, Keynote and Google Slides open it):

    title slide; the experiment log (one row per run, split over slides when long);
    per run: its card slide(s), then one slide per picture, then the range test it cites (when not itself shown);
    its test look (the one look at the test set); then each sweep's family card and its plot.

Everything is native and editable (text boxes, tables, the run's own PNGs, embedded byte for byte). Nothing is left
to a viewer's autofit, which PowerPoint applies only when a box is edited: each text is measured with the metrics of
the font it is shown in (Arial, or Liberation Sans, its metric twin; matplotlib's DejaVu Sans, wider, where neither
is found), wrapped in its box, and the card's blocks are laid out in two columns at the largest size from 16 to 10
points that fits; what does not fit at 10 points continues on a second slide, tables split by rows with their
header. Each mention of a run the deck shows jumps to its card when clicked. Where LibreOffice is installed, the
deck is also rendered to PDF (``soffice --headless``), its jumps kept as the PDF's links.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

from .. import __version__
from ..errors import Expected
from ..files import atomic_write
from . import card as cards
from .card import Bullets, Card, Para, Picture, Span, Table, Text, plain_text
from .kinds import LR_PICTURE
from .records import read_run_info
from .report import report_cards, runs_table
from .rundir import RunDir, find_run, list_runs
from .sweep import member_folder, read_families

# The slide in points (16:9, 13.333 x 7.5 in), its margins, and the title's band.
W, H, MARGIN, GUTTER = 960.0, 540.0, 30.0, 20.0
TITLE_TOP, TITLE_H, BODY_TOP = 16.0, 56.0, 80.0
SIZES = (16, 15, 14, 13, 12, 11, 10)  # body text sizes tried, largest first
LEADING = 1.2  # line height over font size, as both PowerPoint and Impress set single spacing for these fonts
INSET = 3.6  # text box and table cell insets (0.05 in)
SANS, MONO = "Arial", "Courier New"
DARK, ACCENT, GREY = (0x22, 0x22, 0x22), (0x1F, 0x4E, 0x79), (0x55, 0x55, 0x55)
PART_SHAPE = "part {}"  # the shape names of a card's parts: text boxes "part 3", tables "part 3 table"
PDF_HINT = ("no PDF: LibreOffice is not installed (Debian/Ubuntu: apt install libreoffice-impress; macOS: brew install "
            "--cask libreoffice); `soffice --headless --convert-to pdf {deck}` renders it, or export it from PowerPoint "
            "or Keynote")


class SlidesError(Expected, ValueError):
    """A selection that names no run of the folder, or a deck that cannot be written."""


# -- measuring text --------------------------------------------------------------------------------------------


@cache
def _font(mono: bool, bold: bool):
    """A PIL font with the metrics of the one the deck names (Arial / Courier New, or their Liberation twins), or
    matplotlib's DejaVu (wider than both: a text measured with it fits when shown in Arial)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    names = ("Courier New", "Liberation Mono") if mono else ("Arial", "Liberation Sans")
    fallback = "DejaVu Sans Mono" if mono else "DejaVu Sans"
    for name in (*names, fallback):
        prop = font_manager.FontProperties(family=name, weight="bold" if bold else "normal")
        try:
            path = font_manager.findfont(prop, fallback_to_default=False)
        except ValueError:
            continue
        return ImageFont.truetype(path, 100)
    raise SlidesError("no font to measure text with: matplotlib's DejaVu Sans is missing")


def _width(s: str, size: float, mono: bool = False, bold: bool = False) -> float:
    return _font(mono, bold).getlength(s) * size / 100


@lru_cache(maxsize=4096)  # a card is laid out at every size of SIZES: each text is measured once
def _units(t: Text) -> tuple[tuple[float, float], ...]:
    """What a line may not break inside, at 100 points: (width, width of the spaces after it). Spans meet without a
    space inside a unit (an opening bracket, a code span, a closing one), and a line breaks only at a space."""
    units, width = [], 0.0
    for s in t:
        mono, bold = s.style == "code", s.style == "bold"
        for piece in re.split(r"( +)", s.text):
            if not piece:
                continue
            if piece.startswith(" "):
                units.append((width, _width(piece, 100)))
                width = 0.0
            else:
                width += _width(piece, 100, mono, bold)
    return tuple(units + [(width, 0.0)] if width else units)


def lines(t: Text, size: float, width: float) -> int:
    """Lines that text ``t`` takes at ``size`` points in a box ``width`` points wide, wrapped at spaces (a word wider
    than the box breaks inside, as both PowerPoint and Impress break it)."""
    n, x, width = 1, 0.0, 0.98 * width - 1  # to spare: the renderers round and kern a little differently
    for w, space in ((w * size / 100, sp * size / 100) for w, sp in _units(t)):
        if x > 0 and x + w > width:
            n, x = n + 1, 0.0
        if w > width:  # broken inside: whole lines, and the rest starts the next line
            n += int(w // width)
            w = w % width
        x += w + space
    return n


# -- layout: blocks placed in two columns ----------------------------------------------------------------------


@dataclass
class Item:
    """A piece of a card that a column holds: a part's text (paragraphs) or a table's rows."""

    part: int  # 1..5; 0 for the line that points at the picture slides
    paras: list[Text] = field(default_factory=list)  # text items; the first is the heading when ``heading``
    heading: bool = False
    table: Table | None = None  # a table item: its header and the rows this piece holds
    height: float = 0.0
    widths: list[float] = field(default_factory=list)  # a table's column widths
    continued: bool = False  # a table's piece after the first (it repeats the header)


def _text_height(paras: list[Text], size: float, width: float, heading: bool) -> float:
    h = 2 * INSET
    for i, t in enumerate(paras):
        s = size + 1 if heading and i == 0 else size
        h += lines(t, s, width - 2 * INSET) * s * LEADING + (0.3 * size if i else 0)  # space before a paragraph
    return h


def _column_widths(t: Table, size: float, width: float) -> list[float]:
    """Each column's natural width (its widest cell on one line), shrunk where the table is too wide: narrow columns
    keep theirs, the others share what is left equally (water filling)."""
    natural = [max([_width(h, size, bold=True)] + [sum(_width(s.text, size, s.style == "code", s.style == "bold")
                                                       for s in row[i]) for row in t.rows]) + 2 * INSET + 2
               for i, h in enumerate(t.header)]
    if sum(natural) <= width:
        return [n * width / sum(natural) for n in natural]
    out, left, todo = [0.0] * len(natural), width, sorted(range(len(natural)), key=lambda i: natural[i])
    while todo:
        share = left / len(todo)
        i = todo[0]
        if natural[i] > share:
            for j in todo:
                out[j] = share
            break
        out[i], left = natural[i], left - natural[i]
        todo.pop(0)
    return out


def _row_height(cells, widths: list[float], size: float, bold: bool = False) -> float:
    cells = [c if isinstance(c, tuple) else cards.text(Span(c, "bold" if bold else "plain")) for c in cells]
    return max(lines(c, size, w - 2 * INSET) for c, w in zip(cells, widths)) * size * LEADING + 2 * INSET


def _table_pieces(t: Table, size: float, widths: list[float], room: float, full: float) -> list[tuple[Table, float]]:
    """The table split by rows into pieces with their heights, the first fitting ``room``, the others ``full``; each
    repeats the header."""
    head = _row_height(t.header, widths, size, bold=True)
    pieces, rows, h = [], [], head
    for r in t.rows:
        rh = _row_height(r, widths, size)
        if rows and h + rh > (room if not pieces else full):
            pieces.append((Table(t.header, tuple(rows)), h))
            rows, h = [], head
        rows.append(r)
        h += rh
    pieces.append((Table(t.header, tuple(rows)), h))
    return pieces


def _blocks(card: Card, pictures: int) -> list[tuple[int, object]]:
    """The card's blocks in order, each with its part number; pictures become one line that points at their slides."""
    out: list[tuple[int, object]] = []
    for k, (heading, blocks) in enumerate(card.parts(), 1):
        out.append((k, ("heading", heading)))
        for b in blocks:
            if isinstance(b, Bullets):
                out += [(k, Para(cards.text("\u2022 ", *item))) for item in b.items]  # a bullet item moves on its own
            elif not isinstance(b, Picture):
                out.append((k, b))
    if pictures:
        out.append((0, Para(cards.text(f"Support visuals: the next {pictures} slide(s).", ))))
    return out


def _start(b, size: float, width: float) -> float:
    """The height of a block's beginning, which a heading or an introducing sentence keeps with it: a table's header
    and first row, or a whole paragraph."""
    if isinstance(b, Table):
        widths = _column_widths(b, size, width)
        return _row_height(b.header, widths, size, True) + (_row_height(b.rows[0], widths, size) if b.rows else 0)
    return _text_height([b.text], size, width, False)


def layout(card: Card, size: float, pictures: int) -> list[list[list[Item]]]:
    """The card at ``size`` points: slides, each two columns of items, in reading order."""
    col_w = (W - 2 * MARGIN - GUTTER) / 2
    full = H - MARGIN - BODY_TOP
    slides: list[list[list[Item]]] = [[[]]]
    room = full

    def next_column():
        nonlocal room
        if len(slides[-1]) == 2:
            slides.append([[]])
        else:
            slides[-1].append([])
        room = full

    def place(item: Item):
        nonlocal room
        col = slides[-1][-1]
        if col and col[-1].table is None and item.table is None and col[-1].part == item.part and not item.heading:
            merged = col[-1].paras + item.paras  # the same part's texts share a box
            h = _text_height(merged, size, col_w, col[-1].heading)
            if h - col[-1].height <= room:
                room -= h - col[-1].height
                col[-1].paras, col[-1].height = merged, h
                return
        if item.height > room and col:
            next_column()
        room -= item.height
        slides[-1][-1].append(item)

    blocks = _blocks(card, pictures)
    for i, (k, b) in enumerate(blocks):
        nxt = blocks[i + 1][1] if i + 1 < len(blocks) and blocks[i + 1][0] == k else None  # the part's next block
        if isinstance(b, tuple):  # a heading goes with the part's first block, or with nothing when the part is empty
            item = Item(k, [cards.text(Span(b[1], "bold"))], heading=True)
            item.height = _text_height(item.paras, size, col_w, True)
            if nxt is not None and item.height + _start(nxt, size, col_w) > room and slides[-1][-1]:
                next_column()
            place(item)
        elif isinstance(b, Table):
            widths = _column_widths(b, size, col_w)
            pieces = _table_pieces(b, size, widths, room, full)
            if pieces[0][1] > room and slides[-1][-1]:  # not even its first row fits here: it starts the next column
                next_column()
                pieces = _table_pieces(b, size, widths, room, full)
            for n, (piece, h) in enumerate(pieces):
                if n:
                    next_column()
                place(Item(k, table=piece, height=h, widths=widths, continued=n > 0))
        else:
            h = _text_height([b.text], size, col_w, False)
            if isinstance(nxt, Table) and h + _start(nxt, size, col_w) > room and slides[-1][-1]:
                next_column()  # a sentence that introduces a table stays with its header and first row
            place(Item(k, [b.text], height=h))
    return slides


def fit(card: Card, pictures: int) -> tuple[float, list[list[list[Item]]]]:
    """The largest size at which the card takes its fewest slides, and its layout at that size."""
    layouts = [(size, layout(card, size, pictures)) for size in SIZES]
    fewest = min(len(lay) for _, lay in layouts)
    return next((size, lay) for size, lay in layouts if len(lay) == fewest)


# -- the deck --------------------------------------------------------------------------------------------------


class Deck:
    """A python-pptx presentation at 16:9 whose slides are blank but for what this module puts on them."""

    def __init__(self):
        from pptx import Presentation

        self.prs = Presentation()
        self.prs.slide_width, self.prs.slide_height = _pt(W), _pt(H)
        self.cards: dict[int, object] = {}  # experiment number -> the first slide of its card
        self.links: list[tuple[object, object, int]] = []  # (text run, its slide, the experiment it names)

    def slide(self, name: str, title: str, size: float = 28):
        s = self.prs.slides.add_slide(self.prs.slide_layouts[6])  # blank: no placeholder to overflow
        s.name = name
        width = W - 2 * MARGIN
        fits = [z for z in range(int(size), 13, -1) if lines(cards.text(Span(title, "bold")), z, width - 2 * INSET) *
                z * LEADING + 2 * INSET <= TITLE_H]
        z = fits[0] if fits else 14  # a title too long even at 14 points wraps on: the test of rendered pages says so
        self.text(s, MARGIN, TITLE_TOP, width, TITLE_H, [cards.text(Span(title, "bold"))], z, "title", color=ACCENT)
        return s

    def text(self, slide, x, y, w, h, paras: list[Text], size: float, name: str, heading: bool = False, color=DARK):
        """A text box of paragraphs of spans; with ``heading`` the first paragraph is a part's heading."""
        from pptx.dml.color import RGBColor
        from pptx.enum.text import MSO_AUTO_SIZE

        box = slide.shapes.add_textbox(_pt(x), _pt(y), _pt(w), _pt(h))
        box.name = name
        tf = box.text_frame
        tf.word_wrap, tf.auto_size = True, MSO_AUTO_SIZE.NONE
        tf.margin_left = tf.margin_right = tf.margin_top = tf.margin_bottom = _pt(INSET)
        for i, t in enumerate(paras):
            p = tf.paragraphs[0] if i == 0 else tf.add_paragraph()
            if i:
                p.space_before = _pt(0.3 * size)
            first = heading and i == 0
            _line_size(p, size + 1 if first else size)
            for s in t:
                r = p.add_run()
                r.text = s.text
                f = r.font
                f.size, f.name = _pt(size + 1 if first else size), MONO if s.style == "code" else SANS
                f.bold = s.style == "bold" or first
                f.color.rgb = RGBColor(*(ACCENT if first or s.run is not None else color))
                if s.run is not None:
                    self.links.append((r, slide, s.run))
        return box

    def table(self, slide, x, y, t: Table, widths: list[float], size: float, name: str):
        from pptx.dml.color import RGBColor

        # An empty cell holds a space: Impress gives an empty header cell the table style's 18-point line.
        rows = [tuple(c if plain_text(c) else cards.text(Span(" ")) for c in row)
                for row in [tuple(cards.text(Span(h, "bold")) for h in t.header), *t.rows]]
        heights = [_row_height(row, widths, size) for row in rows]
        shape = slide.shapes.add_table(len(rows), len(t.header), _pt(x), _pt(y), _pt(sum(widths)), _pt(sum(heights)))
        shape.name = name
        tbl = shape.table
        for i, w in enumerate(widths):
            tbl.columns[i].width = _pt(w)
        for r, row in enumerate(rows):
            tbl.rows[r].height = _pt(heights[r])
            for c, cell_text in enumerate(row):
                cell = tbl.cell(r, c)
                cell.margin_left = cell.margin_right = cell.margin_top = cell.margin_bottom = _pt(INSET)
                p = cell.text_frame.paragraphs[0]
                _line_size(p, size)
                for s in cell_text:
                    run = p.add_run()
                    run.text = s.text
                    run.font.size, run.font.name = _pt(size), MONO if s.style == "code" else SANS
                    run.font.bold = s.style == "bold" or r == 0
                    if r:  # the header keeps the table style's colour
                        run.font.color.rgb = RGBColor(*(ACCENT if s.run is not None else DARK))
                    if s.run is not None:
                        self.links.append((run, slide, s.run))
        return shape

    def card(self, card: Card, pictures: int, number: int | None = None) -> int:
        """The card's slide(s) in the lab's layout, the first the target of links to experiment ``number``; returns
        how many."""
        size, slides = fit(card, pictures)
        col_w = (W - 2 * MARGIN - GUTTER) / 2
        for n, columns in enumerate(slides):
            s = self.slide(f"card {card.title}" + (f" ({n + 1})" if n else ""), card.title + (" (continued)" if n else ""))
            if number is not None and not n:
                self.cards.setdefault(number, s)  # a run's training card comes before its test look
            for c, column in enumerate(columns):
                x, y = MARGIN + c * (col_w + GUTTER), BODY_TOP
                for item in column:
                    name = PART_SHAPE.format(item.part) if item.part else "pictures"
                    if item.table is not None:
                        self.table(s, x, y, item.table, item.widths, size,
                                   f"{name} table" + (" (continued)" if item.continued else ""))
                    else:
                        self.text(s, x, y, col_w, item.height, item.paras, size, name, heading=item.heading,
                                  color=GREY if not item.part else DARK)
                    y += item.height
        return len(slides)

    def picture(self, name: str, title: str, path: Path, caption: str) -> None:
        """One picture on its own slide, as large as the margins allow at its own aspect, its caption beneath."""
        from PIL import Image

        s = self.slide(name, title)
        width = W - 2 * MARGIN
        size = next((z for z in (14, 13, 12, 11) if lines(cards.text(caption), z, width - 2 * INSET) <= 2), 10)
        cap_h = lines(cards.text(caption), size, width - 2 * INSET) * size * LEADING + 2 * INSET
        room_w, room_h = width, H - MARGIN - BODY_TOP - cap_h - 6
        with Image.open(path) as im:
            iw, ih = im.size
        scale = min(room_w / iw, room_h / ih)
        w, h = iw * scale, ih * scale
        pic = s.shapes.add_picture(str(path), _pt(MARGIN + (room_w - w) / 2), _pt(BODY_TOP), _pt(w), _pt(h))
        pic.name = "picture"
        self.text(s, MARGIN, BODY_TOP + h + 6, width, cap_h, [cards.text(caption)], size, "caption", color=GREY)

    def log(self, rows: list[list[Text]], header: list[str], widths: list[float]) -> int:
        """The experiment log as a native table, split over as many slides as it needs; returns how many."""
        size = 12
        t = Table(tuple(header), tuple(tuple(r) for r in rows))
        full = H - MARGIN - BODY_TOP
        pieces = [piece for piece, _ in _table_pieces(t, size, widths, full, full)]
        for i, piece in enumerate(pieces):
            title = "Experiment log" + (f" ({i + 1}/{len(pieces)})" if len(pieces) > 1 else "")
            s = self.slide(f"log {i + 1}", title)
            self.table(s, MARGIN, BODY_TOP, piece, widths, size, "log table")
        return len(pieces)

    def save(self, path: Path) -> Path:
        self._jumps()
        return atomic_write(path, self.prs.save)

    def _jumps(self) -> None:
        """Each mention of an experiment whose card the deck shows becomes a click that jumps to that card's slide
        (a mention of a run not shown stays coloured text). Made at the end: the log names runs before their cards."""
        from pptx.opc.constants import RELATIONSHIP_TYPE as RT

        for run, slide, number in self.links:
            target = self.cards.get(number)
            if target is None or target is slide:
                continue
            link = run.font._rPr.add_hlinkClick(slide.part.relate_to(target.part, RT.SLIDE))
            link.set("action", "ppaction://hlinksldjump")
        self.links = []


def _line_size(p, size: float) -> None:
    """The size of a paragraph's end mark, which sets the height of an empty paragraph (an empty table cell): left
    unset, renderers give it the default 18 points, and the row outgrows its measure."""
    p._p.get_or_add_endParaRPr().set("sz", str(int(round(size * 100))))


def _pt(x: float):
    from pptx.util import Pt

    return Pt(x)


def _one_line(s: str, size: float, width: float) -> str:
    """``s`` cut with an ellipsis to one line of ``width`` points."""
    if _width(s, size) <= width:
        return s
    while s and _width(s + "\u2026", size) > width:
        s = s[:-1]
    return s.rstrip() + "\u2026"


# -- selection and the whole deck ------------------------------------------------------------------------------


def parse_runs(spec: str) -> list[int]:
    """'2,5,7-9' -> [2, 5, 7, 8, 9]; anything else is refused in one sentence."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        a, dash, b = part.partition("-")
        if not a.isdigit() or (dash and not b.isdigit()) or (dash and int(b) < int(a)):
            raise SlidesError(f"--runs {spec}: {part!r} is not a run number or a range such as 7-9")
        out += list(range(int(a), int(b or a) + 1))
    return out


def lineage(root: Path, number: int) -> list[int]:
    """Experiment ``number`` and every run its --after chain follows, in experiment order."""
    seen, todo = set(), [number]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        r = find_run(root, n)
        if r is None:
            raise SlidesError(f"--lineage {number}: run #{n} is not in {root}; `mame-fast runs --root {root}` lists them")
        seen.add(n)
        todo += [int(a) for a in read_run_info(r.path).get("after", [])]
    return sorted(seen)


@dataclass
class Written:
    pptx: Path
    pdf: Path | None
    slides: int
    note: str  # how the PDF was made, or how to make one


def write_deck(root: Path, out: Path | None = None, numbers: list[int] | None = None, title: str = "",
               pdf: bool = True) -> Written:
    """The deck of runs folder ``root`` (``numbers``: the runs to show, all when None), as ``out`` (slides.pptx in
    ``root`` by default) and, where LibreOffice is installed and ``pdf``, its PDF beside it."""
    root = Path(root)
    known = {r.number: r for r in list_runs(root)}
    if numbers is not None and (missing := [n for n in numbers if n not in known]):
        raise SlidesError(f"run(s) {', '.join(f'#{n}' for n in missing)} not in {root}; `mame-fast runs --root "
                          f"{root}` lists them")
    chosen = set(known) if numbers is None else set(numbers)
    out = Path(out) if out else root / f"{RunDir.SLIDES}.pptx"
    all_cards = [c for c in report_cards(root) if _shown(c, chosen, root, numbers is None)]
    deck = Deck()
    _cover(deck, root, title, chosen, numbers, all_cards)
    _log(deck, root, chosen)
    for c in all_cards:
        folder = root / c.folder if c.folder else root
        pictures = [(p, folder / p.path) for p in c.pictures() if (folder / p.path).is_file()]
        cited = _cited_range_tests(c, root, chosen)
        deck.card(c, len(pictures) + len(cited), None if c.kind == "sweep" else RunDir(folder).number)
        for p, path in pictures:
            deck.picture(f"picture {c.title} {p.path}", f"{c.title}: {_label(p.path)}", path, p.caption)
        for r in cited:
            deck.picture(f"picture {c.title} {r.path.name}/{RunDir.PLOTS}/{LR_PICTURE[0]}",
                         f"{c.title}: the range test it follows, #{r.number}", r.path / RunDir.PLOTS / LR_PICTURE[0],
                         LR_PICTURE[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    deck.save(out)
    pdf_path, note = (render_pdf(out) if pdf else (None, "no PDF asked for"))
    return Written(out, pdf_path, len(deck.prs.slides), note)


def _shown(c: Card, chosen: set[int], root: Path, everything: bool) -> bool:
    if c.kind == "sweep":  # a sweep shows when all runs do, or when one of its members is chosen
        family = next(f for f in read_families(root) if c.title == f"Sweep: {f['name']}")
        folders = [member_folder(m, root) for m in family["members"]]
        return everything or any(RunDir(f).number in chosen for f in folders if f is not None)
    return RunDir(root / c.folder).number in chosen


def _cited_range_tests(c: Card, root: Path, chosen: set[int]) -> list[RunDir]:
    """The range tests a training run follows (--after) that the deck does not show itself: their plot is evidence."""
    if c.kind != "train":
        return []
    out = []
    for n in read_run_info(root / c.folder).get("after", []):
        r = find_run(root, int(n))
        if r is not None and r.number not in chosen and (r.path / RunDir.PLOTS / LR_PICTURE[0]).is_file():
            out.append(r)
    return out


def _label(path: str) -> str:
    return Path(path).stem.replace("_", " ")


def _cover(deck: Deck, root: Path, title: str, chosen: set[int], numbers: list[int] | None, shown: list[Card]) -> None:
    s = deck.slide("cover", title or f"Experiments: {root.resolve().name}", size=36)
    kinds = [c.kind for c in shown]
    which = "every run" if numbers is None else "runs " + ", ".join(f"#{n}" for n in sorted(chosen))
    said = [cards.text(f"{kinds.count('train')} training run(s), {kinds.count('lr-find')} range test(s), "
                       f"{kinds.count('test')} look(s) at the test set, {kinds.count('sweep')} sweep(s): {which}."),
            cards.text(f"From {root} on {datetime.date.today().isoformat()} by mame-fast {__version__}; every number "
                       "comes from the run folders, and `mame-fast slides` writes this deck again.")]
    width = W - 2 * MARGIN
    h = _text_height(said, 16, width, False)
    deck.text(s, MARGIN, BODY_TOP + 60, width, h, said, 16, "summary")


def _log(deck: Deck, root: Path, chosen: set[int]) -> None:
    header = ["#", "name", "follows", "hypothesis", "best val top-1 [95%]", "verdict"]
    widths = [36, 150, 70, 0, 190, 130]
    widths[3] = W - 2 * MARGIN - sum(widths)
    rows = [[cards.text(Span(str(r["#"]), run=r["#"])), cards.text(r["name"]), _follows(r["after"]),
             cards.text(_one_line(r["hypothesis"] or "-", 12, widths[3] - 2 * INSET - 2)),
             cards.text(r["best val [95%]"]), cards.text(r["diagnosis"])] for r in runs_table(root) if r["#"] in chosen]
    if rows:
        deck.log(rows, header, widths)


def _follows(after: str) -> Text:
    """The log's "follows" cell ("#2,#3"), each number a link to its run."""
    numbers = [int(n) for n in re.findall(r"#(\d+)", after)]
    if not numbers:
        return cards.text("-")
    spans = [Span(f"#{n}", run=n) for n in numbers]
    return tuple(x for i, sp in enumerate(spans) for x in ((Span(", "),) if i else ()) + (sp,))


def render_pdf(pptx: Path) -> tuple[Path | None, str]:
    """The deck as PDF beside it, rendered by LibreOffice; (None, how to get one) where it is not installed."""
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if soffice is None:
        return None, PDF_HINT.format(deck=pptx)
    pdf = pptx.with_suffix(".pdf")
    with tempfile.TemporaryDirectory() as tmp:  # its own profile: two renders at once do not wait for each other
        r = subprocess.run([soffice, f"-env:UserInstallation=file://{tmp}/profile", "--headless", "--convert-to", "pdf",
                            "--outdir", tmp, str(pptx)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HOME": tmp})
        made = Path(tmp) / f"{pptx.stem}.pdf"
        if r.returncode or not made.is_file():
            raise SlidesError(f"{pptx}: LibreOffice wrote no PDF (exit {r.returncode}): {(r.stderr or r.stdout)[-300:]}")
        atomic_write(pdf, lambda f: f.write(made.read_bytes()))
    return pdf, f"PDF rendered by {soffice}"
