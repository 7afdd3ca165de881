"""Stage 1b: variable-shape MAMe images -> WebDataset tar shards + DALI index files + manifest.

Why shards: the training loop reads a few large sequential files with an index instead of 20k small
files, and every reader (DALI ``fn.readers.webdataset``, ``webdataset``, ``tar``) understands them.

Layout written under ``<out>/<variant>/`` (variant ``full`` or ``256``)::

    train-000000.tar  train-000000.idx  ...  val-000000.tar ...  manifest.json  [rejects.jsonl]

Each sample is ``<key>.jpg`` (original bytes when no resize/conversion is needed, else re-encoded),
``<key>.cls`` (class index as text, the webdataset convention), ``<key>.lbl`` (class index as 4-byte
little-endian int32, so DALI reads labels with ``dtypes=INT32`` and no Python callback) and
``<key>.json``. Keys replace dots in the file stem by underscores: webdataset and DALI split a member
name at its *first* dot and 6,965 MAMe files are named like ``1980.266.jpeg``.

Guarantees: sample order within a split is a seeded shuffle; same input + settings give byte-identical
shards (fixed tar headers, ordered parallel map); shards are written under a temporary name and renamed
when complete, so an interrupted run leaves no partial shard and rerunning resumes after the last
complete one; ``manifest.json`` is written last, so a folder without it was never published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .. import __version__
from ..files import atomic_write_text, ignore_stop_signals, mp_context, stop_signals_held, terminate_pool
from . import metadata as md
from .format import (
    EXTS,
    FORMAT,
    FORMAT_VERSION,
    ShardError,
    index_from_tar,
    index_line,
    index_text,
    load_manifest,
    read_index,
    safe_key,
    sample_members,
    sha256,
    shard_name,
    split_shards,
)
from .source import Source

# Decoding a non-JPEG cannot be scaled in the DCT domain; above this a full decode needs > 1 GB.
MAX_FULL_DECODE_PIXELS = 200_000_000


class BadImage(ShardError):
    pass


@dataclass(frozen=True)
class ShardSettings:
    """What ``mame-fast shard`` does; all of it is recorded in the manifest."""

    variant: str = "full"
    """'full' (data/, downscaled to the budget) or '256' (data_256/, as is)."""
    max_pixels: int | None = 1_000_000
    """Pixel budget per stored image (never upscaled); None keeps the original size."""
    max_side: int | None = None
    """Alternative budget: longest side in pixels."""
    quality: int = 90
    """JPEG quality for re-encoded images."""
    shard_size_mb: float = 128.0
    """A shard is closed once it holds this many MB."""
    splits: tuple[str, ...] = ("train", "val", "test")
    seed: int = 0
    """Seed of the within-split sample order."""
    skip_bad: bool = False
    """Skip (and list in rejects.jsonl) unusable images instead of failing."""

    def __post_init__(self) -> None:
        checks = {"variant": self.variant in ("full", "256"), "max_pixels": self.max_pixels is None or self.max_pixels >= 1,
                  "max_side": self.max_side is None or self.max_side >= 1, "quality": 1 <= self.quality <= 100,
                  "shard_size_mb": self.shard_size_mb > 0,
                  "splits": bool(self.splits) and set(self.splits) <= {"train", "val", "test"}}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ShardError(f"shard settings: {bad[0]}={getattr(self, bad[0])!r} is out of range (variant full or 256; sizes at "
                             f"least 1; quality 1-100; splits among train, val, test); nothing was written")


def target_size(w: int, h: int, max_pixels: int | None, max_side: int | None) -> tuple[int, int]:
    """The stored size under the budget: aspect kept to +-1 px, never upscaled."""
    k = 1.0
    if max_pixels:
        k = min(k, math.sqrt(max_pixels / (w * h)))
    if max_side:
        k = min(k, max_side / max(w, h))
    if k >= 1.0:
        return w, h
    # Floor, not round: w*k * h*k equals the budget, so flooring both never exceeds it and each side
    # stays within 1 px of the exact scaled size (rounding both can overshoot by a row).
    tw, th = max(1, math.floor(w * k + 1e-9)), max(1, math.floor(h * k + 1e-9))
    return tw, th


def prepare_image(data: bytes, name: str, settings: ShardSettings) -> tuple[bytes, int, int, str | None]:
    """Decode-check, orient, convert and downscale one image; returns (jpeg, width, height, note).

    ``note`` says what conversion happened (None when the original bytes are kept). Raises BadImage
    with the file name and the problem for anything unusable.
    """
    if not data:
        raise BadImage(f"{name}: zero-byte file")
    Image.MAX_IMAGE_PIXELS = None  # we bound memory ourselves: DCT scaling, or the check below
    try:
        img = Image.open(io.BytesIO(data))
        fmt, mode = img.format, img.mode
        w0, h0 = img.size
    except Exception as e:  # PIL raises a zoo of types for corrupt headers
        raise BadImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    orientation = img.getexif().get(0x0112, 1) if fmt == "JPEG" else 1
    swapped = orientation in (5, 6, 7, 8)
    ow, oh = (h0, w0) if swapped else (w0, h0)
    tw, th = target_size(ow, oh, settings.max_pixels, settings.max_side)
    notes = []
    if fmt != "JPEG":
        notes.append(f"{fmt} data under a .jpg name")
    if mode not in ("RGB",):
        notes.append(f"mode {mode} converted to RGB")
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    resize = (tw, th) != (ow, oh)
    try:
        if fmt == "JPEG":
            # DCT-domain downscaling: libjpeg decodes straight to 1/2, 1/4 or 1/8 scale, so an 8 or 373 Mpx
            # original is never fully decoded. Without resize, decode at 1/8 just to check integrity.
            req = (tw, th) if resize else (max(1, ow // 8), max(1, oh // 8))
            img.draft("RGB" if mode != "CMYK" else None, (req[1], req[0]) if swapped else req)
        elif w0 * h0 > MAX_FULL_DECODE_PIXELS:
            raise BadImage(f"{name}: {fmt} of {w0}x{h0} is too large to decode without DCT scaling")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"{name}: corrupt or truncated {fmt} ({type(e).__name__}: {e})") from e
    if not notes and not resize:
        return data, ow, oh, None
    img = _to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    if img.size != (tw, th):
        img = _resize(img, tw, th)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=settings.quality)
    return buf.getvalue(), tw, th, "; ".join(notes) or None


def _resize(img: Image.Image, w: int, h: int) -> Image.Image:
    """Antialiased bicubic downscale with torch's vectorized uint8 kernel.

    Same result as PIL's BICUBIC (mean difference < 0.01 grey level on a 2 Mpx image) at ~1/2.5 of
    its time, and ~1/3.5 of LANCZOS; after DCT-domain decoding, the resize is the largest cost left.
    It is the call torchvision's ``resize`` makes for a uint8 image on a CPU (bit for bit the same pixels), without
    importing torchvision, which doubles a shard process's start-up.
    """
    import torch

    # N=1 over HWC memory, its batch stride the whole image: unambiguously channels-last, the fast path, and the
    # output is allocated channels-last too (a batch stride of 3 would give a contiguous one, pytorch#68430).
    a = torch.from_numpy(np.array(img))[None].permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(a, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return Image.fromarray(out[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one image per process: threads inside a worker only oversubscribe
    ignore_stop_signals()  # a Ctrl-C stops the parent, which terminates the pool


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) gray: scale to 8 bits by the actual range, not by clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas over white, as a museum photograph's background would be.
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Worker side


def _work(job: tuple) -> dict:
    source, settings, file, label, row_meta = job
    try:
        data = source.read(file)
        jpg, w, h, note = prepare_image(data, source.path(file), settings)
    except BadImage as e:
        return {"file": file, "error": str(e)}
    except OSError as e:
        return {"file": file, "error": f"{source.path(file)}: cannot read ({e})"}
    meta = dict(row_meta, width=w, height=h, converted=note)
    return {"file": file, "key": safe_key(file), "label": label, "jpg": jpg, "json": meta}


# ---------------------------------------------------------------------------------------------------
# Tar writing with the DALI index


def _member(tf: tarfile.TarFile, name: str, payload: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed headers: byte-identical shards for identical input
    info.mode = 0o444
    info.uname = info.gname = ""
    header_at = tf.offset
    tf.addfile(info, io.BytesIO(payload))
    return header_at + tarfile.BLOCKSIZE, len(payload)  # USTAR names < 100 chars: one header block


class ShardWriter:
    """Writes one split's shards; each shard becomes visible only when complete (tmp + rename)."""

    def __init__(self, folder: Path, split: str, start_index: int, max_bytes: int):
        self.folder, self.split, self.index, self.max_bytes = folder, split, start_index, max_bytes
        self.tf: tarfile.TarFile | None = None
        self.lines: list[str] = []

    def _name(self, ext: str) -> Path:
        return self.folder / shard_name(self.split, self.index, ext)

    def add(self, rec: dict) -> None:
        try:
            if self.tf is None:
                self.tf = tarfile.open(self._name("tar.tmp"), "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115  (open across add() calls)
                self.lines = []
            self.lines.append(index_line([(name, *_member(self.tf, name, payload)) for name, payload in sample_members(rec)]))
            if self.tf.offset >= self.max_bytes:
                self.close()
        except OSError as e:  # a failed write names no file (a full disk): name the shard being written
            raise OSError(e.errno, e.strerror, e.filename or str(self._name("tar"))) from e

    def close(self) -> None:
        if self.tf is None:
            return
        self.tf.close()
        self.tf = None
        atomic_write_text(self._name("idx"), index_text(self.lines))
        # The tar is renamed last: a visible .tar always has its .idx beside it.
        os.replace(self._name("tar.tmp"), self._name("tar"))
        self.index += 1

    def abort(self) -> None:
        """Drop the shard being written. Closing may fail again (a full disk fails the tar's last write): the
        temporary files are removed whatever happens, and the original error is the one that propagates."""
        tf, self.tf = self.tf, None
        try:
            if tf is not None:
                with contextlib.suppress(OSError):
                    tf.close()
        finally:
            with contextlib.suppress(OSError):
                self._name("tar.tmp").unlink(missing_ok=True)


def _read_done_shard(tar: Path) -> list[dict]:
    """Records (without image bytes) of a complete shard left by an earlier run."""
    out = []
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.name.endswith(".json"):
                meta = json.loads(tf.extractfile(m).read())
                out.append({"key": m.name[: -len(".json")], "label": meta["label"], "json": meta})
    return out


# ---------------------------------------------------------------------------------------------------
# The command


def plan_split(meta: md.Metadata, split: str, seed: int) -> list[md.Row]:
    rows = meta.split(split)
    order = np.random.default_rng([seed, md.SPLITS.index(split)]).permutation(len(rows))
    return [rows[i] for i in order]


def preflight(source: Source, meta: md.Metadata, settings: ShardSettings) -> list[dict]:
    """Cheap checks before anything is written: keys unique, files present and non-empty."""
    rows = [r for r in meta.rows if r.subset in settings.splits]
    if not rows:
        raise ShardError(f"{source.root}: no rows for splits {settings.splits} in {md.DATASET_CSV}")
    keys: dict[str, str] = {}
    for r in rows:
        k = safe_key(r.file)
        if k in keys:
            raise ShardError(f"{source.root}: files {keys[k]!r} and {r.file!r} map to the same key {k!r}")
        keys[k] = r.file
    bad = [{"file": f, "error": f"{source.path(f)}: missing image file"} for f in source.missing([r.file for r in rows])]
    if source.kind == "folder":
        missing = {b["file"] for b in bad}
        bad += [
            {"file": r.file, "error": f"{source.path(r.file)}: zero-byte file"}
            for r in rows
            if r.file not in missing and (source.images / r.file).stat().st_size == 0
        ]
    if bad and not settings.skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ShardError(f"{bad[0]['error']}{more}; nothing was written. Fix the source or pass --skip-bad.")
    return bad


def write_shards(src: Path, out: Path, settings: ShardSettings, workers: int = 1, progress=None) -> Path:
    """Shard ``src`` into ``out/<variant>/``; returns that folder. Resumes an interrupted run."""
    source = Source(src, settings.variant)
    meta = source.metadata()
    folder = Path(out) / settings.variant
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, settings)
    rejects = preflight(source, meta, settings)
    # Imported once here (~2 s), so that forked workers don't each pay for it on their first image.
    import torch  # noqa: F401

    with stop_signals_held():
        pool = mp_context().Pool(workers, initializer=_worker_init) if workers > 1 else None
    try:
        splits = {split: shard_split(folder, split, source, meta, settings, pool, rejects, progress) for split in settings.splits}
    finally:
        if pool:
            terminate_pool(pool)
    if rejects:
        atomic_write_text(folder / "rejects.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    else:
        (folder / "rejects.jsonl").unlink(missing_ok=True)
    _write_manifest(folder, src, source, meta, settings, splits, len(rejects))
    return folder


def shard_split(folder: Path, split: str, source: Source, meta: md.Metadata, settings: ShardSettings, pool, rejects: list[dict],
                progress=None) -> dict:
    """One split's shards, after those an earlier run completed; unusable images fail (or join ``rejects``)."""
    rejected = {b["file"] for b in rejects}
    rows = [r for r in plan_split(meta, split, settings.seed) if r.file not in rejected]
    done_recs, todo = _resume_point(folder, split, rows)
    writer = ShardWriter(folder, split, len(split_shards(folder, split)), int(settings.shard_size_mb * 2**20))
    jobs = [(source, settings, r.file, meta.label(r), _sample_meta(meta, r, split)) for r in todo]
    if progress:
        progress(split, None, len(jobs))  # announce the split's size: the bar gets an ETA
    results = pool.imap(_work, jobs, chunksize=2) if pool else map(_work, jobs)
    new_recs: list[dict] = []
    try:
        for rec in results:
            if progress:
                progress(split, rec, len(jobs))
            if "error" in rec:
                if not settings.skip_bad:
                    raise ShardError(f"{rec['error']}; no manifest was written. Fix it or pass --skip-bad.")
                rejects.append(rec)
                continue
            writer.add(rec)
            new_recs.append({k: rec[k] for k in ("key", "label", "json")})
        writer.close()
    except BaseException:
        writer.abort()  # no partial shard survives, complete ones stay for the resume
        raise
    return _split_summary(folder, split, done_recs + new_recs, meta.classes)


def _resume_point(folder: Path, split: str, rows: list[md.Row]) -> tuple[list[dict], list[md.Row]]:
    """Records of the split's complete shards, and the rows still to write. Complete shards hold the deterministic order
    up to their last sample (minus samples rejected under --skip-bad); anything else means another source or seed."""
    done_recs = [rec for tar in split_shards(folder, split) for rec in _read_done_shard(tar)]
    pos = {safe_key(r.file): i for i, r in enumerate(rows)}
    done_pos = [pos.get(r["key"], -1) for r in done_recs]
    if done_pos and (min(done_pos) < 0 or done_pos != sorted(set(done_pos))):
        raise ShardError(f"{folder}: existing {split} shards do not match this source and seed; use a new --out")
    return done_recs, rows[done_pos[-1] + 1 :] if done_pos else rows


def _sample_meta(meta: md.Metadata, r: md.Row, split: str) -> dict:
    """The ``<key>.json`` of a sample (its size fields are added once the image is prepared)."""
    return {"file": r.file, "class": r.medium, "label": meta.label(r), "museum": r.museum, "instance_id": r.instance_id,
            "orig_width": r.width, "orig_height": r.height, "aspect": round(r.width / r.height, 4), "split": split}


def reader_lists(folder: Path, variant: str, splits: dict) -> None:
    """Shard lists other tools read as they are: ``<split>.wids.json`` (wids' ShardListDataset: random access by index)
    and ``_info.json`` (timm's ``--dataset wds/...`` reader), with each shard's sample count, names relative to the
    folder."""
    info = {"name": f"mame-{variant}", "splits": {}}
    for split, s in splits.items():
        names, counts = [sh["tar"] for sh in s["shards"]], [sh["count"] for sh in s["shards"]]
        wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"mame-{variant}-{split}",
                "shardlist": [{"url": n, "nsamples": c} for n, c in zip(names, counts)]}
        atomic_write_text(folder / f"{split}.wids.json", json.dumps(wids, indent=1))
        info["splits"][split] = {"name": split, "num_samples": s["count"], "filenames": names, "shard_lengths": counts}
    atomic_write_text(folder / "_info.json", json.dumps(info, indent=1))


def _write_manifest(folder: Path, src: Path, source: Source, meta: md.Metadata, settings: ShardSettings, splits: dict,
                    rejected: int) -> None:
    """The readers' lists of shards (``reader_lists``), then manifest.json, written last: a folder without it was never
    published."""
    reader_lists(folder, settings.variant, splits)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"mame-fast {__version__}",
        "variant": settings.variant, "settings": dataclasses.asdict(settings),
        "source": {"path": str(Path(src).resolve()), "kind": source.kind,
                   "dataset_csv_sha256": hashlib.sha256(source.metadata_bytes(md.DATASET_CSV)).hexdigest()},
        "classes": meta.classes, "rejected": rejected, "splits": splits,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))


def _split_summary(folder: Path, split: str, recs: list[dict], classes: list[str]) -> dict:
    shards = []
    shard_of = []
    for i, tar in enumerate(split_shards(folder, split)):
        idx = tar.with_suffix(".idx")
        n = len(read_index(idx))
        shards.append({"tar": tar.name, "idx": idx.name, "count": n, "bytes": tar.stat().st_size, "sha256": sha256(tar)})
        shard_of += [i] * n
    if len(shard_of) != len(recs):
        raise ShardError(f"{folder}: {split} shards hold {len(shard_of)} samples but {len(recs)} were written")
    per_class = {c: 0 for c in classes}
    for r in recs:
        per_class[classes[r["label"]]] += 1
    return {
        "count": len(recs),
        "per_class": per_class,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        # Column-wise so that a 20k-sample split stays a small file that the loader reads in one go.
        "samples": {
            "key": [r["key"] for r in recs],
            "file": [r["json"]["file"] for r in recs],
            "label": [r["label"] for r in recs],
            "width": [r["json"]["width"] for r in recs],
            "height": [r["json"]["height"] for r in recs],
            "shard": shard_of,
        },
        "converted": {r["json"]["file"]: r["json"]["converted"] for r in recs if r["json"].get("converted")},
    }


def _check_settings(folder: Path, settings: ShardSettings) -> None:
    """Refuse to resume into a folder that was started with other settings (shards would mix)."""
    stamp = folder / ".settings.json"
    mine = json.dumps({k: v for k, v in dataclasses.asdict(settings).items() if k != "skip_bad"}, sort_keys=True)
    if stamp.exists() and stamp.read_text() != mine:
        raise ShardError(
            f"{folder}: holds shards made with other settings ({stamp.read_text()}); use another --out or delete it"
        )
    atomic_write_text(stamp, mine)


# ---------------------------------------------------------------------------------------------------
# Verification


def reindex(folder: Path) -> list[Path]:
    """Rewrite every index of a shard folder that differs from its tar's (missing, damaged, stale, foreign), from the
    tar, once the tar is checked against the manifest's SHA-256: an index can be rebuilt, a damaged tar cannot. Returns
    the indexes rewritten."""
    folder = Path(folder)
    m = load_manifest(folder)
    shards = [sh for s in m["splits"].values() for sh in s["shards"]]
    for sh in shards:  # every tar first: nothing is rewritten in a folder whose shards are damaged
        tar = folder / sh["tar"]
        if not tar.is_file() or sha256(tar) != sh["sha256"]:
            raise ShardError(f"{tar}: {'missing' if not tar.is_file() else 'its bytes differ from the manifest'}; its index "
                             f"cannot be rebuilt from it. Delete the shard folder and shard again.")
    rewritten = []
    for sh in shards:
        idx, text = folder / sh["idx"], index_from_tar(folder / sh["tar"])
        if not idx.is_file() or idx.read_text(errors="replace") != text:
            atomic_write_text(idx, text)
            rewritten.append(idx)
    return rewritten


def verify(folder: Path) -> list[str]:
    """Re-read every shard against the manifest and the index; returns the problems found (empty: OK). Each shard is
    compared with its own slice of the manifest, so one damaged shard does not make the ones after it look wrong."""
    folder = Path(folder)
    m = load_manifest(folder)
    problems: list[str] = []
    for split, s in m["splits"].items():
        samples, pos = s["samples"], 0
        for sh in s["shards"]:
            rows = [{k: samples[k][i] for k in ("key", "label", "width", "height")} for i in range(pos, pos + sh["count"])]
            problems += _verify_shard(folder, sh, rows)
            pos += sh["count"]
        if len(samples["key"]) > pos:
            problems.append(f"{folder}: manifest lists more {split} samples than the shards hold")
    return problems


def _verify_shard(folder: Path, sh: dict, rows: list[dict]) -> list[str]:
    """The problems of one shard: checksum, index against tar and manifest, labels, image sizes."""
    tar, idx = folder / sh["tar"], folder / sh["idx"]
    if not tar.is_file() or not idx.is_file():
        return [f"{tar}: missing tar or index"]
    problems = [] if sha256(tar) == sh["sha256"] else [f"{tar}: checksum differs from the manifest (file changed or corrupt)"]
    try:
        index = read_index(idx)
        data = tar.read_bytes()
        with tarfile.open(tar) as tf:
            members = {mm.name: (mm.offset_data, mm.size) for mm in tf if mm.isfile()}
    except (ShardError, tarfile.TarError, OSError) as e:
        return problems + [f"{tar}: unreadable ({e})"]
    for ent, row in zip(index, rows):
        key = row["key"]
        if ent["__key__"] != key:
            problems.append(f"{idx}: sample {ent['__key__']} where the manifest has {key}")
            continue
        problems += [f"{idx}: offset/size of {key}.{ext} does not match the tar" for ext in EXTS
                     if members.get(f"{key}.{ext}") != ent.get(ext)]
        off, size = ent["lbl"]
        if int.from_bytes(data[off : off + size], "little") != row["label"]:
            problems.append(f"{tar}: {key}.lbl differs from the manifest label {row['label']}")
        off, size = ent["jpg"]
        try:
            with Image.open(io.BytesIO(data[off : off + size])) as im:
                if im.size != (row["width"], row["height"]):
                    problems.append(f"{tar}: {key}.jpg is {im.size}, manifest says {(row['width'], row['height'])}")
        except Exception as e:  # any failure to open is what we report
            problems.append(f"{tar}: {key}.jpg does not open ({e})")
    if len(index) != len(rows):
        problems.append(f"{idx}: {len(index)} samples where the manifest has {len(rows)}")
    return problems
