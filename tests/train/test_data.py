"""Manifest rows and samples at the boundary: rows without a modality or with missing columns, audio under one
analysis frame, long audio windows for evaluation and one random clip for training, all through the runtime's
preprocessing."""

import numpy as np
import soundfile

from synergy.runtime.audio import audio_windows, load_audio
from synergy.train.data import Collate, ManifestDataset, read_manifest

RATE = 16_000


def _dataset(csv, clip_seconds=0.5, speed_perturb=0.0):
    return ManifestDataset(
        read_manifest(csv),
        image_size=30,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        sample_rate=RATE,
        clip_seconds=clip_seconds,
        text_mode="prompt",
        templates=("a {}.",),
        speed_perturb=speed_perturb,
    )


def _write(path, seconds):
    t = np.arange(round(seconds * RATE)) / RATE
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE, subtype="FLOAT")


def test_rows_without_a_modality_or_with_missing_columns_are_bad_rows_with_their_line(tmp_path):
    _write(tmp_path / "a.wav", 0.3)
    (tmp_path / "m.csv").write_text(
        "img_path,wav_path,label,caption\n"
        "a.wav_is_not_here_but_this_row_is_fine.png,,dog,\n"  # line 2: a missing file (reported when loaded)
        ",,,\n"  # line 3: no modality at all
        ",a.wav\n"  # line 4: two of four columns
        ",a.wav,dog,\n"  # line 5: good
    )
    rows = read_manifest(tmp_path / "m.csv")
    assert [r.line for r in rows] == [2, 3, 4, 5]
    assert rows[1].problem == "no image, audio, label or caption: the row has no modality"
    assert rows[2].problem == "2 of 4 columns missing"
    dataset = _dataset(tmp_path / "m.csv")
    assert dataset[1]["bad"] == "no image, audio, label or caption: the row has no modality (manifest line 3)"
    assert dataset[2]["bad"] == "2 of 4 columns missing (manifest line 4)"
    assert "no such file" in dataset[0]["bad"] and dataset[0]["bad"].endswith("(manifest line 2)")
    assert dataset[3]["bad"] is None


def test_audio_under_one_frame_is_a_bad_sample_and_50_ms_is_kept(tmp_path):
    _write(tmp_path / "tiny.wav", 0.02)
    _write(tmp_path / "short.wav", 0.05)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption\n,tiny.wav,dog,\n,short.wav,cat,\n")
    dataset = _dataset(tmp_path / "m.csv")
    assert "tiny.wav: 20.0 ms long, shorter than one analysis frame (25 ms" in dataset[(0, 1)]["bad"]
    good = dataset[(1, 1)]
    assert good["bad"] is None and good["audio"][1].tolist() == [800]  # one window, its real length kept


def test_evaluation_windows_equal_the_runtime_and_training_takes_one_clip(tmp_path):
    _write(tmp_path / "long.wav", 1.37)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption\n,long.wav,dog,\n")
    dataset = _dataset(tmp_path / "m.csv")
    windows, lengths = dataset[0]["audio"]  # evaluation: every window, as `synergy infer` cuts them
    expected = audio_windows(load_audio(tmp_path / "long.wav", RATE), 8_000)
    np.testing.assert_array_equal(windows, expected[0])
    np.testing.assert_array_equal(lengths, expected[1])
    train_windows, train_lengths = dataset[(0, 7)]["audio"]  # training: one random full clip
    assert train_windows.shape == (1, 8_000) and train_lengths.tolist() == [8_000]

    collate = Collate(_tokenizer(), 30, 8_000)
    batch = collate([dataset[0], dataset[0]])
    assert batch["waveform"].shape == (2 * len(lengths), 8_000)
    assert batch["audio_owner"].tolist() == [0] * len(lengths) + [1] * len(lengths)


def test_speed_perturbation_moves_pitch_and_length_in_training_only(tmp_path):
    """A 440 Hz tone of 0.3 s: training with audio_speed_perturb=0.2 plays it 0.8-1.2x as fast (so 367-550 Hz and
    0.25-0.375 s), each augmentation seed its own factor and the same factor again; evaluation is untouched."""
    _write(tmp_path / "tone.wav", 0.3)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption\n,tone.wav,tone,\n")
    plain, perturbed = _dataset(tmp_path / "m.csv"), _dataset(tmp_path / "m.csv", speed_perturb=0.2)
    np.testing.assert_array_equal(perturbed[0]["audio"][0], plain[0]["audio"][0])  # evaluation: no perturbation
    np.testing.assert_array_equal(plain[(0, 3)]["audio"][0], plain[0]["audio"][0])  # off: training clip unchanged
    pitches = set()
    for seed in range(6):
        windows, lengths = perturbed[(0, seed)]["audio"]
        np.testing.assert_array_equal(perturbed[(0, seed)]["audio"][0], windows)  # a pure function of the seed
        n = int(lengths[0])
        factor = 0.3 * RATE / n
        assert 0.8 - 0.01 <= factor <= 1.2 + 0.01
        spectrum = np.abs(np.fft.rfft(windows[0, :n] * np.hanning(n)))
        peak = np.argmax(spectrum) * RATE / n
        assert abs(peak - 440 * factor) < 2 * RATE / n, (peak, factor)
        pitches.add(round(peak))
    assert len(pitches) > 3


def _tokenizer():
    from synergy.core.tokenizer import train_tokenizer

    return train_tokenizer(["a dog.", "a cat."], vocab_size=40, max_length=8)
