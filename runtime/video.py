"""Video in: decode (PyAV, whose wheels ship FFmpeg and its codecs), sample frames uniformly, and read the soundtrack.

A video is two inputs the model already knows: its frames are images and its soundtrack is audio. Rules, chosen here
and documented in the README:

- Frames: ``max_frames`` (default 8) sampled uniformly over the duration, at most ``frames_per_second`` (default 1)
  of them per second of video, as CLIP4VLA samples (a 3 s clip gives 3 frames, a minute 8). Frame i is the first
  decoded frame at or after the centre of the i-th of N equal parts of the duration (the last frame where the stream
  ends early). A video over ``SEEK_AFTER_SECONDS`` (20 s) is sampled by seeking to the keyframe before each time and
  decoding up to it (one GOP per frame, the same frames), a shorter one in a single pass. Each is RGB at the video's
  coded size, turned upright as players show it: a phone stores portrait footage as landscape pictures plus a display
  matrix (an MP4/MOV track's matrix, a Matroska projection), which FFmpeg attaches to every decoded frame, and
  :func:`upright` applies it as ffmpeg's autorotate does (90/180/270 degrees, mirrors, other angles). A bare ``rotate``
  metadata tag without a matrix is ignored, as FFmpeg >= 5 ignores it. ``frame_transform`` (e.g. the image
  preprocessing) is applied to the upright frame as each is picked, so a long 4K video costs N preprocessed frames of
  memory, not N full frames.
- Soundtrack: the first audio stream, downmixed to mono by FFmpeg (a 5.1 film mix is downmixed with its standard
  matrix, where a plain audio file with more than 2 channels is refused), then through ``audio.load_audio``'s checks
  and soxr resampling, so a video's soundtrack and the same audio as a WAV give the same waveform. A soundtrack
  shorter than one analysis frame (25 ms) counts as none.
- A video stream without an audio stream is image-only; a container with audio but no video stream (an .m4a, a
  soundtrack-only .webm) is audio-only. A container with neither, a still image (FFmpeg opens PNG and JPEG as
  one-frame videos) and a file FFmpeg cannot open are refused.
- Bounded work: the duration (``max_seconds``, default 10 minutes) and the frame size (``MAX_PIXELS``) are checked
  from the headers before anything is decoded; decoding stops with an error past ``timeout_seconds`` of wall time,
  and the soundtrack is refused once it decodes past ``max_seconds``, so a lying header cannot grow memory.
- A stream that decodes to no frame is refused (0 frames); a file that ends long before the duration its header
  promises is truncated and refused, as is a stream FFmpeg reports as corrupt.

Training, ``synergy eval`` and the runtime all call :func:`load_video`: one source of truth for every file.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import DEFAULT_MAX_SECONDS, load_audio
from .errors import UnsupportedAudio, UnsupportedVideo
from .files import NotARegularFile, open_regular

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".flv")
DEFAULT_MAX_FRAMES = 8
DEFAULT_FRAMES_PER_SECOND = 1.0
DEFAULT_TIMEOUT_SECONDS = 120.0
MAX_PIXELS = 4096 * 4096  # per frame: 8K and larger are refused, not decoded into gigabytes
MAX_SIDE = 16_384
# FFmpeg demuxers that open a single picture as a one-frame "video"
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "gif", "tiff_pipe", "apng")
# a file whose last decoded frame ends this much before the header's duration is truncated
TRUNCATION_TOLERANCE = 0.1  # fraction of the duration (at least one second is always allowed)
# longer videos are sampled by seeking to each frame's time (one GOP decoded per frame) instead of decoding every frame
SEEK_AFTER_SECONDS = 20.0
INSTALL_HINT = "video decoding needs PyAV: pip install 'synergy-clip[video]' (or pip install av)"


@dataclass(frozen=True)
class Video:
    """A decoded video: ``frames`` (RGB uint8 [H, W, 3] arrays, upright: the display matrix applied; or
    ``frame_transform``'s output), the time of each in seconds, the soundtrack [T] float32 mono at ``sample_rate``
    (None: no usable audio), and the duration."""

    frames: tuple
    times: tuple[float, ...]
    audio: np.ndarray | None
    sample_rate: int
    duration: float

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, present in (("image", self.frames), ("audio", self.audio is not None)) if present)


def describe_video(source, index: int) -> str:
    """A short name for an input, used in error messages and results."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<video bytes #{index}, {len(source)} B>"
    return f"<video #{index}>"


def frame_times(duration: float, max_frames: int = DEFAULT_MAX_FRAMES, per_second: float = DEFAULT_FRAMES_PER_SECOND):
    """The sampling times of a video ``duration`` seconds long: N = clamp(floor(duration * per_second), 1,
    max_frames) centres of N equal parts. ``frame_times(3.0) == [0.5, 1.5, 2.5]``."""
    count = int(min(max_frames, max(1, np.floor(duration * per_second + 1e-9))))
    return [(i + 0.5) * duration / count for i in range(count)]


def _sampling_times(duration: float, max_frames: int, per_second: float, positions) -> list[float] | None:
    if duration <= 0:
        return None  # unknown: decided while decoding
    if positions is not None:
        return sorted(min(max(float(p), 0.0), 1.0) * duration for p in positions)
    return frame_times(duration, max_frames, per_second)


def import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings would flood stderr; errors come back typed
    return av


def load_video(
    source,
    sample_rate: int,
    *,
    name: str | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    frames_per_second: float = DEFAULT_FRAMES_PER_SECOND,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    frame_transform: Callable | None = None,
    frames: bool = True,
    audio: bool = True,
    positions: Sequence[float] | None = None,
) -> Video:
    """Decode one video file (a path or its bytes) -> ``Video``. ``frames=False`` / ``audio=False`` skip a stream
    (training reads what it needs). ``positions``: fractions of the duration in [0, 1) to sample instead of the
    uniform times (training's random frame). ``frame_transform``: applied to each sampled frame (a PIL RGB image)
    as it is decoded. Raises ``UnsupportedVideo`` naming the input."""
    name = name or describe_video(source, 0)
    if max_frames < 1 or frames_per_second <= 0:
        raise ValueError(f"max_frames must be >= 1 and frames_per_second > 0, got {max_frames}, {frames_per_second}")
    av = import_av()
    with _openable(source, name) as opened, _open_container(av, opened, name) as container:
        if container.format.name in IMAGE_FORMATS or container.format.name.endswith("_pipe"):
            still = container.format.name
            raise UnsupportedVideo(name, f"is a still image ({still}), not a video; pass it as an image")
        video_stream = container.streams.video[0] if container.streams.video else None
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        if video_stream is None and audio_stream is None:
            raise UnsupportedVideo(name, "has no video and no audio stream; pass a video file (MP4, WebM, MKV, MOV)")
        duration = _duration(container, video_stream or audio_stream)
        if duration > max_seconds:
            raise UnsupportedVideo(name, f"{duration:.1f} s long, over the {max_seconds:g} s limit; cut it first")
        if video_stream is not None:
            _check_size(video_stream, name)
        wanted = [s for s, on in ((video_stream, frames), (audio_stream, audio)) if s is not None and on]
        if video_stream is not None and not wanted:
            wanted = [video_stream]  # still proves the file decodes
        sampling = _sampling_times(duration, max_frames, frames_per_second, positions)
        seek = sampling is not None and video_stream in wanted and duration > SEEK_AFTER_SECONDS
        started = time.monotonic()
        in_order = [s for s in wanted if s is not video_stream] if seek else wanted
        decoded = ([], [], -1.0, None, None)
        if in_order:
            decoded = _decode_streams(
                av, container, in_order, video_stream, audio_stream, duration, name, timeout_seconds,
                max_seconds, sampling, frame_transform, max_frames, frames_per_second,
            )  # fmt: skip
        if seek:
            deadline = started + timeout_seconds
            decoded = (
                *_seek_frames(av, container, video_stream, sampling, deadline, name, frame_transform),
                *decoded[3:],
            )
    picked, times, last_video_time, sound, sound_rate = decoded
    if video_stream is not None and video_stream in wanted:
        if not picked:
            raise UnsupportedVideo(name, "0 frames decode from its video stream; the file is empty or corrupt")
        if duration > 0 and last_video_time < duration - max(1.0, TRUNCATION_TOLERANCE * duration):
            raise UnsupportedVideo(
                name,
                f"truncated: the header promises {duration:.2f} s but frames stop at {last_video_time:.2f} s; "
                "re-encode or re-download it",
            )
    waveform = None
    if sound is not None and sound.size:
        try:
            waveform = load_audio((sound, sound_rate), sample_rate, name=name, max_seconds=max_seconds + 1.0)
        except UnsupportedAudio as error:
            if "shorter than one analysis frame" not in error.problem:
                raise UnsupportedVideo(name, f"soundtrack: {error.problem}") from error
    if video_stream is None and waveform is None and audio:
        raise UnsupportedVideo(name, "its only stream is audio, and it decodes to less than 25 ms of sound")
    return Video(tuple(picked) if frames else (), tuple(times) if frames else (), waveform, sample_rate, duration)


def _openable(source, name: str):
    """A path -> its file, opened by ``files.open_regular`` (a FIFO, a device or a link loop is refused without
    blocking, and FFmpeg reads the very file that was checked); bytes -> a BytesIO. The caller closes it."""
    if isinstance(source, (str, os.PathLike)):
        try:
            opened = open_regular(Path(source))
        except NotARegularFile as error:
            hint = "pass video files (the CLI expands folders and globs)" if error.problem == "is a folder" else ""
            hint = hint or ("check the path" if "no such" in error.problem else "pass a regular video file")
            raise UnsupportedVideo(name, f"{error.problem}; {hint}") from error
        if os.fstat(opened.fileno()).st_size == 0:
            opened.close()
            raise UnsupportedVideo(name, "empty file (0 bytes); pass a video file")
        return opened
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnsupportedVideo(name, "empty bytes; pass the bytes of a video file (MP4, WebM, MKV, MOV)")
        return io.BytesIO(bytes(source))
    raise UnsupportedVideo(name, f"unsupported input of type {type(source).__name__}; pass a path or bytes")


def _open_container(av, opened, name: str):
    try:
        return av.open(opened, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as error:
        raise UnsupportedVideo(
            name, f"cannot be opened as a video ({_reason(error)}); the file is not a video, or truncated or corrupt"
        ) from error


def _reason(error) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _duration(container, stream) -> float:
    """Seconds, from the stream's header, else the container's; 0.0 when neither says."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def _check_size(stream, name: str) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise UnsupportedVideo(name, f"frame size {width}x{height} in the header; the file is corrupt, re-encode it")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise UnsupportedVideo(
            name,
            f"frames of {width}x{height} pixels, over the {MAX_PIXELS // 1_000_000} Mpx limit; downscale it "
            "(e.g. `ffmpeg -i in -vf scale=-2:720 out.mp4`)",
        )


def _picture(frame, transform):
    """A decoded frame -> RGB uint8 [H, W, 3] upright (its display matrix applied), or ``transform(PIL image)``."""
    from PIL import Image

    image = Image.fromarray(upright(frame.to_ndarray(format="rgb24"), display_matrix(frame)))
    return transform(image) if transform is not None else np.asarray(image)


def display_matrix(frame) -> np.ndarray | None:
    """A decoded frame's DISPLAYMATRIX side data -> int32 [9] (FFmpeg's layout: row-major 3x3, 16.16 fixed point),
    or None when it has none."""
    # Not frame.side_data: PyAV's side-data view and the frame refer to each other, so the decoded picture (and its
    # decoder's buffer pool) would live until the cyclic GC, and a GC run in a forked worker (from-videos' Pool) hangs
    # freeing it. A 2x2 copy carries the same side data (av_frame_copy_props) and holds no decoder buffer.
    probe = frame.reformat(width=2, height=2, format="gray", interpolation="POINT")
    side = next((data for data in probe.side_data if data.type.name == "DISPLAYMATRIX"), None)
    if side is None:
        return None
    matrix = np.frombuffer(bytes(side), dtype=np.int32)  # native-endian int32, as FFmpeg stores it
    return matrix if matrix.shape == (9,) else None


def display_rotation(matrix: np.ndarray) -> float:
    """ffmpeg's ``get_rotation``: the clockwise turn in whole degrees, in [0, 360), that shows the picture upright
    (``-round(av_display_rotation_get(matrix))``, wrapped). A degenerate matrix (a zero column) is no turn."""
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0.0 or scale_y == 0.0:
        return 0.0  # FFmpeg: NaN, which takes its no-turn branch too
    degrees = math.degrees(math.atan2(b / scale_y, a / scale_x))
    theta = math.copysign(math.floor(abs(degrees) + 0.5), degrees)  # C's round(): halves away from zero
    return theta - 360.0 * math.floor(theta / 360.0 + 0.9 / 360.0)


def upright(pixels: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """Pixels [H, W, C] as decoded -> as displayed, choosing the filters ffmpeg's autorotate (fftools) chooses: a
    quarter turn is a ``transpose`` (with the mirror the matrix holds), a half turn ``hflip`` and / or ``vflip``, no
    turn with a mirrored y axis ``vflip``, and any other angle the ``rotate`` filter (same size, bilinear, black
    corners). A quarter turn swaps H and W."""
    if matrix is None:
        return pixels
    theta = display_rotation(matrix)
    if abs(theta - 90.0) < 1.0:
        turned = pixels.transpose(1, 0, 2) if matrix[3] > 0 else np.rot90(pixels, -1)  # cclock_flip | clock
    elif abs(theta - 180.0) < 1.0:
        turned = pixels[:, ::-1] if matrix[0] < 0 else pixels  # hflip
        turned = turned[::-1] if matrix[4] < 0 else turned  # vflip
    elif abs(theta - 270.0) < 1.0:
        turned = np.rot90(pixels, -1)[::-1] if matrix[3] < 0 else np.rot90(pixels, 1)  # clock_flip | cclock
    elif abs(theta) > 1.0:
        from PIL import Image

        # the rotate filter turns clockwise by theta; PIL's rotate turns counter-clockwise
        return np.asarray(Image.fromarray(pixels).rotate(-theta, resample=Image.Resampling.BILINEAR))
    else:
        turned = pixels[::-1] if matrix[4] < 0 else pixels  # vflip
    return np.ascontiguousarray(turned)


def _seek_frames(av, container, stream, times, deadline: float, name: str, transform):
    """Long videos: for each sampling time, seek to the keyframe before it and decode up to the first frame at or
    after it -> (frames, their times, the end time of the last decoded frame). Past the last frame, the last frame;
    a file that ends before its header's duration is left to the caller's truncation check."""
    picked, picked_times, last_time = [], [], -1.0
    try:
        for target in times:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            stream.codec_context.flush_buffers()  # no frame from before the seek leaks into this one
            found = latest = None
            for packet in container.demux(stream):
                if time.monotonic() > deadline:
                    raise UnsupportedVideo(name, "decoding took too long; the file is too long or malformed")
                for frame in packet.decode():
                    if frame.time is None:
                        continue
                    step = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
                    last_time, latest = max(last_time, float(frame.time) + step), frame
                    if frame.time >= target - 1e-6:
                        found = frame
                        break
                if found is not None:
                    break
            # the stream ends before this time: its last frame, as the single pass picks
            found = found if found is not None else latest
            if found is None:
                break
            picked.append(_picture(found, transform))
            picked_times.append(float(found.time))
    except UnsupportedVideo:
        raise
    except (av.error.FFmpegError, ValueError, MemoryError) as error:
        raise UnsupportedVideo(
            name, f"cannot be decoded ({_reason(error)}); the file is truncated or corrupt, re-encode it"
        ) from error
    return picked, picked_times, last_time


def _decode_streams(
    av,
    container,
    wanted,
    video_stream,
    audio_stream,
    duration,
    name,
    timeout,
    max_seconds,
    times,
    transform,
    most,
    per_second,
):
    """One pass over the packets of the wanted streams -> (picked frames, their times, the last video frame's end
    time, soundtrack [T] float32 or None, its rate). ``times`` None: the duration is unknown, so every frame is
    kept up to ``most`` (at 1 per second) and thinned afterwards."""
    deadline = time.monotonic() + timeout
    picked, picked_times, pending = [], [], list(times) if times is not None else None
    last_video_time, last_frame, last_frame_time, unknown_kept, spacing = -1.0, None, 0.0, [], 1.0 / per_second
    resampler = av.AudioResampler(format="fltp", layout="mono") if audio_stream in wanted else None
    chunks, sound_rate, sound_samples = [], None, 0
    sound_limit = None
    if video_stream in wanted:
        video_stream.thread_type = "AUTO"

    try:
        for packet in container.demux(*wanted):
            if time.monotonic() > deadline:
                raise UnsupportedVideo(name, f"decoding took over {timeout:g} s; the file is too long or malformed")
            for frame in packet.decode():
                if packet.stream is video_stream:
                    at = float(frame.time) if frame.time is not None else last_video_time + 1e-3
                    step = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
                    last_video_time = max(last_video_time, at + step)
                    if pending is None:  # unknown duration: frames every `spacing` s, thinned to at most 2 x most
                        if not unknown_kept or at >= unknown_kept[-1][0] + spacing:
                            unknown_kept.append((at, _picture(frame, transform)))
                            if len(unknown_kept) >= 2 * most:  # memory stays bounded: drop every other, space wider
                                unknown_kept, spacing = unknown_kept[::2], 2 * spacing
                        continue
                    while pending and at >= pending[0] - 1e-6:
                        picked.append(_picture(frame, transform))
                        picked_times.append(at)
                        pending.pop(0)
                    last_frame, last_frame_time = frame, at
                else:
                    # an encoder's priming samples carry negative times (AAC: 1024 before 0): players drop them
                    skip = round(-float(frame.time) * frame.sample_rate) if frame.time is not None else 0
                    for converted in resampler.resample(frame):
                        sound_rate = converted.sample_rate
                        sound_limit = sound_limit or int((max_seconds + 1.0) * sound_rate)
                        samples = converted.to_ndarray()[0]  # [n]: planar float, mono
                        if skip > 0:
                            samples, skip = samples[skip:], max(0, skip - samples.shape[0])
                        sound_samples += samples.shape[0]
                        if sound_samples > sound_limit:
                            raise UnsupportedVideo(
                                name, f"its soundtrack decodes past the {max_seconds:g} s limit; cut it first"
                            )
                        chunks.append(samples.astype(np.float32, copy=False))
        if resampler is not None:
            for converted in resampler.resample(None):
                sound_rate = converted.sample_rate
                chunks.append(converted.to_ndarray()[0].astype(np.float32, copy=False))
    except UnsupportedVideo:
        raise
    except (av.error.FFmpegError, ValueError, MemoryError) as error:
        raise UnsupportedVideo(
            name, f"cannot be decoded ({_reason(error)}); the file is truncated or corrupt, re-encode it"
        ) from error
    if pending is None and unknown_kept:  # thin the 1-per-second frames uniformly to at most ``most``
        keep = np.unique(np.linspace(0, len(unknown_kept) - 1, min(most, len(unknown_kept))).round().astype(int))
        picked = [unknown_kept[i][1] for i in keep]
        picked_times = [unknown_kept[i][0] for i in keep]
    elif pending and last_frame is not None:  # the stream ended before the last sampling times: repeat its end
        for _ in pending:
            picked.append(_picture(last_frame, transform))
            picked_times.append(last_frame_time)
    sound = np.concatenate(chunks) if chunks else None
    if sound is not None and audio_stream.duration and audio_stream.time_base and sound_rate:
        # the last codec frame is padded past the end of the audio: keep the duration the stream declares
        sound = sound[: max(1, round(float(audio_stream.duration * audio_stream.time_base) * sound_rate))]
    return picked, picked_times, last_video_time, sound, sound_rate
