"""Stage 1a: where the original images come from: a MAMe folder or the official zips, read in place.

A source answers two questions: the metadata bytes (the CSVs) and the bytes of one image of one
variant (``full`` reads ``data/``, ``256`` reads ``data_256/``). The zips are read member by member
without unpacking: the official ``MAMe_data.zip`` is ~70 GB, a second copy on disk is not an option.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ..errors import Expected
from . import metadata as md

VARIANT_DIRS = {"full": "data", "256": "data_256"}
VARIANT_ZIPS = {"full": "MAMe_data.zip", "256": "MAMe_data_256.zip"}


class SourceError(Expected, ValueError):
    """The source folder is unusable; the message names the path and what to do."""


def metadata_bytes(root: Path, name: str) -> bytes:
    """One of the official CSVs of a MAMe root, loose or inside MAMe_metadata.zip."""
    loose = Path(root) / name
    if loose.is_file():
        return loose.read_bytes()
    zpath = Path(root) / "MAMe_metadata.zip"
    if zpath.is_file():
        with zipfile.ZipFile(zpath) as z:
            for m in z.namelist():
                if os.path.basename(m) == name:
                    return z.read(m)
    raise SourceError(f"{root}: {name} not found (neither loose nor in MAMe_metadata.zip)")


def read_metadata(root: Path) -> md.Metadata:
    """The metadata of a MAMe root (loose CSVs or the official zip), whether or not its images are there."""
    return md.load(metadata_bytes(root, md.DATASET_CSV), metadata_bytes(root, md.LABELS_CSV), str(root))


class Source:
    """A MAMe root: metadata CSVs (loose or in MAMe_metadata.zip) plus images (folder or zip)."""

    def __init__(self, root: Path, variant: str):
        self.root = Path(root)
        self.variant = variant
        if variant not in VARIANT_DIRS:
            raise SourceError(f"unknown variant {variant!r}; use one of {list(VARIANT_DIRS)}")
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a folder (give the MAMe root or the folder with the official zips)")
        self._zip: zipfile.ZipFile | None = None
        self._zip_names: dict[str, str] | None = None
        folder = self.root / VARIANT_DIRS[variant]
        zpath = self.root / VARIANT_ZIPS[variant]
        if folder.is_dir():
            self.kind, self.images = "folder", folder
        elif zpath.is_file():
            self.kind, self.images = "zip", zpath
        else:
            raise SourceError(
                f"{self.root}: neither {VARIANT_DIRS[variant]}/ nor {VARIANT_ZIPS[variant]} is here; "
                f"download the official {VARIANT_ZIPS[variant]} (README: 'Real MAMe data') or pick the other --res"
            )

    def __getstate__(self):
        # Open zip handles don't pickle; each worker process opens its own.
        state = self.__dict__.copy()
        state["_zip"] = None
        return state

    def metadata_bytes(self, name: str) -> bytes:
        return metadata_bytes(self.root, name)

    def metadata(self) -> md.Metadata:
        return read_metadata(self.root)

    def _names(self) -> dict[str, str]:
        if self._zip_names is None:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.images)
            # Members are 'data/<file>' in the official zip; map by base name to be lenient on the prefix.
            self._zip_names = {os.path.basename(n): n for n in self._zip.namelist() if not n.endswith("/")}
        return self._zip_names

    def path(self, file: str) -> str:
        """A human-readable location of one image, for messages."""
        return f"{self.images}/{file}" if self.kind == "folder" else f"{self.images}!{VARIANT_DIRS[self.variant]}/{file}"

    def missing(self, files: list[str]) -> list[str]:
        """The files of ``files`` that this source does not have."""
        if self.kind == "folder":
            present = set(os.listdir(self.images))
        else:
            present = set(self._names())
        return [f for f in files if f not in present]

    def read(self, file: str) -> bytes:
        if self.kind == "folder":
            return (self.images / file).read_bytes()
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.images)
        return self._zip.read(self._names()[file])
