"""Stage 5g: experiment cards, the table of runs, comparisons and the report, from what runs measured.

A card has the course's five parts, filled from the records so that the evidence is never lost:

    #17: <name>
    1 - Previous observed state   (outcomes of the predecessors given with --after)
    2 - Current hypothesis        (--hypothesis)
    3 - Experimental setup        (resolved config, model size, and the diff against the predecessor)
    4 - Experimental outcomes     (best/final val accuracy, train/val gap, epochs, images/s, test, plots)
    5 - Observations              (automatic diagnosis + notes from `mame-fast note`)

Cards are built as structured sections and rendered to Markdown and to HTML (no Markdown parser needed).
"""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from ..config import TrainConfig, diff, load, to_dict
from ..files import atomic_write_text
from .diagnose import diagnose_run
from .plots import pyplot, save_figure
from .records import read_metrics, read_run_info, run_status, update_run_info
from .rundir import RunDir, find_run, list_runs


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
    rows = read_metrics(run_dir)
    vrows = [r for r in rows if r.get("val")]
    info = read_run_info(run_dir)
    out = {"epochs": len(rows), "status": run_status(info)}
    if vrows:
        best = max(vrows, key=lambda r: r["val"]["top1"])
        last = vrows[-1]
        out.update(best_val=best["val"]["top1"], best_epoch=best["epoch"], final_val=last["val"]["top1"],
                   final_train=last["train_top1"], gap=last["train_top1"] - last["val"]["top1"],
                   final_val_loss=last["val"]["loss"], balanced=last["val"]["balanced_acc"])
        ema = [r for r in vrows if r.get("val_ema")]
        if ema:
            out["best_val_ema"] = max(r["val_ema"]["top1"] for r in ema)
    if rows:
        out["images_per_s"] = sum(r["images_per_s"] for r in rows) / len(rows)
        out["data_wait"] = sum(r["data_wait"] for r in rows) / len(rows)
    if "test_top1" in info:
        out["test"] = info["test_top1"]
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# -- cards as sections ---------------------------------------------------------------------------------


def card_sections(run_dir: Path, root: Path) -> dict:
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    n = RunDir(run_dir).number
    preds = [p.path for p in (find_run(root, k) for k in info.get("after", [])) if p is not None]
    title = f"#{n}: {info.get('name', run_dir.name)}"
    # 1 - previous state
    prev = []
    for p in preds:
        o, d = outcomes(p), diagnose_run(p)
        prev.append(f"#{RunDir(p).number} ({read_run_info(p).get('name', p.name)}): best val top-1 {_pct(o.get('best_val'))} at epoch "
                    f"{o.get('best_epoch', '-')}, train/val gap {_pct(o.get('gap'))}, diagnosis **{d.verdict}** ({'; '.join(d.reasons)}).")
    if not prev:
        prev = ["None: this is a first experiment (no --after)."]
    # 2 - hypothesis
    hyp = info.get("hypothesis") or "(not stated; give one with --hypothesis)"
    # 3 - setup
    cfg = run_config(run_dir)
    d, o = cfg.data, cfg.optim
    setup = [
        f"Model `{cfg.model}`; data `{d.res}` ({'crops %d px' % d.crop if d.res == '256' else '~%d px per image, %d buckets' % (d.pixels, d.buckets)}), "
        f"batch {d.batch_size} x {info.get('world_size', 1)} rank(s), {cfg.epochs} epochs, {o.name} lr {o.lr} (per 256), "
        f"wd {o.weight_decay}, {o.schedule} schedule, label smoothing {o.label_smoothing}, mixup {o.mixup}, cutmix {o.cutmix}, "
        f"EMA {o.ema}, colour jitter {d.color_jitter}, scale_min {d.scale_min}; precision {cfg.precision}; seed {cfg.seed}.",
        "Full resolved configuration: `config.yaml`; model spec: `model.yaml`.",
    ]
    for r in info.get("resumes", []):
        changed = ", ".join(f"`{k}` {a} -> {b}" for k, (a, b) in r["changes"].items()) or "nothing changed"
        setup.append(f"Resumed at {r['time']}: {changed}.")
    diff_rows = []
    if preds:
        dd = diff(config_with_spec(preds[0]), config_with_spec(run_dir))
        diff_rows = [(k, _short(a), _short(b)) for k, (a, b) in dd.items() if k not in ("out",)]
    # 4 - outcomes
    oc = outcomes(run_dir)
    out_rows = [
        ("best val top-1", f"{_pct(oc.get('best_val'))} (epoch {oc.get('best_epoch', '-')})"),
        ("final val top-1 / balanced", f"{_pct(oc.get('final_val'))} / {_pct(oc.get('balanced'))}"),
        ("final train top-1", _pct(oc.get("final_train"))),
        ("train/val gap", _pct(oc.get("gap"))),
        ("epochs run / status", f"{oc['epochs']} / {oc['status']}"),
        ("images/s (mean), data wait", f"{oc.get('images_per_s', 0):.0f}, {_pct(oc.get('data_wait'))}"),
    ]
    if "best_val_ema" in oc:
        out_rows.append(("best val top-1 (EMA)", _pct(oc["best_val_ema"])))
    if "test" in oc:
        out_rows.append(("TEST top-1 (run once)", _pct(oc["test"])))
    plots = [f"plots/{p.name}" for p in sorted((run_dir / "plots").glob("*.png"))] if (run_dir / "plots").is_dir() else []
    # 5 - observations
    dg = diagnose_run(run_dir)
    obs = [f"Automatic diagnosis: **{dg.verdict}**: {'; '.join(dg.reasons)}.", f"Suggested next step: {dg.next_step}"]
    obs += [f"Note: {t}" for t in info.get("notes", [])]
    return {"title": title, "previous": prev, "hypothesis": hyp, "setup": setup, "diff": diff_rows,
            "diff_against": f"#{RunDir(preds[0]).number}" if preds else None, "outcomes": out_rows, "plots": plots, "observations": obs,
            "number": n}


def _short(v) -> str:
    s = yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (dict, list)) else str(v)
    return s if len(s) < 80 else s[:77] + "..."


def card_markdown(s: dict, link_prefix: str = "") -> str:
    md = [f"## {s['title']}", "", "**1 - Previous observed state**", ""] + [f"- {p}" for p in s["previous"]]
    md += ["", "**2 - Current hypothesis**", "", s["hypothesis"], "", "**3 - Experimental setup & details**", ""]
    md += [line for x in s["setup"] for line in (x, "")][:-1]
    if s["diff_against"]:
        md += ["", f"Changes against {s['diff_against']}:", "", "| key | before | now |", "|---|---|---|"]
        md += [f"| `{k}` | {a} | {b} |" for k, a, b in s["diff"]] or ["| (none) | | |"]
    md += ["", "**4 - Experimental outcomes**", "", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s["outcomes"]]
    md += [""] + [f"![{Path(p).stem}]({link_prefix}{p})" for p in s["plots"]]
    md += ["", "**5 - Observations**", ""] + [f"- {o}" for o in s["observations"]] + [""]
    return "\n".join(md)


def card_html(s: dict, link_prefix: str = "") -> str:
    e = html.escape

    def bold(t: str) -> str:
        parts = e(t).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)).replace("`", "")

    h = [f"<section><h2>{e(s['title'])}</h2><h4>1 - Previous observed state</h4><ul>"] + [f"<li>{bold(p)}</li>" for p in s["previous"]]
    h += [f"</ul><h4>2 - Current hypothesis</h4><p>{e(s['hypothesis'])}</p><h4>3 - Experimental setup &amp; details</h4>"]
    h += [f"<p>{bold(x)}</p>" for x in s["setup"]]
    if s["diff_against"]:
        h += [f"<p>Changes against {e(s['diff_against'])}:</p><table><tr><th>key</th><th>before</th><th>now</th></tr>"]
        h += [f"<tr><td><code>{e(k)}</code></td><td>{e(a)}</td><td>{e(b)}</td></tr>" for k, a, b in s["diff"]] + ["</table>"]
    h += ["<h4>4 - Experimental outcomes</h4><table>"] + [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in s["outcomes"]] + ["</table>"]
    h += [f'<img src="{e(link_prefix + p)}" style="max-width:48%">' for p in s["plots"]]
    h += ["<h4>5 - Observations</h4><ul>"] + [f"<li>{bold(o)}</li>" for o in s["observations"]] + ["</ul></section>"]
    return "\n".join(h)


def write_card(run_dir: Path, root: Path | None = None, sections: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    s = sections or card_sections(run_dir, Path(root) if root else run_dir.parent)
    atomic_write_text(run_dir / RunDir.CARD, card_markdown(s))
    return run_dir / RunDir.CARD


def add_note(run_dir: Path, text: str) -> None:
    info = read_run_info(run_dir)
    update_run_info(run_dir, {"notes": info.get("notes", []) + [text]})
    write_card(run_dir)


# -- tables, comparisons, the report -------------------------------------------------------------------


def runs_table(root: Path) -> list[dict]:
    rows = []
    for r in list_runs(root):
        p = r.path
        info, oc = read_run_info(p), outcomes(p)
        rows.append({"#": r.number, "name": info.get("name", p.name), "hypothesis": info.get("hypothesis", ""),
                     "after": ",".join(f"#{a}" for a in info.get("after", [])), "best val": _pct(oc.get("best_val")),
                     "gap": _pct(oc.get("gap")), "diagnosis": diagnose_run(p).verdict if oc["epochs"] else "-",
                     "epochs": oc["epochs"], "images/s": f"{oc.get('images_per_s', 0):.0f}", "test": _pct(oc.get("test"))})
    return rows


def compare(runs: list[Path], out: Path) -> tuple[Path, dict]:
    """Curves of several runs overlaid in one figure, and the config diff of each against the first."""
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
    base = config_with_spec(runs[0])
    diffs = {f"#{RunDir(p).number}": diff(base, config_with_spec(p)) for p in runs[1:]}
    return path, diffs


def write_report(root: Path, title: str = "Experiment report") -> tuple[Path, Path]:
    """report.md and report.html in ``root``: the runs table, then every card in order."""
    root = Path(root)
    runs = [r.path for r in list_runs(root)]
    table = runs_table(root)
    cols = list(table[0]) if table else []
    md = [f"# {title}", "", f"{len(runs)} run(s) in `{root}`.", ""]
    if table:
        md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    hs = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
          f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body><h1>{html.escape(title)}</h1>"
          f"<p>{len(runs)} run(s) in {html.escape(str(root))}.</p><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    hs += ["<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in table] + ["</table>"]
    for p in runs:
        s = card_sections(p, root)
        write_card(p, root, s)
        md += ["", card_markdown(s, link_prefix=f"{p.name}/")]
        hs.append(card_html(s, link_prefix=f"{p.name}/"))
    hs.append("</body></html>")
    atomic_write_text(root / "report.md", "\n".join(md))
    atomic_write_text(root / "report.html", "\n".join(hs))
    return root / "report.md", root / "report.html"
