"""Stage 5g: experiment cards, the table of runs, comparisons and the report, from what runs measured.

A card has the course's five parts, filled from the records so that the evidence is never lost:

    #17: <name>
    1 - Previous observed state   (outcomes of the predecessors given with --after)
    2 - Current hypothesis        (--hypothesis)
    3 - Experimental setup        (resolved config, model size, what each resume changed, the diff against the predecessor)
    4 - Experimental outcomes     (best/final val accuracy with their 95% intervals, gap, epochs, images/s, test, plots)
    5 - Observations              (automatic diagnosis + notes from `mame-fast note`)

Cards are built as structured sections and rendered to Markdown and to HTML (no Markdown parser needed).
Every val top-1 is shown with its 95% interval (``stats.py``), so that nobody reads noise as a finding.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from ..config import TrainConfig, diff, load, to_dict
from ..files import atomic_write_text
from .diagnose import diagnose_run
from .plots import pyplot, save_figure
from .records import read_metrics, read_run_info, run_status, update_run_info
from .rundir import RunDir, find_run, list_runs
from .stats import pct, verdict


def run_config(run_dir: Path) -> TrainConfig:
    """A run's resolved config, read and checked as any config is."""
    return load(Path(run_dir) / RunDir.CONFIG)


def config_with_spec(run_dir: Path) -> dict:
    """The run's config as a dict, with its resolved model spec under ``model_spec`` (for diffs)."""
    c = to_dict(run_config(run_dir))
    spec = Path(run_dir) / RunDir.SPEC
    if spec.is_file():
        c["model_spec"] = yaml.safe_load(spec.read_text())
    return c


def outcomes(run_dir: Path) -> dict:
    """What a run measured: best and final val top-1 (with ``val_count``, the size of the split they were measured
    on), the train/val gap, throughput, status and the test result when there is one."""
    rows = read_metrics(run_dir)
    vrows = [r for r in rows if r.get("val")]
    info = read_run_info(run_dir)
    out = {"epochs": len(rows), "status": run_status(info)}
    if vrows:
        best = max(vrows, key=lambda r: r["val"]["top1"])
        last = vrows[-1]
        out.update(best_val=best["val"]["top1"], best_epoch=best["epoch"], final_val=last["val"]["top1"],
                   final_train=last["train_top1"], gap=last["train_top1"] - last["val"]["top1"], val_count=last["val"]["count"],
                   final_val_loss=last["val"]["loss"], balanced=last["val"]["balanced_acc"])
        ema = [r for r in vrows if r.get("val_ema")]
        if ema:
            out["best_val_ema"] = max(r["val_ema"]["top1"] for r in ema)
    if rows:
        out["images_per_s"] = sum(r["images_per_s"] for r in rows) / len(rows)
        out["data_wait"] = sum(r["data_wait"] for r in rows) / len(rows)
    test = Path(run_dir) / RunDir.TEST
    if test.is_file():  # the one look: its top-1 and the number of test images it was measured on
        t = json.loads(test.read_text())
        out["test"], out["test_count"] = t["top1"], t.get("count")
    return out


# -- cards as sections ---------------------------------------------------------------------------------


def card_sections(run_dir: Path, root: Path) -> dict:
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    preds = [p.path for p in (find_run(root, k) for k in info.get("after", [])) if p is not None]
    diff_rows = []
    if preds:
        dd = diff(config_with_spec(preds[0]), config_with_spec(run_dir))
        diff_rows = [(k, _short(a), _short(b)) for k, (a, b) in dd.items() if k not in ("out",)]
    plots = sorted(f"plots/{p.name}" for p in (run_dir / RunDir.PLOTS).glob("*.png"))
    dg = diagnose_run(run_dir)
    observations = [f"Automatic diagnosis: **{dg.verdict}**: {'; '.join(dg.reasons)}.", f"Suggested next step: {dg.next_step}"]
    return {"title": f"#{RunDir(run_dir).number}: {info.get('name', run_dir.name)}", "number": RunDir(run_dir).number,
            "previous": [previous_state(p) for p in preds] or ["None: this is a first experiment (no --after)."],
            "hypothesis": info.get("hypothesis") or "(not stated; give one with --hypothesis)",
            "setup": _setup(run_dir, info, preds), "diff": diff_rows,
            "diff_against": f"#{RunDir(preds[0]).number}" if preds else None,
            "outcomes": _outcome_rows(outcomes(run_dir)) if info.get("kind") != "lr-find" else
            [(k.replace("_", " "), _number(v)) for k, v in info.get("lr_find", {}).items()],
            "plots": plots,
            "observations": observations + [f"Note: {t}" for t in info.get("notes", [])]}


def previous_state(p: Path) -> str:
    o, d = outcomes(p), diagnose_run(p)
    name = read_run_info(p).get("name", p.name)
    if d.verdict == "range test":
        return f"#{RunDir(p).number} ({name}): {d.reasons[0]}; plot `plots/lr_find.png`."
    return (f"#{RunDir(p).number} ({name}): best val top-1 {pct(o.get('best_val'), o.get('val_count'))} "
            f"at epoch {o.get('best_epoch', '-')}, train/val gap {pct(o.get('gap'))}, diagnosis **{d.verdict}** "
            f"({'; '.join(d.reasons)}).")


def _setup(run_dir: Path, info: dict, preds: list[Path] = ()) -> list[str]:
    cfg = run_config(run_dir)
    d, o = cfg.data, cfg.optim
    world = info.get("world_size", 1)
    data = (f"fixed {d.crop} px square crops (`data.res=256`)" if d.res == "256" else
            f"full resolution, ~{d.pixels:,} px per image in up to {d.buckets} aspect-ratio buckets (`data.res=full`)")
    # The rate is given per 256 images and scaled to the global batch (train/step.py): say both, as training.png plots
    # the scaled one.
    lr = f"{o.name} lr {o.lr:g} per 256 images ({o.lr * d.batch_size * world / 256:.3g} at this run's batch)"
    chosen = info.get("precision", {}).get("chosen", cfg.precision)  # what auto chose, on the machine the run ran on
    precision = f"{chosen}{' (chosen by auto)' if cfg.precision == 'auto' and chosen != 'auto' else ''}"
    found = info.get("lr_find")
    if found:  # a range test ignores epochs, schedule and optim.lr: its rate is the thing that varies
        schedule = (f"learning-rate range test: {found['steps']} steps, {o.name} lr growing exponentially from "
                    f"{found.get('start', 1e-5):g} to {found.get('end', 10):g} per 256 images until the loss diverged")
    else:
        schedule = f"{cfg.epochs} epochs, {lr}, {o.schedule} schedule"
    lines = [
        f"Model `{cfg.model}`; {data}, batch {d.batch_size} x {world} rank(s), {schedule}, weight decay "
        f"{o.weight_decay}, label smoothing {o.label_smoothing}, mixup {o.mixup}, cutmix {o.cutmix}, "
        f"EMA {o.ema}, colour jitter {d.color_jitter}, scale_min {d.scale_min}; precision {precision}; seed {cfg.seed}.",
        "Full resolved configuration: `config.yaml`; model spec: `model.yaml`.",
    ]
    for p in preds:  # the question the interview asks of a rate: where does it lie against the range test it cites?
        test = read_run_info(p).get("lr_find")
        if test and not found:
            low, high = test["range"]
            where = "below" if o.lr < low else "above" if o.lr > high else "inside"
            lines.append(f"optim.lr {o.lr:g} per 256 images lies {where} the range suggested by the range test "
                         f"#{RunDir(p).number} ({low:.3g} to {high:.3g}).")
    for r in info.get("resumes", []):
        changed = ", ".join(f"`{k}` {a} -> {b}" for k, (a, b) in r["changes"].items()) or "nothing changed"
        lines.append(f"Resumed at {r['time']}: {changed}.")
    return lines


def _outcome_rows(oc: dict) -> list[tuple[str, str]]:
    n = oc.get("val_count")
    rows = [
        ("best val top-1 [95% interval]", f"{pct(oc.get('best_val'), n)} (epoch {oc.get('best_epoch', '-')})"),
        ("final val top-1 / balanced", f"{pct(oc.get('final_val'), n)} / {pct(oc.get('balanced'))}"),
        ("final train top-1", pct(oc.get("final_train"))),
        ("train/val gap", pct(oc.get("gap"))),
        ("epochs run / status", f"{oc['epochs']} / {oc['status']}"),
        ("images/s (mean), data wait", f"{oc.get('images_per_s', 0):.0f}, {pct(oc.get('data_wait'))}"),
    ]
    if "best_val_ema" in oc:
        rows.append(("best val top-1 (EMA)", pct(oc["best_val_ema"], n)))
    if "test" in oc:
        rows.append(("TEST top-1 [95% interval] (run once)", pct(oc["test"], oc.get("test_count"))))
    return rows


def _number(v) -> str:
    """A measured value for a card: 3 significant digits; a pair as a range."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]:.3g} to {v[1]:.3g}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _short(v) -> str:
    s = (yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (dict, list)) else
         f"{v:g}" if isinstance(v, float) else str(v))
    return s if len(s) < 80 else s[:77] + "..."


def card_markdown(s: dict, link_prefix: str = "") -> str:
    md = [f"## {s['title']}", "", "**1 - Previous observed state**", ""] + [f"- {p}" for p in s["previous"]]
    md += ["", "**2 - Current hypothesis**", "", s["hypothesis"], "", "**3 - Experimental setup & details**", ""]
    md += [line for x in s["setup"] for line in (x, "")][:-1]
    if s["diff_against"]:
        md += ["", f"Changes against {s['diff_against']}:", "", "| key | before | now |", "|---|---|---|"]
        md += [f"| `{k}` | {a} | {b} |" for k, a, b in s["diff"]] or ["| (none) | | |"]
    md += ["", "**4 - Experimental outcomes**", ""] + ([s["outcomes_note"], ""] if s.get("outcomes_note") else [])
    md += markdown_table(s.get("outcome_header", ["measure", "value"]), s["outcomes"])
    md += [""] + [f"![{Path(p).stem}]({link_prefix}{p})" for p in s["plots"]]
    md += ["", "**5 - Observations**", ""] + [f"- {o}" for o in s["observations"]] + [""]
    return "\n".join(md)


def card_html(s: dict, link_prefix: str = "") -> str:
    e = html.escape

    def bold(t: str) -> str:
        parts = e(t).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)).replace("`", "")

    h = [f"<section><h2>{e(s['title'])}</h2><h4>1 - Previous observed state</h4><ul>"]
    h += [f"<li>{bold(p)}</li>" for p in s["previous"]]
    h += [f"</ul><h4>2 - Current hypothesis</h4><p>{e(s['hypothesis'])}</p><h4>3 - Experimental setup &amp; details</h4>"]
    h += [f"<p>{bold(x)}</p>" for x in s["setup"]]
    if s["diff_against"]:
        h += [f"<p>Changes against {e(s['diff_against'])}:</p><table><tr><th>key</th><th>before</th><th>now</th></tr>"]
        h += [f"<tr><td><code>{e(k)}</code></td><td>{e(a)}</td><td>{e(b)}</td></tr>" for k, a, b in s["diff"]] + ["</table>"]
    h += ["<h4>4 - Experimental outcomes</h4>"] + ([f"<p>{e(s['outcomes_note'])}</p>"] if s.get("outcomes_note") else [])
    h += [html_table(s.get("outcome_header", ["measure", "value"]), s["outcomes"])]
    h += [f'<img src="{e(link_prefix + p)}" style="max-width:48%">' for p in s["plots"]]
    h += ["<h4>5 - Observations</h4><ul>"] + [f"<li>{bold(o)}</li>" for o in s["observations"]] + ["</ul></section>"]
    return "\n".join(h)


def html_table(header: list[str], rows: list) -> str:
    e = html.escape
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in header) + "</tr>" + body + "</table>"


def markdown_table(header: list[str], rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def write_card(run_dir: Path, root: Path | None = None, sections: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    s = sections or card_sections(run_dir, Path(root) if root else run_dir.parent)
    return atomic_write_text(run_dir / RunDir.CARD, card_markdown(s))


def add_note(run_dir: Path, text: str) -> None:
    info = read_run_info(run_dir)
    update_run_info(run_dir, {"notes": info.get("notes", []) + [text]})
    write_card(run_dir)


# -- tables, comparisons, the report -------------------------------------------------------------------


def runs_table(root: Path) -> list[dict]:
    rows = []
    for r in list_runs(root):
        info, oc = read_run_info(r.path), outcomes(r.path)
        rows.append({"#": r.number, "name": info.get("name", r.path.name), "hypothesis": info.get("hypothesis", ""),
                     "after": ",".join(f"#{a}" for a in info.get("after", [])),
                     "best val [95%]": pct(oc.get("best_val"), oc.get("val_count")), "gap": pct(oc.get("gap")),
                     "diagnosis": diagnose_run(r.path).verdict if oc["epochs"] or info.get("kind") else "-",
                     "status": oc["status"],
                     "epochs": oc["epochs"], "images/s": f"{oc.get('images_per_s', 0):.0f}",
                     "test [95%]": pct(oc.get("test"), oc.get("test_count"))})
    return rows


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
    for a, t in zip(ax, ("train loss", "val loss", "val top-1")):
        a.set(title=t, xlabel="epoch")
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


def write_report(root: Path, title: str = "Experiment report") -> tuple[Path, Path]:
    """report.md and report.html in ``root``: the runs table, then every card in order."""
    root = Path(root)
    runs = [r.path for r in list_runs(root)]
    table = runs_table(root)
    cols = list(table[0]) if table else []
    cells = [[r[c] for c in cols] for r in table]
    md = [f"# {title}", "", f"{len(runs)} run(s) in `{root}`.", ""] + (markdown_table(cols, cells) if table else [])
    e = html.escape
    hs = [f"<html><head><meta charset='utf-8'><title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;"
          f"margin:auto}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head>"
          f"<body><h1>{e(title)}</h1><p>{len(runs)} run(s) in {e(str(root))}.</p>", html_table(cols, cells)]
    for p in runs:
        s = card_sections(p, root)
        write_card(p, root, s)
        md += ["", card_markdown(s, link_prefix=f"{p.name}/")]
        hs.append(card_html(s, link_prefix=f"{p.name}/"))
    for family in sorted(root.glob("sweep-*.json")):  # the sweeps' family cards, after their runs
        s = json.loads(family.read_text()).get("card")
        if s:
            md += ["", card_markdown(s)]
            hs.append(card_html(s))
    hs.append("</body></html>")
    atomic_write_text(root / "report.md", "\n".join(md))
    atomic_write_text(root / "report.html", "\n".join(hs))
    return root / "report.md", root / "report.html"
