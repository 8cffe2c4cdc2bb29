"""Labels files: cleaned (NFC, whitespace, invisible characters), blank lines skipped, duplicates/empties refused."""

import pytest

from synergy.runtime.errors import InferUsageError, LabelsError
from synergy.runtime.labels import normalise_label, read_labels
from synergy.runtime.prompts import label_prompts


def test_normalise_label():
    assert normalise_label("  cafe\u0301 \t au\u00a0lait\u200b ") == "café au lait"  # NFC, NBSP, tab, ZWSP
    assert normalise_label("\ufeffdog\u3000house\u200e") == "dog house"  # BOM, ideographic space, LRM
    assert normalise_label(" \t\u2003 ") == ""


def test_file_with_blank_lines_bom_and_odd_spacing(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffdog\n\n  cat  \r\n\t\ncar\u00a0 engine\nbird song   \n", encoding="utf-8")
    assert read_labels(path) == ("dog", "cat", "car engine", "bird song")
    assert read_labels(str(path)) == read_labels(["dog", " ", "cat", "car  engine", "bird song"])


def test_duplicates_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("dog\ncat\n\nDog \n", encoding="utf-8")
    with pytest.raises(LabelsError, match=r"labels.txt: lines 1 and 4 give the same label .*remove one"):
        read_labels(path)
    with pytest.raises(LabelsError, match=r"items 1 and 2"):
        read_labels(["café", "cafe\u0301"])  # equal after NFC


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n", "\u200b\n"])
def test_empty_labels_file(content, tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LabelsError, match=r"no labels.*one label per line"):
        read_labels(path)


def test_missing_non_utf8_and_non_string(tmp_path):
    with pytest.raises(LabelsError, match=r"no such labels file"):
        read_labels(tmp_path / "none.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(LabelsError, match=r"not UTF-8 text.*save it as UTF-8"):
        read_labels(path)
    with pytest.raises(LabelsError, match=r"item 2 is a int"):
        read_labels(["dog", 3])
    assert issubclass(LabelsError, InferUsageError)  # the CLI maps it to exit code 2


def test_prompts():
    assert label_prompts("dog", ("a photo of a {}.", "{label} barking", "{}")) == [
        "a photo of a dog.",
        "dog barking",
        "dog",
    ]
    assert label_prompts("dog", ()) == ["dog"]
