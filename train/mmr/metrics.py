"""Missing-modality reconstruction metrics, per item, one definition each (training's validation and `synergy mmr
eval` both use them).

- image: PSNR in dB from each image's own MSE with peak 1.0 (pixels in [0, 1]), averaged over images; SSIM at data
  range 1.0 (:func:`synergy.core.reconstruction.ssim`, scikit-image's Gaussian-window SSIM).
- audio: SSIM of the z-scored log-mel at the training log-mels' range (max - min), and MSE in the same units.
- text: token accuracy over the truth's real tokens (not padding, not the always-given <s>), and exact match of the
  whole sequence up to and including the first </s>.
"""

from __future__ import annotations

import torch
from torch import Tensor

from synergy.core.reconstruction import ssim


def psnr(prediction: Tensor, truth: Tensor, peak: float = 1.0) -> Tensor:
    """[B, ...] in [0, peak] -> [B] dB, from each item's MSE (floored at 1e-10: a perfect copy is 100 dB)."""
    mse = (prediction - truth).float().square().flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(peak**2 / mse)


def cut_at_eos(ids: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Predicted ids [B, L] -> (ids with every position after the first </s> set to padding, attention mask [B, L]).
    A row without </s> keeps all L tokens."""
    is_eos = ids == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first </s>
    return ids.masked_fill(after, pad_id), (~after).long()


def text_real_tokens(token_mask: Tensor) -> Tensor:
    """The positions token accuracy counts: the truth's tokens except position 0 (<s>, given to every sequence)."""
    real = token_mask.bool().clone()
    real[:, 0] = False
    return real


def image_metrics(prediction: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """[B, 3, S, S] in [0, 1] -> per item {"psnr_db", "ssim"}."""
    return {"psnr_db": psnr(prediction, truth), "ssim": ssim(prediction.float(), truth.float(), 1.0)}


def audio_metrics(prediction: Tensor, truth: Tensor, data_range: float) -> dict[str, Tensor]:
    """[B, frames, mels] z-scored log-mel -> per item {"ssim", "mse"}."""
    mse = (prediction - truth).float().square().flatten(1).mean(1)
    return {"ssim": ssim(prediction.float(), truth.float(), data_range), "mse": mse}


def text_metrics(predicted_ids: Tensor, truth_ids: Tensor, token_mask: Tensor, eos_id: int, pad_id: int):
    """ids [B, L] -> per item {"token_accuracy", "exact_match"}, both in [0, 1]."""
    real = text_real_tokens(token_mask)
    correct = ((predicted_ids == truth_ids) & real).sum(1).float()
    accuracy = correct / real.sum(1).clamp(min=1).float()
    cut, _ = cut_at_eos(predicted_ids, eos_id, pad_id)
    truth = truth_ids.masked_fill(~token_mask.bool(), pad_id)
    return {"token_accuracy": accuracy, "exact_match": (cut == truth).all(1).float()}


def reconstruction_metrics(
    target: str, prediction: Tensor, truth: Tensor, token_mask: Tensor | None, audio_range: float, pad_eos
) -> dict[str, Tensor]:
    """The metrics of ``target`` per item: ``prediction`` pixels | log-mel | predicted token ids against ``truth``;
    ``token_mask`` (text) the truth's attention mask; ``pad_eos`` (pad id, end-of-sequence id), as
    ``train.mmr.special_ids`` gives them. Training's validation and `synergy mmr eval` both call this."""
    if target == "image":
        return image_metrics(prediction, truth)
    if target == "audio":
        return audio_metrics(prediction, truth, audio_range)
    pad_id, eos_id = pad_eos
    return text_metrics(prediction, truth, token_mask, eos_id=eos_id, pad_id=pad_id)
