"""Flash attention with key-padding lengths in Triton (forward and backward), for CUDA training and GPU inference.

Layers: `_attention_fwd_kernel` -> `attention_fwd()` (launcher) -> `FusedAttentionFunction` (autograd) ->
`synergy.kernels.attention.fused_attention()` (functional, dispatch). Semantics are those of `reference.py`.

Forward (FlashAttention-2): one program per (query tile, batch*head); an online softmax over key tiles keeps a
running max m and sum l, so nothing of size N^2 is stored; the log-sum-exp per row is saved for the backward.
Backward by recomputation: `_attention_bwd_preprocess_kernel` computes delta = rowsum(dO * O), then one program per
key tile accumulates dK, dV over query tiles and one program per query tile accumulates dQ over key tiles. Every
output element is written by exactly one program (no atomics), so the backward is deterministic.

Key padding: a tile loop only runs up to `lengths[b]`, so fully padded key tiles (and query tiles, whose output is a
constant 0) cost nothing; only the tiles that straddle a boundary (the padding edge, the causal diagonal) pay for
the masks (`MASKED=True` in the inner loops).

Scores are kept in base 2: s2 = (q . k) * scale * log2(e), so exp2 replaces exp; the saved lse is in the same units.
Head dims that are not a power of two (80, 96) are padded to BLOCK_D with masked loads. Written with pointer
arithmetic only (no block pointers, no autotune, no inline asm) so it runs on Triton 3.6 on GPUs and under
TRITON_INTERPRET=1 on Triton 3.9.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; masked rows and the head-dim padding read as 0. Unmasked tiles skip the mask."""
    if MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM < BLOCK_D:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attention_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    offs_d,
    lo,
    hi,
    length,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) for one query tile; acc: [BLOCK_M, BLOCK_D], l_i, m_i: [BLOCK_M]."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < length
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], col_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            keep = cols[None, :] < length
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        # key 0 is in the first tile every row visits and is never masked, so m_new is finite from the first tile on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], col_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N"])  # N == 1 would become a constexpr in the length arithmetic
def _attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    LENGTHS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    N,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_M), B*H): O[b, h, tile] = softmax(q k^T * scale) v; LSE[b*H + h, tile] in log2 units."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if HAS_LENGTHS:
        length = tl.load(LENGTHS + b)
    else:
        length = N
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    row_ok = offs_m < length  # padded query rows read as 0 (never touch their data) and output 0
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # keys [0, hi) are visible to some row of this tile; a tile of padded queries (start_m >= length) visits none
    hi = length
    full = length
    if CAUSAL:
        hi = tl.minimum(length, start_m + BLOCK_M)
        full = tl.minimum(length, start_m)
    hi = tl.where(start_m < length, hi, 0)
    hi_full = tl.minimum((full // BLOCK_N) * BLOCK_N, hi)  # key tiles below hi_full need no mask

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, hi_full, length, qk_scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, hi_full, hi, length, qk_scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, DOT_PRECISION,
    )  # fmt: skip

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & d_ok[None, :])
    lse = tl.where(row_ok, m_i + tl.math.log2(l_safe), 0.0)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_on,
    stride_dob,
    stride_doh,
    stride_don,
    H,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_M), B*H): DELTA[b*H + h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _attention_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qn,
    stride_don,
    cols,
    offs_d,
    lo,
    hi,
    length,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dk, dv: [BLOCK_N, BLOCK_D] of one key tile (keys `cols`) over the query tiles [lo, hi)."""
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < length
        q = _load_tile(q_base + rows[:, None] * stride_qn + offs_d[None, :], row_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_base + rows[:, None] * stride_don + offs_d[None, :], row_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)  # [BLOCK_M]
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            keep = row_ok[None, :]
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["N"])  # N == 1 would become a constexpr in the length arithmetic
def _attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    LENGTHS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    N,
    qk_scale_log2,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_N), B*H): dK, dV of one key tile, summed over the query rows that see it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if HAS_LENGTHS:
        length = tl.load(LENGTHS + b)
    else:
        length = N
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (cols[:, None] < length) & d_ok[None, :]  # padded keys load as 0 and store as 0
    k_ptrs = K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

    # query rows [lo, hi) see this key tile: valid rows only (padded rows output a constant), causal rows >= start_n;
    # rows in [lo_full, hi_full) are valid and (causal) at or below the diagonal for every key of the tile
    hi = tl.where(start_n < length, length, 0)
    hi_full = (length // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        lo_full = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        lo_full = 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * N
    delta_base = DELTA + pid_bh.to(tl.int64) * N
    if CAUSAL:  # the diagonal tiles
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols, offs_d,
            lo, tl.minimum(lo_full, hi), length, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True, DOT_PRECISION,
        )  # fmt: skip
    dk, dv = _attention_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols, offs_d,
        lo_full, tl.minimum(hi_full, hi), length, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False,
        DOT_PRECISION,
    )  # fmt: skip
    dk, dv = _attention_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols, offs_d,
        tl.maximum(hi_full, lo_full), hi, length, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True,
        DOT_PRECISION,
    )  # fmt: skip

    key_ok = (cols < length)[:, None]
    store_mask = (cols[:, None] < N) & d_ok[None, :]
    dk = tl.where(key_ok, dk * sm_scale, 0.0)
    dv = tl.where(key_ok, dv, 0.0)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attention_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    offs_d,
    lo,
    hi,
    length,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dq: [BLOCK_M, BLOCK_D] of one query tile over the key tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < length
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], col_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], col_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            keep = cols[None, :] < length
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["N"])  # N == 1 would become a constexpr in the length arithmetic
def _attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    LENGTHS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    H,
    N,
    qk_scale_log2,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_M), B*H): dQ of one query tile, summed over the keys it sees."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if HAS_LENGTHS:
        length = tl.load(LENGTHS + b)
    else:
        length = N
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < length
    mask = row_ok[:, None] & d_ok[None, :]  # padded query rows load as 0 and store as 0
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0
    )
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)

    hi = length
    full = length
    if CAUSAL:
        hi = tl.minimum(length, start_m + BLOCK_M)
        full = tl.minimum(length, start_m)
    hi = tl.where(start_m < length, hi, 0)
    hi_full = tl.minimum((full // BLOCK_N) * BLOCK_N, hi)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, hi_full, length,
        qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, DOT_PRECISION,
    )  # fmt: skip
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, hi_full, hi, length,
        qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, DOT_PRECISION,
    )  # fmt: skip
    dq = tl.where(row_ok[:, None], dq * sm_scale, 0.0)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & d_ok[None, :])


INTERPRETED = type(_attention_fwd_kernel).__name__ == "InterpretedFunction"


def _tile_config(head_dim: int, interpreted: bool) -> dict:
    """Per kernel: (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages). Fixed per head dim, not autotuned
    (autotune does not run interpreted). GPU values start from Triton's fused-attention tutorial and were checked by
    compiling for sm_90 (Triton 3.9, ptxas -v): every kernel uses wgmma, spills are <= 12 bytes. They are
    not tuned on hardware. Interpreted, small tiles make odd test sizes cross several tiles and both kinds of edge."""
    if interpreted:
        return dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1), preprocess=(32, 0, 4, 1))
    if triton.next_power_of_2(head_dim) <= 64:
        return dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 4, 3), preprocess=(64, 0, 4, 1))
    return dict(fwd=(128, 32, 8, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2), preprocess=(64, 0, 4, 1))


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16; 80 and 96 pad to 128


def _check_inputs(q: torch.Tensor, lengths: torch.Tensor | None) -> None:
    if not q.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton attention kernel needs CUDA tensors; to run it on CPU set TRITON_INTERPRET=1 before triton is "
            "first imported (slow, for tests), or use impl='torch'"
        )
    if q.shape[-1] > 128:
        raise ValueError(f"fused attention supports head dims up to 128, got {q.shape[-1]}; use impl='torch'")
    if lengths is not None and lengths.device != q.device:
        raise ValueError(f"lengths is on {lengths.device} but q is on {q.device}; move lengths to q's device")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, fp32 training) get exact fp32 products; fp16/bf16 use the tensor cores anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, N, d] (last dim contiguous); lengths: [B] int32 or None -> (out [B, H, N, d], lse [B*H, N] fp32).

    `out` is laid out as [B, N, H, d] in memory (a transposed view), so the [B, N, H*d] layout transformers wants next
    is free."""
    _check_inputs(q, lengths)
    batch, heads, n, head_dim = q.shape
    block_m, block_n, num_warps, num_stages = _tile_config(head_dim, INTERPRETED)["fwd"]
    out = torch.empty(batch, n, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(batch * heads, n, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, block_m), batch * heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, lengths if lengths is not None else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, n, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, q, k, v, out: [B, H, N, d]; lse: [B*H, N] -> (dq, dk, dv), each [B, H, N, d] like its input."""
    batch, heads, n, head_dim = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    cfg = _tile_config(head_dim, INTERPRETED)
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim))
    masking = dict(CAUSAL=causal, HAS_LENGTHS=lengths is not None, DOT_PRECISION=_dot_precision(q.dtype))
    lengths_arg = lengths if lengths is not None else q
    qk_scale_log2 = scale * LOG2E

    delta = torch.empty(batch * heads, n, dtype=torch.float32, device=q.device)
    block_m, _, num_warps, num_stages = cfg["preprocess"]
    _attention_bwd_preprocess_kernel[(triton.cdiv(n, block_m), batch * heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, n,
        BLOCK_M=block_m, **dims, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_m, block_n, num_warps, num_stages = cfg["dkdv"]
    _attention_bwd_dkdv_kernel[(triton.cdiv(n, block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, lengths_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        heads, n, qk_scale_log2, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, **dims, **masking, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    block_m, block_n, num_warps, num_stages = cfg["dq"]
    _attention_bwd_dq_kernel[(triton.cdiv(n, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, lengths_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
        heads, n, qk_scale_log2, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, **dims, **masking, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dq, dk, dv


class FusedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the per-row lse; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, causal: bool, scale: float):
        out, lse = attention_fwd(q, k, v, lengths, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, lengths, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def fused_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """q, k, v: [B, H, N, d] of one dtype; lengths: [B] int or None -> [B, H, N, d]. Validation is the caller's."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if lengths is not None:
        lengths = lengths.to(device=q.device, dtype=torch.int32).clamp(0, q.shape[-2])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FusedAttentionFunction.apply(q, k, v, lengths, causal, float(scale))
