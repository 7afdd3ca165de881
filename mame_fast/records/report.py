"""Stage 5j: experiment cards on disk, the table of runs, comparisons and the report, from what runs measured.

A card has the course's five parts, filled from the records so that the evidence is never lost:

    #17: <name>
    1 - Previous observed state   (outcomes of the predecessors given with --after)
    2 - Current hypothesis        (--hypothesis)
    3 - Experimental setup        (resolved config, model size, what each resume changed, the diff against the predecessor)
    4 - Experimental outcomes     (best/final val accuracy with their 95% intervals, gap, epochs, images/s, test, plots)
    5 - Observations              (automatic diagnosis + notes from `mame-fast note`)

Each run kind builds its card as data (``kinds.card_for``: a ``card.Card``); this module writes ``card.md`` and the
report (Markdown and one-column HTML) from those objects. Every val top-1 is shown with its 95% interval
(``stats.py``), so that nobody reads noise as a finding.
"""

from __future__ import annotations

import html as _html
from pathlib import Path

from ..config import diff
from ..files import atomic_write_text
from . import card as cards
from .card import Card
from .facts import outcomes
from .kinds import card_for, config_with_spec, diagnose_run, look_card
from .plots import pyplot, save_figure
from .records import read_metrics, read_run_info, update_run_info
from .rundir import RunDir, list_runs
from .stats import pct, verdict
from .sweep import read_families, sweep_card


def write_card(run_dir: Path, root: Path | None = None, card: Card | None = None) -> Path:
    """card.md of a run, from its card object."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / RunDir.CARD, cards.markdown(card or card_for(run_dir, root)))


def add_note(run_dir: Path, text: str) -> None:
    info = read_run_info(run_dir)
    update_run_info(run_dir, {"notes": info.get("notes", []) + [text]})
    write_card(run_dir)


# -- tables, comparisons -------------------------------------------------------------------------------------


def runs_table(root: Path) -> list[dict]:
    rows = []
    for r in list_runs(root):
        info, oc = read_run_info(r.path), outcomes(r.path)
        rows.append({"#": r.number, "name": info.get("name", r.path.name), "hypothesis": info.get("hypothesis", ""),
                     "after": ",".join(f"#{a}" for a in info.get("after", [])),
                     "best val [95%]": best_val(oc), "gap": pct(oc.get("gap")),
                     "diagnosis": diagnose_run(r.path).verdict if oc["epochs"] or info.get("kind") else "-",
                     "status": oc["status"] + (f", requeued {n}" if (n := info.get("slurm", {}).get("requeues")) else ""),
                     "epochs": oc["epochs"], "images/s": f"{oc.get('images_per_s', 0):.0f}",
                     "test [95%]": pct(oc.get("test"), oc.get("test_count"))})
    return rows


def best_val(oc: dict) -> str:
    """The best val top-1 of a run's weights, the model's or the EMA's, whichever won (best.pt holds those, and `test`
    looks with them), with its interval."""
    if oc.get("best_val_ema", -1.0) > (oc.get("best_val") if oc.get("best_val") is not None else -1.0):
        return f"{pct(oc['best_val_ema'], oc.get('val_count'))} (EMA)"
    return pct(oc.get("best_val"), oc.get("val_count"))


def compare(runs: list[Path], out: Path) -> tuple[Path, dict, dict]:
    """Curves of several runs overlaid in one figure; the config diff of each against the first; and whether each
    one's best val top-1 differs from the first's beyond noise (the 95% interval of the difference)."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for p in runs:
        rows = read_metrics(p)
        lab = f"#{RunDir(p).number} {read_run_info(p).get('name', '')}"
        ep = [r["epoch"] for r in rows if r.get("val")]
        ax[0].plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], "-", label=lab)
        ax[1].plot(ep, [r["val"]["loss"] for r in rows if r.get("val")], "-", label=lab)
        ax[2].plot(ep, [r["val"]["top1"] for r in rows if r.get("val")], "-", label=lab)
    from matplotlib.ticker import MaxNLocator

    for a, t, y in zip(ax, ("train loss", "val loss", "val top-1"), ("cross-entropy", "cross-entropy", "accuracy")):
        a.set(title=t, xlabel="epoch", ylabel=y)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    path = save_figure(fig, Path(out))
    base, first = config_with_spec(runs[0]), outcomes(runs[0])
    diffs, verdicts = {}, {}
    for p in runs[1:]:
        key, o = f"#{RunDir(p).number}", outcomes(p)
        diffs[key] = diff(base, config_with_spec(p))
        if "best_val" in first and "best_val" in o:
            verdicts[key] = verdict(first["best_val"], first["val_count"], o["best_val"], o["val_count"])
    return path, diffs, verdicts


# -- the report ----------------------------------------------------------------------------------------------

STYLE = """body{font-family:sans-serif;max-width:1000px;margin:auto;padding:0 1em;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
section.card{border-top:2px solid #444;margin-top:2em} figure{margin:1em 0} figure img{width:100%;height:auto}
figcaption{font-size:90%;color:#333} code{background:#f3f3f3;padding:0 2px}"""


def report_cards(root: Path) -> list[Card]:
    """Every card of a runs folder in the report's order: the runs by number (each test look after its run), then the
    sweeps' family cards."""
    out: list[Card] = []
    for r in list_runs(root):
        out.append(card_for(r.path, root))
        if (look := look_card(r.path)) is not None:
            out.append(look)
    return out + [sweep_card(f, root) for f in read_families(root)]


def write_report(root: Path, title: str = "Experiment report") -> tuple[Path, Path]:
    """report.md and report.html in ``root``: the runs table, then every card (``report_cards``); each run's card.md is
    rewritten from the same card object."""
    root = Path(root)
    table = runs_table(root)
    cols = list(table[0]) if table else []
    cells = [[str(r[c]) for c in cols] for r in table]
    all_cards = report_cards(root)
    for c in all_cards:
        if c.kind in ("train", "lr-find"):
            write_card(root / c.folder, root, c)
    md_links = {c.number: f"{c.folder}/{RunDir.CARD}" for c in all_cards if c.number is not None}
    html_links = {n: f"#run-{n}" for n in md_links}
    deck = [p.name for p in (root / f"{RunDir.SLIDES}.pptx", root / f"{RunDir.SLIDES}.pdf") if p.is_file()]
    md = [f"# {title}", "", f"{len(table)} run(s) in `{root}`. " + _slides_line(deck, root, "[{0}]({0})"), ""]
    md += cards.table_markdown(cards.table(cols, cells)) if table else []
    e = _html.escape
    hs = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style></head>"
          f"<body><h1>{e(title)}</h1><p>{len(table)} run(s) in {e(str(root))}. "
          f"{_slides_line([e(d) for d in deck], e(str(root)), HTML_LINK)}</p>"]
    hs += [cards.table_html(cards.table(cols, cells))] if table else []
    for c in all_cards:
        prefix = f"{c.folder}/" if c.folder else ""
        md += ["", cards.markdown(c, prefix, md_links)]
        hs.append(cards.html(c, prefix, html_links))
    hs.append("</body></html>")
    base = root / RunDir.REPORT
    atomic_write_text(base.with_suffix(".md"), "\n".join(md))
    atomic_write_text(base.with_suffix(".html"), "\n".join(hs))
    return base.with_suffix(".md"), base.with_suffix(".html")


HTML_LINK = '<a href="{0}">{0}</a>'


def _slides_line(deck: list[str], root, link: str) -> str:
    """Where the interview's slides are (``mame-fast slides`` wrote them), or the command that writes them."""
    if deck:
        return "Slides for the interview: " + " and ".join(link.format(d) for d in deck) + "."
    return f"Slides for the interview: `mame-fast slides --root {root}` writes them."
