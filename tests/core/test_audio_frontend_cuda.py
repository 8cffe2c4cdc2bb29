"""Train/serve parity of the log-mel front end on a GPU: the features a CUDA training step computes must be the ones
the float32 CPU runtime computes. cuDNN runs float32 convolutions in TF32 by default on Ampere and Hopper (10 mantissa
bits), and training turns TF32 matmuls on too, which would move the quiet bins of the DFT convolution; the front end
must keep (at least) IEEE float32 precision on CUDA whatever the global settings (it runs its DFT and mel bank in
float64 there, which has no TF32 mode) and never touch those settings (tests/core/test_audio_frontend.py checks that
in a process that used torch's fp32_precision API too)."""

import math

import pytest
import torch

from synergy.core.audio_frontend import LogMelFrontend

pytestmark = pytest.mark.requires_cuda

SAMPLE_RATE = 16_000


def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    """[3, T] clips with quiet bins: a loud tone over faint noise, a very quiet chirp, a short clip then padding."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t) + 1e-4 * torch.randn(t.shape, generator=g)
    chirp = 1e-3 * torch.sin(2 * math.pi * (200 + 1500 * t) * t)
    short = 0.3 * torch.randn(t.shape, generator=g)
    lengths = torch.tensor([t.numel(), t.numel(), SAMPLE_RATE // 2])
    short[SAMPLE_RATE // 2 :] = 0.0
    return torch.stack([tone, chirp, short]), lengths


@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_features_match_cpu_with_tf32_enabled(autocast):
    frontend = LogMelFrontend(SAMPLE_RATE, n_mels=128, num_frames=300)
    waveform, lengths = _clips()
    expected = frontend(waveform, lengths)
    cudnn_before, matmul_before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    precision_before = torch.get_float32_matmul_precision()
    try:
        # what a training script sets for speed: TF32 everywhere
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        cuda = frontend.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            got = cuda(waveform.cuda(), lengths.cuda())
        assert got.dtype == torch.float32
        # the global settings are the caller's: the front end leaves them alone
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_before, matmul_before
        torch.set_float32_matmul_precision(precision_before)
    # normalised log-mel units (log / (2 * 4.57)): float32 summation order only. Rounding the conv's inputs to TF32's
    # 10 mantissa bits (simulated on CPU) moves the quiet bins of the tone-over-noise clip by up to 0.38
    torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=1e-4)
