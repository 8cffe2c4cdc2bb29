"""Global negatives across processes, beside the loss that uses them (as open_clip keeps ``gather_features`` next to
its ClipLoss): every process's rows, in rank order, to pass as ``global_features`` / ``global_masks``.

    global_features, global_masks = gather_features(features, masks)
    loss = trimodal_contrastive_loss(*features, logit_scale, masks=masks, global_features=global_features,
                                     global_masks=global_masks, row_offset=rank * b)

Each process then holds its share of the full-batch loss (its rows against all columns, divided by the global
count): the shares add up to the full-batch loss, so back-propagate ``loss * world_size`` under DDP, which averages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def gather_features(
    features: tuple[Tensor, ...], masks: tuple[Tensor, ...] | None = None
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    """features: each [b, D] on this process -> each [world * b, D], concatenated in rank order, WITH gradient
    (``torch.distributed.nn.functional.all_gather``: a rank's backward receives its rows' gradients from every
    process). masks: each [b] bool -> [world * b], no gradient. Needs an initialised process group and the same b on
    every process."""
    from torch.distributed.nn.functional import all_gather  # imports nothing distributed until it is needed

    world = dist.get_world_size()
    global_features = tuple(torch.cat(all_gather(f.contiguous())) for f in features)
    if masks is None:
        return global_features, None
    global_masks = []
    for mask in masks:
        gathered = [torch.empty_like(mask) for _ in range(world)]
        dist.all_gather(gathered, mask.contiguous())
        global_masks.append(torch.cat(gathered))
    return global_features, tuple(global_masks)
