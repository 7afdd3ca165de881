"""A card is data: one object, three renderers (Markdown, HTML, plain text) that say the same thing: the same parts in
the same order, the same numbers in each part, the same links to other experiments and the same pictures."""

from __future__ import annotations

import html.parser
import re
import shutil
from pathlib import Path

import pytest

from mame_fast.records import card as cards
from mame_fast.records.card import Bullets, Card, Para, Picture, bold, code, ref, table, text
from mame_fast.records.kinds import card_for, look_card
from mame_fast.records.rundir import list_runs
from mame_fast.records.sweep import read_families, sweep_card

FIXTURE = Path(__file__).parent / "fixtures" / "runs_629ef3b"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


class _Parts(html.parser.HTMLParser):
    """The text of each <h4> part of an HTML card, the hrefs of its links and the srcs of its images."""

    def __init__(self):
        super().__init__()
        self.parts: list[list[str]] = []
        self.heads: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h4":
            self._in_head = True
            self.heads.append("")
            self.parts.append([])
        elif tag == "a" and a.get("href", "").startswith("#run-"):
            self.links.append(a["href"])
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "h4":
            self._in_head = False

    def handle_data(self, data):
        if self._in_head:
            self.heads[-1] += data
        elif self.parts:
            self.parts[-1].append(data)


def _md_parts(md: str) -> tuple[list[str], list[str]]:
    chunks = re.split(r"^\*\*(\d - [^*]+)\*\*$", md, flags=re.M)
    return chunks[1::2], chunks[2::2]


def _plain_parts(txt: str) -> tuple[list[str], list[str]]:
    chunks = re.split(r"^(\d - .+)$", txt, flags=re.M)
    return chunks[1::2], chunks[2::2]


def _numbers(s: str) -> list[str]:
    """The numbers a rendered part states, without its link targets and picture paths (markup, not content)."""
    s = re.sub(r"!\[[^\]]*\]\([^)]*\)|\]\([^)]*\)|\[\S+\.png\]|plots/\S+", "", s)
    return NUMBER.findall(s)


def _same_everywhere(card: Card, runs: dict[int, str]):
    md = cards.markdown(card, runs={n: f"{p}/card.md" for n, p in runs.items()})
    page = _Parts()
    page.feed(cards.html(card, runs={n: f"#run-{n}" for n in runs}))
    plain = cards.plain(card)
    md_heads, md_parts = _md_parts(md)
    pl_heads, pl_parts = _plain_parts(plain)
    assert md_heads == page.heads == pl_heads == list(cards.PARTS)
    for heading, m, h, p in zip(cards.PARTS, md_parts, page.parts, pl_parts):
        h = " ".join(h)
        assert _numbers(m) == _numbers(h) == _numbers(p), heading
    # Links: the experiments the card names, in order, in every renderer.
    linked = [n for n in card.links() if n in runs]
    assert [int(x) for x in re.findall(r"\[#(\d+)\]\(", md)] == linked
    assert page.links == [f"#run-{n}" for n in linked]
    assert [int(x) for x in re.findall(r"#(\d+)", "".join(s.text for s in _ref_spans(card)))] == card.links()
    # Pictures: the same files, in the card's order.
    shown = [p.path for p in card.pictures()]
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == shown == page.images
    assert re.findall(r"^  \[(\S+)\]", plain, flags=re.M) == shown


def _ref_spans(card: Card):
    from mame_fast.records.card import _texts

    return [s for t in _texts(card) for s in t if s.run is not None]


def test_a_hand_made_card_renders_the_same_three_ways():
    card = Card(
        "#7: wider", "train", 7,
        previous=(Bullets((text(ref(5), " (base): best val top-1 61.2% [58.6, 63.7], diagnosis ", bold("underfitting"), "."),
                           text(ref(6), " (lr): suggested optim.lr 0.05"))),),
        hypothesis=(Para(text("Twice the width | fits better")),),
        setup=(Para(text("Model ", code("wide"), "; batch 64 x 4 rank(s)")),
               table(["key", "before", "now"], [(text(code("model")), "small", "wide"), ("epochs", "30", "45")])),
        outcomes=(table(["measure", "value"], [("best val top-1 [95% interval]", "71.3% [68.9, 73.6] (epoch 44)")]),
                  Picture("plots/curves.png", "Loss and top-1 per epoch")),
        observations=(Bullets((text("Automatic diagnosis: ", bold("fitting"), ": gap +2.1%."), text("Note: see ", ref(5)))),))
    _same_everywhere(card, {5: "005-base", 6: "006-lr"})
    md = cards.markdown(card)
    assert "Twice the width | fits better" in md and "| `model` | small | wide |" in md  # a cell's pipe is escaped
    assert "Twice the width \\| fits better" not in md  # ... only in table cells
    assert "<b>underfitting</b>" in cards.html(card) and "<code>wide</code>" in cards.html(card)
    assert "**" not in cards.plain(card) and "`" not in cards.plain(card)


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old") / "runs"
    shutil.copytree(FIXTURE, root)
    return root


def test_every_card_of_real_run_folders_renders_the_same_three_ways(old_runs):
    """Training runs, a range test, a test look and a sweep's family card: each one object, three renderers."""
    runs = {r.number: r.path.name for r in list_runs(old_runs)}
    made = [card_for(r.path, old_runs) for r in list_runs(old_runs)]
    made += [c for c in (look_card(r.path) for r in list_runs(old_runs)) if c is not None]
    made += [sweep_card(f, old_runs) for f in read_families(old_runs)]
    assert sorted(c.kind for c in made) == ["lr-find", "sweep", "test", "train", "train", "train"]
    for c in made:
        _same_everywhere(c, runs)
