from collections import Counter

import pytest

from mame_fast.data import metadata as md

CSV = md.COLUMNS


def _csv(rows, header=CSV, bom=False, crlf=False):
    nl = "\r\n" if crlf else "\n"
    text = nl.join([",".join(header)] + [",".join(r) for r in rows]) + nl
    return (("\ufeff" if bom else "") + text).encode()


ROW = ["1980.266.jpeg", "Woven fabric ", "The Cleveland Museum of Art", "1980.266", "train", "5527.0", "6685.0", "1.0", "0.8268"]
LABELS = b"0,Bronze\n1,Woven fabric\n"


def test_real_metadata_counts():
    meta = md.load_dir()
    assert len(meta.classes) == 29
    assert Counter(r.subset for r in meta.rows) == {"train": 20300, "val": 1450, "test": 15657}
    # The trailing-space pitfall: Woven fabric keeps its 700 training images.
    assert sum(r.medium == "Woven fabric" and r.subset == "train" for r in meta.rows) == 700
    assert all(Counter(meta.label(r) for r in meta.split("train")).get(i) == 700 for i in range(29))


@pytest.mark.parametrize("bom,crlf", [(False, False), (True, False), (False, True), (True, True)])
def test_bom_and_crlf_parse_the_same(bom, crlf):
    meta = md.load(_csv([ROW], bom=bom, crlf=crlf), LABELS, "x")
    assert meta.rows[0].file == "1980.266.jpeg" and meta.label(meta.rows[0]) == 1
    assert (meta.rows[0].width, meta.rows[0].height) == (5527, 6685)


def test_missing_column_is_named():
    with pytest.raises(md.MetadataError, match=r"x/MAMe_dataset.csv: missing column\(s\) \['Subset'\]"):
        md.load(_csv([ROW[:4] + ROW[5:]], header=[c for c in CSV if c != "Subset"]), LABELS, "x")


def test_unknown_class_is_named():
    with pytest.raises(md.MetadataError, match=r"class\(es\) \['Velvet'\] not in MAMe_labels.csv"):
        md.load(_csv([[ROW[0], "Velvet"] + ROW[2:]]), LABELS, "x")


def test_duplicate_file_is_named():
    with pytest.raises(md.MetadataError, match=r"duplicate file name '1980.266.jpeg'"):
        md.load(_csv([ROW, ROW]), LABELS, "x")
