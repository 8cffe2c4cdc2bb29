"""train/datasets/spoken.py: real espeak-ng speech (the Debian package; .ci/run installs it), clips 0.4-1 s at
22.05 kHz, held-out speakers absent from training, the same bytes for the same seed, and `synergy data spoken`."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from synergy.train.datasets import spoken

ROOT = Path(__file__).resolve().parents[3]  # the repository root, which is the `synergy` package
if shutil.which("espeak-ng") is None:  # not a skip: CI counts a skip for a missing tool as a failure
    pytest.fail("espeak-ng is not on PATH: apt-get install espeak-ng (.ci/run does)", pytrace=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("spoken") / "data"
    return spoken.synthesize_spoken(out, seed=5, train_per_word=1, val_per_word=1, unseen_per_word=2, image_size=40)


def test_splits_hold_every_word_and_keep_the_unseen_speakers_out_of_training(small):
    train, val, unseen = (rows(small.root / f"{split}.csv") for split in spoken.SPLITS)
    assert len(train) == len(val) == len(spoken.TRAIN_SPEAKERS) * len(spoken.WORDS)
    assert len(unseen) == 2 * len(spoken.UNSEEN_SPEAKERS) * len(spoken.WORDS)
    assert small.rows == {"train": len(train), "val": len(val), "unseen": len(unseen)}
    for split in (train, val, unseen):
        assert sorted({row["label"] for row in split}) == sorted(spoken.WORDS)
        assert all(row["label"] in row["caption"] for row in split)
    voice = lambda row: row["wav_path"].split("/")[-1].split("_", 1)[1].rsplit("_", 1)[0]
    assert {voice(r) for r in train} == {voice(r) for r in val}
    assert not {voice(r) for r in unseen} & {voice(r) for r in train}
    assert (small.root / "labels.txt").read_text().split() == list(spoken.WORDS)


def test_clips_are_speech_of_0_4_to_1_s_at_22_05_khz_and_pictures_are_rgb(small):
    for row in rows(small.root / "unseen.csv")[:12] + rows(small.root / "train.csv")[::7]:
        wave, rate = soundfile.read(small.root / row["wav_path"], dtype="float32")
        assert rate == 22_050 and wave.ndim == 1
        assert spoken.MIN_SECONDS <= len(wave) / rate <= spoken.MAX_SECONDS
        assert 0.25 < np.abs(wave).max() <= 1.0  # speech at the drawn gain, not silence
        image = Image.open(small.root / row["img_path"])
        assert image.mode == "RGB" and image.size == (40, 40)


def test_the_same_seed_writes_the_same_bytes_and_a_full_folder_needs_overwrite(small, tmp_path):
    again = spoken.synthesize_spoken(tmp_path / "again", seed=5, train_per_word=1, val_per_word=1, unseen_per_word=2,
                                     image_size=40)  # fmt: skip
    for name in ("train.csv", "unseen.csv"):
        assert (again.root / name).read_bytes() == (small.root / name).read_bytes()
    first = rows(small.root / "unseen.csv")[3]
    for column in ("wav_path", "img_path"):
        assert (again.root / first[column]).read_bytes() == (small.root / first[column]).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        spoken.synthesize_spoken(again.root, seed=5)


def test_synergy_data_spoken_writes_the_set(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "synergy.cli", "data", "spoken", "--out", str(tmp_path / "set"),
         "--train-per-word", "1", "--val-per-word", "1", "--unseen-per-word", "1"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unseen.csv" in done.stdout and len(rows(tmp_path / "set" / "unseen.csv")) == len(spoken.WORDS) * 3
