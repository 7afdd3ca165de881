"""The test set, once: `mame-fast test` reads the test split with the checkpoint it names, records every look in
the ledger, and refuses a second look unless asked."""

from __future__ import annotations

import json

import pytest
import torch

from mame_fast.input import build_loader
from mame_fast.input.reader import open_split
from mame_fast.records.records import read_metrics, read_run_info
from mame_fast.train import checkpoint as ckpt
from mame_fast.train.loop import run
from mame_fast.train.model import build
from mame_fast.train.spec import spec_from_dict
from mame_fast.train.testset import AlreadyTested, evaluate_test_set

from .helpers import cfg_for


def _top1(run_dir, which: str) -> tuple[float, int]:
    """Top-1 of a checkpoint's weights on the test split, computed here with a plain loop."""
    cfg_state = ckpt.load(run_dir / f"{which}.pt")
    model = build(spec_from_dict(cfg_state["spec"]))
    model.load_state_dict(cfg_state["model"])
    model.eval()
    from mame_fast.config import load

    cfg = load(run_dir / "config.yaml")
    right = n = 0
    with torch.no_grad():
        for b in build_loader(cfg.data, "test", False, 0).epoch(0):
            pred = model(b.images, b.sizes if b.padded else None).argmax(-1)[: b.real]
            right += int((pred == b.labels[: b.real]).sum())
            n += b.real
    return right / n, n


def test_test_reads_the_test_split_with_the_named_checkpoint(shards, tmp_path):
    """A run whose best epoch is not its last (a noisy constant learning rate): `--checkpoint last` and `best` each
    evaluate their own weights on the test split, computed here with a plain loop."""
    sets = {"optim.lr": 0.05, "optim.schedule": "constant", "optim.warmup_epochs": 0}
    d = run(cfg_for(shards, tmp_path, epochs=3, **sets), name="look")
    n_test, n_val = len(open_split(shards, "test")), len(open_split(shards, "val"))
    assert n_test != n_val  # the fixture tells the splits apart
    assert ckpt.load(d / "best.pt")["epoch"] < 3  # the setup: best and last differ
    r = evaluate_test_set(d, "last")
    top1, n = _top1(d, "last")
    assert r["count"] == n == n_test and r["top1"] == pytest.approx(top1, abs=1e-9)
    assert r["checkpoint"] == "last" and r["epoch"] == 3
    best = ckpt.load(d / "best.pt")["epoch"]
    r = evaluate_test_set(d, "best", again=True)
    assert r["epoch"] == best and r["top1"] == pytest.approx(_top1(d, "best")[0], abs=1e-9)


def test_test_set_runs_once(shards, tmp_path):
    d = run(cfg_for(shards, tmp_path, epochs=1), name="once")
    first = evaluate_test_set(d)
    with pytest.raises(AlreadyTested, match=r"already evaluated on the test set at .* top-1"):
        evaluate_test_set(d)
    assert json.loads((d / "test.json").read_text())["time"] == first["time"]  # the refusal wrote nothing
    again = evaluate_test_set(d, again=True)
    assert again["top1"] == first["top1"] and again["count"] == first["count"] == len(open_split(shards, "test"))
    ledger = [json.loads(x) for x in (tmp_path / "test_ledger.jsonl").read_text().splitlines()]
    assert [x["again"] for x in ledger] == [False, True] and [x["run"] for x in ledger] == [d.name, d.name]


def test_test_evaluates_the_ema_weights_when_they_won(shards, tmp_path):
    """A run whose EMA wins validation (a noisy constant learning rate, a short EMA): best.pt holds the EMA weights of
    that epoch, `test` evaluates exactly them, and test.json and the ledger say so."""
    sets = {"optim.lr": 0.1, "optim.ema": 0.7, "optim.schedule": "constant", "optim.warmup_epochs": 0}
    d = run(cfg_for(shards, tmp_path, epochs=1, **sets), name="ema")
    info = read_run_info(d)
    assert (info["best_weights"], info["best_epoch"]) == ("ema", 1)  # the setup: the EMA won
    best, last = ckpt.load(d / "best.pt"), ckpt.load(d / "last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    assert best["weights"] == "ema" and all(torch.equal(best["model"][k], ema[k]) for k in ema)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in ema)  # not the raw weights
    r = evaluate_test_set(d)
    assert (r["weights"], r["epoch"], r["checkpoint"]) == ("ema", 1, "best")
    assert r["top1"] == pytest.approx(_top1(d, "best")[0], abs=1e-9)
    ledger = json.loads((tmp_path / "test_ledger.jsonl").read_text().splitlines()[-1])
    assert (ledger["weights"], ledger["epoch"]) == ("ema", 1)
    # What the table of runs and test.json show is the val top-1 of the weights that were tested: the EMA's.
    ema_top1 = read_metrics(d)[0]["val_ema"]["top1"]
    assert r["val_top1"] == ema_top1 == info["best_val_top1"]
    from mame_fast.records.report import runs_table

    assert runs_table(tmp_path)[0]["best val [95%]"].startswith(f"{100 * ema_top1:.1f}% [") and \
        runs_table(tmp_path)[0]["best val [95%]"].endswith("(EMA)")


def test_a_second_look_with_other_weights_is_still_a_second_look(shards, tmp_path):
    """The one look is per run, not per checkpoint: --checkpoint last after a look with best is refused too."""
    d = run(cfg_for(shards, tmp_path, epochs=1), name="once")
    evaluate_test_set(d, "best")
    for other in ("last", "best"):
        with pytest.raises(AlreadyTested):
            evaluate_test_set(d, other)
    assert len((tmp_path / "test_ledger.jsonl").read_text().splitlines()) == 1


def test_the_run_is_held_for_the_whole_look(shards, tmp_path, monkeypatch):
    """While the test split is evaluated, the run folder's lock is held: a trainer or a second look started then is
    refused (the lock is not let go between the check for an earlier look and the writing of this one)."""
    from mame_fast.records.runrecord import RunBusy, RunRecord
    from mame_fast.train import testset

    d = run(cfg_for(shards, tmp_path, epochs=1), name="once")
    seen, real = [], testset.evaluate

    def evaluate_while_another_tries(*a, **kw):
        with pytest.raises(RunBusy) as e:
            RunRecord.reopen(d, "train")
        seen.append(str(e.value))
        return real(*a, **kw)

    monkeypatch.setattr(testset, "evaluate", evaluate_while_another_tries)
    evaluate_test_set(d)
    assert len(seen) == 1 and "another `mame-fast test` of this run is evaluating it on the test set" in seen[0]
