"""The tri-modal contrastive loss in plain PyTorch: the CPU path, the export path and the oracle of the Triton kernel.

Three symmetric InfoNCE terms, one per pair of `PAIRS` (image-text, text-audio, audio-image), each with its own
(already exponentiated) logit scale. For a pair (X, Y) with scale s, a local row r counts when it has both
modalities; its row term is the cross-entropy of s * X[r] @ Y_glob.T over the columns valid in Y, target column
row_offset + r; its column term is the same with X and Y swapped. The pair loss is
0.5 * (sum of row terms + sum of column terms) / n_pair, with n_pair counted over the GLOBAL rows valid in both, so
that in distributed training the per-process losses add up to the full-batch loss. A pair without valid rows adds
exactly 0 (and zero gradients).

This file materialises the [b, B] logits of each direction: simple and exact, O(b * B) memory.
"""

import functools

import torch
from torch import Tensor

PAIRS = (("image", "text"), ("text", "audio"), ("audio", "image"))
MODALITIES = ("image", "text", "audio")


def _direction_terms(
    queries: Tensor, keys: Tensor, valid: Tensor, key_mask: Tensor, scale: Tensor, row_offset: int
) -> Tensor:
    """queries: [b, D], keys: [B, D], valid: [b], key_mask: [B] -> per-row cross-entropy [b] of
    scale * queries @ keys.T over the columns valid in key_mask, target column row_offset + r; 0 where not valid."""
    logits = scale * queries @ keys.T  # [b, B]
    target = torch.arange(queries.shape[0], device=queries.device) + row_offset
    positive = logits.gather(1, target[:, None])[:, 0]  # [b]
    # rows that do not count keep every column: their (discarded) logsumexp stays finite, so its gradient is no NaN
    excluded = ~key_mask[None, :] & valid[:, None]  # [b, B]
    lse = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)  # [b]
    return torch.where(valid, lse - positive, 0.0)


def trimodal_contrastive_loss_reference(
    image: Tensor,
    text: Tensor,
    audio: Tensor,
    logit_scale: Tensor,
    *,
    masks: tuple[Tensor, Tensor, Tensor] | None = None,
    global_features: tuple[Tensor, Tensor, Tensor] | None = None,
    global_masks: tuple[Tensor, Tensor, Tensor] | None = None,
    row_offset: int = 0,
) -> Tensor:
    """image, text, audio: [b, D] local rows; logit_scale: [3]; masks: 3 x [b] bool; global_features: 3 x [B, D]
    (the columns; None: the local rows); global_masks: 3 x [B] bool. Arguments are assumed checked and defaulted by
    `synergy.kernels.contrastive.trimodal_contrastive_loss` (global_masks is required when global_features is given
    with masks). Returns a scalar, float32 (float64 for float64 inputs)."""
    dtype = functools.reduce(torch.promote_types, [image.dtype, text.dtype, audio.dtype, torch.float32])  # half -> fp32
    local = [x.to(dtype) for x in (image, text, audio)]
    columns = local if global_features is None else [x.to(dtype) for x in global_features]
    b, big_b = local[0].shape[0], columns[0].shape[0]
    if masks is None:
        masks = (torch.ones(b, dtype=torch.bool, device=image.device),) * 3
    if global_masks is None:
        global_masks = (
            masks if global_features is None else (torch.ones(big_b, dtype=torch.bool, device=image.device),) * 3
        )
    total = torch.zeros((), dtype=dtype, device=image.device)
    for p, (x_name, y_name) in enumerate(PAIRS):
        x, y = MODALITIES.index(x_name), MODALITIES.index(y_name)
        scale = logit_scale[p].to(dtype)
        valid = masks[x] & masks[y]  # [b] rows that count
        n_pair = (global_masks[x] & global_masks[y]).sum()
        rows = _direction_terms(local[x], columns[y], valid, global_masks[y], scale, row_offset)  # [b]
        cols = _direction_terms(local[y], columns[x], valid, global_masks[x], scale, row_offset)  # [b]
        total = total + 0.5 * (rows.sum() + cols.sum()) / n_pair.clamp(min=1)
    return total
