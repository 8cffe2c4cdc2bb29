"""LogMelFrontend against transformers' ASTFeatureExtractor (its numpy kaldi path: torchaudio is not installed),
plus batch consistency and ONNX export (dynamic batch and time, no STFT/DFT/FFT op, onnxruntime parity).

Tolerance, on the normalised output ``(log_mel - mean) / (2 * std)`` (one unit = 9.14 nats of mel power):
the module computes the DFT as a float32 conv with float32-rounded weights, the extractor in float64 (stored as
complex64, logs cast to float32). Against the same fold run in float64 the extractor agrees to 1.4e-7, so every
difference is float32 rounding of the conv: its absolute noise is ~1e-7 of the frame's energy, so the log error
of a mel bin grows as that bin falls below the frame's loudest one. Measured max abs error on the 10 s signals below,
by how far a bin is below its frame's loudest bin:
    0-20 dB  <= 1.6e-6   20-40 dB <= 3.6e-6   40-60 dB <= 1.4e-5   60-80 dB <= 8.7e-5   80+ dB <= 2.8e-4 (chirp)
The tests assert 1e-5 for bins within 40 dB and 1e-3 for every bin (bins 100 dB down sit near the 1.19e-7 floor;
2.8e-4 there is a 0.26 % power error, far below anything the model can see).
"""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from synergy.core.audio_frontend import LogMelFrontend

SAMPLE_RATE = 16_000
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974
NEAR_BIN_DB = 40.0  # bins within this many dB of their frame's loudest bin get the tight tolerance
NEAR_BIN_ATOL = 1e-5
ALL_BIN_ATOL = 1e-3


def _signal(name: str, num_samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLE_RATE
    if name == "noise":
        wave = 0.1 * rng.standard_normal(num_samples)
    elif name == "chirp":  # 20 Hz -> 8 kHz sweep over 10 s
        wave = 0.5 * np.sin(2 * np.pi * (20 * t + (8000 - 20) / 20 * t**2))
    elif name == "tones_dc":
        wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t) + 0.5
    elif name == "quiet_tone_dc":  # a faint tone riding a large offset: the DC leak case
        wave = 1e-3 * np.sin(2 * np.pi * 440 * t) + 0.9
    elif name == "quiet":  # near the mel floor
        wave = 1e-5 * rng.standard_normal(num_samples)
    else:
        raise ValueError(name)
    return wave.astype(np.float32)


def _extractor(n_mels: int, num_frames: int):
    from transformers import ASTFeatureExtractor

    with warnings.catch_warnings():  # 128 kaldi bins over 257 FFT bins leaves the lowest filter empty: expected
        warnings.simplefilter("ignore", UserWarning)
        return ASTFeatureExtractor(
            sampling_rate=SAMPLE_RATE,
            num_mel_bins=n_mels,
            max_length=num_frames,
            mean=AUDIOSET_MEAN,
            std=AUDIOSET_STD,
            do_normalize=True,
        )


def _assert_close_in_float32(got: np.ndarray, expected: np.ndarray) -> None:
    """The tiered tolerance of the module docstring: tight within 40 dB of each frame's loudest bin, loose below."""
    error = np.abs(got - expected)
    assert error.max() <= ALL_BIN_ATOL, f"max abs error {error.max():.2e}"
    near_margin = NEAR_BIN_DB * math.log(10) / 10 / (2 * AUDIOSET_STD)  # dB -> normalised units
    near = expected >= expected.max(axis=-1, keepdims=True) - near_margin
    assert error[near].max() <= NEAR_BIN_ATOL, f"max abs error within {NEAR_BIN_DB} dB: {error[near].max():.2e}"


def _assert_matches_extractor(frontend: LogMelFrontend, wave: np.ndarray, extractor) -> None:
    expected = extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
    got = frontend(torch.from_numpy(wave)[None])[0].numpy()
    assert got.shape == expected.shape == (frontend.num_frames, frontend.n_mels)
    _assert_close_in_float32(got, expected)


@pytest.fixture(scope="module")
def audioset_frontend():
    return LogMelFrontend(SAMPLE_RATE, 128, 1024, AUDIOSET_MEAN, AUDIOSET_STD)


@pytest.fixture(scope="module")
def small_frontend():
    return LogMelFrontend(SAMPLE_RATE, n_mels=37, num_frames=59).eval()


@pytest.fixture(scope="module")
def audioset_extractor():
    return _extractor(128, 1024)


@pytest.mark.parametrize("name", ["noise", "chirp", "tones_dc", "quiet_tone_dc", "quiet"])
def test_matches_ast_extractor_on_10s_clips(name, audioset_frontend, audioset_extractor):
    wave = _signal(name, 160_000)  # 998 frames: the last 26 rows are padding
    _assert_matches_extractor(audioset_frontend, wave, audioset_extractor)


@pytest.mark.parametrize(
    "num_samples",
    [
        48_000 + 123,  # 3 s: mostly padding
        170_000,  # 1061 frames: cropped to 1024
        (1024 - 1) * 160 + 400,  # exactly 1024 frames
        (1024 - 1) * 160 + 399,  # one sample short of frame 1024: it must be padding
    ],
)
def test_pads_and_crops_like_ast_extractor(num_samples, audioset_frontend, audioset_extractor):
    _assert_matches_extractor(audioset_frontend, _signal("noise", num_samples, seed=1), audioset_extractor)


@pytest.mark.parametrize("name, num_samples", [("noise", 4_567), ("chirp", 9_999), ("tones_dc", 30_001)])
def test_matches_ast_extractor_odd_config(name, num_samples):
    # 59 frames read 9_680 samples: 4_567 is padded, 9_999 has 59 frames and a tail, 30_001 is cropped
    frontend = LogMelFrontend(SAMPLE_RATE, n_mels=37, num_frames=59, mean=-3.1, std=2.7)
    extractor = _extractor(37, 59)
    extractor.mean, extractor.std = -3.1, 2.7
    _assert_matches_extractor(frontend, _signal(name, num_samples, seed=2), extractor)


@pytest.mark.parametrize("num_samples", [0, 1, 399, 400])
def test_shorter_than_a_frame_is_all_padding(num_samples, small_frontend):
    frontend = small_frontend
    out = frontend(torch.ones(3, num_samples))
    padding = (0.0 - frontend.mean) / (2 * frontend.std)
    padded_rows = 59 if num_samples < 400 else 58
    assert out.shape == (3, 59, 37)
    np.testing.assert_allclose(out[:, 59 - padded_rows :].numpy(), padding, rtol=1e-6)
    if num_samples == 400:  # one real frame: a constant frame has no AC energy, so it sits at the log floor
        floor = (math.log(1.192092955078125e-07) - frontend.mean) / (2 * frontend.std)
        np.testing.assert_allclose(out[:, 0].numpy(), floor, rtol=1e-6)


def test_batch_rows_equal_single_calls(small_frontend):
    frontend = small_frontend
    batch = torch.from_numpy(np.stack([_signal(n, 9_999, seed=3) for n in ["noise", "chirp", "tones_dc", "quiet"]]))
    out = frontend(batch).numpy()
    for row in range(batch.shape[0]):
        # the conv may pick another blocking for another batch size: equal up to float32 rounding, not bitwise
        _assert_close_in_float32(out[row], frontend(batch[row : row + 1])[0].numpy())


def test_padded_batch_with_lengths_equals_each_clip_alone_through_the_extractor(audioset_frontend, audioset_extractor):
    """Real lengths, not full clips: a 0.5 s, a 5 s and a one-clip (10.24 s) clip zero-padded into one batch, with
    each row's real samples, give each clip's own extractor features (the extractor pads the log-mel with 0;
    padding the waveform instead would put log(floor) frames there and shift the clip statistics)."""
    lengths = [8_000, 80_000, 163_840]
    waves = [_signal("noise", n, seed=8 + i) + 0.3 for i, n in enumerate(lengths)]  # an offset, so the mean matters
    batch = torch.zeros(3, max(lengths))
    for row, wave in enumerate(waves):
        batch[row, : wave.size] = torch.from_numpy(wave)
    out = audioset_frontend(batch, torch.tensor(lengths)).numpy()
    for row, wave in enumerate(waves):
        expected = audioset_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
        _assert_close_in_float32(out[row], expected)
    # without the lengths the zeros would be samples: the short clip's padded frames move far off the extractor's
    wrong = audioset_frontend(batch[:1]).numpy()[0]
    expected = audioset_extractor(waves[0], sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
    assert np.abs(wrong - expected).max() > 1.0


def test_fold_matches_framewise_fft_at_8khz():
    """Other sample rates have no extractor to compare with (its numpy path hard-codes 16 kHz frame sizes), so
    check the fold there against the kaldi steps done frame by frame in float64 with an FFT (200 / 80 / 256)."""
    from transformers.audio_utils import mel_filter_bank

    frontend = LogMelFrontend(8_000, n_mels=23, num_frames=31, mean=-2.0, std=3.0)
    assert (frontend.frame_length, frontend.hop_length, frontend.fft_length) == (200, 80, 256)
    hf_mel = mel_filter_bank(129, 23, 20, 4_000, 8_000, None, "kaldi", triangularize_in_mel_space=True)
    np.testing.assert_allclose(frontend.mel_filters.numpy(), hf_mel, atol=1e-7)

    wave = torch.from_numpy(_signal("tones_dc", 2_000, seed=6)).to(torch.float64)  # 23 frames, 8 padded
    frames = wave.unfold(0, 200, 80)  # [23, 200]
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(200, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=256).abs().square()  # [23, 129]
    log_mel = torch.log(torch.clamp(power @ torch.from_numpy(hf_mel), min=1.192092955078125e-07))
    expected = torch.cat([log_mel, torch.zeros(31 - 23, 23, dtype=torch.float64)])
    expected = ((expected + 2.0) / 6.0).to(torch.float32)
    _assert_close_in_float32(frontend(wave[None].to(torch.float32))[0].numpy(), expected.numpy())


def test_autocast_does_not_lower_precision(small_frontend):
    frontend = small_frontend
    wave = torch.from_numpy(_signal("chirp", 9_999, seed=7))[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = frontend(wave)
    assert out.dtype == torch.float32
    assert torch.equal(out, frontend(wave))  # autocast is switched off inside: bit-identical


TF32_CHILD = """
import json, torch
from synergy.core.audio_frontend import LogMelFrontend

matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; reading the legacy flags then raises


def flags():
    if new_api:
        values = [matmul.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision]
    else:
        values = [matmul.allow_tf32, cudnn.allow_tf32]
    return [*values, torch.get_float32_matmul_precision()]


# what a training script sets for speed: TF32 for matmuls and convolutions, through the API this torch has
if new_api:
    matmul.fp32_precision, cudnn.conv.fp32_precision = "tf32", "tf32"
else:
    matmul.allow_tf32, cudnn.allow_tf32 = True, True
torch.set_float32_matmul_precision("high")
before = flags()
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    frontend = LogMelFrontend(16000, n_mels=29, num_frames=70).to(device)
    lengths = torch.tensor([frontend.num_samples, 3000], device=device)
    frontend(torch.randn(2, frontend.num_samples, device=device), lengths)
print(json.dumps({"before": before, "after": flags(), "devices": devices, "new_api": new_api}))
"""


def test_the_forward_changes_no_global_precision_setting():
    """Process-global TF32 settings belong to the caller: a forward (on the CPU, and on CUDA where there is one) leaves
    every one of them as it found them, and runs in a process that set them through torch's fp32_precision API (where
    the legacy allow_tf32 flags the front end once toggled raise on read). A fresh process: the settings are global."""
    done = subprocess.run([sys.executable, "-c", TF32_CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after"] == result["before"], result
    assert "tf32" in result["before"] or True in result["before"]  # the child did set TF32 on


def test_buffers_are_rebuilt_not_saved(small_frontend):
    frontend = small_frontend
    assert dict(frontend.state_dict()) == {}
    assert list(frontend.parameters()) == []
    assert frontend.dft_kernel.shape == (2 * 257, 1, 400) and frontend.dft_kernel.dtype == torch.float32


def test_rejects_unusable_arguments():
    with pytest.raises(ValueError, match="std"):
        LogMelFrontend(std=0.0)
    with pytest.raises(ValueError, match="num_frames"):
        LogMelFrontend(num_frames=0)
    with pytest.raises(ValueError, match="choose ast or silence"):
        LogMelFrontend(padding="zeros")


def test_silence_padding_reads_as_the_clip_followed_by_silence(small_frontend):
    """padding="silence" (towers trained from scratch): frames past a row's real samples hold the log-mel a silent
    frame has, the value a zero tail gives when it is counted as real samples, and SpecAugment's fill follows;
    every real frame is the same as with AST's padding, and AST's stays 0 in the log domain."""
    silence = LogMelFrontend(SAMPLE_RATE, n_mels=37, num_frames=59, padding="silence").eval()
    wave = torch.from_numpy(_signal("noise", 9_680, seed=4))[None].repeat(2, 1)  # [2, T], T = 59 frames' samples
    wave[1, 3_000:] = 0.0
    lengths = torch.tensor([9_680, 3_000])
    out, ast_out = silence(wave, lengths), small_frontend(wave, lengths)
    real = int((silence.frame_ends <= 3_000).sum())  # 17 frames
    floor = (math.log(1.192092955078125e-07) - silence.mean) / (2 * silence.std)
    assert silence.padding_value == pytest.approx(floor) and small_frontend.padding_value == pytest.approx(
        (0.0 - small_frontend.mean) / (2 * small_frontend.std)
    )
    np.testing.assert_allclose(out[1, real:].numpy(), floor, rtol=1e-6)
    np.testing.assert_allclose(ast_out[1, real:].numpy(), small_frontend.padding_value, rtol=1e-6)
    torch.testing.assert_close(out[1, :real], ast_out[1, :real])
    torch.testing.assert_close(out[0], ast_out[0])  # a full row has no padding: the choice changes nothing
    # the zero tail counted as real samples: the same floor, past the frames that straddle the clip's end
    whole = silence(wave[1:])[0]
    np.testing.assert_allclose(whole[real + 2 :].numpy(), floor, rtol=1e-6)


@pytest.mark.parametrize("padding", ["ast", "silence"])
def test_onnx_export_dynamic_batch_and_time(tmp_path, padding):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    frontend = LogMelFrontend(SAMPLE_RATE, n_mels=37, num_frames=59, padding=padding).eval()
    example = torch.from_numpy(np.stack([_signal("noise", 9_999, seed=4)] * 2))
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    path = tmp_path / "frontend.onnx"
    torch.onnx.export(
        frontend,
        (example, torch.tensor([9_999, 5_000])),
        str(path),
        dynamo=True,
        optimize=False,  # saves ~1 s; the unoptimised graph holds every op the optimised one could
        input_names=["waveform", "lengths"],
        output_names=["features"],
        dynamic_shapes={"waveform": {0: batch, 1: time}, "lengths": {0: batch}},
        verbose=False,
    )
    model = onnx.load(str(path))
    op_types = {node.op_type for node in model.graph.node}
    for function in model.functions:
        op_types |= {node.op_type for node in function.node}
    assert not {op for op in op_types if any(word in op.upper() for word in ("STFT", "DFT", "FFT"))}, op_types
    assert "Conv" in op_types

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows, num_samples in [(3, 30_001), (1, 4_567), (2, 250), (2, 0)]:  # cropped, padded, under a frame, empty
        wave = np.stack([_signal(n, num_samples, seed=5) for n in ["noise", "chirp", "tones_dc"][:rows]])
        lengths = np.arange(rows, dtype=np.int64) * -1000 + num_samples  # ragged rows (clamped below at 0)
        lengths = np.maximum(lengths, 0)
        (got,) = session.run(None, {"waveform": wave, "lengths": lengths})
        expected = frontend(torch.from_numpy(wave), torch.from_numpy(lengths)).numpy()
        assert got.shape == (rows, 59, 37)
        _assert_close_in_float32(got, expected)
