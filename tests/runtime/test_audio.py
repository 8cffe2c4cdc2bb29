"""Audio decoding, checks and windowing: every bad input is an UnsupportedAudio that names it and says what to do."""

import numpy as np
import pytest
import soundfile
import soxr

from synergy.runtime.audio import audio_windows, load_audio
from synergy.runtime.errors import UnsupportedAudio

from .conftest import SAMPLE_RATE, audio_bytes, tone

# ------------------------------------------------------------------------------------------------------ windows


def test_short_audio_is_one_window_that_keeps_its_real_length():
    wave = np.arange(1, 71, dtype=np.float32)
    windows, lengths = audio_windows(wave, 129)
    assert windows.shape == (1, 129) and lengths.tolist() == [70]  # the model pads past 70, in the log-mel domain
    np.testing.assert_array_equal(windows[0, :70], wave)
    assert not windows[0, 70:].any()


def test_exact_clip_is_one_window():
    wave = np.arange(129, dtype=np.float32)
    windows, lengths = audio_windows(wave, 129)
    np.testing.assert_array_equal(windows, wave[None])
    assert lengths.tolist() == [129]


@pytest.mark.parametrize(
    ("length", "overlap", "starts"),
    [
        (300, 0.5, [0, 64, 128, 171]),  # hop round(129 * 0.5) = 64; the tail window is aligned to the end
        (258, 0.0, [0, 129]),  # no overlap, exact fit: no extra window
        (259, 0.0, [0, 129, 130]),
        (193, 0.5, [0, 64]),  # 64 + 129 = 193 covers it all
    ],
)
def test_long_audio_windows_cover_everything_with_full_clips(length, overlap, starts):
    wave = np.arange(length, dtype=np.float32)
    windows, lengths = audio_windows(wave, 129, overlap)
    assert windows.shape == (len(starts), 129) and lengths.tolist() == [129] * len(starts)
    np.testing.assert_array_equal(windows[:, 0], starts)
    np.testing.assert_array_equal(windows[-1], wave[-129:])


def test_overlap_out_of_range_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        audio_windows(np.zeros(10, np.float32), 4, 1.0)


# ------------------------------------------------------------------------------------------------ good inputs


def test_path_bytes_and_waveform_decode_the_same(tmp_path):
    wave = tone(0.3)
    path = tmp_path / "a.wav"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    from_path = load_audio(path, SAMPLE_RATE)
    from_bytes = load_audio(path.read_bytes(), SAMPLE_RATE)
    from_array = load_audio((wave, SAMPLE_RATE), SAMPLE_RATE)
    np.testing.assert_array_equal(from_path, wave)
    np.testing.assert_array_equal(from_bytes, wave)
    np.testing.assert_array_equal(from_array, wave)


def test_stereo_is_downmixed_and_channel_axis_found():
    stereo = tone(0.2, channels=2)  # [T, 2]
    expected = stereo.mean(axis=1)
    np.testing.assert_allclose(load_audio((stereo, SAMPLE_RATE), SAMPLE_RATE), expected, rtol=1e-6)
    np.testing.assert_allclose(load_audio((stereo.T, SAMPLE_RATE), SAMPLE_RATE), expected, rtol=1e-6)
    np.testing.assert_allclose(load_audio(audio_bytes(stereo, subtype="FLOAT"), SAMPLE_RATE), expected, rtol=1e-6)


def test_int16_pcm_is_scaled():
    pcm = np.tile(np.array([0, 16384, -32768, 32767], dtype=np.int16), 50)  # 200 samples: one 25 ms frame
    np.testing.assert_allclose(load_audio((pcm, SAMPLE_RATE), SAMPLE_RATE), np.tile([0, 0.5, -1, 32767 / 32768], 50))


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44_100])
def test_audio_shorter_than_one_frame_is_refused_by_name_and_one_frame_is_answered(rate):
    frame = rate * 25 // 1000  # kaldi's 25 ms analysis frame
    with pytest.raises(UnsupportedAudio, match=r"<waveform #0>: .* shorter than one analysis frame \(25 ms"):
        load_audio((tone(0.02, rate=rate), rate), SAMPLE_RATE)
    wave = load_audio((tone(0.05, rate=rate), rate), SAMPLE_RATE)  # 50 ms: two frames, a valid clip
    assert wave.shape[0] >= 2 * frame * SAMPLE_RATE // rate


def test_resampled_with_soxr():
    wave = tone(0.25, rate=22_050)
    out = load_audio((wave, 22_050), SAMPLE_RATE)
    np.testing.assert_array_equal(out, soxr.resample(wave, 22_050, SAMPLE_RATE, quality="HQ"))
    assert abs(out.size - 0.25 * SAMPLE_RATE) <= 1


@pytest.mark.parametrize("rate", [22_050, 44_100, 48_000])
def test_resampling_reproduces_an_ideal_band_limited_tone(rate):
    """The resampler itself, against the analytic answer: a 1 kHz + 3.1 kHz tone sampled at ``rate`` becomes the
    same tone sampled at 16 kHz (edges excluded: the filter's start-up)."""

    def tones(r, n):
        t = np.arange(n) / r
        return 0.5 * np.sin(2 * np.pi * 1000 * t) + 0.25 * np.sin(2 * np.pi * 3100 * t + 0.3)

    out = load_audio((tones(rate, rate).astype(np.float32), rate), 16_000)  # 1 s
    ideal = tones(16_000, out.size)
    assert np.abs(out - ideal)[800:-800].max() < 2e-3


# ------------------------------------------------------------------------------------------------- bad inputs


def _raises(source, match, **kwargs):
    with pytest.raises(UnsupportedAudio, match=match) as info:
        load_audio(source, SAMPLE_RATE, **kwargs)
    return info.value


def test_missing_file_names_it(tmp_path):
    error = _raises(tmp_path / "nope.wav", "no such file; check the path")
    assert error.source == str(tmp_path / "nope.wav")
    assert str(tmp_path / "nope.wav") in str(error)


def test_folder_is_not_a_file(tmp_path):
    _raises(tmp_path, "is a folder")


def test_zero_frame_wav(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros((0, 1), np.float32), SAMPLE_RATE)
    assert soundfile.read(path)[0].size == 0  # soundfile itself decodes it "successfully"
    error = _raises(path, r"0 frames \(empty audio\)")
    assert "empty.wav" in str(error)


def test_empty_bytes_and_empty_array():
    _raises(b"", "empty bytes")
    _raises((np.zeros(0, np.float32), SAMPLE_RATE), "0 samples")


def test_bytes_that_are_no_audio():
    _raises(b"this is a text file, not a sound", "cannot be decoded as audio.*WAV, FLAC")


@pytest.mark.parametrize(("format", "subtype"), [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16")])
def test_truncated_files(format, subtype, tmp_path):
    data = audio_bytes(tone(1.0), format=format, subtype=subtype)
    path = tmp_path / f"cut.{format.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    error = _raises(path, "truncated|cannot be decoded")
    assert "re-encode" in str(error)


def test_nan_and_inf_samples(tmp_path):
    wave = tone(0.2)
    wave[800] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    _raises(path, r"NaN or Inf samples \(first at 0.100 s\)")
    wave[800] = np.inf
    _raises((wave, SAMPLE_RATE), "NaN or Inf")


def test_too_many_channels():
    surround = tone(0.1, channels=6)
    _raises(audio_bytes(surround), "6 channels; only mono or stereo.*downmix")
    _raises((surround, SAMPLE_RATE), "6 channels")


def test_too_long_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    soundfile.write(path, tone(2.0), SAMPLE_RATE)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the duration check")

    monkeypatch.setattr(soundfile.SoundFile, "read", no_decoding)
    _raises(path, r"2.0 s long, over the 1.5 s limit", max_seconds=1.5)


def test_unsupported_types_and_rates():
    _raises(12345, "unsupported input of type int")
    _raises((tone(0.1), 0), "sample rate must be a positive integer")
    _raises((tone(0.1), 8000.5), "sample rate must be a positive integer")
    _raises((np.array(["a", "b"]), SAMPLE_RATE), "dtype")
    _raises((np.zeros((2, 3, 4), np.float32), SAMPLE_RATE), "shape")


def test_a_rate_below_8_khz_is_refused_from_the_header_before_decoding(monkeypatch):
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(599, np.float32), 1, format="WAV", subtype="PCM_16")  # 1.2 KB that claims 599 s
    tiny = buffer.getvalue()
    assert len(tiny) < 1300

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the sample-rate check")

    with monkeypatch.context() as patched:
        patched.setattr(soundfile.SoundFile, "read", no_decoding)
        _raises(tiny, r"sample rate 1 Hz, below the 8,000 Hz minimum .*resample it")
    _raises((np.zeros(7_999, np.float32), 7_999), r"sample rate 7,999 Hz, below the 8,000 Hz minimum")
    assert load_audio((tone(0.1, rate=8_000), 8_000), SAMPLE_RATE).shape[0] > 0  # telephone audio is fine
