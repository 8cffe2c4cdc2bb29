"""The aisfx tower (synergy.core.aisfx): its front end against Essentia's own spectrograms, its CNN against aisfx's
``EmbeddingNet`` with the wheel's real weights, the pinned and safely loaded checkpoint, and the folder that
``synergy towers aisfx`` writes going through a checkpoint.

The Essentia spectrograms in tests/core/golden were written by Essentia 2.1b6 (in a separate environment: it is AGPL
and no dependency of Synergy) with aisfx's own streaming network (FrameCutter, Windowing, Spectrum, MelBands,
shift-scale log) fed the samples of :func:`golden_signal` through a VectorInput.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from synergy.core.aisfx import AisfxModel, AisfxSpectrogram, extract_aisfx_folder, read_aisfx_checkpoint
from synergy.core.pretrained_folders import AISFX, load_wheel_weights

ESSENTIA_GOLDEN = Path(__file__).parent / "golden" / "aisfx_essentia_spectrograms.npz"
SPECTROGRAM_MAX = 9.457798957824707  # aisfx's spec_norm='original'


def golden_signal(length: int, seed: int) -> np.ndarray:
    """The 44.1 kHz signal Essentia was fed for ``ESSENTIA_GOLDEN``: noise over a decaying 440 Hz tone."""
    noise = np.random.RandomState(seed).randn(length)
    t = np.arange(length) / 44_100.0
    return (0.2 * noise + 0.5 * np.sin(2 * np.pi * 440.0 * t) * np.exp(-t)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return extract_aisfx_folder(tmp_path_factory.mktemp("aisfx") / "folder")


def test_the_front_end_matches_essentias_spectrogram_in_one_padded_batch():
    frontend = AisfxSpectrogram(44_100, 2048, 1024, 96, 100, SPECTROGRAM_MAX)
    golden = dict(np.load(ESSENTIA_GOLDEN))
    waves = [golden_signal(int(name.split("_")[1]), int(name.split("_")[2])) for name in golden]
    # rows zero-padded to the longest (150000 samples: longer than the block's 102400, which the front end crops)
    batch = torch.zeros(len(waves), max(w.size for w in waves))
    for row, wave in enumerate(waves):
        batch[row, : wave.size] = torch.from_numpy(wave)
    lengths = torch.tensor([w.size for w in waves])
    got = frontend(batch, lengths).numpy()  # [3, 100, 96]
    for row, want in enumerate(golden.values()):
        frames = min(want.shape[0], 100)  # 148, 31 and 3 frames: Essentia's ceil(L / 1024) + 1
        np.testing.assert_allclose(got[row, :frames], want[:frames] / SPECTROGRAM_MAX, atol=5e-6)
        assert (got[row, frames:] == 0).all()  # aisfx pads a short block with zeros


def test_the_cnn_is_aisfx_embedding_net_with_the_wheels_weights(folder):
    from aisfx.models.cnn2d import EmbeddingNet

    ours = AisfxModel.from_pretrained(folder).eval()
    theirs = EmbeddingNet("max", 3, 1, 64)  # aisfx.inference.load_bestModel's network
    state = read_aisfx_checkpoint()
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)  # the same names, every one of them
    theirs.eval()
    blocks = torch.rand(5, 100, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(blocks).pooler_output, theirs(blocks), atol=0, rtol=0)


def test_the_checkpoint_is_pinned_and_loads_without_unpickling_code():
    with pytest.raises(ValueError, match="expected 0000.*--force-reinstall aisfx"):
        load_wheel_weights(dataclasses.replace(AISFX, sha256="0" * 64))
    # weights_only=True refuses the file's numpy globals unless they are allowed one by one
    with pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray.scalar"):
        load_wheel_weights(AISFX)
    state = read_aisfx_checkpoint()
    assert len(state) == 4 * 12 and all(isinstance(v, torch.Tensor) for v in state.values())


def test_the_folder_carries_the_licence_into_the_checkpoint(folder, tmp_path):
    from synergy.core.checkpoint import load_checkpoint, save_checkpoint
    from synergy.core.model import create_model
    from synergy.core.tokenizer import train_tokenizer

    assert "Attribution 4.0 International" in (folder / "LICENSE").read_text()
    licence = json.loads((folder / "config.json").read_text())["weights_licence"]
    assert licence["licence"] == "CC-BY-4.0" and licence["sha256"] == AISFX.sha256
    assert licence["source"].startswith("PyPI aisfx 0.1.2: aisfx/models/checkpoint.pth")

    model = create_model("tiny", **{"audio.pretrained": str(folder)}).eval()
    assert model.audio_family == "aisfx"
    assert (model.config.audio.sample_rate, round(model.config.audio.clip_seconds * 44_100)) == (44_100, 102_400)
    tokenizer = train_tokenizer(["a bell", "rain"] * 4, 131, model.config.text.max_length)
    saved = save_checkpoint(tmp_path / "checkpoint", model, tokenizer)
    assert json.loads((saved / "config.json").read_text())["towers"]["audio"]["weights_licence"] == licence
    loaded, _ = load_checkpoint(saved)  # no folder needed: the checkpoint rebuilds the CNN from its config
    wave = torch.from_numpy(golden_signal(30_001, 2))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(wave), model.encode_audio(wave))


def test_a_config_that_disagrees_with_the_towers_clip_says_the_values_to_use(folder):
    from synergy.core.audio_families import waveform_frontend
    from synergy.core.config import AudioTowerConfig

    tower = AisfxModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"use sample_rate=44100, clip_seconds=2\.32199"):
        waveform_frontend(AudioTowerConfig(sample_rate=16_000), tower)
