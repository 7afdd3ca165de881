"""Every word true on the student's path: what a new user meets when a path is wrong, a file is damaged or a range test
starts too high, through the command line (exit code, one sentence, nothing written)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mame_fast.records.kinds import diagnose_run
from mame_fast.records.records import read_run_info
from mame_fast.records.rundir import list_runs

from .helpers import invoke
from .helpers import train_sets as sets

FIXTURE = Path(__file__).parent / "fixtures" / "runs_629ef3b"


def one_sentence(code: int, out: str, want: int = 2) -> None:
    """Exit code ``want``, no traceback, and the error is one sentence (progress lines may come before it)."""
    assert code == want and "Traceback" not in out and "error:" in out, (code, out)
    assert len(out[out.index("error:"):]) < 450, out


@pytest.mark.parametrize("command", [["diagnose"], ["note", "{run}", "hello"], ["test"], ["compare", "{run}"],
                                     ["train", "--resume"]])
def test_a_run_that_does_not_exist_is_refused_and_nothing_is_written(tmp_path, command):
    missing = tmp_path / "runs" / "002"
    args = [a.replace("{run}", str(missing)) for a in command]
    if "{run}" not in " ".join(command):
        args.append(str(missing))
    t = time.time()
    code, out = invoke(*args)
    one_sentence(code, out)
    assert f"{missing}: no such run folder" in out and time.time() - t < 10
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["runs", "report"])
def test_a_runs_folder_that_does_not_exist_is_refused(tmp_path, command):
    code, out = invoke(command, "--root", tmp_path / "nope")
    one_sentence(code, out)
    assert f"{tmp_path / 'nope'}: no such folder of runs" in out and not (tmp_path / "nope").exists()


@pytest.mark.parametrize("command", ["preview", "lr-find", "train"])
def test_a_shard_folder_that_does_not_exist_is_refused_at_once(tmp_path, command):
    t = time.time()
    code, out = invoke(command, "--shards", tmp_path / "shard" / "256", "--set", f"out={tmp_path / 'runs'}")
    one_sentence(code, out)
    assert "no such folder; make shards with `mame-fast shard" in out and time.time() - t < 5
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage, said", [("", "damaged (empty)"), ('{"format": "mame-fast-shards/1", "vari', "not JSON"),
                                          ("drop:splits", "field 'splits' is missing"),
                                          ("drop:classes", "field 'classes' is missing")])
@pytest.mark.parametrize("command", ["preview", "train", "lr-find", "verify"])
def test_a_damaged_manifest_is_one_sentence_naming_it(shards, tmp_path, damage, said, command):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    manifest = folder / "manifest.json"
    if damage.startswith("drop:"):
        m = json.loads(manifest.read_text())
        del m[damage[5:]]
        manifest.write_text(json.dumps(m))
    else:
        manifest.write_text(damage)
    args = ["shard", folder, "--verify"] if command == "verify" else [command, *sets(folder, tmp_path / "runs")]
    code, out = invoke(*args)
    one_sentence(code, out)
    assert f"{manifest}: " in out and said in out and "run the same `mame-fast shard` command again" in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spec, said", [("stem_width: 16\nstages: 3\n", "stages: 3 is not a list of stages"),
                                        ("stem_width: 16\nstages:\n  - [32, 1, 2]\n", "stages[0]: [32, 1, 2] is not a mapping")])
def test_a_malformed_model_spec_is_one_sentence(shards, tmp_path, spec, said):
    p = tmp_path / "my.yaml"
    p.write_text(spec)
    code, out = invoke("train", *sets(shards, tmp_path / "runs", f"model={p}"))
    one_sentence(code, out)
    assert f"{p}: {said}" in out and not (tmp_path / "runs").exists()


def test_an_empty_width_in_the_metadata_names_the_column_and_the_fix(root_copy, tmp_path):
    csv = root_copy / "MAMe_dataset.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")
    row[header.index("Width")] = ""
    lines[3] = ",".join(row)
    csv.write_text("\n".join(lines) + "\n")
    code, out = invoke("shard", root_copy, "--out", tmp_path / "o")
    one_sentence(code, out)
    assert f"{csv}:4: column Width is '', not a number of pixels (image {row[0]})" in out and "fix the value" in out
    assert "{" not in out  # not the row printed as a dict


def test_a_resume_with_another_model_is_refused_in_one_short_line(shards, tmp_path):
    code, out = invoke("train", *sets(shards, tmp_path, "model=tiny", "max_steps=2"))
    assert code == 0, out
    d = list_runs(tmp_path)[0].path
    code, out = invoke("train", *sets(shards, tmp_path, "model=small"), "--resume", d)
    one_sentence(code, out)
    assert "its model spec differs from model=small" in out and "start a new run (--after 1)" in out


def test_a_range_test_that_starts_too_high_suggests_nothing(shards, tmp_path):
    """--start 1e6: the loss explodes at once. The test stops there, says there is no range (exit 4), suggests no
    rate, and its folder says diverged with the plot of what it saw."""
    code, out = invoke("lr-find", "--start", "1e6", "--end", "1e8", "--steps", "20", *sets(shards, tmp_path))
    one_sentence(code, out, want=4)
    assert "no learning-rate range to suggest" in out and "Start lower (--start 1e+03)" in out, out
    d = list_runs(tmp_path)[0].path
    info = read_run_info(d)
    assert info["status"] == "diverged" and "lr_find" not in info
    found = json.loads((d / "lr_find.json").read_text())
    assert len(found["lr"]) < 20 and found["diverged"] and not found["usable"]  # stopped where it diverged
    assert (d / "plots" / "lr_find.png").is_file() and "suggested optim.lr" not in (d / "card.md").read_text()
    assert diagnose_run(d).verdict == "diverged" and "Start the range test lower" in diagnose_run(d).next_step


def test_a_run_that_never_left_its_warm_up_is_not_called_underfitting(shards, tmp_path):
    code, out = invoke("train", *sets(shards, tmp_path, "epochs=2", "optim.warmup_epochs=2", "optim.lr=0.0001"))
    assert code == 0, out
    d = diagnose_run(list_runs(tmp_path)[0].path)
    assert d.verdict == "not converged" and "inside the learning-rate warm-up (2 epochs)" in d.reasons[0], d.text()


def test_the_readme_names_only_files_metrics_csv_has(shards, tmp_path):
    """README: metrics.jsonl has per-class accuracy and the confusion matrix; metrics.csv its scalar columns."""
    from mame_fast.records.records import CSV_COLUMNS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    said = readme[readme.index("`metrics.csv`"):].split(")", 1)[0]
    assert "per-class" not in said and "confusion" not in said
    assert not any("class" in c or "confusion" in c for c in CSV_COLUMNS)


def test_explore_on_the_official_zips_draws_the_sample_grid(tmp_path):
    """README step 1 leaves the downloads zipped ('no need to unpack'): explore reads the images from the zip."""
    from PIL import Image

    from mame_fast.data.sample import SampleSpec, write_sample

    write_sample(tmp_path / "zips", SampleSpec(per_class=(1, 1, 0), max_side=96, large=0, seed=0), workers=1, as_zip=True)
    assert not (tmp_path / "zips" / "data").exists() and (tmp_path / "zips" / "MAMe_data.zip").is_file()
    code, out = invoke("explore", tmp_path / "zips", "--out", tmp_path / "ex")
    assert code == 0, out
    grid = Image.open(tmp_path / "ex" / "samples.png").convert("L")
    assert grid.size[0] >= 1000 and sum(grid.histogram()[:200]) > 0.01 * grid.size[0] * grid.size[1]  # images drawn
    assert "samples.png" in (tmp_path / "ex" / "explore.md").read_text()


def test_the_readme_workflow_keeps_its_promise_of_unsquashed_images():
    """The workflow trains from the full-resolution shards (square crops at --res 256), never from the official 256
    release, which its authors squashed; step 7 changes one thing (the model) and keeps step 6's rate."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    steps = readme[readme.index("## Your first experiments"):readme.index("## Commands")]
    assert "--shards shards/256" not in steps and steps.count("--shards shards/full") >= 5
    step7 = steps[steps.index("7. **Change one thing**"):steps.index("8. **")]
    assert "--set optim.lr=RATE" in step7 and "--set model=medium" in step7
    assert "squashed" in steps and "xdg-open" not in readme
    from mame_fast.config import load

    assert load("256").data.shards.endswith("shards/full")  # the shipped config follows the same path
