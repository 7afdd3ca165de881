"""Stage 2b: random access to the samples of one split of a shard folder, through the DALI index files.

Kept apart from decoding and augmentation (``pipeline.py``, ``pilloader.py``) so that a source can
change without touching them. Reading a sample is one slice of a memory-mapped tar: no tar parsing,
no Python-side decode. Everything that can be checked before training starts is checked here, each
failure naming the shard and what to do: no manifest, another variant, an empty or missing split, a
missing, stale or foreign index, a truncated or changed tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.format import ShardError, load_manifest, read_index, reindex_advice, sha256
from ..files import atomic_write_text


@dataclass
class Split:
    """One split of a shard folder: per-sample arrays plus where each JPEG lies."""

    folder: Path
    name: str
    classes: list[str]
    keys: list[str]
    files: list[str]
    labels: np.ndarray  # (n,) int64
    height: np.ndarray  # (n,) stored size
    width: np.ndarray
    shard: np.ndarray  # (n,) index into tars
    offset: np.ndarray  # (n,) byte offset of <key>.jpg in its tar
    size: np.ndarray
    tars: list[Path]
    variant: str

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # DataLoader workers get the arrays, and map the tars themselves
        state = self.__dict__.copy()
        state.pop("_maps", None)
        return state

    def jpeg(self, i: int) -> memoryview:
        """The encoded bytes of sample ``i`` (a zero-copy view into the mapped tar)."""
        maps = self.__dict__.setdefault("_maps", {})
        s = int(self.shard[i])
        if s not in maps:
            with open(self.tars[s], "rb") as f:
                maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        o = int(self.offset[i])
        return memoryview(maps[s])[o : o + int(self.size[i])]


def check_checksums(folder: Path, tars: list[tuple[Path, str]]) -> None:
    """Each tar's SHA-256 against the manifest, once per version of the file: a sample damaged inside an intact-looking
    tar (same size, flipped bytes in a JPEG's entropy-coded data) would otherwise train silently, the decoder only
    warning. The result is remembered per (path, size, modification time), in the shard folder when it is writable,
    else in ~/.cache/mame-fast/; a changed file is checked again. Costs one read of the split, once (about 1 s per
    GB on one core; benchmarks/results)."""
    memo_path = _memo_path(folder)
    memo = _read_memo(memo_path)
    changed = False
    for tar, want in tars:
        st = tar.stat()
        key = f"{tar.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if memo.get(key) == want:
            continue
        if sha256(tar) != want:
            raise ShardError(f"{tar}: its SHA-256 differs from the manifest: the file changed or is damaged (a corrupt sample "
                             f"would train silently). Check the folder with `mame-fast shard {folder} --verify` and re-shard.")
        memo[key], changed = want, True
    if changed:
        with contextlib.suppress(OSError):  # a memo that cannot be written costs a re-check next time, nothing else
            atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))


def _memo_path(folder: Path) -> Path:
    if os.access(folder, os.W_OK):
        return folder / ".checksums-verified.json"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mame-fast"
    cache.mkdir(parents=True, exist_ok=True)
    return cache / f"checksums-verified-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.json"


def _read_memo(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def open_split(folder: Path, split: str, res: str | None = None) -> Split:
    """Open and check a split; ``res`` ('full' or '256') is checked against the shards' variant."""
    folder = Path(folder)
    m = load_manifest(folder)
    variant = m["variant"]
    if res == "full" and variant != "full":
        raise ShardError(
            f"{folder}: these are '{variant}' shards (256x256, squashed by the official release); "
            f"--res full needs shards made with `mame-fast shard SRC --res full`"
        )
    if split not in m["splits"]:
        raise ShardError(f"{folder}: no '{split}' split here (it has {sorted(m['splits'])}); shard it with --splits")
    s = m["splits"][split]
    if s["count"] == 0:
        raise ShardError(f"{folder}: the '{split}' split is empty")
    keys = s["samples"]["key"]
    offset = np.zeros(len(keys), np.int64)
    size = np.zeros(len(keys), np.int64)
    tars = []
    pos = 0
    for sh in s["shards"]:
        tar, idx = folder / sh["tar"], folder / sh["idx"]
        if not tar.is_file():
            raise ShardError(f"{tar}: missing shard listed in the manifest; re-run `mame-fast shard` to restore it")
        if not idx.is_file():
            raise ShardError(f"{idx}: missing index for {tar.name}; {reindex_advice(folder)}")
        if tar.stat().st_size != sh["bytes"]:
            raise ShardError(
                f"{tar}: {tar.stat().st_size} bytes, the manifest says {sh['bytes']} (truncated or changed); "
                f"check it with `mame-fast shard {folder} --verify` and re-shard"
            )
        entries = read_index(idx)
        if len(entries) != sh["count"] or [e["__key__"] for e in entries] != keys[pos : pos + sh["count"]]:
            raise ShardError(f"{idx}: stale or foreign index (its samples differ from the manifest); {reindex_advice(folder)}")
        for i, e in enumerate(entries):
            if "jpg" not in e:
                raise ShardError(f"{idx}: sample {e['__key__']} has no .jpg component")
            offset[pos + i], size[pos + i] = e["jpg"]
        if entries and offset[pos + len(entries) - 1] + size[pos + len(entries) - 1] > sh["bytes"]:
            raise ShardError(f"{idx}: points past the end of {tar.name}; the index does not belong to this tar: "
                             f"{reindex_advice(folder)}")
        tars.append(tar)
        pos += sh["count"]
    check_checksums(folder, [(t, sh["sha256"]) for t, sh in zip(tars, s["shards"])])
    return Split(
        folder=folder, name=split, classes=m["classes"], keys=keys, files=s["samples"]["file"],
        labels=np.asarray(s["samples"]["label"], np.int64), height=np.asarray(s["samples"]["height"]),
        width=np.asarray(s["samples"]["width"]), shard=np.asarray(s["samples"]["shard"]), offset=offset,
        size=size, tars=tars, variant=variant,
    )
