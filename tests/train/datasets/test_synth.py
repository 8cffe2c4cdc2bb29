import colorsys
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from synergy.train.datasets import synth


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> synth.SynthSummary:
    return synth.synthesize_tiny(tmp_path_factory.mktemp("synth") / "data", seed=3)


def test_same_seed_same_bytes_for_any_worker_count(tiny, tmp_path):
    again = synth.synthesize_tiny(tmp_path / "again", seed=3, workers=2)
    assert all_files(again.root) == all_files(tiny.root)


def test_different_seed_changes_csv_and_files(tiny, tmp_path):
    other = synth.synthesize_tiny(tmp_path / "other", seed=4)
    assert other.train_csv.read_bytes() != tiny.train_csv.read_bytes()
    name = "images/val/red_circle_0000.png"
    assert (other.root / name).read_bytes() != (tiny.root / name).read_bytes()
    name = "audio/val/red_circle_0000.wav"
    assert (other.root / name).read_bytes() != (tiny.root / name).read_bytes()


def test_csv_columns_counts_and_classes_json(tiny):
    n_train, n_held = len(tiny.train_classes), len(tiny.heldout_classes)
    assert n_train >= 12 and n_held == 4
    for path, n_rows in ((tiny.train_csv, 3 * n_train), (tiny.val_csv, 2 * n_train), (tiny.heldout_csv, 2 * n_held)):
        with open(path, newline="", encoding="utf-8") as f:
            assert next(csv.reader(f)) == ["img_path", "wav_path", "label", "caption"]
        assert len(read_rows(path)) == n_rows
    assert (tiny.n_train, tiny.n_val, tiny.n_heldout) == (3 * n_train, 2 * n_train, 2 * n_held)
    info = json.loads(tiny.classes_json.read_text())
    assert info["train_classes"] == list(tiny.train_classes)
    assert info["heldout_classes"] == list(tiny.heldout_classes)
    assert info["templates"] == list(synth.PROMPT_TEMPLATES)
    assert all("{}" in t for t in info["templates"])


def test_files_decode_with_the_requested_geometry(tiny):
    rows = [(split, r) for split in ("train", "val", "heldout") for r in read_rows(tiny.root / f"{split}.csv")]
    for _, row in rows:
        if row["img_path"]:
            with Image.open(tiny.root / row["img_path"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
        if row["wav_path"]:
            info = soundfile.info(tiny.root / row["wav_path"])
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (16_000, 1, 8_000, "PCM_16")
    wave, _ = soundfile.read(tiny.root / rows[0][1]["wav_path"], dtype="float32")
    assert 0.25 < np.abs(wave).max() < 0.95  # amplitude jitter stays audible and unclipped


def test_heldout_combinations_never_in_train_or_val_but_their_words_are(tiny):
    seen = {r["label"] for csv_path in (tiny.train_csv, tiny.val_csv) for r in read_rows(csv_path)}
    held = {r["label"] for r in read_rows(tiny.heldout_csv)}
    assert seen == set(tiny.train_classes)
    assert held == set(tiny.heldout_classes) and not held & seen
    seen_words = [label.split() for label in seen]
    for label in held:
        colour, shape = label.split()
        assert sum(w[0] == colour for w in seen_words) >= 3 and sum(w[1] == shape for w in seen_words) >= 3


def test_no_single_attribute_determines_a_class(tiny):
    colours = [label.split()[0] for label in tiny.train_classes]
    shapes = [label.split()[1] for label in tiny.train_classes]
    assert min(colours.count(c) for c in set(colours)) >= 3
    assert min(shapes.count(s) for s in set(shapes)) >= 3


def test_missing_modalities_only_in_train_never_both(tiny):
    train = read_rows(tiny.train_csv)
    missing = [r for r in train if not r["img_path"] or not r["wav_path"]]
    assert len(missing) == round(0.1 * len(train)) == tiny.n_missing_image + tiny.n_missing_audio
    assert all(r["img_path"] or r["wav_path"] for r in train)
    assert tiny.n_missing_image > 0 and tiny.n_missing_audio > 0  # seed 3 draws both kinds
    for csv_path in (tiny.val_csv, tiny.heldout_csv):
        assert all(r["img_path"] and r["wav_path"] for r in read_rows(csv_path))
    # exactly the referenced files exist: a missing modality is not written behind the CSV's back
    referenced = {
        r[c]
        for p in ("train", "val", "heldout")
        for r in read_rows(tiny.root / f"{p}.csv")
        for c in ("img_path", "wav_path")
    }
    written = {str(p.relative_to(tiny.root)) for p in tiny.root.rglob("*") if p.suffix in (".png", ".wav")}
    assert written == referenced - {""}


def test_captions_vary_and_name_both_attributes(tiny):
    rows = read_rows(tiny.train_csv) + read_rows(tiny.val_csv)
    assert len({r["caption"] for r in rows}) > len(rows) // 2
    for r in rows:
        colour, shape = r["label"].split()
        assert any(w in r["caption"] for w in synth.COLOUR_SYNONYMS[colour]), r
        assert any(w in r["caption"] for w in synth.SHAPE_SYNONYMS[shape]), r


@pytest.mark.parametrize("colour", synth.COLOURS)
def test_picture_colour_and_sound_pitch_follow_the_colour(colour):
    rng = np.random.default_rng(11)
    for shape in synth.SHAPES:
        pixels = synth.render_image(shape, colour, 48, rng).reshape(-1, 3) / 255.0
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
        hue = hsv[hsv[:, 1] > 0.5, 0] * 360.0  # the shape's pixels: the background is desaturated
        offset = np.median((hue - synth.HUE_DEGREES[colour] + 180.0) % 360.0) - 180.0
        assert hue.size > 50 and abs(offset) < 20.0, (shape, colour, offset)

        wave = synth.render_sound(shape, colour, 16_000, 1.0, rng)
        spectrum = np.abs(np.fft.rfft(wave))
        freqs = np.fft.rfftfreq(wave.size, 1 / 16_000)
        band = freqs > 150  # above the brown-noise rumble
        peak = freqs[band][np.argmax(spectrum[band])]
        assert abs(np.log2(peak / synth.PITCH_HZ[colour])) < 0.4, (shape, colour, peak)


def test_refuses_a_foreign_folder_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synth.synthesize_tiny(tmp_path, train_per_class=1, val_per_class=0, heldout_per_class=0)
    assert not (tmp_path / "classes.json").exists()
    summary = synth.synthesize_tiny(tmp_path, overwrite=True, train_per_class=1, val_per_class=0, heldout_per_class=0)
    assert (tmp_path / "notes.txt").read_text() == "mine" and summary.train_csv.is_file()


def test_labels_txt_lists_every_class_once(tiny):
    assert tiny.labels_txt == tiny.root / "labels.txt"
    lines = tiny.labels_txt.read_text(encoding="utf-8").splitlines()
    assert lines == list(tiny.train_classes + tiny.heldout_classes) and len(set(lines)) == 20
    from synergy.runtime.labels import read_labels  # what `synergy infer --labels` reads

    assert read_labels(tiny.labels_txt) == tuple(lines)


def test_summary_reads_as_text_not_a_dataclass_dump(tiny):
    text = str(tiny)
    assert "SynthSummary(" not in text and "PosixPath" not in text
    lines = text.splitlines()
    assert lines[0] == f"wrote the synthetic tri-modal set to {tiny.root}"
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {
        "train.csv": str(tiny.n_train),
        "val.csv": str(tiny.n_val),
        "heldout.csv": str(tiny.n_heldout),
        "labels.txt": "20",
        "classes.json": "classes,",
    }
    assert f"({tiny.n_missing_image} without image, {tiny.n_missing_audio} without audio)" in lines[1]
    assert ", ".join(tiny.heldout_classes) in lines[3]


def test_refuses_to_replace_an_earlier_output_without_overwrite(tmp_path):
    synth.synthesize_tiny(tmp_path, train_per_class=1, val_per_class=0, heldout_per_class=0)
    before = all_files(tmp_path)
    with pytest.raises(FileExistsError, match="holds an earlier synth output.*overwrite=True"):
        synth.synthesize_tiny(tmp_path, seed=9, train_per_class=1, val_per_class=0, heldout_per_class=0)
    assert all_files(tmp_path) == before


def test_rewrites_a_previous_output_without_leftovers(tmp_path):
    synth.synthesize_tiny(tmp_path, train_per_class=2, val_per_class=0, heldout_per_class=1, missing_rate=0.0)
    assert any((tmp_path / "images" / "train").glob("*_0001.png"))
    summary = synth.synthesize_tiny(
        tmp_path, train_per_class=1, val_per_class=0, heldout_per_class=0, missing_rate=0, overwrite=True
    )
    assert summary.n_train == len(summary.train_classes) and summary.n_heldout == 0
    assert not any((tmp_path / "images").rglob("*_0001.png"))
    assert not any((tmp_path / "audio" / "heldout").glob("*.wav"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_per_class": 0}, "per-class counts"),
        ({"missing_rate": 1.5}, "missing_rate"),
        ({"image_size": 8}, "image_size"),
        ({"sample_rate": 4_000}, "sample_rate"),
    ],
)
def test_bad_arguments_say_what_to_use(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.synthesize_tiny(tmp_path / "out", **kwargs)
