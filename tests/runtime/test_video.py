"""Video in (runtime.video + Runtime.embed_video / classify(video=) + `synergy infer --video`): the four containers
(MP4 H.264+AAC, WebM VP9+Opus, MKV, MOV) written here with PyAV, frame sampling (at most 1 per second, at most 8),
the soundtrack equal to the same audio given as audio, silent videos (image-only) and audio-only containers, a
named error for every bad file, and phone videos' display matrices applied as ffmpeg's autorotate applies them (checked
against the ffmpeg CLI where it is installed). Files are tiny (32 px, a few seconds at a few fps)."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from synergy.cli.infer import InferInputs, InferOptions, run
from synergy.runtime import video as video_module
from synergy.runtime.errors import InputError, UnsupportedVideo
from synergy.runtime.search import l2_normalise
from synergy.runtime.video import frame_times, load_video
from synergy.train.datasets.synth_video import write_video

from .conftest import LABELS, SAMPLE_RATE, tone

SIZE = 32


def frames(count: int, seed: int = 0) -> np.ndarray:
    """[count, SIZE, SIZE, 3] uint8: a bright square moving right over a gradient, so frames differ."""
    base = np.linspace(0, 200, SIZE, dtype=np.float32)[None, :, None] * np.ones((SIZE, 1, 3), np.float32)
    out = np.repeat(base[None], count, 0)
    for i in range(count):
        x = (4 + 3 * i + seed) % (SIZE - 8)
        out[i, 8:20, x : x + 8] = (250, 40 + 20 * seed, 40)
    return out.astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    made = {}
    for i, suffix in enumerate((".mp4", ".webm", ".mkv", ".mov")):
        made[suffix] = root / f"clip{i}{suffix}"
        write_video(made[suffix], frames(12, i), 4, tone(3.0, freq=300 + 200 * i), SAMPLE_RATE)  # 3 s at 4 fps
    made["silent"] = root / "silent.mp4"
    write_video(made["silent"], frames(8), 4, None)
    made["long"] = root / "long.mkv"
    write_video(made["long"], frames(12), 1, None)  # 12 s at 1 fps
    av = video_module.import_av()
    made["audio_only"] = root / "sound.m4a"
    with av.open(str(made["audio_only"]), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(1.5)[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    made["not_video"] = root / "notes.mp4"
    made["not_video"].write_text("this is text, not a video\n" * 50)
    made["empty"] = root / "empty.webm"
    made["empty"].write_bytes(b"")
    data = made[".mkv"].read_bytes()
    made["truncated"] = root / "truncated.mkv"
    made["truncated"].write_bytes(data[: len(data) // 3])
    data = made[".mp4"].read_bytes()  # MP4 writes its index (moov) last: a cut file cannot even be opened
    made["cut_mp4"] = root / "cut.mp4"
    made["cut_mp4"].write_bytes(data[: len(data) // 2])
    from PIL import Image

    made["still"] = root / "still.mp4"
    Image.fromarray(frames(1)[0]).save(made["still"], format="PNG")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    made["labels"] = root / "labels.txt"
    return made


def test_frame_times_are_uniform_at_most_one_per_second_and_eight():
    assert frame_times(3.0) == [0.5, 1.5, 2.5]
    assert frame_times(0.4) == [0.2]
    assert len(frame_times(60.0)) == 8 and frame_times(60.0)[0] == 3.75
    assert frame_times(10.0, max_frames=4, per_second=2.0) == [1.25, 3.75, 6.25, 8.75]


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov"])
def test_each_container_gives_frames_and_the_soundtrack(videos, suffix):
    decoded = load_video(videos[suffix], SAMPLE_RATE)
    assert decoded.modalities == ("image", "audio")
    assert len(decoded.frames) == 3 and decoded.frames[0].shape == (SIZE, SIZE, 3)
    assert decoded.frames[0].dtype == np.uint8
    assert [round(t * 4) / 4 for t in decoded.times] == pytest.approx([0.5, 1.5, 2.5], abs=0.26)
    assert not np.array_equal(decoded.frames[0], decoded.frames[2])  # the square moved
    # the soundtrack: 3 s at the model's rate (codec priming / padding adds a few ms), a tone at the right pitch
    assert abs(decoded.audio.shape[0] / SAMPLE_RATE - 3.0) < 0.1
    spectrum = np.abs(np.fft.rfft(decoded.audio[SAMPLE_RATE // 2 : SAMPLE_RATE * 2]))
    peak = np.argmax(spectrum) * SAMPLE_RATE / (1.5 * SAMPLE_RATE)
    assert abs(peak - (300 + 200 * [".mp4", ".webm", ".mkv", ".mov"].index(suffix))) < 5


def test_bytes_decode_like_the_file(videos):
    from_file = load_video(videos[".mp4"], SAMPLE_RATE)
    from_bytes = load_video(videos[".mp4"].read_bytes(), SAMPLE_RATE)
    assert all(np.array_equal(a, b) for a, b in zip(from_file.frames, from_bytes.frames))
    np.testing.assert_array_equal(from_file.audio, from_bytes.audio)


def test_long_video_is_capped_at_eight_frames_and_silent_video_is_image_only(videos):
    long = load_video(videos["long"], SAMPLE_RATE)
    assert len(long.frames) == 8 and long.audio is None and long.modalities == ("image",)
    assert long.times == pytest.approx([0.75 + 1.5 * i for i in range(8)], abs=0.76)
    assert len(load_video(videos["long"], SAMPLE_RATE, max_frames=3).frames) == 3
    silent = load_video(videos["silent"], SAMPLE_RATE)
    assert silent.modalities == ("image",) and len(silent.frames) == 2


def test_audio_only_container_is_audio_only(videos):
    decoded = load_video(videos["audio_only"], SAMPLE_RATE)
    assert decoded.modalities == ("audio",) and decoded.frames == ()
    assert abs(decoded.audio.shape[0] / SAMPLE_RATE - 1.5) < 0.1


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("not_video", "cannot be opened as a video"),
        ("empty", "empty file"),
        ("truncated", "truncated"),
        ("cut_mp4", "truncated or corrupt"),
        ("still", "still image"),
    ],
)
def test_bad_files_are_named_errors(videos, key, words):
    with pytest.raises(UnsupportedVideo, match=words) as caught:
        load_video(videos[key], SAMPLE_RATE)
    assert caught.value.source == str(videos[key])


def test_missing_folder_too_long_too_large_and_too_slow_are_refused(videos, monkeypatch, tmp_path):
    with pytest.raises(UnsupportedVideo, match="no such file"):
        load_video(tmp_path / "nope.mp4", SAMPLE_RATE)
    with pytest.raises(UnsupportedVideo, match="is a folder"):
        load_video(tmp_path, SAMPLE_RATE)
    with pytest.raises(UnsupportedVideo, match="over the 2 s limit"):
        load_video(videos[".mp4"], SAMPLE_RATE, max_seconds=2.0)
    with pytest.raises(UnsupportedVideo, match="decoding took over"):
        load_video(videos[".mp4"], SAMPLE_RATE, timeout_seconds=0.0)
    monkeypatch.setattr(video_module, "MAX_PIXELS", 31 * 31)
    with pytest.raises(UnsupportedVideo, match="32x32 pixels"):
        load_video(videos[".mp4"], SAMPLE_RATE)


def test_embed_video_pools_frames_and_embeds_the_soundtrack_as_audio(runtime, videos):
    decoded = load_video(videos[".mkv"], SAMPLE_RATE)
    result = runtime.embed_video([str(videos[".mkv"]), videos["silent"], videos["audio_only"]])
    frames_alone = runtime.embed_image(list(decoded.frames))  # [3, D], each normalised
    np.testing.assert_allclose(result.image[0], l2_normalise(frames_alone.mean(0)), atol=1e-5)
    np.testing.assert_allclose(result.audio[0], runtime.embed_audio([(decoded.audio, SAMPLE_RATE)])[0], atol=1e-5)
    np.testing.assert_allclose(result.fused[0], l2_normalise(result.image[0] + result.audio[0]), atol=1e-5)
    assert result.modalities == (("image", "audio"), ("image",), ("audio",))
    assert np.isnan(result.audio[1]).all() and np.isnan(result.image[2]).all()
    np.testing.assert_allclose(result.fused[1], result.image[1], atol=1e-6)
    np.testing.assert_allclose(result.fused[2], result.audio[2], atol=1e-6)
    with pytest.raises(UnsupportedVideo, match="cannot be opened"):
        runtime.embed_video([videos[".mp4"], videos["not_video"]])


def test_a_stream_with_a_non_finite_embedding_fails_its_video_alone(runtime, videos, monkeypatch):
    """A soundtrack of huge finite samples (3e38, as a float WAV can hold) embeds to NaN: that video is an error
    naming it, never an answer built from its other stream or a NaN probability; the other video is answered."""
    import synergy.runtime.video_embedding as runtime_module

    real_load_video = runtime_module.load_video

    def loud(item, *args, **kwargs):
        video = real_load_video(item, *args, **kwargs)
        return dataclasses.replace(video, audio=np.full_like(video.audio, 3e38)) if "clip0" in str(item) else video

    monkeypatch.setattr(runtime_module, "load_video", loud)
    result = runtime.embed_video_batch([videos[".mp4"], videos[".webm"]])
    assert isinstance(result.errors[0], InputError) and "non-finite" in str(result.errors[0])
    assert result.errors[1] is None and result.modalities[1] == ("image", "audio")
    predictions = runtime.classify_video(LABELS, [videos[".mp4"], videos[".webm"]])
    assert [p.ok for p in predictions] == [False, True]


def test_classify_video_fuses_with_the_streams_scale(runtime, videos):
    predictions = runtime.classify(LABELS, video=[videos[".webm"], videos["not_video"], videos["silent"]], top_k=2)
    assert [p.ok for p in predictions] == [True, False, True]
    assert predictions[0].modalities == ("image", "audio") and predictions[2].modalities == ("image",)
    assert isinstance(predictions[1].error, UnsupportedVideo)
    fused = runtime.embed_video(videos[".webm"]).fused[0]
    similarity = runtime.label_embeddings(LABELS) @ fused
    logits = runtime.label_scale(["image", "audio"]) * similarity
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert predictions[0].top[0].probability == pytest.approx(probabilities.max(), rel=1e-5)
    assert predictions[0].top[0].label == LABELS[int(np.argmax(probabilities))]


def test_infer_video_answers_every_container_and_names_each_bad_file(tiny_bundle, videos, capsys):
    good = [str(videos[s]) for s in (".mp4", ".webm", ".mkv", ".mov")]
    bad = [str(videos["truncated"]), str(videos["not_video"])]
    options = InferOptions(str(videos["labels"]), bundle=str(tiny_bundle[0]), top_k=2, as_json=True)
    code = run(InferInputs(video=good + bad), options)
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["input"] for r in records] == good + bad
    assert [r["ok"] for r in records] == [True] * 4 + [False] * 2
    assert all(r["modality"] == "video" and r["streams"] == ["image", "audio"] for r in records[:4])
    assert {r["error"]["type"] for r in records[4:]} == {"UnsupportedVideo"}
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("synergy infer: 6 inputs, 4 ok, 2 failed in ")


def test_infer_video_cli_table_and_globs(tiny_bundle, videos):
    from click.testing import CliRunner

    from synergy.cli import main

    folder = videos[".mp4"].parent
    args = ["infer", "--video", str(folder / "clip*"), "--video", str(videos["silent"])]
    args += ["--labels", str(videos["labels"]), "--bundle", str(tiny_bundle[0]), "--top-k", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("clip") == 4 and "silent.mp4" in result.output
    missing = CliRunner().invoke(main, [*args[:2], str(folder / "nothing*.mp4"), *args[3:]])
    assert missing.exit_code == 1, missing.output
    assert "no files match this pattern" in missing.output


def test_a_stream_without_a_duration_is_sampled_across_its_length(tmp_path):
    """A raw H.264 stream has no container and no duration: frames are kept every second (thinned as they pile up,
    so memory stays bounded) and at most 8 are returned, spread over the whole stream."""
    av = video_module.import_av()
    with av.open(str(tmp_path / "raw.h264"), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i in range(40):  # 20 s at 2 fps, brighter each frame
            pixels = np.full((SIZE, SIZE, 3), i * 6, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode(None))
    decoded = load_video(tmp_path / "raw.h264", SAMPLE_RATE)
    brightness = [float(f.mean()) for f in decoded.frames]
    assert decoded.duration == 0.0 and len(decoded.frames) == 8 and decoded.audio is None
    assert brightness == sorted(brightness) and brightness[0] < 30 and brightness[-1] > 190


@pytest.mark.parametrize("key", ["long", ".mp4", ".webm"])
def test_seeking_gives_the_frames_of_a_single_pass(videos, monkeypatch, key):
    """Long videos are sampled by seeking; forced on for these short ones, it must pick the very same frames."""
    one_pass = load_video(videos[key], SAMPLE_RATE)
    monkeypatch.setattr(video_module, "SEEK_AFTER_SECONDS", 0.0)
    seeking = load_video(videos[key], SAMPLE_RATE)
    assert seeking.times == one_pass.times
    assert all(np.array_equal(a, b) for a, b in zip(seeking.frames, one_pass.frames))
    assert (seeking.audio is None) == (one_pass.audio is None)
    if one_pass.audio is not None:
        np.testing.assert_array_equal(seeking.audio, one_pass.audio)
    with pytest.raises(UnsupportedVideo, match="truncated"):
        load_video(videos["truncated"], SAMPLE_RATE)


def test_infer_video_leaves_torch_out(tiny_bundle, videos):
    check = f"""
from synergy.cli.infer import InferInputs, InferOptions, run
options = InferOptions({str(videos["labels"])!r}, bundle={str(tiny_bundle[0])!r})
code = run(InferInputs(video=[{str(videos[".mkv"])!r}]), options)
assert code == 0, code
heavy = sorted(m for m in ("torch", "transformers", "torchaudio", "torchvision") if m in sys.modules)
print("HEAVY", heavy)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", "import sys\n" + check]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


# --- display matrices (phone videos) ---------------------------------------------------------------------------------

# the eight ways a display matrix can place a picture: (counter-clockwise degrees, hflip, vflip) as PyAV writes them
ORIENTATIONS = [(0, False, False), (90, False, False), (180, False, False), (270, False, False),
                (0, True, False), (0, False, True), (90, True, False), (90, False, True)]  # fmt: skip


def marked_picture(height: int = 24, width: int = 40) -> np.ndarray:
    """[H, W, 3] uint8, grey with a red block in the top-left corner and a green one in the top-right: no rotation or
    mirror maps it onto itself, and H != W shows a quarter turn."""
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[:8, :8] = (255, 0, 0)
    picture[:8, -8:] = (0, 255, 0)
    return picture


def write_oriented(path, ccw: int = 0, hflip: bool = False, vflip: bool = False, codec: str = "libx264") -> None:
    """A 1 s, 4 fps video of ``marked_picture`` whose stream carries a display matrix (written by PyAV as FFmpeg's
    muxers write a phone's: the MP4/MOV track matrix, Matroska's projection), or none for (0, False, False)."""
    av = video_module.import_av()
    picture = marked_picture()
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = picture.shape[1], picture.shape[0], "yuv420p"
        if (ccw, hflip, vflip) != (0, False, False):
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (set_display_rotation is newer)")
            stream.set_display_rotation(ccw, hflip=hflip, vflip=vflip)
        for _ in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))


def as_displayed(picture: np.ndarray, ccw: int, hflip: bool, vflip: bool) -> np.ndarray:
    """What a player shows: turned ``ccw`` degrees counter-clockwise, then mirrored."""
    shown = np.rot90(picture, ccw // 90)
    shown = shown[:, ::-1] if hflip else shown
    return shown[::-1] if vflip else shown


def corner_colours(pixels: np.ndarray) -> str:
    """R (red), G (green) or . (grey) for the top-left, top-right, bottom-left and bottom-right corners."""

    def colour(block):
        red, green, _ = block.reshape(-1, 3).astype(float).mean(0)
        return "R" if red > 200 and green < 80 else "G" if green > 200 and red < 80 else "."

    top, left, bottom, right = slice(0, 4), slice(0, 4), slice(-4, None), slice(-4, None)
    return "".join(colour(pixels[y, x]) for y, x in ((top, left), (top, right), (bottom, left), (bottom, right)))


def ffmpeg_cli() -> str | None:
    """The ffmpeg CLI: the system's, else the static build the imageio-ffmpeg wheel ships (the dev extra installs it,
    so a machine without a system ffmpeg still runs the parity tests)."""
    found = shutil.which("ffmpeg")
    if found is None:
        try:
            import imageio_ffmpeg
        except ImportError:
            return None
        found = imageio_ffmpeg.get_ffmpeg_exe()
    return found


FFMPEG = ffmpeg_cli()


def ffmpeg_first_frame(path) -> np.ndarray:
    """The ffmpeg CLI's own first frame of ``path`` (autorotate is on by default) as RGB [H, W, 3]."""
    from PIL import Image

    command = [FFMPEG, "-v", "error", "-nostdin", "-i", str(path), "-frames:v", "1", "-f", "image2pipe"]
    png = subprocess.run([*command, "-c:v", "png", "-"], capture_output=True, check=True, timeout=60).stdout
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg CLI is not installed")


@pytest.mark.parametrize(("ccw", "hflip", "vflip"), ORIENTATIONS)
def test_frames_are_upright_as_the_display_matrix_says(tmp_path, monkeypatch, ccw, hflip, vflip):
    """A phone stores a portrait video as landscape pictures plus a display matrix: every frame comes back as it is
    displayed, in the single pass, in the seeking path, and as the PIL image ``frame_transform`` is given."""
    write_oriented(tmp_path / "phone.mp4", ccw, hflip, vflip)
    expected = as_displayed(marked_picture(), ccw, hflip, vflip)
    seen = []
    load_video(tmp_path / "phone.mp4", SAMPLE_RATE, frame_transform=lambda image: seen.append(image.size))
    assert seen == [(expected.shape[1], expected.shape[0])]  # PIL sizes are (W, H)
    decoded = load_video(tmp_path / "phone.mp4", SAMPLE_RATE)
    frame = decoded.frames[0]
    assert len(decoded.frames) == 1 and frame.shape == expected.shape
    assert sorted(corner_colours(expected)) == [".", ".", "G", "R"]  # the helper sees both blocks
    assert corner_colours(frame) == corner_colours(expected)
    assert np.abs(frame.astype(int) - expected).mean() < 4  # H.264 4:2:0 round trip
    monkeypatch.setattr(video_module, "SEEK_AFTER_SECONDS", 0.0)
    np.testing.assert_array_equal(load_video(tmp_path / "phone.mp4", SAMPLE_RATE).frames[0], frame)


@pytest.mark.parametrize(("suffix", "codec"), [(".mov", "libx264"), (".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_the_display_matrix_of_mov_mkv_and_webm_applies_too(tmp_path, suffix, codec):
    write_oriented(tmp_path / f"phone{suffix}", 270, codec=codec)
    frame = load_video(tmp_path / f"phone{suffix}", SAMPLE_RATE).frames[0]
    expected = as_displayed(marked_picture(), 270, False, False)
    assert frame.shape == expected.shape and corner_colours(frame) == corner_colours(expected) == ".R.G"


@needs_ffmpeg
@pytest.mark.parametrize(("ccw", "hflip", "vflip"), [*ORIENTATIONS, (45, False, False), (-30, False, False)])
def test_frames_match_the_ffmpeg_cli_autorotated(tmp_path, ccw, hflip, vflip):
    """Parity with the real tool: the ffmpeg CLI decodes the same file with its autorotate; quarter turns and mirrors
    match it up to colour conversion, other angles (its ``rotate`` filter) up to the antialiasing of the edges."""
    write_oriented(tmp_path / "phone.mp4", ccw, hflip, vflip)
    ours = load_video(tmp_path / "phone.mp4", SAMPLE_RATE, positions=[0.0]).frames[0].astype(int)
    theirs = ffmpeg_first_frame(tmp_path / "phone.mp4").astype(int)
    assert ours.shape == theirs.shape
    if ccw % 90 == 0:
        assert corner_colours(ours) == corner_colours(theirs)
        assert np.abs(ours - theirs).mean() < 2
    else:
        assert np.abs(ours - theirs).mean() < 10
        assert np.abs(marked_picture() - theirs).mean() > 3 * np.abs(ours - theirs).mean()  # turned, not as decoded


@needs_ffmpeg
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotation_set_by_the_ffmpeg_cli_matches_its_own_decode(tmp_path, degrees):
    """The ffmpeg CLI itself marks a stream-copied file as rotated (``-display_rotation`` since FFmpeg 6; before, the
    ``rotate`` tag, which FFmpeg 5's MP4 muxer turns into the track matrix), then decodes it autorotated."""
    plain, out = tmp_path / "plain.mp4", tmp_path / f"rotated{degrees}.mp4"
    write_oriented(plain)
    ffmpeg = [FFMPEG, "-v", "error", "-nostdin", "-y"]
    newer = [*ffmpeg, "-display_rotation", str(degrees), "-i", str(plain), "-c", "copy", str(out)]
    older = [*ffmpeg, "-i", str(plain), "-metadata:s:v:0", f"rotate={degrees}", "-c", "copy", str(out)]
    if subprocess.run(newer, capture_output=True, timeout=60).returncode != 0:
        subprocess.run(older, capture_output=True, check=True, timeout=60)
    theirs = ffmpeg_first_frame(out)
    ours = load_video(out, SAMPLE_RATE, positions=[0.0]).frames[0]
    assert ours.shape == theirs.shape == ((24, 40, 3) if degrees == 180 else (40, 24, 3))
    assert corner_colours(ours) == corner_colours(theirs) != corner_colours(marked_picture())
    assert np.abs(ours.astype(int) - theirs).mean() < 2


def test_a_fifo_a_link_loop_and_a_device_are_refused_without_blocking(tmp_path):
    """Paths open through ``files.open_regular``: a FIFO would block a worker forever and a device never ends."""
    os.mkfifo(tmp_path / "pipe.mp4")
    os.symlink(tmp_path / "loop.mp4", tmp_path / "loop.mp4")
    for path, words in ((tmp_path / "pipe.mp4", "a FIFO"), (tmp_path / "loop.mp4", "symbolic link loop"),
                        ("/dev/zero", "character device")):  # fmt: skip
        with pytest.raises(UnsupportedVideo, match=words) as caught:
            load_video(path, SAMPLE_RATE)
        assert caught.value.source == str(path) and "pass a regular video file" in caught.value.problem


def test_a_bare_rotate_tag_without_a_matrix_is_ignored_as_ffmpeg_ignores_it(tmp_path):
    """A ``rotate`` metadata tag in a Matroska file is no display matrix: FFmpeg >= 5 neither turns it into one nor
    autorotates by it, and neither does the decoder (the ffmpeg CLI agrees where it is installed)."""
    av = video_module.import_av()
    picture = marked_picture()
    with av.open(str(tmp_path / "tagged.mkv"), "w") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = picture.shape[1], picture.shape[0], "yuv420p"
        stream.metadata["rotate"] = "90"
        for _ in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    with av.open(str(tmp_path / "tagged.mkv")) as container:
        assert {k.lower(): v for k, v in container.streams.video[0].metadata.items()}.get("rotate") == "90"
    frame = load_video(tmp_path / "tagged.mkv", SAMPLE_RATE).frames[0]
    assert frame.shape == picture.shape and corner_colours(frame) == corner_colours(picture) == "RG.."
    if FFMPEG is not None:
        assert corner_colours(ffmpeg_first_frame(tmp_path / "tagged.mkv")) == "RG.."


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_reading_the_display_matrix_keeps_no_decoded_frame_alive(tmp_path):
    """Decoded frames are freed as soon as they are used. PyAV's ``frame.side_data`` would tie each frame in a
    reference cycle, keeping its picture and its decoder's buffer pool until the cyclic GC; that GC, run in a worker
    forked afterwards (from-videos' Pool), hung freeing them."""
    import gc

    av = video_module.import_av()
    write_oriented(tmp_path / "phone.mp4", 90)
    gc.collect()
    gc.disable()
    try:
        load_video(tmp_path / "phone.mp4", SAMPLE_RATE)
        alive = [o for o in gc.get_objects() if type(o) is av.VideoFrame and (o.width, o.height) == (40, 24)]
        assert alive == []
        pid = os.fork()
        if pid == 0:  # the child collects whatever cyclic garbage the parent left, as a Pool worker would
            import signal

            signal.alarm(20)
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        gc.enable()
