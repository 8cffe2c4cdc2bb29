"""Tri-modal contrastive loss: three pairwise symmetric InfoNCE terms (image-text, text-audio, audio-image).

    loss = trimodal_contrastive_loss(image, text, audio, logit_scale)                 # [b, D] x 3, [3] -> scalar
    loss = trimodal_contrastive_loss(image, text, audio, logit_scale, masks=masks,    # distributed: local rows
                                     global_features=gathered, global_masks=gathered_masks, row_offset=rank * b)

`impl="auto"` runs the Triton kernels (`triton.py`, no B x B matrix, deterministic) on CUDA tensors when triton
imports, and the PyTorch reference (`reference.py`) otherwise. `impl="triton"` on CPU tensors runs the kernels under
the Triton interpreter and needs TRITON_INTERPRET=1 set before triton is first imported. Importing this module does
not import triton.
"""

import functools

import torch
from torch import Tensor, nn

from ..dispatch import IMPLS, resolve_impl
from .distributed import gather_features  # public beside the loss: the global-negatives gather
from .reference import MODALITIES, PAIRS, trimodal_contrastive_loss_reference

__all__ = [
    "MODALITIES",
    "PAIRS",
    "TriModalContrastiveLoss",
    "gather_features",
    "trimodal_contrastive_loss",
    "trimodal_contrastive_loss_reference",
]

KERNELS = f"{__name__}.triton"  # imported lazily: importing this package must not import triton


def _check(
    features: tuple[Tensor, Tensor, Tensor],
    logit_scale: Tensor,
    masks: tuple[Tensor, Tensor, Tensor] | None,
    global_features: tuple[Tensor, Tensor, Tensor] | None,
    global_masks: tuple[Tensor, Tensor, Tensor] | None,
    row_offset: int,
) -> None:
    """Shape and device checks only (no values: those would synchronise the GPU every step)."""
    b, dim = features[0].shape if features[0].dim() == 2 else (None, None)
    # a kernel handed a pointer of another device reads garbage or dies with an illegal address: say which tensor
    device = features[0].device
    others = [*zip(MODALITIES, features), ("logit_scale", logit_scale)]
    for group, tensors in (("masks", masks), ("global_features", global_features), ("global_masks", global_masks)):
        others += [(f"{group}[{i}] ({m})", x) for i, (m, x) in enumerate(zip(MODALITIES, tensors or ()))]
    for name, x in others:
        if x.device != device:
            raise ValueError(
                f"{name} is on {x.device} but the image features are on {device}: every tensor of the loss must be "
                f"on one device; move it with .to({str(device)!r})"
            )
    for name, x in zip(MODALITIES, features):
        if x.dim() != 2 or x.shape != (b, dim):
            shapes = [tuple(f.shape) for f in features]
            raise ValueError(f"image, text, audio must all be [b, D] of one shape, got {shapes} ({name})")
    if logit_scale.shape != (3,):
        raise ValueError(
            f"logit_scale must be [3] (image-text, text-audio, audio-image), got {tuple(logit_scale.shape)}"
        )
    if masks is not None and (len(masks) != 3 or any(m.shape != (b,) or m.dtype != torch.bool for m in masks)):
        raise ValueError(f"masks must be three [b]=[{b}] bool tensors (image, text, audio)")
    big_b = b
    if global_features is not None:
        if len(global_features) != 3:
            raise ValueError("global_features must be a tuple of three [B, D] tensors (image, text, audio)")
        big_b = global_features[0].shape[0]
        if any(g.shape != (big_b, dim) for g in global_features):
            shapes = [tuple(g.shape) for g in global_features]
            raise ValueError(f"global_features must all be [B, D] with the local D={dim}, got {shapes}")
        if masks is not None and global_masks is None:
            raise ValueError(
                "masks given with global_features needs global_masks too: gather the masks alongside the features"
            )
    if global_masks is not None and (
        len(global_masks) != 3 or any(m.shape != (big_b,) or m.dtype != torch.bool for m in global_masks)
    ):
        raise ValueError(f"global_masks must be three [B]=[{big_b}] bool tensors (image, text, audio)")
    if global_features is None and global_masks is not None:
        raise ValueError(
            "global_masks goes with global_features; without them the columns are the local rows: pass masks"
        )
    if global_features is None and row_offset != 0:
        raise ValueError(f"row_offset={row_offset} needs global_features (the columns the offset indexes into)")
    if not 0 <= row_offset <= big_b - b:
        raise ValueError(f"row_offset={row_offset} puts the {b} local rows outside the {big_b} global rows")


def trimodal_contrastive_loss(
    image: Tensor,
    text: Tensor,
    audio: Tensor,
    logit_scale: Tensor,
    *,
    masks: tuple[Tensor, Tensor, Tensor] | None = None,
    global_features: tuple[Tensor, Tensor, Tensor] | None = None,
    global_masks: tuple[Tensor, Tensor, Tensor] | None = None,
    row_offset: int = 0,
    impl: str = "auto",
) -> Tensor:
    """Sum over the pairs (image-text, text-audio, audio-image) of symmetric InfoNCE with the pair's logit scale.

    image, text, audio: [b, D] local rows, L2-normalised; logit_scale: [3] exponentiated scales of the pairs.
    masks: 3 x [b] bool, which local rows have each modality (None: all). A local row counts in a pair when it has
    both modalities. global_features: 3 x [B, D], the columns (every process's rows, gathered WITH gradient; None:
    the local rows are the columns); global_masks: 3 x [B] bool, only with global_features (default: all True; required
    when masks are given); global_masks[row_offset:row_offset + b] must equal masks (default: that slice).
    row_offset: global index of local row 0 (rank * b). Each pair loss is 0.5 * (row terms + column terms) summed
    over the local rows that count, divided by the GLOBAL number of rows valid in both modalities, so the losses of
    all processes add up to the full-batch loss; a pair without valid rows adds exactly 0.
    Returns a scalar, float32 (float64 for float64 inputs on the torch path). Gradients flow to the features, the
    global features and logit_scale.
    """
    features = (image, text, audio)
    _check(features, logit_scale, masks, global_features, global_masks, row_offset)
    if masks is None and global_masks is not None:  # the local rows' masks are their slice of the global ones
        masks = tuple(m[row_offset : row_offset + image.shape[0]] for m in global_masks)
    if resolve_impl(impl, image.device, kernels=KERNELS) == "torch":
        return trimodal_contrastive_loss_reference(
            image, text, audio, logit_scale, masks=masks, global_features=global_features,
            global_masks=global_masks, row_offset=row_offset,
        )  # fmt: skip
    from .triton import trimodal_contrastive_triton  # lazy: importing this package must not import triton

    dtype = functools.reduce(torch.promote_types, [x.dtype for x in features])
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"impl='triton' takes float32, float16 or bfloat16 features, got {dtype}; use impl='torch'")
    features = tuple(x.to(dtype) for x in features)
    b = image.shape[0]
    ones = torch.ones(3, b, dtype=torch.bool, device=image.device)
    stacked_masks = ones if masks is None else torch.stack(masks)
    if global_features is None:
        stacked_global_masks = stacked_masks
    else:
        global_features = tuple(g.to(dtype) for g in global_features)
        big_b = global_features[0].shape[0]
        stacked_global_masks = (
            torch.ones(3, big_b, dtype=torch.bool, device=image.device)
            if global_masks is None
            else torch.stack(global_masks)
        )
    return trimodal_contrastive_triton(
        features, logit_scale, stacked_masks, global_features, stacked_global_masks, row_offset
    )


class TriModalContrastiveLoss(nn.Module):
    """Module form of `trimodal_contrastive_loss` (no parameters: the logit scales belong to the model)."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(
        self,
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
        return trimodal_contrastive_loss(
            image, text, audio, logit_scale, masks=masks, global_features=global_features,
            global_masks=global_masks, row_offset=row_offset, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
