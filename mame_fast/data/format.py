"""Stage 1c: the on-disk shard format, shared by the writer (``shard.py``) and the reader (``input/reader.py``).

A shard folder ``<out>/<variant>/`` holds, per split, ``<split>-NNNNNN.tar`` with ``<key>.jpg``, ``<key>.cls``
(class index as text, the webdataset convention), ``<key>.lbl`` (class index as 4-byte little-endian int32, so
DALI reads labels with ``dtypes=INT32`` and no Python callback) and ``<key>.json``; beside each tar its DALI
index ``<split>-NNNNNN.idx`` (the v1.2 format of DALI's ``wds2idx``); and ``manifest.json``, written last, so a
folder without it was never published. Keys replace dots in the file stem by underscores: webdataset and
DALI split a member name at its *first* dot, and 6,965 MAMe files are named like ``1980.266.jpeg``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import Expected

FORMAT = "mame-fast-shards"
FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes
EXTS = ("jpg", "cls", "lbl", "json")


class ShardError(Expected, ValueError):
    """Bad input or a bad shard folder; the message names the file and the problem."""


def safe_key(file: str) -> str:
    """Sample key from a MAMe file name: the stem with dots made underscores ('1980.266.jpeg' -> '1980_266')."""
    stem = file.rsplit(".", 1)[0]
    return stem.replace(".", "_").replace("/", "_")


def shard_name(split: str, index: int, ext: str = "tar") -> str:
    """``train-000003.tar``: the name of a split's shard ``index``."""
    return f"{split}-{index:06d}.{ext}"


def sample_members(rec: dict) -> list[tuple[str, bytes]]:
    key = rec["key"]
    return [
        (f"{key}.jpg", rec["jpg"]),
        (f"{key}.cls", str(rec["label"]).encode()),
        (f"{key}.lbl", int(rec["label"]).to_bytes(4, "little", signed=True)),
        (f"{key}.json", json.dumps(rec["json"], sort_keys=True).encode()),
    ]


def index_line(members: list[tuple[str, int, int]]) -> str:
    """One sample's line of a DALI v1.2 index: ``ext offset size name`` per member."""
    return " ".join(f"{name.split('.', 1)[1]} {off} {size} {name}" for name, off, size in members)


def index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"


def read_index(idx: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI v1.2 index: per sample, {ext: (offset, size)} plus '__key__'."""
    redo = reindex_advice(idx.parent)
    lines = idx.read_text(errors="replace").splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{idx}:1: not the header of a DALI {INDEX_VERSION} index file; {redo}")
    n = int(head[1])
    samples = []
    for lineno, line in enumerate(lines[1 : n + 1], 2):
        f = line.split()
        try:
            if not f or len(f) % 4:
                raise ValueError
            comp = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
        except ValueError:
            raise ShardError(f"{idx}:{lineno}: damaged line (not groups of 'ext offset size name'); {redo}") from None
        samples.append(dict(comp, __key__=f[3].split(".", 1)[0]))
    if len(samples) != n:
        raise ShardError(f"{idx}: header says {n} samples, file has {len(samples)}; the index is truncated; {redo}")
    return samples


def reindex_advice(folder: Path) -> str:
    """What to do about a damaged, stale or missing index: rewrite it from its tar (``shard.reindex``)."""
    return f"rewrite the folder's indexes from their tars with `mame-fast shard {folder} --reindex`"


def index_from_tar(tar: Path) -> str:
    """The DALI index of a shard, read from the tar's headers: what the writer wrote beside it (and what DALI's wds2idx
    writes), byte for byte. Members are grouped into samples by their key, the name up to its first dot."""
    import tarfile

    lines, members, key = [], [], None
    with tarfile.open(tar) as tf:
        for m in tf:
            if not m.isfile():
                continue
            k = m.name.split(".", 1)[0]
            if k != key and members:
                lines.append(index_line(members))
                members = []
            key = k
            members.append((m.name, m.offset_data, m.size))
    if members:
        lines.append(index_line(members))
    return index_text(lines)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_shards(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ShardError(
            f"{folder}: no manifest.json; this is not a complete shard folder. Run `mame-fast shard` "
            f"(again: it resumes) to finish it."
        )
    redo = "run the same `mame-fast shard` command again: it keeps the complete shards and rewrites the manifest"
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: damaged ({'empty' if not path.read_bytes().strip() else f'not JSON: {e}'}); {redo}") \
            from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path}: not a mame-fast shard manifest (no \"format\": {FORMAT!r}); {redo}")
    # The fields the loaders and `shard --verify` read, each of the type they expect.
    for key, kind in (("variant", str), ("classes", list), ("splits", dict), ("rejected", int)):
        if not isinstance(m.get(key), kind):
            raise ShardError(f"{path}: field {key!r} is {'missing' if key not in m else f'not a {kind.__name__}'}: the "
                             f"manifest is damaged; {redo}")
    for split, v in m["splits"].items():
        for key, kind in (("count", int), ("shards", list), ("samples", dict)):
            if not isinstance(v, dict) or not isinstance(v.get(key), kind):
                raise ShardError(f"{path}: field splits.{split}.{key} is missing or not a {kind.__name__}: the manifest is "
                                 f"damaged; {redo}")
    return m
