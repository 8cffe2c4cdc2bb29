"""Hostile and careless media (issue 16): each bad input is a named error for that item alone, `synergy infer` exits
1 with the good inputs of the same call answered and every JSON line valid JSON; memory-heavy inputs run in a
subprocess under RLIMIT_AS and finish in seconds; every Pillow mode converts to RGB as the CLIP processor would
(where it is right)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from PIL import Image

from synergy import cli
from synergy.runtime import InputError, UnsupportedAudio, UnsupportedImage, UnsupportedText
from synergy.runtime.audio import load_audio
from synergy.runtime.image import load_image, preprocess_image

from .conftest import IMAGE_SIZE, LABELS, MEAN, SAMPLE_RATE, STD, picture, tone


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in a JSON line")

    return json.loads(line, parse_constant=refuse)


def _huge_float_wav(path):
    """Finite float samples so large that the model's arithmetic overflows: the embedding is NaN."""
    soundfile.write(path, np.full(4000, 3e38, np.float32), SAMPLE_RATE, subtype="FLOAT")


def _extreme_rate_flac(path):
    soundfile.write(path, np.zeros((65_535, 2), np.int16), 655_350, format="FLAC")


def _symlink_loop(path):
    os.symlink(path, path)


# (file name, how to make it, modality, error type, message regex)
MEDIA = [
    ("fifo.wav", os.mkfifo, "audio", "UnsupportedAudio", r"is a FIFO \(named pipe\), not a regular file"),
    ("loop.wav", _symlink_loop, "audio", "UnsupportedAudio", r"is a symbolic link loop"),
    ("missing.wav", lambda p: None, "audio", "UnsupportedAudio", r"no such file; check the path"),
    ("huge.wav", _huge_float_wav, "audio", "UnsupportedAudio", r"non-finite embedding.*\[-1, 1\]"),
    ("rate.flac", _extreme_rate_flac, "audio", "UnsupportedAudio", r"655,350 Hz, above the 384,000 Hz limit"),
    ("fifo.png", os.mkfifo, "image", "UnsupportedImage", r"is a FIFO"),
    ("zero.png", lambda p: os.symlink("/dev/zero", p), "image", "UnsupportedImage", r"is a character device"),
]


def test_hostile_media_fail_alone_with_exit_1_and_valid_json(tiny_bundle, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    soundfile.write(tmp_path / "good.wav", tone(0.4), SAMPLE_RATE)
    picture(50, 40).save(tmp_path / "good.png")
    for name, make, *_ in MEDIA:
        make(str(tmp_path / name))
    audio = [str(tmp_path / n) for n, _, m, *_ in MEDIA if m == "audio"]
    image = [str(tmp_path / n) for n, _, m, *_ in MEDIA if m == "image"]
    args = ["infer", "--bundle", str(tiny_bundle[0]), "--labels", str(tmp_path / "labels.txt"), "--json"]
    for file in [*audio, str(tmp_path / "good.wav")]:
        args += ["--audio", file]
    for file in [*image, str(tmp_path / "good.png")]:
        args += ["--image", file]
    result = {}

    def invoke():  # in a thread: a FIFO that blocked would hang it, not the test run
        result["cli"] = CliRunner().invoke(cli.main, args)

    worker = threading.Thread(target=invoke, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "synergy infer hung on a FIFO or a device"
    assert time.monotonic() - started < 30
    run = result["cli"]
    assert run.exit_code == 1, run.output
    records = {Path_name(r["input"]): r for r in map(_strict_json, run.stdout.strip().splitlines())}
    assert records["good.wav"]["ok"] and records["good.png"]["ok"]
    for name, _, _, error_type, message in MEDIA:
        record = records[name]
        assert not record["ok"] and record["error"]["type"] == error_type, record
        assert __import__("re").search(message, record["error"]["message"]), record
    assert f"{len(MEDIA) + 2} inputs, 2 ok, {len(MEDIA)} failed" in run.stderr


def Path_name(path: str) -> str:
    return os.path.basename(path)


def test_lone_surrogate_fails_alone(runtime):
    result = runtime.embed_batch("text", ["dog", "\ud800", "cat"])
    assert result.ok.tolist() == [True, False, True]
    assert isinstance(result.errors[1], UnsupportedText)
    assert "lone surrogate '\\ud800' at character 0" in str(result.errors[1])
    np.testing.assert_allclose(result.vectors[[0, 2]], runtime.embed_text(["dog", "cat"]), atol=1e-6)
    predictions = runtime.classify(list(LABELS), text=["a dog", "x\udfff", "a piano"])
    assert [p.ok for p in predictions] == [True, False, True]


def test_non_finite_embedding_is_an_item_error_never_ok(runtime):
    """The bad item fails with an error that names it; the good items of its batch get what they get alone."""
    huge = (np.full(4000, 3e38, np.float32), SAMPLE_RATE)
    good = (tone(0.3), SAMPLE_RATE)
    alone = runtime.embed_audio([good])[0]
    result = runtime.embed_batch("audio", [good, huge, good])
    assert result.ok.tolist() == [True, False, True]
    error = result.errors[1]
    assert isinstance(error, UnsupportedAudio) and np.isnan(result.vectors[1]).all()
    assert error.source == result.sources[1] == "<waveform #1>"
    assert str(error).startswith("<waveform #1>: the model gives non-finite embedding"), str(error)
    for row in (0, 2):
        np.testing.assert_allclose(result.vectors[row], alone, rtol=0, atol=1e-6)

    predictions = runtime.classify(list(LABELS), audio=[good, huge])
    (expected,) = runtime.classify(list(LABELS), audio=[good])
    assert predictions[0].ok and not predictions[1].ok
    assert [s.label for s in predictions[0].top] == [s.label for s in expected.top]
    np.testing.assert_allclose(
        [s.probability for s in predictions[0].top], [s.probability for s in expected.top], rtol=0, atol=1e-6
    )
    assert all(np.isfinite(s.probability) for s in predictions[0].top)
    error = predictions[1].error
    assert isinstance(error, UnsupportedAudio) and predictions[1].source == error.source == "<waveform #1>"
    assert str(error).startswith("<waveform #1>: the model gives non-finite embedding"), str(error)
    with pytest.raises(UnsupportedAudio, match=r"^<waveform #0>: the model gives non-finite embedding"):
        runtime.embed_audio([huge])


@pytest.mark.parametrize(
    ("kind", "load", "error_type"),
    [("audio", lambda path: load_audio(path, SAMPLE_RATE), UnsupportedAudio), ("image", load_image, UnsupportedImage)],
)
def test_a_path_that_is_not_a_regular_file_says_what_it_is_and_what_to_do(tmp_path, kind, load, error_type):
    """One rule for every reader (files.open_input): the error names the path, what it is, and what to pass."""
    os.mkfifo(tmp_path / "fifo")
    cases = {
        tmp_path / "missing": "no such file; check the path",
        tmp_path: f"is a folder; pass {kind} files (the CLI expands folders and globs)",
        tmp_path / "fifo": f"is a FIFO (named pipe), not a regular file; pass a regular {kind} file",
    }
    for path, problem in cases.items():
        with pytest.raises(error_type) as caught:
            load(str(path))
        assert (caught.value.source, caught.value.problem) == (str(path), problem)


def test_waveform_channels_are_named_by_the_short_axis():
    with pytest.raises(UnsupportedAudio, match=r"waveform of shape \(3, 16000\): 3 channels"):
        load_audio((np.zeros((3, 16000), np.float32), 16000), 16000)
    with pytest.raises(UnsupportedAudio, match=r"waveform of shape \(16000, 3\): 3 channels"):
        load_audio((np.zeros((16000, 3), np.float32), 16000), 16000)
    with pytest.raises(UnsupportedAudio, match=r"up to 384,000, got 1000000"):
        load_audio((np.zeros(16000, np.float32), 1_000_000), 16000)


def test_decoding_has_a_time_bound(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(3.0), SAMPLE_RATE)
    assert load_audio(str(tmp_path / "a.wav"), SAMPLE_RATE).shape == (3 * SAMPLE_RATE,)
    with pytest.raises(UnsupportedAudio, match=r"decoding took over 0 s \(max_decode_seconds\)"):
        load_audio(str(tmp_path / "a.wav"), SAMPLE_RATE, max_decode_seconds=0)


def test_streamed_decoding_equals_one_shot_resampling(tmp_path):
    import soxr

    wave = tone(7.3, rate=44_100, channels=2)  # > 4 blocks of 65536 frames
    soundfile.write(tmp_path / "a.flac", wave, 44_100, subtype="PCM_24")
    decoded = soundfile.read(tmp_path / "a.flac", dtype="float32")[0].mean(axis=1)
    expected = soxr.resample(decoded, 44_100, 16_000, quality="HQ")
    np.testing.assert_array_equal(load_audio(str(tmp_path / "a.flac"), 16_000), expected)


def test_a_fifo_does_not_block_the_batcher(runtime, tmp_path):
    os.mkfifo(tmp_path / "x.wav")
    soundfile.write(tmp_path / "a.wav", tone(0.3), SAMPLE_RATE)
    batcher = runtime.batcher("audio", max_batch=2, max_queue=2)
    futures = [batcher.submit(str(tmp_path / "x.wav")), batcher.submit(str(tmp_path / "a.wav"))]
    with pytest.raises(UnsupportedAudio, match="FIFO"):
        futures[0].result(timeout=30)
    assert futures[1].result(timeout=30).shape == (runtime.manifest.embed_dim,)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()


# ------------------------------------------------------------------------------------------ memory under a limit

LIMITED = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
started = time.monotonic()
{body}
print(f"ok in {{time.monotonic() - started:.2f}} s")
"""


def _limited(body: str, limit: int = 768 << 20) -> subprocess.CompletedProcess:
    code = LIMITED.format(limit=limit, body=textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# every resize mode a bundle can ask for: CLIP's (shortest edge = crop), DINOv2's and EfficientNet-Lite0's (shortest
# edge 256, crop 224), SigLIP's and ViT's (exact, no crop)
RESIZE_OPTIONS = [
    {},
    {"resize": "shortest_edge", "resize_size": 256, "resample": "bicubic"},
    {"resize": "exact", "resize_size": 224, "resample": "bilinear"},
]


@pytest.mark.parametrize("options", RESIZE_OPTIONS, ids=["clip", "shortest-edge-256", "exact"])
def test_thin_image_bomb_is_bounded_by_the_output_size(tmp_path, options):
    """A 100000 x 1 PNG (under 400 bytes) was resized to 6,400,000 x 64 float pixels (7.5 GiB) before the crop."""
    buffer = io.BytesIO()
    Image.new("L", (100_000, 1), 128).save(buffer, "PNG")
    (tmp_path / "thin.png").write_bytes(buffer.getvalue())
    assert len(buffer.getvalue()) < 400
    done = _limited(
        f"""
        from synergy.runtime.image import load_image, preprocess_image
        for path in [{str(tmp_path / "thin.png")!r}] * 3:
            pixels = preprocess_image(load_image(path), 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), **{options!r})
            assert pixels.shape == (3, 224, 224), pixels.shape
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[2]) < 5


def test_high_rate_flac_is_decoded_in_bounded_memory(tmp_path):
    """150 s of stereo at 384 kHz (a few hundred KB of FLAC) decoded whole is 460 MB of float32 before the downmix;
    block by block it costs the output (150 s at 8 kHz). Rates above 384 kHz are refused outright."""
    path = tmp_path / "high.flac"
    with soundfile.SoundFile(path, "w", 384_000, 2, format="FLAC") as file:
        block = np.zeros((384_000, 2), np.int16)
        block[::38_400] = 1000  # not pure silence
        for _ in range(150):
            file.write(block)
    assert path.stat().st_size < 5 << 20
    done = _limited(
        f"""
        from synergy.runtime.audio import load_audio
        wave = load_audio({str(path)!r}, {SAMPLE_RATE})
        assert wave.shape == (150 * {SAMPLE_RATE},), wave.shape
        """,
        limit=640 << 20,
    )
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ Pillow modes


def _processor():
    try:  # see test_parity_transformers: the PIL-backed processor's name differs across transformers versions
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(MEAN),
        image_std=list(STD),
    )


def _ours(image: Image.Image) -> np.ndarray:
    return preprocess_image(load_image(image), IMAGE_SIZE, MEAN, STD)


def _theirs(processor, image: Image.Image) -> np.ndarray:
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])


def _modes() -> dict:
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (45, 61), dtype=np.uint8)
    rgb = picture(61, 45, seed=4)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    la = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(rng.integers(0, 256, (45, 61), dtype=np.uint8))))
    return {
        "L": Image.fromarray(grey),
        "1": Image.fromarray(grey > 127),
        "LA": la,
        "P": palette,
        "P+transparency": keyed,
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_pillow_modes_match_the_clip_processor(mode):
    pytest.importorskip("transformers")
    image = _modes()[mode]
    np.testing.assert_allclose(_ours(image), _theirs(_processor(), image), atol=2e-2)


def test_16_bit_and_float_greyscale_are_scaled_where_transformers_clips_to_white():
    pytest.importorskip("transformers")
    processor = _processor()
    levels = np.random.default_rng(5).integers(0, 65_536, (45, 61)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG")
    sixteen = Image.open(io.BytesIO(buffer.getvalue()))
    assert sixteen.mode == "I;16"
    eight = Image.fromarray(np.rint(levels / 257).astype(np.uint8))  # what the 16-bit image shows, in 8 bits
    np.testing.assert_allclose(_ours(sixteen), _theirs(processor, eight), atol=2e-2)
    white = (1 - np.asarray(MEAN)) / np.asarray(STD)
    theirs = _theirs(processor, sixteen)  # transformers' convert("RGB") clips every level above 255
    assert (np.abs(theirs - white[:, None, None]) < 1e-3).mean() > 0.95
    as_int = Image.fromarray(levels.astype(np.int32))  # mode I: what 16-bit TIFFs open as
    np.testing.assert_allclose(_ours(as_int), _ours(sixteen), atol=1e-6)
    floats = Image.fromarray((levels / 65535).astype(np.float32))  # mode F, read as 0..1
    np.testing.assert_allclose(_ours(floats), _ours(sixteen), atol=2e-2)
    nan = Image.fromarray(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN or Inf pixels"):
        load_image(nan)


def test_a_1_mb_label_does_not_pad_the_table(tiny_bundle, tmp_path):
    """One 1 MB label padded every row of the table to 1 MB (4 MB of output); a 200 kB one now overflows its own row
    only."""
    (tmp_path / "labels.txt").write_text("\n".join([*LABELS, "x" * 200_000]) + "\n")
    soundfile.write(tmp_path / "a.wav", tone(0.4), SAMPLE_RATE)
    args = ["infer", "--bundle", str(tiny_bundle[0]), "--labels", str(tmp_path / "labels.txt")]
    result = CliRunner().invoke(cli.main, [*args, "--audio", str(tmp_path / "a.wav"), "--top-k", "3"])
    assert result.exit_code == 0, result.output[-500:]
    assert len(result.stdout) < 200_000 + 2_000
    assert all(len(line) < 200 for line in result.stdout.splitlines() if "xxxxxxxxxx" not in line)
