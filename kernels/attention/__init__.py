"""Fused attention with key-padding lengths, and its registration as a transformers attention implementation.

    fused_attention(q, k, v, lengths=lengths, causal=False)     # q, k, v: [B, H, N, d]; lengths: [B] valid keys
    register_attention("synergy")                                # then attn_implementation="synergy" in a tower

`impl="auto"` runs the Triton kernel (`triton.py`) on CUDA tensors when triton imports, and the PyTorch reference
(`reference.py`) otherwise and under export. Importing this module does not import triton.

The transformers integration (`synergy_attention_forward`) turns the 4-D masks transformers builds into lengths:
a key-padding mask (valid prefix, optionally combined with the causal pattern) runs the fused kernel; any other
mask falls back to SDPA with one warning in the log. Which path the towers take is `get_default_impl()`:
"auto" (CUDA -> Triton, CPU / export -> SDPA), "triton" (forced; on CPU it needs TRITON_INTERPRET=1, that is how
the CPU tests run the kernel inside real towers) or "torch" (always SDPA). Set it with `set_default_impl()` or the
environment variable SYNERGY_ATTENTION_IMPL before import.
"""

import logging
import os
import weakref

import torch

from ..dispatch import IMPLS, is_exporting, resolve_impl
from .reference import attention_reference, key_padding_mask

__all__ = [
    "attention_reference",
    "fused_attention",
    "get_default_impl",
    "key_padding_mask",
    "register_attention",
    "set_default_impl",
    "synergy_attention_forward",
]

logger = logging.getLogger(__name__)

KERNELS = f"{__name__}.triton"  # imported lazily: importing this package must not import triton


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, N, d] of one shape (self-attention), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if lengths is not None and (lengths.shape != (q.shape[0],) or lengths.is_floating_point()):
        raise ValueError(f"lengths must be an integer tensor of shape [B]=[{q.shape[0]}], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")  # fmt: skip


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale [+ masks]) v with key padding given as lengths.

    q, k, v: [B, H, N, d]; lengths: [B] int, the number of valid keys of each sequence (padding at the end), or None.
    Padded keys get probability 0 (exactly zero dK, dV); query rows >= lengths[b] output 0 and get zero dQ; a length
    of 0 gives an all-zero sequence. causal: query i sees keys j <= i. scale defaults to 1/sqrt(d).
    Returns [B, H, N, d] (from the Triton path, a view whose memory is laid out [B, N, H, d])."""
    _check_shapes(q, k, v, lengths)
    if resolve_impl(impl, q.device, kernels=KERNELS) == "torch":
        return attention_reference(q, k, v, lengths=lengths, causal=causal, scale=scale)
    from .triton import fused_attention_triton  # lazy: importing this package must not import triton

    k, v = k.to(q.dtype), v.to(q.dtype)
    return fused_attention_triton(q, k, v, lengths, causal, scale)


# --- transformers integration ------------------------------------------------------------------------------------

_default_impl = os.environ.get("SYNERGY_ATTENTION_IMPL", "auto")
if _default_impl not in IMPLS:
    raise ValueError(f"SYNERGY_ATTENTION_IMPL must be one of {IMPLS}, got {_default_impl!r}")


def set_default_impl(impl: str) -> str:
    """Choose the path of the registered transformers attention ("auto" | "triton" | "torch"); returns the old one."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    previous, _default_impl = _default_impl, impl
    return previous


def get_default_impl() -> str:
    return _default_impl


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("synergy attention falls back to SDPA: %s (logged once)", reason)


# Every layer of a tower gets the same mask tensor: analyse it once (one host sync) and reuse the answer.
_mask_cache: tuple[weakref.ref, int, tuple[torch.Tensor, bool] | None] | None = None


def _lengths_from_mask(mask: torch.Tensor, batch: int, n: int) -> tuple[torch.Tensor, bool] | None:
    """A transformers 4-D mask [B or 1, 1, N or 1, N] (bool: True = attend; float: additive 0 / very negative) ->
    (lengths [B] int32, causal) when it is a key-padding mask (valid prefix per sequence), optionally intersected with
    the causal pattern; None for any other mask."""
    global _mask_cache
    if _mask_cache is not None and _mask_cache[0]() is mask and _mask_cache[1] == mask._version:
        return _mask_cache[2]
    result = None
    shape_ok = mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1 and mask.shape[2] in (1, n)
    if shape_ok and mask.shape[3] == n and (mask.dtype == torch.bool or mask.is_floating_point()):
        if mask.dtype == torch.bool:
            allowed, values_ok = mask, torch.ones((), dtype=torch.bool, device=mask.device)
        else:  # additive: 0 where attended, finfo.min (eager masks) or -inf elsewhere; anything else is a real bias
            allowed = mask == 0
            values_ok = (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()
        allowed = allowed.expand(batch, 1, n, n)[:, 0]  # [B, N, N] (a view)
        lengths = allowed[:, -1].sum(-1)  # the last query row sees every valid key in both patterns
        valid = key_padding_mask(lengths, n)  # [B, N]
        causal_pattern = valid[:, None, :] & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        # transformers' padding masks broadcast over query rows (stride 0): then one row decides
        rows = allowed[:, :1] if allowed.stride(1) == 0 else allowed
        checks = torch.stack([values_ok, (rows == valid[:, None, :]).all(), (allowed == causal_pattern).all()])
        values_ok, is_padding, is_causal_padding = checks.tolist()
        if values_ok and (is_padding or is_causal_padding):
            result = (lengths.to(torch.int32), not is_padding)
    _mask_cache = (weakref.ref(mask), mask._version, result)
    return result


def synergy_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query, key, value [B, H, N, d] -> (attn_output [B, N, H, d], None).

    Same contract as transformers' sdpa_attention_forward, which it calls for everything it does not fuse: CPU and
    export ("auto"), masks that are not key padding, cross-attention, cached decoding, position biases."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    def sdpa(reason: str | None = None):
        if reason is not None:
            _warn_once(reason)
        kwargs_sdpa = dict(kwargs, is_causal=is_causal) if is_causal is not None else kwargs
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs_sdpa
        )

    if is_exporting() or resolve_impl(_default_impl, query.device, kernels=KERNELS) == "torch":
        return sdpa()
    for name in ("position_bias", "softcap", "sliding_window", "cache", "s_aux"):
        if kwargs.get(name) is not None:
            return sdpa(f"the module passes {name}, which the fused kernel does not implement")
    n = query.shape[2]
    if key.shape[2] != n:
        return sdpa(f"query length {n} != key length {key.shape[2]} (cross-attention or cached decoding)")
    if dropout > 0.0 and module.training:
        raise ValueError(
            f"synergy fused attention does not implement attention dropout (module {type(module).__name__} asks for "
            f"p={dropout}); set the tower config's attention dropout to 0 (attention_probs_dropout_prob / "
            "attention_dropout), or use attn_implementation='sdpa'"
        )
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions=True: the fused kernel never materialises the attention weights (returns None)")

    lengths = None
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and n > 1  # as SDPA: one query row attends to everything
    else:
        parsed = _lengths_from_mask(attention_mask, query.shape[0], n)
        if parsed is None:
            return sdpa(f"an attention mask that is not a key-padding mask ({attention_mask.dtype}, "
                        f"{tuple(attention_mask.shape)})")  # fmt: skip
        lengths, causal = parsed
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = fused_attention(query, key, value, lengths=lengths, causal=causal, scale=scaling, impl=_default_impl)
    return out.transpose(1, 2).contiguous(), None  # [B, N, H, d]; free when out is laid out [B, N, H, d]


def register_attention(name: str = "synergy") -> str:
    """Register `synergy_attention_forward` with transformers as attn_implementation=`name` (idempotent).

    The mask side is registered too, as transformers' SDPA mask builder: without a mask function transformers would
    hand a custom implementation no padding mask at all. Returns `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, synergy_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
