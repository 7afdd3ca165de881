"""The mutation check of the core (``make mutants``): curated mutants, each a small change named after the promise it
breaks, must each make the tests that guard that promise fail.

Each mutant is applied to a copy of the repository (never to the working tree), and the tests it names run
against the copy; a mutant survives when they all pass. The run prints and writes a table with the kill rate
and the survivors (``tests/mutants_report.md``). A survivor is either a gap to close with a test or a change
that cannot alter behaviour (then it is removed from the list with a line saying why).

    python tests/mutants.py [--only REGEX] [--jobs 2] [--whole]

A new mutant is first run against the whole fast suite (``--whole``: every test not marked slow, which also names the
test that killed it), so that its selection is what kills it, not a guess; the table then runs each one's selection.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    promise: str  # what the change breaks, as the README or a docstring promises it
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: str  # pytest arguments: files and -k selections that guard the promise


M = Mutant
MUTANTS = [
    # -- the epoch plan (input/plan.py) ----------------------------------------------------------------
    M("every sample once per epoch: the split for the world size drops a sample", "mame_fast/input/plan.py",
      "chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 :]]", "chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 + 1 :]]",
      "tests/test_plan.py"),
    M("fillers weigh nothing: they are counted as samples", "mame_fast/input/plan.py",
      "_batch(np.resize(c, cfg.batch_size), len(c),", "_batch(np.resize(c, cfg.batch_size), cfg.batch_size,", "tests/test_plan.py"),
    M("training flips happen", "mame_fast/input/plan.py", "flip = (u[idx, 3] < 0.5) & cfg.flip", "flip = (u[idx, 3] < 0.0) & cfg.flip",
      "tests/test_plan.py tests/test_loaders.py -k flips"),
    M("crops never deform: the training crop takes the bucket's aspect", "mame_fast/input/plan.py",
      "ch, cw = _crop_to_aspect(ih, iw, np.full(len(idx), W / H))", "ch, cw = _crop_to_aspect(ih, iw, np.full(len(idx), H / W))",
      "tests/test_loaders.py -k deformation"),
    M("the order changes every epoch", "mame_fast/input/plan.py", "rng = np.random.default_rng([seed, epoch, 0 if cfg.train else 1])",
      "rng = np.random.default_rng([seed, 0, 0 if cfg.train else 1])", "tests/test_plan.py -k order"),
    M("bucket sides are multiples of the total stride", "mame_fast/input/plan.py", "lo: float = 0.25, hi: float = 4.0, multiple: int = 32",
      "lo: float = 0.25, hi: float = 4.0, multiple: int = 8", "tests/test_plan.py -k bucketing"),
    M("the shape set known before step 0 is the plan's", "mame_fast/input/plan.py",
      "return [(cfg.batch_size, int(b.h[k]), int(b.w[k])) for k in used]", "return [(cfg.batch_size, int(b.w[k]), int(b.h[k])) for k in used]",
      "tests/test_plan.py"),
    # -- reading and loading (input/) ------------------------------------------------------------------
    M("a shard whose bytes changed is refused before training", "mame_fast/input/reader.py", "        if sha256(tar) != want:",
      "        if False and sha256(tar) != want:", "tests/test_loaders.py -k damaged"),
    M("a stale index is refused", "mame_fast/input/reader.py",
      "if len(entries) != sh[\"count\"] or [e[\"__key__\"] for e in entries] != keys[pos : pos + sh[\"count\"]]:",
      "if len(entries) != sh[\"count\"]:", "tests/test_loaders.py -k stale"),
    M("labels follow their samples", "mame_fast/input/loader.py", "\"labels\": np.stack([self.split.labels[p.index] for p in plans]),",
      "\"labels\": np.stack([self.split.labels[np.sort(p.index)] for p in plans]),", "tests/test_loaders.py -k labels"),
    M("each image's valid size is reported (height, width)", "mame_fast/input/loader.py",
      "\"sizes\": np.stack([np.stack([p.out_h, p.out_w], 1) for p in plans]).astype(np.int32),",
      "\"sizes\": np.stack([np.stack([p.out_w, p.out_h], 1) for p in plans]).astype(np.int32),", "tests/test_loaders.py -k labels"),
    M("colour jitter reaches training batches", "mame_fast/input/loader.py", "        if self.plan_cfg.color_jitter:",
      "        if False:", "tests/test_loaders.py -k jitter"),
    M("the DALI CPU tail fills short batches with copies of their samples", "mame_fast/input/loader.py",
      "            out[j].copy_(out[k])", "            pass", "tests/test_loaders.py -k fallback_gives"),
    M("the DALI CPU tail runs every one of its forked tasks", "mame_fast/input/loader.py",
      "    for i in range(tasks):\n        futures.append", "    for i in range(1):\n        futures.append",
      "tests/test_loaders.py -k however"),
    M("the DALI CPU tail's wait raises a task's error", "mame_fast/input/loader.py",
      "            if errors:\n                raise errors[0]", "            pass", "tests/test_loaders.py -k however"),
    M("the fallback flips what the plan flips", "mame_fast/input/fallback.py", "    return out.flip(1) if flip else out",
      "    return out", "tests/test_loaders.py -k flips"),
    M("a fallback ring larger than shared memory is refused before the workers start", "mame_fast/input/fallback.py",
      "        if free is not None and slots * largest > free:", "        if False:",
      "tests/test_loaders.py -k shared_memory"),
    M("the fallback's GPU path copies the whole ring slot to the device", "mame_fast/input/fallback.py",
      "        copied = start_copy(slot, host, self._tail_pool)", "        copied = start_copy(slot[:1], host[:1], self._tail_pool)",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's padding is zero on a GPU (normalize_batch, run on the CPU)", "mame_fast/input/fallback.py",
      "    return x if sizes is None else x * valid_mask(sizes, H, W, x.dtype)", "    return x",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's CPU tail reads only each sample's image from the ring", "mame_fast/input/fallback.py",
      "crops = [slot[k, :h, :w] for k", "crops = [slot[k] for k", "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's workers copy the fillers into batches for a GPU", "mame_fast/input/fallback.py",
      "        if self.fillers:\n            copy_fillers(out, p.real)", "        if False:\n            copy_fillers(out, p.real)",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's workers go on into the next epoch", "mame_fast/input/fallback.py",
      "                    self._items = ((epoch + 1, 0), items)", "                    pass",
      "tests/test_loaders.py -k over_epochs"),
    M("an evaluation fallback's workers stop at the epoch's end", "mame_fast/input/fallback.py",
      "                if not self.run_on:\n                    return", "                if False:\n                    return",
      "tests/test_loaders.py -k each_step_once"),
    M("the fallback keeps its workers' iterator only where it gives what is asked for", "mame_fast/input/fallback.py",
      "        if self._items is None or self._items[0] != (epoch, start_step):", "        if self._items is None:",
      "tests/test_loaders.py -k 'over_epochs or primed'"),
    M("a rebuilt DALI pipeline is not taken as primed", "mame_fast/input/dali.py",
      "            self.pipe, self._ahead = None, False  # frees", "            self.pipe = None  # frees",
      "tests/test_loaders.py -k primed"),
    # -- the step (train/step.py) ----------------------------------------------------------------------
    M("label smoothing spreads the target", "mame_fast/train/step.py", "    return onehot * (1 - smoothing) + smoothing / n",
      "    return onehot", "tests/test_train.py -k smoothing"),
    M("mixup mixes the targets as it mixes the images", "mame_fast/train/step.py", "    return x, t * lam + t.flip(0) * (1 - lam)",
      "    return x, t", "tests/test_train.py -k mixup"),
    M("the loss covers the batch's real rows only", "mame_fast/train/step.py",
      "loss.mean() if real is None else torch.sum(real * loss) / real.sum()", "loss.mean()", "tests/test_train.py -k fillers"),
    M("a graphed step zeroes the gradients it accumulates into", "mame_fast/train/step.py",
      "        torch._foreach_zero_(self.grads)", "        pass", "tests/test_train.py -k cuda_graphs"),
    M("a graphed step replays on the batch it is given", "mame_fast/train/step.py", "            static.copy_(t)",
      "            pass", "tests/test_train.py -k cuda_graphs"),
    M("no weight decay on norms and biases", "mame_fast/train/step.py", "    groups = param_groups_weight_decay(model, o.weight_decay)",
      "    groups = [{\"params\": list(model.parameters()), \"weight_decay\": o.weight_decay}]", "tests/test_train.py -k decay"),
    M("the step reads no host value: AdamW's update is fused, not a step count read per parameter", "mame_fast/train/step.py",
      "    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)",
      "    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))", "tests/test_train.py -k reads_nothing"),
    M("the optimizer's update is a fixed number of operations (SGD)", "mame_fast/train/step.py",
      "momentum=o.momentum, nesterov=True, fused=True)", "momentum=o.momentum, nesterov=True)",
      "tests/test_train.py -k reads_nothing"),
    M("clipping scales every gradient, both weight-decay groups", "mame_fast/train/step.py",
      '    return [p for g in opt.param_groups for p in g["params"]]',
      '    return [p for g in opt.param_groups[:1] for p in g["params"]]', "tests/test_train.py -k clips_the_norm"),
    M("the EMA copies the integer buffers (BatchNorm's counters)", "mame_fast/train/step.py", "        if ema_i:",
      "        if False:", "tests/test_train.py -k ema_averages"),
    M("the EMA moves by 1 - decay towards the weights", "mame_fast/train/step.py",
      "        torch._foreach_lerp_(ema_f, live_f, weight=1.0 - decay)", "        torch._foreach_lerp_(ema_f, live_f, weight=decay)",
      "tests/test_train.py -k ema_averages"),
    M("a resumed run continues the schedule at its step", "mame_fast/train/step.py",
      "LambdaLR(opt, factor, last_epoch=start_step - 1)", "LambdaLR(opt, factor, last_epoch=-1)",
      "tests/test_train.py -k resume_is_exact"),
    # -- the model (train/model.py) ------------------------------------------------------------------------
    M("CPU training survives strided 1x1 convs (torch 2.14.1's oneDNN kernel corrupts the heap)", "mame_fast/train/model.py",
      "    if kernel == 1 and stride > 1:", "    if False:", "tests/test_model.py -k corrupting"),
    M("padding changes no sample's output: average pools divide by real pixels", "mame_fast/train/model.py",
      "                y = y / F.avg_pool2d(mask, 2, 2, ceil_mode=True).clamp_min(1e-6)", "                pass",
      "tests/test_model.py -k padding"),
    # -- resume and checkpoints (train/checkpoint.py, train/loop.py) -------------------------------------
    M("resume restores the EMA weights", "mame_fast/train/checkpoint.py", "            self.ema.load_state_dict(d[\"ema\"])",
      "            pass", "tests/test_train.py -k resume_is_exact"),
    M("resume restores each rank's own RNG", "mame_fast/train/checkpoint.py", "        set_rng_state(d[\"rng\"][rank])",
      "        set_rng_state(d[\"rng\"][0])", "tests/test_train.py -k torchrun"),
    M("an epoch resumed in the middle reports whole-epoch numbers", "mame_fast/train/checkpoint.py",
      "        self.meter.load_state_dict(d[\"meter\"])", "        pass", "tests/test_train.py -k resume_is_exact"),
    M("stopping inside an epoch saves a resumable checkpoint", "mame_fast/train/loop.py",
      "            if stop is not Stop.FINISHED and st.step < s.train_loader.steps(st.epoch):  # left inside the epoch\n"
      "                save_last(s, run_dir)",
      "            if stop is not Stop.FINISHED and st.step < s.train_loader.steps(st.epoch):  # left inside the epoch\n"
      "                pass", "tests/test_train.py -k resume_is_exact"),
    M("best.pt holds exactly the weights that won validation", "mame_fast/train/loop.py",
      "    weights, top1, module = max(candidates, key=lambda c: c[1])", "    weights, top1, module = candidates[0]",
      "tests/test_testset.py -k ema"),
    M("a non-finite loss stops the run", "mame_fast/train/loop.py", "    if diverged:\n        last = run_dir / RunDir.LAST",
      "    if False:\n        last = run_dir / RunDir.LAST", "tests/test_train.py -k nan"),
    # -- resume on every loader, and the signals (issue 33) --------------------------------------------------
    M("resume is exact with the fallback: its DataLoader draws no seed from the global RNG", "mame_fast/input/fallback.py",
      "                generator=torch.Generator().manual_seed(self.seed),", "                generator=None,",
      "tests/test_resume.py -k 'any_cut or rng_alone'"),
    M("resume is exact with DALI: a restarted pipeline feeds from the step asked for", "mame_fast/input/dali.py",
      "            self.feed.start(epoch, start_step)", "            self.feed.start(epoch, 0)",
      "tests/test_resume.py -k any_cut"),
    M("a signal during validation stops the run at the next epoch's start", "mame_fast/train/loop.py",
      "            if rt.any([signalled()])[0]:", "            if False:", "tests/test_resume.py -k any_cut"),
    M("Ctrl-C to the process group: the fallback's workers leave it to the trainer", "mame_fast/input/fallback.py",
      "worker_init_fn=ignore_stop_signals,", "worker_init_fn=None,",
      "tests/test_loaders.py -k signals_that"),
    M("a SIGTERM to the process group: the fallback's workers ignore it unless their parent sent it", "mame_fast/files.py",
      "        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:", "        if True:",
      "tests/test_loaders.py -k signals_that"),
    M("Ctrl-C to `shard`: its pool's workers leave it to the command", "mame_fast/data/shard.py",
      "    ignore_interrupts()  # a Ctrl-C stops the parent", "    pass  # a Ctrl-C stops the parent",
      "tests/test_resume.py -k sharding"),
    M("a run's loaders are closed when it ends", "mame_fast/train/loop.py", "        cleanup.callback(s.close)", "        pass",
      "tests/test_loaders.py -k leaves_no"),
    M("a torn last line is cut before a resumed run appends", "mame_fast/records/records.py",
      "            f.truncate(end)", "            pass", "tests/test_faults.py -k 'torn_metrics'"),
    M("a resume that changes the model is refused", "mame_fast/train/loop.py", "    if state[\"spec\"] != spec_dict(s.spec):",
      "    if False:", "tests/test_faults.py -k changes_the_model"),
    M("the temporary file of a killed writer is removed", "mame_fast/files.py",
      "            if m and m[\"host\"] == _HOST and not alive(int(m[\"pid\"])):", "            if False:",
      "tests/test_faults.py -k killed_writer"),
    # -- the test set, once, under any timing ------------------------------------------------------------
    M("two concurrent looks at the test set make one", "mame_fast/train/testset.py",
      "            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass", "tests/test_faults.py -k concurrent"),
    M("test refuses a run that has not ended", "mame_fast/train/testset.py", "        if status not in FINAL and not unfinished:",
      "        if False:", "tests/test_faults.py -k not_ended"),
    # -- the test set, once (train/testset.py, train/evaluate.py) ---------------------------------------
    M("test reads the test split", "mame_fast/train/testset.py", "loader = build_loader(cfg.data, \"test\", False,",
      "loader = build_loader(cfg.data, \"val\", False,", "tests/test_testset.py"),
    M("the test set is looked at once", "mame_fast/train/testset.py", "    if result_path.is_file() and not again:",
      "    if False:", "tests/test_testset.py -k once"),
    M("--checkpoint last evaluates the last weights", "mame_fast/train/testset.py", "    if which == \"best\":",
      "    if which in (\"best\", \"last\"):", "tests/test_testset.py -k named"),
    M("metrics count the real rows, not the fillers", "mame_fast/train/evaluate.py", "        sums[2] += b.real",
      "        sums[2] += len(b.labels)", "tests/test_testset.py -k named"),
    # -- the metrics and their intervals (train/evaluate.py, records/stats.py) ------------------------------
    M("top-5 accuracy counts a hit among the five highest logits", "mame_fast/train/evaluate.py",
      "logits.topk(min(5, num_classes), -1)", "logits.topk(1, -1)", "tests/test_metrics.py"),
    M("balanced accuracy is the mean of the per-class accuracies", "mame_fast/train/evaluate.py",
      "        \"balanced_acc\": float(np.nanmean(per_class)),", "        \"balanced_acc\": float(np.trace(conf) / n),",
      "tests/test_metrics.py"),
    M("the confusion matrix has true classes in rows", "mame_fast/train/evaluate.py",
      "conf.index_add_(0, labels * num_classes + logits.argmax(-1),", "conf.index_add_(0, logits.argmax(-1) * num_classes + labels,",
      "tests/test_metrics.py"),
    M("the loss is the mean cross-entropy", "mame_fast/train/evaluate.py", "        \"loss\": sums[0].item() / n,",
      "        \"loss\": sums[0].item() / max(1, len(loader)),", "tests/test_metrics.py"),
    M("Wilson's interval is centred where the score test puts it", "mame_fast/records/stats.py",
      "    centre = (p + z * z / (2 * n)) / (1 + z * z / n)", "    centre = p", "tests/test_metrics.py"),
    M("Newcombe's interval of a difference", "mame_fast/records/stats.py",
      "    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)",
      "    return d, d - math.sqrt((p2 - l2) ** 2 + (p1 - l1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (u1 - p1) ** 2)",
      "tests/test_metrics.py"),
    M("a setting's interval over seeds takes Student's quantile", "mame_fast/records/stats.py",
      "    return m, (_T95[n - 2] if n - 1 <= len(_T95) else Z95) * sd / math.sqrt(n)",
      "    return m, (_T95[n - 1] if n <= len(_T95) else Z95) * sd / math.sqrt(n)", "tests/test_metrics.py"),
    # -- the evidence pictures (records/evidence.py, train/lrfind.py) -----------------------------------------
    M("a preview tile is the batch row as fed, de-normalized", "mame_fast/records/evidence.py",
      "* torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)", "* torch.tensor(STD).view(3, 1, 1)",
      "tests/test_evidence.py -k preview_tile"),
    M("the preview shows mixup and cutmix as the step applies them", "mame_fast/records/evidence.py",
      "        x, target = mix(b.images.float(), target, cfg.optim, rng)", "        x = b.images.float()",
      "tests/test_evidence.py -k mixing"),
    M("every gallery image is a mistake", "mame_fast/records/evidence.py", "    wrong = pr[\"true\"] != pr[\"pred\"]",
      "    wrong = pr[\"true\"] == pr[\"pred\"]", "tests/test_evidence.py -k gallery"),
    M("a class activation map is zero on the padding", "mame_fast/records/evidence.py",
      "    maps = maps.clamp(0, 1) * valid_mask(sizes.to(maps.device), *x.shape[2:], maps.dtype)",
      "    maps = maps.clamp(0, 1)", "tests/test_evidence.py -k activation_map"),
    M("the range test leaves the model as it found it", "mame_fast/train/lrfind.py",
      "        model.load_state_dict(saved[0])", "        pass", "tests/test_evidence.py -k range_test"),
    M("the range test suggests a rate it tried", "mame_fast/train/lrfind.py", "    peak = max(lrs[0], lrs[low] / 10)",
      "    peak = lrs[low] * 10", "tests/test_evidence.py -k range_test"),
    # -- the shard writer (data/) ------------------------------------------------------------------------
    M("the same input and seed give byte-identical shards", "mame_fast/data/shard.py", "    info.mtime = 0  #",
      "    info.mtime = id(payload)  #", "tests/test_shard.py -k deterministic"),
    M("an interrupted shard run resumes after its last complete shard", "mame_fast/data/shard.py",
      "    return done_recs, rows[done_pos[-1] + 1 :] if done_pos else rows", "    return done_recs, rows",
      "tests/test_shard.py -k resume"),
    M("verify finds a changed label", "mame_fast/data/shard.py", "        if int.from_bytes(data[off : off + size], \"little\") != row[\"label\"]:",
      "        if False:", "tests/test_shard.py -k verify"),
    # -- configuration (config.py) ----------------------------------------------------------------------
    M("an unknown config key is an error", "mame_fast/config.py",
      "            raise ConfigError(f\"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}\")",
      "            continue", "tests/test_config.py"),
    M("a choice outside its Literal is an error", "mame_fast/config.py", "            if choices and v not in choices:",
      "            if False:", "tests/test_faults.py -k bad_config"),
    M("a number outside its range is an error", "mame_fast/config.py", "            if key in RANGES:\n                _in_range(key, v)",
      "            pass", "tests/test_faults.py -k bad_config"),
]


def copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", ".gpu", "_work", "__pycache__", "demo", "runs", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


WHOLE = "-m 'not slow' -n 2 tests"  # the whole fast suite, on two processes (pytest -x stops it at the first failure)
TIMEOUT_S = 600


def try_mutant(m: Mutant, repo: Path, tests: str | None = None) -> tuple[bool, float, str]:
    """(killed, seconds, detail) of one mutant, on its own copy of the repository, against its tests (or ``tests``)."""
    path = repo / m.file
    src = path.read_text()
    if src.count(m.old) != 1:
        return False, 0.0, f"STALE: the original text occurs {src.count(m.old)} times in {m.file}"
    path.write_text(src.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    t = time.time()
    # Its own process group: on a timeout the whole of it goes (pytest, xdist's workers, their pools), not pytest alone,
    # which left a hung worker's processes orphaned and busy for good.
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests or m.tests)],
                         cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = p.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:  # a hang is a broken promise too (a loader that waits for a dead worker)
        return True, time.time() - t, f"timed out after {TIMEOUT_S} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever the run left behind
        p.wait()
        path.write_text(src)
    lines = out.strip().splitlines() or [""]
    last = next((x.split(" - ")[0] for x in lines if x.startswith("FAILED ")), lines[-1])  # the test that killed it
    # 4: pytest's usage error (a bad -k), 5: no test collected: neither tested the mutant, so neither kills it
    return p.returncode not in (0, 4, 5), time.time() - t, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutants whose promise matches this regular expression")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tried at once, each on its own copy")
    ap.add_argument("--whole", action="store_true", help="run each mutant against the whole fast suite, not its selection")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if re.search(args.only, m.promise)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for j in range(args.jobs):
            copy_repo(Path(tmp) / f"repo{j}")
            copies.append(Path(tmp) / f"repo{j}")
        free = list(copies)

        def job(m: Mutant):
            repo = free.pop()
            try:
                killed, seconds, _ = result = try_mutant(m, repo, WHOLE if args.whole else None)
                print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:4.0f} s  {m.promise}", file=sys.stderr, flush=True)
                return result  # (a whole-suite run takes an hour: a line per mutant as it ends)
            finally:
                free.append(repo)

        with ThreadPoolExecutor(args.jobs) as ex:
            results = list(ex.map(job, chosen))
    killed = sum(k for k, _, _ in results)
    against = "the whole fast suite (the killing test named)" if args.whole else "only the tests that guard its promise"
    lines = [f"# Mutation check of the core: {killed} of {len(chosen)} mutants killed ({killed / len(chosen):.0%})", "",
             f"- date: {dt.datetime.now().isoformat(timespec='seconds')}, {time.time() - t0:.0f} s on {os.cpu_count()} cores "
             f"({args.jobs} at once); each mutant runs {against}", "",
             "| promise broken | file | tests | result | s |", "|---|---|---|---|---|"]
    for m, (k, s, detail) in zip(chosen, results):
        result = ("killed" + (f" by `{detail.removeprefix('FAILED ')}`" if args.whole else "")) if k else "**SURVIVED** " + detail
        lines.append(f"| {m.promise} | `{m.file}` | `{WHOLE if args.whole else m.tests}` | {result} | {s:.0f} |")
    survivors = [m.promise for m, (k, _, _) in zip(chosen, results) if not k]
    lines += ["", "Survivors: " + ("; ".join(survivors) if survivors else "none") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.only or args.whole:  # a whole-suite run is kept whatever it chose: it is the record of a first run
        (ROOT / "tests" / ("mutants_whole_report.md" if args.whole else "mutants_report.md")).write_text(text)
    sys.exit(0 if not survivors else 1)


if __name__ == "__main__":
    main()
