"""Stage 4g: the evaluation budget. A network trained on random crops sees objects larger than whole-image evaluation
shows them, and scores best evaluated at a somewhat higher resolution than it trained at (Touvron et al., "Fixing the
train-test resolution discrepancy", NeurIPS 2019). ``mame-fast evaluate RUN --pixels 300000,360000,450000`` (``--crop``
at 256) evaluates the run's best weights on the validation split at each budget, with intervals, records them in
run.json (``eval_budgets``) and chooses the best; its card shows the table, and ``mame-fast test`` looks at the test set
at the chosen budget (``budget_for_test``), saying which in test.json.

Choosing on validation is what validation is for; the test set is still looked at once.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig, load
from ..errors import Expected
from ..input import build_loader, eval_data
from ..records.records import now, read_run_info, update_run_info
from ..records.rundir import RunDir
from ..records.runrecord import RunRecord
from ..records.stats import wilson
from . import checkpoint as ckpt
from .evaluate import evaluate
from .model import for_evaluation
from .runtime import setup_runtime
from .spec import spec_from_dict


class BudgetError(Expected, ValueError):
    pass


def budget_for_test(run_dir: Path, cfg: TrainConfig) -> dict:
    """The budget the test set is looked at: the one `evaluate` chose on validation, else ``eval.pixels`` /
    ``eval.crop``, else the final training budget; with why."""
    key = cfg.data.budget_key
    chosen = read_run_info(run_dir).get("eval_budgets", {})
    if chosen.get("key") == key and chosen.get("chosen"):
        return {key: chosen["chosen"], "why": f"chosen on validation by `mame-fast evaluate` at {chosen['time']}"}
    if asked := getattr(cfg.eval, key):
        return {key: asked, "why": f"eval.{key}"}
    return {**cfg.data.budget, "why": "the final training budget"}


def evaluate_budgets(run_dir: str | Path, values: list[int]) -> dict:
    """Validation top-1 of the run's best weights at each budget in ``values``; recorded in run.json with the choice
    (the highest top-1; on a tie, the smaller budget, which costs less)."""
    run_dir = RunDir(run_dir)
    cfg = load(run_dir / RunDir.CONFIG)
    key = cfg.data.budget_key
    low = 64 if key == "pixels" else 8
    if not values or any(v < low for v in values):
        raise BudgetError(f"--{key} needs budgets of at least {low} ({key} per image), got {values}")
    with RunRecord.reopen(run_dir.path, "evaluate", owns_status=False):
        state = ckpt.load(run_dir / RunDir.BEST)  # the weights that won validation, the model's or the EMA's
        weights, kind, epoch = state["model"], state["weights"], state["epoch"]
        spec = spec_from_dict(state["spec"])
        rt = setup_runtime(cfg.precision, training=False)
        model = for_evaluation(spec, weights, rt.device, cfg.data.channels_last)
        results = []
        for v in values:
            loader = build_loader(eval_data(cfg.data, **{key: v}), "val", False, cfg.seed, device=rt.device,
                                  dtype=rt.dtype)
            try:
                m = evaluate(model, loader, rt, spec.num_classes)
            finally:
                loader.close()
            results.append({"value": v, "top1": m["top1"], "count": m["count"], "interval": list(wilson(m["top1"], m["count"]))})
        best = max(results, key=lambda r: (r["top1"], -r["value"]))
        record = {"time": now(), "key": key, "weights": kind, "epoch": epoch, "results": results, "chosen": best["value"],
                  "trained_at": cfg.data.pixels if key == "pixels" else cfg.data.crop}
        update_run_info(run_dir, {"eval_budgets": record})
    return record
