"""Stage 5h: an experiment card as data, and its renderers.

The lab's card is a slide titled "#N: name" with five parts: 1 previous observed state, 2 hypothesis, 3 setup,
4 outcomes, 5 observations. Here a ``Card`` holds those parts as blocks (paragraphs and bullet lists of styled
spans, tables, pictures with captions); links to other experiments are spans that name a run number, not text
that a renderer would have to parse back. Each run kind builds its card once (``report.card_for``); ``markdown``,
``html`` and ``plain`` render the same object (the slides renderer reads the same blocks), so no output can say
something the others do not.
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass, field
from typing import Literal, Union

PARTS = ("1 - Previous observed state", "2 - Current hypothesis", "3 - Experimental setup & details",
         "4 - Experimental outcomes", "5 - Observations")


@dataclass(frozen=True)
class Span:
    """A piece of text: plain, bold (a verdict, a key number) or code (a key, a file, a command); ``run`` makes it a
    link to experiment #run."""

    text: str
    style: Literal["plain", "bold", "code"] = "plain"
    run: int | None = None
    file: str | None = None  # a link to a file of the run folder (config.yaml), relative to it


Text = tuple[Span, ...]


def text(*parts: str | Span) -> Text:
    """A text from strings (plain) and spans."""
    return tuple(p if isinstance(p, Span) else Span(p) for p in parts if p != "")


def bold(s: str) -> Span:
    return Span(s, "bold")


def code(s: str) -> Span:
    return Span(s, "code")


def ref(number: int) -> Span:
    """A link to experiment #number."""
    return Span(f"#{number}", run=number)


def file_link(name: str) -> Span:
    """A file of the run folder, linked (shown as code)."""
    return Span(name, "code", file=name)


def plain_text(t: Text) -> str:
    return "".join(s.text for s in t)


@dataclass(frozen=True)
class Para:
    text: Text


@dataclass(frozen=True)
class Bullets:
    items: tuple[Text, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Text, ...], ...]


@dataclass(frozen=True)
class Picture:
    """A PNG of the run folder (``path`` relative to it) and what to look at in it."""

    path: str
    caption: str


Block = Union[Para, Bullets, Table, Picture]


@dataclass(frozen=True)
class Card:
    """One experiment (or a sweep, or a test look) in the lab's five parts."""

    title: str
    kind: str  # "train", "lr-find", "sweep", "test"
    number: int | None = None
    previous: tuple[Block, ...] = ()
    hypothesis: tuple[Block, ...] = ()
    setup: tuple[Block, ...] = ()
    outcomes: tuple[Block, ...] = ()
    observations: tuple[Block, ...] = ()
    folder: str = field(default="", compare=False)  # the run folder's name, for links from a report

    def parts(self) -> list[tuple[str, tuple[Block, ...]]]:
        return list(zip(PARTS, (self.previous, self.hypothesis, self.setup, self.outcomes, self.observations)))

    def pictures(self) -> list[Picture]:
        return [b for _, blocks in self.parts() for b in blocks if isinstance(b, Picture)]

    def links(self) -> list[int]:
        """The experiments this card links to, in order of appearance."""
        return [s.run for t in _texts(self) for s in t if s.run is not None]


def _texts(card: Card):
    for _, blocks in card.parts():
        for b in blocks:
            if isinstance(b, Para):
                yield b.text
            elif isinstance(b, Bullets):
                yield from b.items
            elif isinstance(b, Table):
                yield from (cell for row in b.rows for cell in row)


def table(header: list[str] | tuple[str, ...], rows) -> Table:
    """A table whose cells may be strings (plain) or texts."""
    return Table(tuple(header), tuple(tuple(c if isinstance(c, tuple) else text(str(c)) for c in r) for r in rows))


# -- Markdown --------------------------------------------------------------------------------------------------


# How each renderer marks a span up: (escape, code, bold, link to a run's card).
MARKDOWN = (str, "`{}`", "**{}**", "[{}]({})")
HTML = (_html.escape, "<code>{}</code>", "<b>{}</b>", '<a href="{1}">{0}</a>')


def _span(s: Span, runs: dict[int, str], markup, prefix: str = "") -> str:
    escape, code_, bold_, link = markup
    t = escape(s.text)
    if s.style in ("code", "bold"):
        t = (code_ if s.style == "code" else bold_).format(t)
    if s.run is not None and s.run in runs:
        t = link.format(t, escape(runs[s.run]))
    elif s.file is not None:
        t = link.format(t, escape(prefix + s.file))
    return t


def _md(t: Text, runs: dict[int, str], cell: bool = False, prefix: str = "") -> str:
    out = "".join(_span(s, runs, MARKDOWN, prefix) for s in t)
    return out.replace("|", "\\|").replace("\n", " ") if cell else out


def markdown(card: Card, link_prefix: str = "", runs: dict[int, str] | None = None) -> str:
    """The card as Markdown; pictures and links relative to ``link_prefix``; ``runs``: experiment number -> the path of
    its card, for links (a report links the cards it holds)."""
    runs = runs or {}
    md = [f"## {card.title}"]
    for heading, blocks in card.parts():
        md += ["", f"**{heading}**"]
        for b in blocks:
            md.append("")
            if isinstance(b, Para):
                md.append(_md(b.text, runs, prefix=link_prefix))
            elif isinstance(b, Bullets):
                md += [f"- {_md(t, runs, prefix=link_prefix)}" for t in b.items]
            elif isinstance(b, Table):
                md += table_markdown(b, runs)
            elif isinstance(b, Picture):
                md.append(f"![{b.path.rsplit('/', 1)[-1].rsplit('.', 1)[0]}]({link_prefix}{b.path})")
                md.append(f"*{b.caption}*")
    return "\n".join(md) + "\n"


def table_markdown(t: Table, runs: dict[int, str] | None = None) -> list[str]:
    runs = runs or {}
    return (["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)] +
            ["| " + " | ".join(_md(c, runs, cell=True) for c in r) + " |" for r in t.rows])


# -- HTML ------------------------------------------------------------------------------------------------------


def _h(t: Text, runs: dict[int, str], prefix: str = "") -> str:
    return "".join(_span(s, runs, HTML, prefix) for s in t)


def html(card: Card, link_prefix: str = "", runs: dict[int, str] | None = None) -> str:
    """The card as an HTML ``<section>`` (one column; each picture full width, linked to itself to enlarge, captioned).
    ``runs``: experiment number -> the anchor of its card."""
    runs = runs or {}
    e = _html.escape
    anchor = f' id="run-{card.number}"' if card.number is not None else ""
    h = [f'<section class="card"{anchor}><h2>{e(card.title)}</h2>']
    for heading, blocks in card.parts():
        h.append(f"<h4>{e(heading)}</h4>")
        for b in blocks:
            if isinstance(b, Para):
                h.append(f"<p>{_h(b.text, runs, link_prefix)}</p>")
            elif isinstance(b, Bullets):
                h.append("<ul>" + "".join(f"<li>{_h(t, runs, link_prefix)}</li>" for t in b.items) + "</ul>")
            elif isinstance(b, Table):
                h.append(table_html(b, runs))
            elif isinstance(b, Picture):
                src = e(link_prefix + b.path)
                h.append(f'<figure><a href="{src}"><img src="{src}" alt="{e(b.caption)}"></a>'
                         f"<figcaption>{e(b.caption)}</figcaption></figure>")
    h.append("</section>")
    return "\n".join(h)


def table_html(t: Table, runs: dict[int, str] | None = None) -> str:
    runs = runs or {}
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c, runs)}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# -- plain text (the terminal) ---------------------------------------------------------------------------------


def plain(card: Card) -> str:
    """The card as plain text, for a terminal: no markup, tables as aligned columns, pictures by path."""
    out = [card.title]
    for heading, blocks in card.parts():
        out += ["", heading]
        for b in blocks:
            if isinstance(b, Para):
                out.append("  " + plain_text(b.text))
            elif isinstance(b, Bullets):
                out += [f"  - {plain_text(t)}" for t in b.items]
            elif isinstance(b, Table):
                cells = [list(b.header)] + [[plain_text(c) for c in r] for r in b.rows]
                widths = [max(len(r[i]) for r in cells) for i in range(len(b.header))]
                out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
            elif isinstance(b, Picture):
                out.append(f"  [{b.path}] {b.caption}")
    return "\n".join(out) + "\n"
