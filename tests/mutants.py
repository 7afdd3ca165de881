"""The mutation check of the core (``make mutants``): curated mutants, each a small change named after the promise it
breaks, must each make the tests that guard that promise fail.

Each mutant is applied to a copy of the repository (never to the working tree), and the tests it names run
against the copy; a mutant survives when they all pass. The run prints and writes a table with the kill rate
and the survivors (``benchmarks/results/mutants_cpu<N>_<date>.md``). A survivor is either a gap to close with a test or a change
that cannot alter behaviour (then it is removed from the list with a line saying why).

    python tests/mutants.py [--only REGEX] [--jobs 2] [--whole]

A new mutant is first run against the whole fast suite (``--whole``: every test not marked slow, which also names the
test that killed it), so that its selection is what kills it, not a guess; the table then runs each one's selection.
"""

from __future__ import annotations

import argparse
import ast
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
    where: str  # the function or method that holds ``old`` ("mix", "RunRecord.acquire"), in whichever module it is
    old: str  # must occur exactly once in the functions of that name
    new: str
    tests: str  # pytest arguments: files and -k selections that guard the promise


M = Mutant
MUTANTS = [
    # -- the epoch plan (input/plan.py) ----------------------------------------------------------------
    M("every sample once per epoch: the split for the world size drops a sample", "epoch_plan",
      "chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 :]]", "chunks[j:j] = [c[: len(c) // 2], c[len(c) // 2 + 1 :]]",
      "tests/test_plan.py"),
    M("fillers weigh nothing: they are counted as samples", "epoch_plan",
      "_batch(np.resize(c, cfg.batch_size), len(c),", "_batch(np.resize(c, cfg.batch_size), cfg.batch_size,", "tests/test_plan.py"),
    M("training flips happen", "_batch", "flip = (u[idx, 3] < 0.5) & cfg.flip", "flip = (u[idx, 3] < 0.0) & cfg.flip",
      "tests/test_plan.py tests/test_loaders.py -k flips"),
    M("crops never deform: the training crop takes the bucket's aspect", "_batch",
      "ch, cw = _crop_to_aspect(ih, iw, np.full(len(idx), W / H))", "ch, cw = _crop_to_aspect(ih, iw, np.full(len(idx), H / W))",
      "tests/test_loaders.py -k deformation"),
    M("the order changes every epoch", "epoch_plan", "rng = np.random.default_rng([seed, epoch, 0 if cfg.train else 1])",
      "rng = np.random.default_rng([seed, 0, 0 if cfg.train else 1])", "tests/test_plan.py -k order"),
    M("bucket sides are multiples of the total stride", "make_buckets", "lo: float = 0.25, hi: float = 4.0, multiple: int = 32",
      "lo: float = 0.25, hi: float = 4.0, multiple: int = 8", "tests/test_plan.py -k bucketing"),
    M("the shape set known before step 0 is the plan's", "batch_shapes",
      "return [(cfg.batch_size, int(b.h[k]), int(b.w[k])) for k in used]", "return [(cfg.batch_size, int(b.w[k]), int(b.h[k])) for k in used]",
      "tests/test_plan.py"),
    # -- reading and loading (input/) ------------------------------------------------------------------
    M("a shard whose bytes changed is refused before training", "check_checksums", "        if sha256(tar) != want:",
      "        if False and sha256(tar) != want:", "tests/test_loaders.py -k damaged"),
    M("a stale index is refused", "open_split",
      "if len(entries) != sh[\"count\"] or [e[\"__key__\"] for e in entries] != keys[pos : pos + sh[\"count\"]]:",
      "if len(entries) != sh[\"count\"]:", "tests/test_loaders.py -k stale"),
    M("labels follow their samples", "Loader.rows", "\"labels\": np.stack([self.split.labels[p.index] for p in plans]),",
      "\"labels\": np.stack([self.split.labels[np.sort(p.index)] for p in plans]),", "tests/test_loaders.py -k labels"),
    M("each image's valid size is reported (height, width)", "Loader.rows",
      "\"sizes\": np.stack([np.stack([p.out_h, p.out_w], 1) for p in plans]).astype(np.int32),",
      "\"sizes\": np.stack([np.stack([p.out_w, p.out_h], 1) for p in plans]).astype(np.int32),", "tests/test_loaders.py -k labels"),
    M("colour jitter reaches training batches", "Loader._finish", "        if self.plan_cfg.color_jitter:",
      "        if False:", "tests/test_loaders.py -k jitter"),
    M("the DALI CPU tail fills short batches with copies of their samples", "_tail_images",
      "            out[j].copy_(out[k])", "            pass", "tests/test_loaders.py -k fallback_gives"),
    M("the DALI CPU tail runs every one of its forked tasks", "_fork_tail",
      "    for i in range(tasks):\n        futures.append", "    for i in range(1):\n        futures.append",
      "tests/test_loaders.py -k however"),
    M("the DALI CPU tail's wait raises a task's error", "start_tail",
      "            if errors:\n                raise errors[0]", "            pass", "tests/test_loaders.py -k however"),
    M("the fallback flips what the plan flips", "decode_planned", "    return out.flip(1) if flip else out",
      "    return out", "tests/test_loaders.py -k flips"),
    M("a fallback ring larger than shared memory is refused before the workers start", "PilLoader._ring_slots",
      "        if free is not None and slots * largest > free:", "        if False:",
      "tests/test_loaders.py -k shared_memory"),
    M("the fallback's GPU path copies the whole ring slot to the device", "PilLoader._on_device",
      "        copied = start_copy(slot, host, self._tail_pool)", "        copied = start_copy(slot[:1], host[:1], self._tail_pool)",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's padding is zero on a GPU (normalize_batch, run on the CPU)", "normalize_batch",
      "    return x if sizes is None else x * valid_mask(sizes, H, W, x.dtype)", "    return x",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's CPU tail reads only each sample's image from the ring", "PilLoader.epoch",
      "crops = [slot[k, :h, :w] for k", "crops = [slot[k] for k", "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's workers copy the fillers into batches for a GPU", "_PlannedBatches.__getitem__",
      "        if self.fillers:\n            copy_fillers(out, p.real)", "        if False:\n            copy_fillers(out, p.real)",
      "tests/test_loaders.py -k normalizes_on_a_cpu"),
    M("the fallback's workers go on into the next epoch", "PilLoader.epoch",
      "                    self._items = ((epoch + 1, 0), items)", "                    pass",
      "tests/test_loaders.py -k over_epochs"),
    M("an evaluation fallback's workers stop at the epoch's end", "_Steps.__iter__",
      "                if not self.run_on:\n                    return", "                if False:\n                    return",
      "tests/test_loaders.py -k each_step_once"),
    M("the fallback keeps its workers' iterator only where it gives what is asked for", "PilLoader._items_at",
      "        if self._items is None or self._items[0] != (epoch, start_step):", "        if self._items is None:",
      "tests/test_loaders.py -k 'over_epochs or primed'"),
    M("a rebuilt DALI pipeline is not taken as primed", "DaliLoader._pipeline_at",
      "            self.pipe, self._ahead = None, False  # frees", "            self.pipe = None  # frees",
      "tests/test_loaders.py -k primed"),
    # -- the step (train/step.py) ----------------------------------------------------------------------
    M("label smoothing spreads the target", "soft_targets", "    return onehot * (1 - smoothing) + smoothing / n",
      "    return onehot", "tests/test_train.py -k smoothing"),
    M("mixup mixes the targets as it mixes the images", "mix", "    return x, t * lam + t.flip(0) * (1 - lam)",
      "    return x, t", "tests/test_train.py -k mixup"),
    M("the loss covers the batch's real rows only", "forward_backward",
      "loss.mean() if real is None else torch.sum(real * loss) / real.sum()", "loss.mean()", "tests/test_train.py -k fillers"),
    M("a graphed step zeroes the gradients it accumulates into", "StepGraphs._work",
      "        torch._foreach_zero_(self.grads)", "        pass", "tests/test_train.py -k cuda_graphs"),
    M("a graphed step replays on the batch it is given", "StepGraphs.__call__", "            static.copy_(t)",
      "            pass", "tests/test_train.py -k cuda_graphs"),
    M("no weight decay on norms and biases", "make_optimizer", "    groups = param_groups_weight_decay(model, o.weight_decay)",
      "    groups = [{\"params\": list(model.parameters()), \"weight_decay\": o.weight_decay}]", "tests/test_train.py -k decay"),
    M("the step reads no host value: AdamW's update is fused, not a step count read per parameter", "make_optimizer",
      "    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)",
      "    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))", "tests/test_train.py -k reads_nothing"),
    M("the optimizer's update is a fixed number of operations (SGD)", "make_optimizer",
      "momentum=o.momentum, nesterov=True, fused=True)", "momentum=o.momentum, nesterov=True)",
      "tests/test_train.py -k reads_nothing"),
    M("clipping scales every gradient, both weight-decay groups", "trained_params",
      '    return [p for g in opt.param_groups for p in g["params"]]',
      '    return [p for g in opt.param_groups[:1] for p in g["params"]]', "tests/test_train.py -k clips_the_norm"),
    M("the EMA copies the integer buffers (BatchNorm's counters)", "Ema.apply_update_", "        if ema_i:",
      "        if False:", "tests/test_train.py -k ema_averages"),
    M("the EMA moves by 1 - decay towards the weights", "Ema.apply_update_",
      "        torch._foreach_lerp_(ema_f, live_f, weight=1.0 - decay)", "        torch._foreach_lerp_(ema_f, live_f, weight=decay)",
      "tests/test_train.py -k ema_averages"),
    M("a resumed run continues the schedule at its step", "make_schedule",
      "LambdaLR(opt, factor, last_epoch=start_step - 1)", "LambdaLR(opt, factor, last_epoch=-1)",
      "tests/test_train.py -k resume_is_exact"),
    # -- the model (train/model.py) ------------------------------------------------------------------------
    M("CPU training survives strided 1x1 convs (torch 2.14.1's oneDNN kernel corrupts the heap)", "conv_norm_act",
      "    if kernel == 1 and stride > 1:", "    if False:", "tests/test_model.py -k corrupting"),
    M("padding changes no sample's output: average pools divide by real pixels", "Pool.forward",
      "                y = y / F.avg_pool2d(mask, 2, 2, ceil_mode=True).clamp_min(1e-6)", "                pass",
      "tests/test_model.py -k padding"),
    # -- resume and checkpoints (train/checkpoint.py, train/loop.py) -------------------------------------
    M("resume restores the EMA weights", "TrainState.restore", "            self.ema.load_state_dict(d[\"ema\"])",
      "            pass", "tests/test_train.py -k resume_is_exact"),
    M("resume restores each rank's own RNG", "TrainState.restore", "        set_rng_state(d[\"rng\"][rank])",
      "        set_rng_state(d[\"rng\"][0])", "tests/test_train.py -k torchrun"),
    M("an epoch resumed in the middle reports whole-epoch numbers", "TrainState.restore",
      "        self.meter.load_state_dict(d[\"meter\"])", "        pass", "tests/test_train.py -k resume_is_exact"),
    M("stopping inside an epoch saves a resumable checkpoint", "train",
      "            if stop is not Stop.FINISHED and st.step < s.train_loader.steps(st.epoch):  # left inside the epoch\n"
      "                save_last(s, run_dir)",
      "            if stop is not Stop.FINISHED and st.step < s.train_loader.steps(st.epoch):  # left inside the epoch\n"
      "                pass", "tests/test_train.py -k resume_is_exact"),
    M("best.pt holds exactly the weights that won validation", "keep_best",
      "    weights, top1, module = max(candidates, key=lambda c: c[1])", "    weights, top1, module = candidates[0]",
      "tests/test_testset.py -k ema"),
    M("a non-finite loss stops the run", "check_in", "    if diverged:\n        last = run_dir / RunDir.LAST",
      "    if False:\n        last = run_dir / RunDir.LAST", "tests/test_train.py -k nan"),
    # -- resume on every loader, and the signals (issue 33) --------------------------------------------------
    M("resume is exact with the fallback: its DataLoader draws no seed from the global RNG", "PilLoader._loader",
      "                generator=torch.Generator().manual_seed(self.seed),", "                generator=None,",
      "tests/test_resume.py -k 'any_cut or rng_alone'"),
    M("resume is exact with DALI: a restarted pipeline feeds from the step asked for", "DaliLoader._pipeline_at",
      "            self.feed.start(epoch, start_step)", "            self.feed.start(epoch, 0)",
      "tests/test_resume.py -k any_cut"),
    M("a signal during validation stops the run at the next epoch's start", "train",
      "            if rt.any([signalled()])[0]:", "            if False:", "tests/test_resume.py -k any_cut"),
    M("Ctrl-C to the process group: the fallback's workers leave it to the trainer", "PilLoader._loader",
      "worker_init_fn=ignore_stop_signals,", "worker_init_fn=None,",
      "tests/test_loaders.py -k signals_that"),
    M("a SIGTERM to the process group: the fallback's workers ignore it unless their parent sent it", "_end_on_parents_sigterm",
      "        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:", "        if True:",
      "tests/test_loaders.py -k signals_that"),
    M("Ctrl-C or SIGTERM to `shard`: its pool's workers leave it to the command", "_worker_init",
      "    ignore_stop_signals()  # a Ctrl-C stops the parent",
      "    ignore_stop_signals(); s = __import__('signal'); s.signal(s.SIGTERM, s.SIG_DFL); "
      "s.pthread_sigmask(s.SIG_UNBLOCK, {s.SIGTERM})  # a Ctrl-C stops the parent",  # anyone's SIGTERM ends it
      "tests/test_loaders.py -k pool_survives"),
    M("a run's loaders are closed when it ends", "run", "        cleanup.callback(s.close)", "        pass",
      "tests/test_loaders.py -k leaves_no"),
    M("a torn last line is cut before a resumed run appends", "repair_jsonl",
      "            f.truncate(end)", "            pass", "tests/test_faults.py -k 'torn_metrics'"),
    M("a resume that changes the model is refused", "check_resumable", "    if state[\"spec\"] != spec_dict(s.spec):",
      "    if False:", "tests/test_faults.py -k changes_the_model"),
    M("the temporary file of a killed writer is removed", "remove_stale_temps",
      "            if m and m[\"host\"] == _HOST and not alive(int(m[\"pid\"])):", "            if False:",
      "tests/test_faults.py -k killed_writer"),
    # -- the test set, once, under any timing ------------------------------------------------------------
    M("one process per run folder: a second trainer or test look is refused", "RunRecord.acquire",
      "            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass",
      "tests/test_runrecord.py -k 'held or refused'"),
    M("a refusal names the process that holds the run, not one that held it before", "_read_holder",
      "            if h[\"host\"] != socket.gethostname() or alive(int(h[\"pid\"])):", "            if True:",
      "tests/test_runrecord.py -k refusal_waits"),
    M("a run that lets go of its folder leaves no name in the lock", "RunRecord.release",
      "                self._lock.truncate(0)", "                self._lock.flush()",
      "tests/test_runrecord.py -k held_run"),
    M("test refuses a run that has not ended", "evaluate_test_set", "        if status not in FINAL and not unfinished:",
      "        if False:", "tests/test_faults.py -k not_ended"),
    # -- the test set, once (train/testset.py, train/evaluate.py) ---------------------------------------
    M("test reads the test split", "_look", "loader = build_loader(eval_data(cfg.data, **{key: budget[key]}), \"test\", False,",
      "loader = build_loader(eval_data(cfg.data, **{key: budget[key]}), \"val\", False,", "tests/test_testset.py"),
    M("the test set is looked at once", "evaluate_test_set", "    if result_path.is_file() and not again:",
      "    if False:", "tests/test_testset.py -k once"),
    M("--checkpoint last evaluates the last weights", "weights_to_test", "    if which == \"best\":",
      "    if which in (\"best\", \"last\"):", "tests/test_testset.py -k named"),
    M("metrics count the real rows, not the fillers", "evaluate", "        sums[2] += b.real",
      "        sums[2] += len(b.labels)", "tests/test_testset.py -k named"),
    # -- the metrics and their intervals (train/evaluate.py, records/stats.py) ------------------------------
    M("top-5 accuracy counts a hit among the five highest logits", "evaluate",
      "logits.topk(min(5, num_classes), -1)", "logits.topk(1, -1)", "tests/test_metrics.py"),
    M("balanced accuracy is the mean of the per-class accuracies", "evaluate",
      "        \"balanced_acc\": float(np.nanmean(per_class)),", "        \"balanced_acc\": float(np.trace(conf) / n),",
      "tests/test_metrics.py"),
    M("the confusion matrix has true classes in rows", "evaluate",
      "conf.index_add_(0, labels * num_classes + logits.argmax(-1),", "conf.index_add_(0, logits.argmax(-1) * num_classes + labels,",
      "tests/test_metrics.py"),
    M("the loss is the mean cross-entropy", "evaluate", "        \"loss\": sums[0].item() / n,",
      "        \"loss\": sums[0].item() / max(1, len(loader)),", "tests/test_metrics.py"),
    M("Wilson's interval is centred where the score test puts it", "wilson",
      "    centre = (p + z * z / (2 * n)) / (1 + z * z / n)", "    centre = p", "tests/test_metrics.py"),
    M("Newcombe's interval of a difference", "difference",
      "    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)",
      "    return d, d - math.sqrt((p2 - l2) ** 2 + (p1 - l1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (u1 - p1) ** 2)",
      "tests/test_metrics.py"),
    M("a setting's interval over seeds takes Student's quantile", "mean_interval",
      "    return m, (_T95[n - 2] if n - 1 <= len(_T95) else Z95) * sd / math.sqrt(n)",
      "    return m, (_T95[n - 1] if n <= len(_T95) else Z95) * sd / math.sqrt(n)", "tests/test_metrics.py"),
    # -- the evidence pictures (records/evidence.py, train/lrfind.py) -----------------------------------------
    M("a preview tile is the batch row as fed, de-normalized", "denormalize",
      "* torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)", "* torch.tensor(STD).view(3, 1, 1)",
      "tests/test_evidence.py -k preview_tile"),
    M("the preview shows mixup and cutmix as the step applies them", "train_batches",
      "        x, target = mix(b.images.float(), target, cfg.optim, rng)", "        x = b.images.float()",
      "tests/test_evidence.py -k mixing"),
    M("every gallery image is a mistake", "choose", "    wrong = pr[\"true\"] != pr[\"pred\"]",
      "    wrong = pr[\"true\"] == pr[\"pred\"]", "tests/test_evidence.py -k gallery"),
    M("a class activation map is zero on the padding", "activation_maps",
      "    maps = maps.clamp(0, 1) * valid_mask(sizes.to(maps.device), *x.shape[2:], maps.dtype)",
      "    maps = maps.clamp(0, 1)", "tests/test_evidence.py -k activation_map"),
    M("the range test leaves the model as it found it", "range_test",
      "        s.state.restore(saved)", "        pass", "tests/test_evidence.py -k range_test"),
    M("the range test suggests a rate it tried", "suggest", "    peak = max(lrs[0], lrs[low] / 10)",
      "    peak = lrs[low] * 10", "tests/test_evidence.py -k range_test"),
    # -- the shard writer (data/) ------------------------------------------------------------------------
    M("the same input and seed give byte-identical shards", "_member", "    info.mtime = 0  #",
      "    info.mtime = id(payload)  #", "tests/test_shard.py -k deterministic"),
    M("an interrupted shard run resumes after its last complete shard", "_resume_point",
      "    return done_recs, rows[done_pos[-1] + 1 :] if done_pos else rows", "    return done_recs, rows",
      "tests/test_shard.py -k resume"),
    M("verify finds a changed label", "_verify_shard", "        if int.from_bytes(data[off : off + size], \"little\") != row[\"label\"]:",
      "        if False:", "tests/test_shard.py -k verify"),
    # -- cards, run records, old folders (records/) --------------------------------------------------------
    M("one card, three renderers: HTML shows every table row", "table_html",
      "for c in r) + \"</tr>\" for r in t.rows)", "for c in r) + \"</tr>\" for r in t.rows[:-1])", "tests/test_card.py"),
    M("one card, three renderers: Markdown and HTML link a run they name", "_span",
      "    if s.run is not None and s.run in runs:", "    if False:", "tests/test_card.py"),
    M("the run record writes how a run ended when an exception ends it", "RunRecord.__exit__",
      "            if exc is not None and self.status is None and self.owns_status:", "            if False:",
      "tests/test_runrecord.py -k ended"),
    M("a failed test look leaves the run's status alone", "RunRecord.__exit__",
      "            if exc is not None and self.status is None and self.owns_status:",
      "            if exc is not None and self.status is None:", "tests/test_runrecord.py -k look_that_fails"),
    M("an old sweep file's members are found by name in the runs folder", "member_folder",
      "    return Path(root) / Path(m[\"run\"]).name", "    return Path(m[\"run\"])", "tests/test_old_runs.py"),
    M("a range test that stopped on divergence says so in its card", "range_test_setup",
      "{True: \"until the loss diverged\", False: \"without the loss diverging\"}",
      "{True: \"without the loss diverging\", False: \"until the loss diverged\"}", "tests/test_cli.py -k lr_find"),
    # -- the student's path (issue 40) ---------------------------------------------------------------------
    M("a run folder that does not exist is refused", "existing_run",
      "    if not p.is_dir():", "    if False:", "tests/test_student_path.py -k does_not_exist"),
    M("a damaged manifest is named in one sentence", "load_manifest",
      "    for key, kind in ((\"variant\", str), (\"classes\", list), (\"splits\", dict), (\"rejected\", int)):",
      "    for key, kind in ():", "tests/test_student_path.py -k damaged_manifest"),
    M("a spec's stages must be a list", "spec_from_dict", "        if not isinstance(stages, list):", "        if False:",
      "tests/test_student_path.py -k malformed_model_spec"),
    M("a range test with no usable range suggests nothing", "suggest",
      "    usable = low - lo >= 2 and smoothed[low] < smoothed[0]", "    usable = True",
      "tests/test_student_path.py -k too_high"),
    M("a run that never left its warm-up is not called underfitting", "RunKind.diagnose",
      "        if rows and len(every) <= warm:", "        if False:",
      "tests/test_student_path.py -k warm_up"),
    M("compare says better when the second run scores higher", "verdict",
      "conclusive ({'better' if d > 0 else 'worse'})", "conclusive ({'better' if d < 0 else 'worse'})",
      "tests/test_metrics.py -k comparison"),
    M("metrics.csv holds each value under its own header", "write_metrics_csv",
      "        w.writerow([\"\" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])",
      "        w.writerow([\"\"] + [\"\" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS][:-1])",
      "tests/test_metrics.py -k csv"),
    M("a second look with other weights is refused too", "evaluate_test_set",
      "        if result_path.is_file() and not again:", "        if result_path.is_file() and not again and which == \"best\":",
      "tests/test_testset.py -k other_weights"),
    M("a new epoch's meter still counts fp16 skips", "end_epoch",
      "st.epoch, st.step, st.meter = st.epoch + 1, 0, EpochMeter(rt.device, rt.scaler.is_enabled())",
      "st.epoch, st.step, st.meter = st.epoch + 1, 0, EpochMeter(rt.device)", "tests/test_train.py -k fp16_skips"),
    M("the table of runs shows the val top-1 of the weights that won (the EMA's)", "best_val",
      "    if oc.get(\"best_val_ema\", -1.0) >", "    if -1.0 >", "tests/test_testset.py -k ema_weights"),
    M("explore reads the images of the official zips", "images_of",
      "    for variant in (\"full\", \"256\"):", "    for variant in ():", "tests/test_student_path.py -k zips"),
    # -- runs and sweeps on SLURM (issue 41; their tests need tools/slurm.sh start) --------------------------
    M("run.json counts how often SLURM requeued the run", "scheduler_job",
      "\"requeues\": int(os.environ.get(\"SLURM_RESTART_COUNT\", \"0\"))", "\"requeues\": 0",
      "tests/test_slurm.py -k cut_twice"),
    M("the family card names a member that never started, with what to do", "_unfinished",
      "    return text(\"Not in the numbers: \", *who,", "    return text(\"\", *who,", "tests/test_slurm.py -k cancelled"),
    M("a parallel sweep runs its members side by side", "in_parallel",
      "        while waiting and len(running) < n:", "        while waiting and len(running) < 1:",
      "tests/test_parallel.py"),
    # -- the pixel-budget schedule and the evaluation budget ---------------------------------------------
    M("each epoch is planned at its own budget on the ramp", "EpochPlans.__call__",
      "            cfg = self.cfg if isinstance(self.cfg, PlanConfig) else self.cfg(epoch)",
      "            cfg = self.cfg if isinstance(self.cfg, PlanConfig) else self.cfg(0)",
      "tests/test_budget.py -k shapes_of_its_budget"),
    M("the test looks at the budget `evaluate` chose on validation", "budget_for_test",
      "    if chosen.get(\"key\") == key and chosen.get(\"chosen\"):", "    if False:",
      "tests/test_budget.py -k evaluate_chooses"),
    # -- slides (records/slides.py) ---------------------------------------------------------------------
    M("a picture keeps its aspect within the margins", "Deck.picture", "        scale = min(room_w / iw, room_h / ih)",
      "        scale = room_w / iw", "tests/test_slides.py -k aspect"),
    M("a text is measured as it wraps: a line breaks at a space only, not where two spans meet", "_units",
      "        mono, bold = s.style == \"code\", s.style == \"bold\"",
      "        mono, bold = s.style == \"code\", s.style == \"bold\"\n        units, width = units + [(width, 0.0)], 0.0",
      "tests/test_slides.py -k wraps"),
    M("a card that does not fit continues on another slide", "fit", "    fewest = min(len(lay) for _, lay in layouts)",
      "    fewest = 1", "tests/test_slides.py"),
    M("a mention of a run the deck shows jumps to its card", "Deck._jumps",
      "            if target is None or target is slide:", "            if True:", "tests/test_slides.py -k jumps"),
    M("a mention jumps to the card of the run it names", "Deck.card", "                self.cards.setdefault(number, s)",
      "                self.cards.setdefault(number, self.prs.slides[0])", "tests/test_slides.py -k jumps"),
    # -- configuration (config.py) ----------------------------------------------------------------------
    M("an unknown config key is an error", "merge",
      "            raise ConfigError(f\"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}\")",
      "            continue", "tests/test_config.py"),
    M("a choice outside its Literal is an error", "_Checked.__post_init__", "            if choices and v not in choices:",
      "            if False:", "tests/test_faults.py -k bad_config"),
    M("a number outside its range is an error", "_Checked.__post_init__", "            if key in RANGES:\n                _in_range(key, v)",
      "            pass", "tests/test_faults.py -k bad_config"),
]


def copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", ".gpu", "_work", "__pycache__", "demo", "runs", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


WHOLE = "-m 'not slow' -n 2 tests"  # the whole fast suite, on two processes (pytest -x stops it at the first failure)
TIMEOUT_S = 600


def definitions(src: str, prefix: str = "", tree=None):
    """(qualified name, source text) of every function, method and class in ``src``."""
    offsets = [0]
    for line in src.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    todo = [(tree or ast.parse(src), prefix)]
    while todo:
        node, pre = todo.pop()
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([ch.lineno] + [d.lineno for d in ch.decorator_list])
                yield pre + ch.name, src[offsets[first - 1]:offsets[ch.end_lineno]]
                todo.append((ch, pre + ch.name + "."))


def locate(repo: Path, where: str, old: str) -> tuple[Path | None, str]:
    """The file whose function (or method) ``where`` holds ``old``, and why not when it is not exactly one place: a
    mutant follows its function from module to module, so that a refactor that moves code breaks no anchor."""
    hits = [path for path in sorted((repo / "mame_fast").rglob("*.py"))
            for name, text in definitions(path.read_text()) if name == where for _ in range(text.count(old))]
    return (hits[0], "") if len(hits) == 1 else (None, f"STALE: the original text occurs {len(hits)} times in {where}")


def try_mutant(m: Mutant, repo: Path, tests: str | None = None) -> tuple[bool, float, str]:
    """(killed, seconds, detail) of one mutant, on its own copy of the repository, against its tests (or ``tests``)."""
    path, stale = locate(repo, m.where, m.old)
    if path is None:
        return False, 0.0, stale
    src = path.read_text()
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
             "| promise broken | where | tests | result | s |", "|---|---|---|---|---|"]
    for m, (k, s, detail) in zip(chosen, results):
        result = ("killed" + (f" by `{detail.removeprefix('FAILED ')}`" if args.whole else "")) if k else "**SURVIVED** " + detail
        lines.append(f"| {m.promise} | `{m.where}` | `{WHOLE if args.whole else m.tests}` | {result} | {s:.0f} |")
    survivors = [m.promise for m, (k, _, _) in zip(chosen, results) if not k]
    lines += ["", "Survivors: " + ("; ".join(survivors) if survivors else "none") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.only or args.whole:  # a whole-suite run is kept whatever it chose: it is the record of a first run
        name = f"mutants{'_whole' if args.whole else ''}_cpu{os.cpu_count()}_{dt.date.today().isoformat()}.md"
        (ROOT / "benchmarks" / "results" / name).write_text(text)
    sys.exit(0 if not survivors else 1)


if __name__ == "__main__":
    main()
