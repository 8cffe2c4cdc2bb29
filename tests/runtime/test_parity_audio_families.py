"""Parity of the audio families beyond AST, through the real path: a file on disk -> ``Runtime`` (the exported ONNX
bundle of a checkpoint whose audio tower comes from a local pretrained folder) -> embedding, against the family's own
pipeline -> the same tower weights -> the checkpoint's projection -> L2 norm.

- wav2vec2 and HuBERT: random-weight ``Wav2Vec2Model`` / ``HubertModel`` folders with their real conv geometry
  (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: the length formula users meet) and tiny widths, saved with
  ``save_pretrained`` beside a ``Wav2Vec2FeatureExtractor``; the reference is the extractor on each clip alone ->
  ``last_hidden_state`` mean-pooled (wav2vec2 "group" norm without an attention mask, HuBERT "layer" norm with one).
- aisfx: the real weights of PyPI's aisfx wheel (``synergy towers aisfx``); the reference is Essentia's spectrogram
  (ported to numpy below from aisfx's ``spectrogram_essentia.py`` and Essentia's FrameCutter / Windowing / Spectrum /
  MelBands sources, and checked here against Essentia's own output, tests/core/golden) -> aisfx's own
  ``spectrogram_normalize`` and ``blocking`` -> aisfx's own ``EmbeddingNet`` with the checkpoint's weights, first block.

Audio at several rates: the runtime resamples with soxr, so the references take the same soxr HQ resampling of the
file; the comparison covers everything after the resampler, as tests/runtime/test_parity_transformers.py does for AST.
Tolerance: fp32 cosine >= 0.9999 for every clip, and the same embedding alone as in a batch that mixes lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

MIN_COSINE = 0.9999
SMALL = {
    "hidden_size": 36,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 37,
    "conv_dim": (17,) * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
WAV2VEC2_CLIP_SECONDS = 3.0


def _sound(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A chirp-like tone over noise with an envelope and a DC offset (the normalisation must remove it)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + 0.3 * t))
    wave = 0.3 * tone * np.exp(-t * rng.uniform(0.1, 2)) + 0.02 * rng.standard_normal(t.size) + 0.01 * seed
    return wave.astype(np.float32)


def _files(tmp_path, cases, model_rate: int):
    """(paths written at each case's rate, the same audio resampled to ``model_rate`` as the runtime does)."""
    paths, resampled = [], []
    for seed, (seconds, rate) in enumerate(cases):
        wave = _sound(seconds, rate, seed)
        paths.append(tmp_path / f"{seconds}s_{rate}.wav")
        soundfile.write(paths[-1], wave, rate, subtype="FLOAT")
        resampled.append(wave if rate == model_rate else soxr.resample(wave, rate, model_rate, quality="HQ"))
    return paths, resampled


def _export(root, model):
    from synergy.core.checkpoint import save_checkpoint
    from synergy.core.tokenizer import train_tokenizer
    from synergy.export.bundle import export_bundle
    from synergy.runtime import Runtime

    config = model.config
    tokenizer = train_tokenizer(["a dog barking", "rain on a roof", "a bell"] * 4, 131, config.text.max_length)
    save_checkpoint(root / "checkpoint", model, tokenizer)
    export_bundle(root / "checkpoint", root / "bundle")
    # fp32 parity is onnxruntime's: "auto" may pick OpenVINO bf16 for this bundle (its export's check passed)
    return Runtime.open(root / "bundle", backend="onnxruntime", threads=2, batch_size=4)  # batches mix lengths


def _check(name: str, got: np.ndarray, want: np.ndarray, cases) -> None:
    got, want = got.astype(np.float64), want.astype(np.float64)
    cosines = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    worst = int(np.argmin(cosines))
    print(f"\nparity {name}: worst 1 - cosine {1 - cosines[worst]:.1e} ({cases[worst]}), over {len(cases)} files")
    assert cosines.min() >= MIN_COSINE, dict(zip(map(str, cases), cosines.round(6).tolist()))


# ------------------------------------------------------------------------------------------- wav2vec2 / HuBERT

WAV2VEC2_CASES = [(0.03, 16_000), (0.5, 16_000), (1.3, 44_100), (2.0, 22_050), (3.0, 16_000), (2.5, 8_000)]


def _wav2vec2_folder(kind: str, folder):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    if kind == "wav2vec2":  # wav2vec2-base's kind: GroupNorm in the first conv, no attention mask
        tower = Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="group", **SMALL))
        extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    else:  # hubert-large's kind: LayerNorm in every conv, stable layer norm, attention mask
        tower = HubertModel(HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **SMALL))
        extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    tower.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def _wav2vec2_model(folder):
    from synergy.core.model import create_model

    return create_model("tiny", **{"audio.pretrained": str(folder), "audio.clip_seconds": WAV2VEC2_CLIP_SECONDS})


@pytest.fixture(scope="module", params=["wav2vec2", "hubert"])
def wav2vec2_bundle(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = _wav2vec2_folder(request.param, root / "tower")
    model = _wav2vec2_model(folder).eval()
    runtime = _export(root, model)
    yield request.param, folder, model, runtime
    runtime.close()


def test_wav2vec2_families_match_the_feature_extractor_pipeline(wav2vec2_bundle, tmp_path):
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    name, folder, model, runtime = wav2vec2_bundle
    assert model.audio_family == "wav2vec2" and model.config.audio.waveform_normalize is True
    paths, resampled = _files(tmp_path, WAV2VEC2_CASES, 16_000)
    got = runtime.embed_audio(paths)  # batches of 4 that mix 0.03 s .. 3 s clips
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    tower = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = []
        for wave in resampled:  # each clip alone: the extractor's normalisation over exactly its samples
            values = extractor(wave, sampling_rate=16_000, return_tensors="pt")["input_values"]
            pooled.append(tower(values).last_hidden_state.mean(dim=1))
        want = F.normalize(model.audio_projection(torch.cat(pooled)), dim=-1).numpy()
    _check(name, got, want, WAV2VEC2_CASES)
    alone = np.concatenate([runtime.embed_audio([p]) for p in paths])
    np.testing.assert_allclose(alone, got, atol=1e-5)  # padding in a mixed batch changes nothing


def test_a_batch_with_the_attention_mask_matches_transformers_for_layer_norm_towers(tmp_path):
    """HuBERT-large's kind takes an attention mask in transformers: its padded batch equals ours row by row.
    (wav2vec2-base's kind takes none there, so transformers' own padded batch differs from its clips alone.)"""
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    folder = _wav2vec2_folder("hubert", tmp_path / "hubert")
    model = _wav2vec2_model(folder).eval()
    waves = [_sound(seconds, 16_000, seed) for seed, seconds in enumerate((0.4, 1.7, 0.9))]
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    inputs = extractor(waves, sampling_rate=16_000, padding=True, return_tensors="pt")
    tower = AutoModel.from_pretrained(folder).eval()
    lengths = torch.tensor([w.size for w in waves])
    with torch.no_grad():
        hidden = tower(**inputs).last_hidden_state
        frames = tower._get_feat_extract_output_lengths(lengths)
        want = torch.stack([h[:n].mean(0) for h, n in zip(hidden, frames)])
        padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
        got = model.audio_features(model.audio_frontend(padded, lengths), lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ aisfx

AISFX_CASES = [(0.05, 16_000), (0.3, 44_100), (1.1, 22_050), (2.0, 48_000), (2.32, 44_100), (1.7, 8_000)]


def essentia_spectrogram(wave: np.ndarray) -> np.ndarray:
    """aisfx's ``spectrogram_essentia.compute_spectrogram`` on samples already at 44.1 kHz, in numpy float64:
    FrameCutter(2048, 1024; first frame centred on 0, zero-padded, ceil(L / 1024) + 1 frames) -> Windowing(hann,
    symmetric) -> Spectrum (|FFT|) -> MelBands(96, 0-22050 Hz, htkMel, warping, unit_sum, power) -> log10(1e4 x + 1).
    [frames, 96]"""
    frame, hop, rate, n_mels = 2048, 1024, 44_100, 96
    count = -(-wave.size // hop) + 1
    padded = np.concatenate([np.zeros(frame // 2), wave.astype(np.float64), np.zeros(frame + hop * count)])
    frames = np.stack([padded[k * hop : k * hop + frame] for k in range(count)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / (frame - 1))
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, 1025]

    def mel(hertz):
        return 2595.0 * np.log10(1.0 + hertz / 700.0)

    edges = 700.0 * (10.0 ** (np.linspace(0.0, mel(rate / 2), n_mels + 2) / 2595.0) - 1.0)
    step = (rate / 2) / (frame // 2)
    filters = np.zeros((frame // 2 + 1, n_mels))
    for i in range(n_mels):  # TriangularBands::createFilters, bins ceil(lo / step) .. floor(hi / step)
        for j in range(int(np.ceil(edges[i] / step)), int(np.floor(edges[i + 2] / step)) + 1):
            if j * step < edges[i + 1]:
                filters[j, i] = (mel(j * step) - mel(edges[i])) / (mel(edges[i + 1]) - mel(edges[i]))
            else:
                filters[j, i] = (mel(edges[i + 2]) - mel(j * step)) / (mel(edges[i + 2]) - mel(edges[i + 1]))
    filters /= filters.sum(axis=0, keepdims=True)
    return np.log10(1e4 * (power @ filters) + 1.0)


ESSENTIA_GOLDEN = Path(__file__).parents[1] / "core" / "golden" / "aisfx_essentia_spectrograms.npz"


def golden_signal(length: int, seed: int) -> np.ndarray:
    """The 44.1 kHz signal Essentia was fed for ``ESSENTIA_GOLDEN`` (the same recipe as tests/core/test_aisfx.py)."""
    noise = np.random.RandomState(seed).randn(length)
    t = np.arange(length) / 44_100.0
    return (0.2 * noise + 0.5 * np.sin(2 * np.pi * 440.0 * t) * np.exp(-t)).astype(np.float32)


def test_the_numpy_port_matches_essentia_itself():
    """The reference above against the output of aisfx's own Essentia network (Essentia 2.1b6, fed the same
    samples through a VectorInput), saved in tests/core/golden: Essentia is AGPL and not a dependency of Synergy."""
    for name, want in np.load(ESSENTIA_GOLDEN).items():
        _, length, seed = name.split("_")
        got = essentia_spectrogram(golden_signal(int(length), int(seed)))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)  # Essentia computes in float32


@pytest.fixture(scope="module")
def aisfx_bundle(tmp_path_factory):
    from synergy.core.aisfx import extract_aisfx_folder
    from synergy.core.model import create_model

    root = tmp_path_factory.mktemp("aisfx")
    folder = extract_aisfx_folder(root / "aisfx")
    torch.manual_seed(0)
    model = create_model("tiny", **{"audio.pretrained": str(folder)}).eval()
    runtime = _export(root, model)
    yield model, runtime
    runtime.close()


def test_aisfx_matches_its_own_pipeline_with_the_real_weights(aisfx_bundle, tmp_path):
    from aisfx.models.cnn2d import EmbeddingNet
    from aisfx.preprocessing import blocking, spectrogram_normalize

    from synergy.core.aisfx import read_aisfx_checkpoint

    model, runtime = aisfx_bundle
    assert model.audio_family == "aisfx" and model.config.audio.sample_rate == 44_100
    paths, resampled = _files(tmp_path, AISFX_CASES, 44_100)
    got = runtime.embed_audio(paths)
    network = EmbeddingNet("max", 3, 1, 64)  # aisfx.inference.load_bestModel's
    network.load_state_dict(read_aisfx_checkpoint(), strict=True)
    network.eval()
    first_blocks = []
    for wave in resampled:
        spectrogram = spectrogram_normalize(essentia_spectrogram(wave), spec_norm="original")
        # inference.model_get_embedding's blocking (100 frames, hop 50, drop_partial_block); its compute_hopSize
        # refuses clips under 50 frames, which aisfx cannot embed at all: the hop is set directly
        first_blocks.append(blocking(spectrogram, block_size=100, hop_size=50, drop_partial_block=True)[0])
    with torch.no_grad():
        embedding = network(torch.tensor(np.stack(first_blocks), dtype=torch.float32))  # model.get_embedding
        want = F.normalize(model.audio_projection(embedding), dim=-1).numpy()
    _check("aisfx (real weights)", got, want, AISFX_CASES)
    alone = np.concatenate([runtime.embed_audio([p]) for p in paths])
    np.testing.assert_allclose(alone, got, atol=1e-5)


def test_aisfx_on_long_files_is_close_to_the_mean_of_aisfxs_blocks(aisfx_bundle, tmp_path):
    """Files longer than a block: the runtime's windows (every 50 frames, as aisfx's blocks, plus one aligned to
    the end) against aisfx's whole-file blocks (hop 50, partial block dropped), each projected and normalised, then
    meaned; the two differ only at each window's first frame and in the end window (core/aisfx.py's docstring)."""
    from aisfx.models.cnn2d import EmbeddingNet
    from aisfx.preprocessing import blocking, compute_hopSize, spectrogram_normalize

    from synergy.core.aisfx import read_aisfx_checkpoint

    model, runtime = aisfx_bundle
    cases = [(4.0, 44_100), (7.3, 44_100), (12.0, 22_050)]
    paths, resampled = _files(tmp_path, cases, 44_100)
    got = runtime.embed_audio(paths)
    network = EmbeddingNet("max", 3, 1, 64)
    network.load_state_dict(read_aisfx_checkpoint(), strict=True)
    network.eval()
    want = []
    for wave in resampled:
        spectrogram = spectrogram_normalize(essentia_spectrogram(wave), spec_norm="original")
        blocks = blocking(spectrogram, 100, compute_hopSize(100, 0.5, spectrogram), drop_partial_block=True)
        with torch.no_grad():
            embeddings = F.normalize(model.audio_projection(network(torch.tensor(blocks, dtype=torch.float32))), dim=-1)
        want.append(F.normalize(embeddings.mean(0), dim=0).numpy())
    cosines = (got * np.stack(want)).sum(1)
    print(f"\naisfx long files: cosines {cosines.round(5).tolist()}")
    assert cosines.min() >= 0.995, cosines  # measured 0.9973 (4 s: 3 windows, 2 blocks) to 0.9997
