"""Writes aisfx_essentia_spectrograms.npz: aisfx's own Essentia network on known signals, the oracle of the aisfx
front end (tests/core/test_aisfx.py, tests/runtime/test_parity_audio_families.py).

Essentia is AGPL and no dependency of Synergy: run this in a separate environment,
``python -m venv /tmp/ess && /tmp/ess/bin/pip install essentia numpy && /tmp/ess/bin/python THIS_FILE``.
The network is aisfx 0.1.2's ``spectrogram_essentia.compute_spectrogram`` with inference.py's settings, fed samples
through a VectorInput instead of its EasyLoader (which, at its default replayGain of -6 dB, scales by 1.0).
"""

from pathlib import Path

import numpy as np
from essentia import Pool, run
from essentia.streaming import FrameCutter, MelBands, Spectrum, UnaryOperator, VectorInput, Windowing


def spectrogram(samples: np.ndarray) -> np.ndarray:
    pool = Pool()
    source = VectorInput(samples.astype(np.float32))
    cutter = FrameCutter(frameSize=2048, hopSize=1024)
    window = Windowing(zeroPadding=0, type="hann", normalized=False)
    spectrum = Spectrum(size=2048)
    mels = MelBands(
        inputSize=1025, numberBands=96, sampleRate=44100.0, lowFrequencyBound=0.0, highFrequencyBound=22050.0,
        warpingFormula="htkMel", weighting="warping", normalize="unit_sum", type="power", log=False,
    )  # fmt: skip
    shift, compress = UnaryOperator(type="identity", scale=1e4, shift=1), UnaryOperator(type="log10")
    source.data >> cutter.signal
    cutter.frame >> window.frame >> spectrum.frame
    spectrum.spectrum >> mels.spectrum
    mels.bands >> shift.array >> compress.array >> (pool, "mel_bands")
    run(source)
    return pool["mel_bands"]


def golden_signal(length: int, seed: int) -> np.ndarray:  # as the tests build it
    noise = np.random.RandomState(seed).randn(length)
    t = np.arange(length) / 44_100.0
    return (0.2 * noise + 0.5 * np.sin(2 * np.pi * 440.0 * t) * np.exp(-t)).astype(np.float32)


if __name__ == "__main__":
    spectrograms = {
        f"spectrogram_{length}_{seed}": spectrogram(golden_signal(length, seed)).astype(np.float32)
        for length, seed in [(150_000, 1), (30_001, 2), (1_500, 3)]
    }
    np.savez_compressed(Path(__file__).with_suffix(".npz"), **spectrograms)
