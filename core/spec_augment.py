"""SpecAugment on the log-mel (frequency and time masks, Park et al. 2019) and CLIP4VLA's intra-modal audio contrast.

CLIP4VLA adds to its cross-modal losses an audio-audio term: each clip against a SpecAugment copy of itself, NT-Xent
over the batch (the other clips' copies are the negatives). Here the masks are drawn on the device, inside the model
(``SynergyModel.encode_audio(..., augment=SpecAugment(...))``), after the log-mel front end, so the augmentation runs
on the GPU with the towers and never in the data loader.

The loss (``audio_intra_loss``) is the symmetric cross-entropy of ``scale * a @ b.T`` (a: the clips, b: their copies,
both L2-normalised), i.e. NT-Xent with temperature ``1 / scale``; ``AUDIO_INTRA_SCALE`` = 1 / 0.07, CLIP's initial
temperature, fixed (a learnable one would be a fourth scale the bundle does not carry). The training loop adds
``audio_intra_weight * audio_intra_loss`` to the tri-modal loss; its weight is 0 (off) by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUDIO_INTRA_SCALE = 1 / 0.07


class SpecAugment(nn.Module):
    """``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` spans of up to ``time_width`` frames
    set to ``fill``, drawn per row. Only a row's real frames (``frames`` [B]) are masked in time, so a short clip is
    never masked where it has no sound.

    ``fill`` is the value the front end gives padding frames, so a masked cell reads as silence-padding does:
    ``LogMelFrontend.padding_value``, i.e. ``(0 - mean) / (2 * std)`` after AST's normalisation (+0.467 with AudioSet's
    constants), not 0 (which is the log-mel's mean, a loud-ish frame)."""

    def __init__(self, freq_masks: int, freq_width: int, time_masks: int, time_width: int, fill: float):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.fill = float(fill)

    def forward(self, log_mel: Tensor, frames: Tensor | None = None, generator: torch.Generator | None = None):
        """log_mel: [B, T, M] -> [B, T, M] with masks; ``frames``: [B] real frames per row (None: all T)."""
        batch, length, mels = log_mel.shape
        if frames is None:
            frames = torch.full((batch,), length, device=log_mel.device)
        keep = torch.ones(batch, length, mels, dtype=torch.bool, device=log_mel.device)
        mel_index = torch.arange(mels, device=log_mel.device)
        time_index = torch.arange(length, device=log_mel.device)
        for count, width, axis_len, index, limit in (
            (self.freq_masks, self.freq_width, mels, mel_index, torch.full_like(frames, mels)),
            (self.time_masks, self.time_width, length, time_index, frames.clamp(max=length)),
        ):
            for _ in range(count):
                size = _uniform(batch, generator, log_mel.device) * (min(width, axis_len) + 1)  # [B] in [0, width]
                size = torch.minimum(size.floor(), limit.to(size.dtype))
                start = (_uniform(batch, generator, log_mel.device) * (limit - size + 1)).floor()  # [B]
                inside = (index >= start[:, None]) & (index < (start + size)[:, None])  # [B, axis_len]
                keep &= ~(inside[:, None, :] if index is mel_index else inside[:, :, None])
        return torch.where(keep, log_mel, torch.full((), self.fill, dtype=log_mel.dtype, device=log_mel.device))


def _uniform(batch: int, generator, device) -> Tensor:
    return torch.rand(batch, generator=generator, device=device)


def audio_intra_loss(clips: Tensor, copies: Tensor, mask: Tensor | None = None, scale: float = AUDIO_INTRA_SCALE):
    """NT-Xent between each clip and its augmented copy. clips, copies: [B, D] L2-normalised; mask: [B] bool (rows
    with audio; the others are neither anchors nor negatives). -> scalar: the mean of both directions' CE."""
    if mask is not None:
        clips, copies = clips[mask], copies[mask]
    if clips.shape[0] == 0:
        return clips.sum() * 0.0  # no audio in the batch: a zero that keeps the graph
    logits = scale * clips.float() @ copies.float().T  # [b, b]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
