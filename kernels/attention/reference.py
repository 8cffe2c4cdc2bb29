"""Attention with key-padding lengths in plain PyTorch: the test oracle, the CPU path and the export path.

Semantics shared with the Triton kernel (`triton.py`):
- `lengths[b]` keys of sequence b are valid, the rest is padding at the end; padded keys get probability 0, so their
  dK and dV are exactly zero;
- query rows at positions >= lengths[b] output 0 (never NaN) and get zero dQ, so a length-0 sequence is all zeros;
- `causal`: query i sees keys j <= i (top-left aligned; q and k have the same length).
"""

import torch
import torch.nn.functional as F


def key_padding_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """lengths: [B] int -> valid: [B, n] bool, True where the position is < lengths[b]."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: [B, H, N, d]; lengths: [B] int or None -> out: [B, H, N, d]."""
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    n = q.shape[-2]
    valid = key_padding_mask(lengths, n)  # [B, N]
    allowed = valid[:, None, None, :]  # [B, 1, 1, N]: which keys a query may see
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # A padded query row would see no key at all (NaN in softmax): let it see every key, then zero the row. Its
    # output is a constant 0, so no gradient flows through the keys it saw.
    padded_query = ~valid[:, None, :, None]  # [B, 1, N, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | padded_query, scale=scale)
    return out.masked_fill(padded_query, 0.0)
