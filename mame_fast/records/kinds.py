"""Stage 5g: run kinds. A run folder holds a training run or a learning-rate range test (run.json's ``kind``), and a
training run may hold its one look at the test set. Each kind says, through one interface (``RunKind``), what its
verdict is (``diagnose``), what it tells a later experiment (``previous_state``) and what its card holds
(``card``): nothing else in the package asks which kind a folder is.

Cards follow the lab's five parts (``card.PARTS``) and show the run's pictures in the order a student defends a run:
curves, dynamics, confusion, per-class, errors, maps, histograms, batches, each with what to look for.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..config import TrainConfig, diff, load, to_dict
from .card import Block, Bullets, Card, Para, Picture, Text, bold, code, file_link, plain_text, ref, table, text
from .diagnose import NEXT, NOT_TRAINED, Diagnosis, diagnose_history, low_resolution_tip
from .facts import budget_sentence, data_sentence, outcomes, range_test_sentence, range_test_setup, rate_position
from .records import read_jsonl, read_metrics, read_run_info, run_status
from .rundir import RunDir, find_run
from .stats import pct

# The pictures of a training run, in the order its card shows them, each with what to look for.
PICTURES = (
    (RunDir.CURVES, "Loss and top-1 per epoch, train against val: val flat while train still improves is overfitting; "
                    "both low and flat is underfitting."),
    (RunDir.TRAINING, "Learning rate, throughput with data wait, gradient norm (and the budget per epoch, on a budget "
                      "schedule): a data wait above a few % means the loader limits the run; gradient-norm spikes mean a "
                      "rate too high."),
    (RunDir.CONFUSION, "Validation confusion matrix, rows normalized: which materials are taken for which."),
    (RunDir.PER_CLASS, "Validation accuracy per class: the classes the model has not learned."),
    (RunDir.ERRORS, "The most confused pairs with examples and the most confident mistakes (best weights)."),
    (RunDir.MAPS, "Grad-CAM of right and wrong validation images: does it look at the material or at the frame?"),
    (RunDir.HISTOGRAMS, "Weights and activations per stage over epochs: a bar at 0 after a ReLU is normal; all mass "
                        "at 0 or exploding tails is not."),
    (RunDir.BATCHES, "What the network is fed: training batches as the step receives them, evaluation batches padded."),
)
LR_PICTURE = (RunDir.LR_PLOT, "Loss against learning rate (log axis), raw and smoothed, the suggested range shaded.")


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


def pictures(run_dir: Path, shown=PICTURES) -> tuple[Picture, ...]:
    d = RunDir(run_dir)
    return tuple(Picture(f"{RunDir.PLOTS}/{name}", caption) for name, caption in shown if d.plot(name).is_file())


class RunKind:
    """A training run (the default kind): epochs, validation, checkpoints, a diagnosis of its curves."""

    name = "train"

    def diagnose(self, run_dir: Path, **kw) -> Diagnosis:
        every = read_metrics(run_dir)
        rows = [r for r in every if r.get("val")]
        info = read_run_info(run_dir)
        status = run_status(info)
        if status == "diverged":
            return Diagnosis("diverged", ["the run stopped on a non-finite loss"], NEXT["diverged"], {"epochs": len(rows)})
        if status in NOT_TRAINED:
            why = f"the run {status}" + (f": {info['error']}" if info.get("error") else "") + \
                f" after {len(rows)} validated epoch(s)"
            return Diagnosis(status, [why], NOT_TRAINED[status], {"epochs": len(rows)})
        cfg = run_config(run_dir)
        warm = 0.3 * cfg.epochs if cfg.optim.schedule == "onecycle" else cfg.optim.warmup_epochs
        if rows and len(every) <= warm:  # the rate never reached its peak: capacity cannot be judged
            why = (f"all {len(every)} epoch(s) ran inside the learning-rate warm-up ({warm:g} epochs): the "
                   f"rate never reached its peak, so the curves say nothing yet about the model's capacity")
            return Diagnosis("not converged", [why], "Train for more epochs than the warm-up (optim.warmup_epochs) "
                             "before judging capacity.", {"epochs": len(rows)})
        d = diagnose_history([r["train_loss"] for r in rows], [r["val"]["loss"] for r in rows],
                             [r["train_top1"] for r in rows], [r["val"]["top1"] for r in rows], **kw)
        if d.verdict == "fitting" and rows:
            d.next_step = low_resolution_tip(cfg, rows, info) or d.next_step
        return d

    def previous_state(self, p: Path) -> Text:
        o, d = outcomes(p), self.diagnose(p)
        return text(ref(RunDir(p).number), f" ({read_run_info(p).get('name', p.name)}): best val top-1 "
                    f"{pct(o.get('best_val'), o.get('val_count'))} at epoch {o.get('best_epoch', '-')}, train/val gap "
                    f"{pct(o.get('gap'))}, diagnosis ", bold(d.verdict), f" ({'; '.join(d.reasons)}).")

    def schedule(self, cfg: TrainConfig, info: dict, world: int) -> str:
        o, d = cfg.optim, cfg.data
        # The rate is given per 256 images and scaled to the global batch (train/step.py): say both, as training.png
        # plots the scaled one.
        return (f"{cfg.epochs} epochs, {o.name} lr {o.lr:g} per 256 images ({o.lr * d.batch_size * world / 256:.3g} at "
                f"this run's batch), {o.schedule} schedule")

    def setup(self, run_dir: Path, info: dict, preds: list[Path]) -> list[Block]:
        cfg = run_config(run_dir)
        d, o = cfg.data, cfg.optim
        world = info.get("world_size", 1)
        chosen = info.get("precision", {}).get("chosen", cfg.precision)  # what auto chose, on the machine it ran on
        precision = f"{chosen}{' (chosen by auto)' if cfg.precision == 'auto' and chosen != 'auto' else ''}"
        blocks: list[Block] = [
            Para(text("Model ", code(cfg.model), "; ", *data_sentence(d), f", batch {d.batch_size} x {world} rank(s), "
                      f"{self.schedule(cfg, info, world)}, weight decay {o.weight_decay}, label smoothing "
                      f"{o.label_smoothing}, mixup {o.mixup}, cutmix {o.cutmix}, EMA {o.ema}, colour jitter "
                      f"{d.color_jitter}, scale_min {d.scale_min}; precision {precision}; seed {cfg.seed}.")),
            Para(text("Full resolved configuration: ", file_link(RunDir.CONFIG), "; model spec: ", file_link(RunDir.SPEC),
                      ".")),
        ]
        for p in preds:  # the question the interview asks of a rate: where does it lie against the range test it cites?
            found = read_run_info(p).get("lr_find")
            if found and self.name == "train":
                blocks.append(Para(text(f"optim.lr {o.lr:g} per 256 images lies {rate_position(o.lr, found)} "
                                        f"the range suggested by the range test ", ref(RunDir(p).number),
                                        f" ({found['range'][0]:.3g} to {found['range'][1]:.3g}).")))
        if d.ramped:
            blocks.append(Para(text(*budget_sentence(d, info.get("budget_schedule", [])))))
        if cfg.eval.pixels or cfg.eval.crop:
            key = d.budget_key
            blocks.append(Para(text("Validated at ", code(f"eval.{key}={getattr(cfg.eval, key)}"), " (trained at "
                                    f"{getattr(d, key):,}).")))
        for r in info.get("resumes", []):
            blocks.append(Para(text(f"Resumed at {r['time']}: ", *_changes(r["changes"]), ".")))
        if preds:
            blocks += _diff_blocks(preds[0], run_dir)
        return blocks

    def outcome_blocks(self, run_dir: Path, info: dict) -> list[Block]:
        oc = outcomes(run_dir)
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
        return [table(["measure", "value"], rows), *_budget_blocks(info.get("eval_budgets")), *pictures(run_dir)]

    def card(self, run_dir: Path, root: Path) -> Card:
        run_dir = Path(run_dir)
        info = read_run_info(run_dir)
        preds = [r.path for r in (find_run(root, k) for k in info.get("after", [])) if r is not None]
        dg = self.diagnose(run_dir)
        observations = [text("Automatic diagnosis: ", bold(dg.verdict), f": {'; '.join(dg.reasons)}."),
                        text(f"Suggested next step: {dg.next_step}")] + [text(f"Note: {t}") for t in info.get("notes", [])]
        return Card(
            title=f"#{RunDir(run_dir).number}: {info.get('name', run_dir.name)}", kind=self.name,
            number=RunDir(run_dir).number, folder=run_dir.name,
            previous=(Bullets(tuple(previous_state(p) for p in preds) or
                              (text("None: this is a first experiment (no --after)."),)),),
            hypothesis=(Para(text(info.get("hypothesis") or "(not stated; give one with --hypothesis)")),),
            setup=tuple(self.setup(run_dir, info, preds)), outcomes=tuple(self.outcome_blocks(run_dir, info)),
            observations=(Bullets(tuple(observations)),))


class RangeTest(RunKind):
    """A learning-rate range test (`mame-fast lr-find`): one pass of growing rates, no epochs, no checkpoint."""

    name = "lr-find"

    def diagnose(self, run_dir: Path, **kw) -> Diagnosis:
        info = read_run_info(run_dir)
        if f := info.get("lr_find"):
            return Diagnosis("range test", [plain_text(range_test_sentence(f))],
                             f"Train with optim.lr in [{f['range'][0]:.3g}, {f['range'][1]:.3g}] per 256 images (e.g. "
                             f"{f['suggested_lr']:.3g}) and cite this test with --after.", {"epochs": 0})
        status = run_status(info)  # a range test without its result: it leaves no checkpoint to resume
        why = f"the range test {status} before its result" + (f": {info['error']}" if info.get("error") else "")
        if status == "diverged":  # the loss did not fall before it diverged: the same options would do the same
            return Diagnosis(status, [why], "Start the range test lower (--start) or end it higher (--end), so that the "
                             "loss falls before it diverges.", {"epochs": 0})
        return Diagnosis(status, [why], "Run `mame-fast lr-find` again with the same options: a range test has no "
                         "checkpoint to resume.", {"epochs": 0})

    def previous_state(self, p: Path) -> Text:
        f = read_run_info(p).get("lr_find")
        said = range_test_sentence(f) if f else text(self.diagnose(p).reasons[0])
        return text(ref(RunDir(p).number), f" ({read_run_info(p).get('name', p.name)}): ", *said, "; plot ",
                    code(f"{RunDir.PLOTS}/{RunDir.LR_PLOT}"), ".")

    def schedule(self, cfg: TrainConfig, info: dict, world: int) -> str:
        found = info.get("lr_find")  # a range test ignores epochs, schedule and optim.lr: its rate is what varies
        return range_test_setup(found, cfg.optim.name) if found else "a learning-rate range test that did not finish"

    def outcome_blocks(self, run_dir: Path, info: dict) -> list[Block]:
        found = info.get("lr_find", {})
        rows = [(k.replace("_", " "), _number(v)) for k, v in found.items()]
        return [table(["measure", "value"], rows), *pictures(run_dir, (LR_PICTURE,))]


TRAINING = RunKind()
KINDS = {k.name: k for k in (TRAINING, RangeTest())}


def kind_of(run_dir: Path) -> RunKind:
    return KINDS.get(read_run_info(run_dir).get("kind", "train"), TRAINING)


def diagnose_run(run_dir: Path, **kw) -> Diagnosis:
    """The verdict of any run folder, by its kind."""
    return kind_of(run_dir).diagnose(Path(run_dir), **kw)


def previous_state(p: Path) -> Text:
    """What run ``p`` tells the experiment that follows it (part 1 of that card)."""
    return kind_of(p).previous_state(Path(p))


def card_for(run_dir: Path, root: Path | None = None) -> Card:
    run_dir = Path(run_dir)
    return kind_of(run_dir).card(run_dir, Path(root) if root else run_dir.parent)


def look_card(run_dir: Path) -> Card | None:
    """The one look at the test set of a run, as a card of its own (None when it was not tested)."""
    run_dir = Path(run_dir)
    path = run_dir / RunDir.TEST
    if not path.is_file():
        return None
    t, info, n = json.loads(path.read_text()), read_run_info(run_dir), RunDir(run_dir).number
    looks = [r for r in read_jsonl(RunDir(run_dir).ledger) if r.get("run") == run_dir.name]
    rows = [("test top-1 [95% interval]", pct(t["top1"], t.get("count"))), ("top-5", pct(t.get("top5"))),
            ("balanced accuracy", pct(t.get("balanced_acc"))), ("test images", f"{t.get('count', '-')}")]
    return Card(
        title=f"Test set: #{n} {info.get('name', run_dir.name)}", kind="test", number=None, folder=run_dir.name,
        previous=(Bullets((previous_state(run_dir),)),),
        hypothesis=(Para(text("The weights chosen on validation score on the test set as validation said, within "
                              "its interval.")),),
        setup=(Para(text(f"Checkpoint {t['checkpoint']}: the {t['weights']} weights of epoch {t['epoch']}, evaluated on "
                         f"the test split at {t['time']} (run status then: {t.get('run_status', '?')})" +
                         "".join(f", at {k} {v:,} ({t['budget']['why']})" for k, v in t.get("budget", {}).items()
                                 if k != "why") + ".")),),
        outcomes=(table(["measure", "value"], rows),),
        observations=(Bullets(tuple(text(f"Look {i + 1} at {r['time']}: {r['checkpoint']} checkpoint, top-1 "
                                         f"{pct(r['top1'], r.get('count'))}" + (" (--again)" if r.get("again") else ""))
                                    for i, r in enumerate(looks)) or (text("No ledger line for this look."),)),))


def _budget_blocks(found: dict | None) -> list[Block]:
    """The evaluation-budget sweep of `mame-fast evaluate` (run.json's ``eval_budgets``), as a sentence and a table."""
    if not found:
        return []
    unit = "pixels per image" if found["key"] == "pixels" else "crop side"
    rows = [(f"{r['value']:,}", pct(r["top1"], r["count"]),
             ", ".join(w for w, on in (("chosen", r["value"] == found["chosen"]),
                                       ("trained at", r["value"] == found.get("trained_at"))) if on))
            for r in found["results"]]
    return [Para(text("Evaluation budgets (", code("mame-fast evaluate"), f" at {found['time']}: validation, the "
                      f"{found['weights']} weights of epoch {found['epoch']}): the test looks at {found['key']} ",
                      bold(f"{found['chosen']:,}"), ".")),
            table([unit, "val top-1 [95% interval]", ""], rows)]


def _changes(changes: dict) -> list:
    if not changes:
        return ["nothing changed"]
    out: list = []
    for k, (a, b) in changes.items():
        out += ([", "] if out else []) + [code(k), f" {a} -> {b}"]
    return out


def _diff_blocks(pred: Path, run_dir: Path) -> list[Block]:
    dd = diff(config_with_spec(pred), config_with_spec(run_dir))
    rows = [(text(code(k)), text(_short(a)), text(_short(b))) for k, (a, b) in dd.items() if k not in ("out",)]
    return [Para(text("Changes against ", ref(RunDir(pred).number), ":")),
            table(["key", "before", "now"], rows or [("(none)", "", "")])]


def _number(v) -> str:
    """A measured value for a card: 3 significant digits; a pair as a range."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]:.3g} to {v[1]:.3g}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _short(v) -> str:
    s = (yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (dict, list)) else
         f"{v:g}" if isinstance(v, float) else str(v))
    return s if len(s) < 80 else s[:77] + "..."
