"""Stage 0: the MAMe metadata (official CSVs) read into typed rows, with the pitfalls handled.

Everything downstream (sample generation, sharding, exploration, bucketing tests) reads the metadata
through this module, so a CSV quirk is handled once: a UTF-8 BOM, CRLF line ends, float sizes, and
the class spelled ``"Woven fabric "`` in ``MAMe_dataset.csv`` but ``Woven fabric`` in
``MAMe_labels.csv`` (matching without stripping silently loses that class).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import Expected

DATASET_CSV = "MAMe_dataset.csv"
LABELS_CSV = "MAMe_labels.csv"
TOY_CSV = "MAMe_toy_dataset.csv"
COLUMNS = (
    "Image file",
    "Medium",
    "Museum",
    "Museum-based instance ID",
    "Subset",
    "Width",
    "Height",
    "Product size",
    "Aspect ratio",
)
SPLITS = ("train", "val", "test")
# Written back as the official file spells it, so generated samples carry the same pitfall.
OFFICIAL_SPELLING = {"Woven fabric": "Woven fabric "}


class MetadataError(Expected, ValueError):
    """A metadata file is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class Row:
    """One image of MAMe as the official metadata describes it."""

    file: str
    medium: str
    museum: str
    instance_id: str
    subset: str
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def vendored_dir() -> Path:
    """The folder holding the unchanged official CSVs shipped with the package."""
    return Path(str(resources.files("mame_fast.data") / "vendored"))


def _read_text(data: bytes, source: str) -> str:
    try:
        # utf-8-sig drops a BOM if there is one; newline handling is left to the csv module.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{source}: not UTF-8 text ({e})") from e


def parse_labels(data: bytes, source: str) -> list[str]:
    """Class names by index from ``MAMe_labels.csv`` (no header, ``index,name`` lines)."""
    names: dict[int, str] = {}
    for lineno, rec in enumerate(csv.reader(io.StringIO(_read_text(data, source), newline="")), 1):
        if not rec or all(not f.strip() for f in rec):
            continue
        if len(rec) != 2 or not rec[0].strip().isdigit():
            raise MetadataError(f"{source}:{lineno}: expected 'index,name', got {rec!r}")
        idx, name = int(rec[0]), rec[1].strip()
        if idx in names:
            raise MetadataError(f"{source}:{lineno}: class index {idx} appears twice")
        names[idx] = name
    if sorted(names) != list(range(len(names))) or not names:
        raise MetadataError(f"{source}: class indices must be 0..N-1 without gaps, got {sorted(names)}")
    classes = [names[i] for i in range(len(names))]
    if len(set(classes)) != len(classes):
        raise MetadataError(f"{source}: a class name appears twice")
    return classes


def parse_dataset(data: bytes, source: str) -> list[Row]:
    """Rows of ``MAMe_dataset.csv`` (or the toy CSV), validated column by column."""
    reader = csv.DictReader(io.StringIO(_read_text(data, source), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise MetadataError(f"{source}: missing column(s) {missing}; header is {header}")
    reader.fieldnames = header
    rows: list[Row] = []
    for lineno, rec in enumerate(reader, 2):
        # csv.DictReader fills missing fields with None and puts extra ones under the key None.
        if None in rec or any(v is None for v in rec.values()):
            got = len([v for k, v in rec.items() if k is not None and v is not None]) + len(rec.get(None) or [])
            raise MetadataError(f"{source}:{lineno}: {got} field(s) where the header has {len(header)}; fix or remove the row")
        sizes = {}
        for column in ("Width", "Height"):  # the two numbers: name the column, the value and the image it belongs to
            try:
                sizes[column] = int(float(rec[column]))
            except ValueError:
                raise MetadataError(f"{source}:{lineno}: column {column} is {rec[column].strip()!r}, not a number of "
                                    f"pixels (image {rec['Image file'].strip() or '?'}); fix the value or remove the "
                                    f"row") from None
        row = Row(file=rec["Image file"].strip(), medium=rec["Medium"].strip(), museum=rec["Museum"].strip(),
                  instance_id=rec["Museum-based instance ID"].strip(), subset=rec["Subset"].strip(),
                  width=sizes["Width"], height=sizes["Height"])
        if row.subset not in SPLITS:
            raise MetadataError(f"{source}:{lineno}: Subset {row.subset!r} is not one of {SPLITS}")
        if not row.file:
            raise MetadataError(f"{source}:{lineno}: column Image file is empty; fix or remove the row")
        if row.width <= 0 or row.height <= 0:
            raise MetadataError(f"{source}:{lineno}: image {row.file} has size {row.width}x{row.height} (columns Width, "
                                f"Height); sizes are positive: fix the values or remove the row")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Metadata:
    """The dataset rows and the class list, checked against each other."""

    rows: list[Row]
    classes: list[str]
    source: str

    def label(self, row: Row) -> int:
        return self.classes.index(row.medium)

    def split(self, subset: str) -> list[Row]:
        return [r for r in self.rows if r.subset == subset]


def check(rows: list[Row], classes: list[str], source: str) -> None:
    """Every class known and every file name unique; raises naming the offending rows."""
    known = set(classes)
    unknown = sorted({r.medium for r in rows if r.medium not in known})
    if unknown:
        example = next(r.file for r in rows if r.medium == unknown[0])
        raise MetadataError(
            f"{source}: class(es) {unknown} not in {LABELS_CSV} (e.g. row of {example}); "
            f"known classes: {classes}"
        )
    seen: set[str] = set()
    for r in rows:
        if r.file in seen:
            raise MetadataError(f"{source}: duplicate file name {r.file!r}")
        seen.add(r.file)


def load(dataset: bytes, labels: bytes, source: str) -> Metadata:
    classes = parse_labels(labels, f"{source}/{LABELS_CSV}")
    rows = parse_dataset(dataset, f"{source}/{DATASET_CSV}")
    check(rows, classes, f"{source}/{DATASET_CSV}")
    return Metadata(rows=rows, classes=classes, source=source)


def load_dir(folder: Path | None = None) -> Metadata:
    """Metadata from a folder holding the official CSVs (default: the vendored copy)."""
    folder = Path(folder) if folder is not None else vendored_dir()
    for name in (DATASET_CSV, LABELS_CSV):
        if not (folder / name).is_file():
            raise MetadataError(f"{folder}: no {name} here (expected the official MAMe metadata CSVs)")
    return load((folder / DATASET_CSV).read_bytes(), (folder / LABELS_CSV).read_bytes(), str(folder))


def toy_files(folder: Path | None = None) -> set[str]:
    """File names listed in ``MAMe_toy_dataset.csv``."""
    folder = Path(folder) if folder is not None else vendored_dir()
    path = folder / TOY_CSV
    return {r.file for r in parse_dataset(path.read_bytes(), str(path))}


def write_csv(path: Path, rows: list[Row]) -> None:
    """Write rows in the official format (floats for sizes, aspect rounded to 4 decimals)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.file,
                    OFFICIAL_SPELLING.get(r.medium, r.medium),
                    r.museum,
                    r.instance_id,
                    r.subset,
                    f"{float(r.width)}",
                    f"{float(r.height)}",
                    f"{float(r.width * r.height)}",
                    f"{round(r.width / r.height, 4)}",
                ]
            )


def write_labels(path: Path, classes: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        for i, c in enumerate(classes):
            f.write(f"{i},{c}\n")
