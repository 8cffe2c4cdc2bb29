"""The tri-modal contrastive loss in Triton: forward and backward without any B x B matrix in global memory.

Layers: `_trimodal_ce_fwd_kernel` -> `trimodal_ce_fwd()` (launcher), `_trimodal_ce_bwd_kernel` -> `trimodal_ce_bwd()`
-> `TriModalContrastiveFunction` (autograd) -> `trimodal_contrastive_triton()` -> the public
`synergy.kernels.contrastive.trimodal_contrastive_loss()` / `TriModalContrastiveLoss`. Semantics: `reference.py`.

Notation. The three modalities are stacked as m = 0, 1, 2 (image, text, audio); pair p is (X=p, Y=(p+1)%3) with scale
s_p, so the pairs are image-text, text-audio, audio-image. Every modality m is the query side of two *directions*:
  (m, 0): queries m against keys (m+1)%3 through pair m        (the row term of pair m)
  (m, 1): queries m against keys (m+2)%3 through pair (m+2)%3  (the column term of pair (m+2)%3)
and direction (m, 0) is the transpose of direction ((m+1)%3, 1). Per direction and query row the kernels keep a
logsumexp over the valid keys (`lse[m, k, r]`) and the positive logit (`pos[m, k, r]`, target key row_offset + r).

Forward, rectangular form (local rows against gathered global columns, `symmetric=False`): one program per (tile of
local rows, modality m) streams the column tiles of both partners and keeps an online logsumexp for the two
directions of m. FUSED: the query tile of m is loaded once per D-chunk and multiplied against the key tiles of both of
its partners, so a modality's tile serves both of its pairs: three tile loads (x_m, y_m+1, y_m+2) for two products
instead of four, nine instead of twelve per tile position for the six directions, in one launch instead of six.

Forward, full batch (`symmetric=True`, the columns are the rows): direction ((m+1)%3, 1) is the transpose of (m, 0),
so each S tile s_m * X_m[i] @ X_{m+1}[j].T is computed ONCE and yields both the row logsumexp (online, in registers)
and a column logsumexp. Column statistics need a reduction across the programs that own other row tiles; instead of
float atomics (whose order varies from run to run) every program keeps its own partial column logsumexp in a
[n_programs, 3, B] buffer (read-modify-write of its own slice only) and the launcher combines them with a
torch.logsumexp in a fixed order. The grid is persistent (n_programs <= max_programs, each program walks row tiles
pid, pid + n_programs, ...), so that buffer is O(max_programs * B), not O(B^2 / BLOCK_M). Here no tile is shared
between pairs (each product needs its own two tiles), so the three pairs share one launch, not loads.

Backward by recomputation, one program per (tile of query rows, modality m): recompute the S tiles of both directions
of m (the query tile again loaded once for both pairs), form dlogits = c_p * D where D is the softmax minus the
one-hot target (row term, with the row's lse) plus, in the full-batch form, the transposed direction's softmax minus
target (column term, with the column's lse), and accumulate dX_m[i] += c_p * s_p * D @ X_q[j] over the column tiles.
Each output row belongs to exactly one program, so no atomics: the backward is deterministic (run to run, bitwise).
The full-batch form needs this one kernel; the rectangular form runs it a second time with the roles swapped
(programs own tiles of global columns, the local rows are the keys, only the column term) to get the gradient of the
gathered features. The [BLOCK_M, D] fp32 gradient rows do not fit in registers for D >= 512 (and three modalities),
so they are accumulated chunk by chunk of D in an fp32 buffer owned by the program (read-modify-write, no atomics).
The scale gradients are sum(D * (x . y)) per tile row, written per program and summed by the launcher in fixed order.

FLOPs per pair, full batch (B x B, D): forward 2 B^2 D (one product gives rows and columns), backward 8 B^2 D (two
directions, each recompute + one gradient product), so 10 B^2 D against the 8 B^2 D the benchmark divides by (one
recompute serving both gradients would need atomics or a [splits, B, D] buffer). Rectangular, per process with b local
rows: forward 4 b B D, backward 16 b B D (the local-rows and the gathered-columns launches).

Determinism: no atomics anywhere; every reduction across programs (partial column logsumexps, scale gradients) is
summed by torch in a fixed order. Results are bitwise reproducible for a given shape, tile config and device.

Precision: fp32, fp16 and bf16 inputs; every dot accumulates in fp32; logits, logsumexps and the softmax are fp32. For
fp16/bf16 the softmax-minus-target tile is rounded to the input dtype before its gradient dot (as FlashAttention
does); the per-pair factor c_p * s_p (which may be tiny, 0.5/n) is applied after the dot, in fp32, so fp16 does not
flush it to zero. fp32 inputs follow torch.get_float32_matmul_precision(): IEEE fp32 dots under "highest" (torch's
default), TF32 under "high"/"medium" (a TF32 logit at scale 100 can be off by about 0.05).

Written with pointer arithmetic only (no block pointers, no autotune, no inline asm) for Triton 3.6 on GPUs and
TRITON_INTERPRET=1 on CPUs (Triton 3.9), where the tests run it and also compile it to sm_90 cubins.
"""

import dataclasses

import torch
import triton
import triton.language as tl

# Offsets into [3, n, D] buffers are int64: 3 * n * D passes 2^31 at n = 1M, D = 1024.


@triton.jit
def _online_logsumexp(m_i, l_i, logits):
    """One tile of an online logsumexp along rows. logits: [BM, BN] with -inf where excluded; m_i, l_i: [BM]."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet: keep exp() away from -inf - -inf
    l_new = l_i * tl.exp(m_i - base) + tl.sum(tl.exp(logits - base[:, None]), 1)
    return m_new, l_new


@triton.jit
def _finish_logsumexp(m_i, l_i):
    base = tl.where(m_i == float("-inf"), 0.0, m_i)
    return base + tl.log(l_i)  # -inf for a row without any valid key


@triton.jit
def _column_logsumexp(logits):
    """logits: [BM, BN] with -inf where excluded -> logsumexp over the rows of the tile, [BN] (-inf if none)."""
    c_max = tl.max(logits, 0)
    base = tl.where(c_max == float("-inf"), 0.0, c_max)
    return base + tl.log(tl.sum(tl.exp(logits - base[None, :]), 0))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    base = tl.where(hi == float("-inf"), 0.0, hi)
    return base + tl.log(tl.exp(a - base) + tl.exp(b - base))


@triton.jit
def _trimodal_ce_fwd_kernel(
    row_ptr,  # [3, n_rows, DIM] query features (the local rows), contiguous
    col_ptr,  # [3, n_cols, DIM] key features (the global columns; the same buffer when SYMMETRIC)
    scale_ptr,  # [3] fp32 logit scale of each pair
    col_key_ptr,  # [3, n_cols] int8: column valid as a key of its modality (global masks)
    row_key_ptr,  # [3, n_rows] int8: row valid as a key (SYMMETRIC column statistics only)
    lse_ptr,  # [3, 2, n_rows] fp32 out: logsumexp of direction (m, k) per query row (k = 1 only if not SYMMETRIC)
    pos_ptr,  # [3, 2, n_rows] fp32 out: positive logit of direction (m, k)
    col_lse_ptr,  # [n_programs, 3, n_cols] fp32, -inf on entry (SYMMETRIC only): partial column logsumexp of pair m
    n_rows,
    n_cols,
    row_offset,  # global index of local row 0: the target key of query row r is row_offset + r
    DIM: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid (n_programs, 3): program (pid, m) owns the row tiles pid, pid + n_programs, ... of modality m."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    m = tl.program_id(1)
    q0 = (m + 1) % 3  # keys of direction (m, 0), through pair m
    q1 = (m + 2) % 3  # keys of direction (m, 1), through pair q1
    s0 = tl.load(scale_ptr + m)
    s1 = tl.load(scale_ptr + q1)
    x_base = row_ptr + m.to(tl.int64) * n_rows * DIM
    y0_base = col_ptr + q0.to(tl.int64) * n_cols * DIM
    y1_base = col_ptr + q1.to(tl.int64) * n_cols * DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    for row_tile in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows = row_tile * BLOCK_M + offs_m
        row_ok = rows < n_rows
        x_rows = x_base + rows.to(tl.int64)[:, None] * DIM  # [BM, 1] pointers
        m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l0 = tl.zeros([BLOCK_M], tl.float32)
        pos0 = tl.zeros([BLOCK_M], tl.float32)
        m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        pos1 = tl.zeros([BLOCK_M], tl.float32)
        if SYMMETRIC:
            row_key = row_ok & (tl.load(row_key_ptr + m * n_rows + rows, mask=row_ok, other=0) != 0)
        for col_tile in range(0, tl.cdiv(n_cols, BLOCK_N)):
            cols = col_tile * BLOCK_N + offs_n
            col_ok = cols < n_cols
            y0_rows = y0_base + cols.to(tl.int64)[:, None] * DIM  # [BN, 1]
            y1_rows = y1_base + cols.to(tl.int64)[:, None] * DIM
            g0 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # x . y of direction (m, 0)
            g1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # x . y of direction (m, 1)
            for d_start in range(0, DIM, BLOCK_D):
                dd = d_start + offs_d
                d_ok = dd < DIM
                x = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
                y0 = tl.load(y0_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
                g0 = tl.dot(x, tl.trans(y0), g0, input_precision=INPUT_PRECISION)
                if not SYMMETRIC:  # the same x tile serves the second pair of modality m
                    y1 = tl.load(y1_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    g1 = tl.dot(x, tl.trans(y1), g1, input_precision=INPUT_PRECISION)
            is_target = (rows[:, None] + row_offset) == cols[None, :]  # [BM, BN]
            logits0 = g0 * s0
            key0 = col_ok & (tl.load(col_key_ptr + q0 * n_cols + cols, mask=col_ok, other=0) != 0)
            m0, l0 = _online_logsumexp(m0, l0, tl.where(key0[None, :], logits0, float("-inf")))
            pos0 += tl.sum(tl.where(is_target, logits0, 0.0), 1)
            if SYMMETRIC:
                # the same tile, read down its columns: the column term of pair m, i.e. direction (q0, 1)
                tile_lse = _column_logsumexp(tl.where(row_key[:, None], logits0, float("-inf")))  # [BN]
                partial = col_lse_ptr + (pid * 3 + m).to(tl.int64) * n_cols + cols
                previous = tl.load(partial, mask=col_ok, other=float("-inf"))
                tl.store(partial, _logaddexp(previous, tile_lse), mask=col_ok)
                # the next row tile of this program reads these columns back, maybe from other threads
                tl.debug_barrier()
            else:
                logits1 = g1 * s1
                key1 = col_ok & (tl.load(col_key_ptr + q1 * n_cols + cols, mask=col_ok, other=0) != 0)
                m1, l1 = _online_logsumexp(m1, l1, tl.where(key1[None, :], logits1, float("-inf")))
                pos1 += tl.sum(tl.where(is_target, logits1, 0.0), 1)
        out0 = lse_ptr + (m * 2) * n_rows + rows
        tl.store(out0, _finish_logsumexp(m0, l0), mask=row_ok)
        tl.store(pos_ptr + (m * 2) * n_rows + rows, pos0, mask=row_ok)
        if not SYMMETRIC:
            tl.store(lse_ptr + (m * 2 + 1) * n_rows + rows, _finish_logsumexp(m1, l1), mask=row_ok)
            tl.store(pos_ptr + (m * 2 + 1) * n_rows + rows, pos1, mask=row_ok)


@triton.jit
def _softmax_minus_target(logits, lse, keep, is_target):
    """exp(logits - lse) where keep, else 0, minus the one-hot target. lse broadcasts ([BM, 1] or [1, BN])."""
    return tl.where(keep, tl.exp(logits - lse), 0.0) - tl.where(is_target, 1.0, 0.0)


@triton.jit
def _trimodal_ce_bwd_kernel(
    row_ptr,  # [3, n_rows, DIM] features of the rows this launch differentiates
    col_ptr,  # [3, n_cols, DIM] features of the other side
    grad_ptr,  # [3, n_rows, DIM] fp32, zero on entry: d loss / d rows (each program owns its rows)
    dscale_ptr,  # [3, 2, n_row_tiles] fp32 out: sum of D * (x . y) over the tile of direction (m, k)
    scale_ptr,  # [3] fp32 s_p
    factor_ptr,  # [3] fp32 c_p = grad_output * 0.5 / n_pair (0 for an empty pair)
    row_lse_ptr,  # [3, 2, n_rows] logsumexp of the rows as queries (ROW_TERM); 0 where a row does not count
    row_valid_ptr,  # [3, n_rows] int8: row counts in pair p (ROW_TERM)
    row_key_ptr,  # [3, n_rows] int8: row valid as a key of its modality (COL_TERM)
    col_lse_ptr,  # [3, 2, n_cols] logsumexp of the columns as queries (COL_TERM)
    col_valid_ptr,  # [3, n_cols] int8: column counts in pair p (COL_TERM)
    col_key_ptr,  # [3, n_cols] int8: column valid as a key of its modality (ROW_TERM)
    n_rows,
    n_cols,
    row_offset,  # target: row r and column c are a positive pair when r + row_offset == c + col_offset
    col_offset,
    DIM: tl.constexpr,
    ROW_TERM: tl.constexpr,  # the rows are queries (softmax along the row, lse of the row)
    COL_TERM: tl.constexpr,  # the columns are queries (softmax down the column, lse of the column)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grid (cdiv(n_rows, BLOCK_M), 3): program (i, m) accumulates d rows_m[tile i] over all column tiles, for the
    two directions of modality m: keys q0 = (m+1)%3 through pair m and keys q1 = (m+2)%3 through pair q1."""
    row_tile = tl.program_id(0)
    m = tl.program_id(1)
    q0 = (m + 1) % 3
    q1 = (m + 2) % 3
    s0 = tl.load(scale_ptr + m)
    s1 = tl.load(scale_ptr + q1)
    f0 = tl.load(factor_ptr + m) * s0  # d logits / d (x . y) folded with c_p, applied after the dot in fp32
    f1 = tl.load(factor_ptr + q1) * s1
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = row_ptr + m.to(tl.int64) * n_rows * DIM + rows.to(tl.int64)[:, None] * DIM  # [BM, 1]
    dx_rows = grad_ptr + m.to(tl.int64) * n_rows * DIM + rows.to(tl.int64)[:, None] * DIM
    y0_base = col_ptr + q0.to(tl.int64) * n_cols * DIM
    y1_base = col_ptr + q1.to(tl.int64) * n_cols * DIM
    if ROW_TERM:
        lse0 = tl.load(row_lse_ptr + (m * 2) * n_rows + rows, mask=row_ok, other=0.0)
        lse1 = tl.load(row_lse_ptr + (m * 2 + 1) * n_rows + rows, mask=row_ok, other=0.0)
        valid0 = tl.load(row_valid_ptr + m * n_rows + rows, mask=row_ok, other=0) != 0
        valid1 = tl.load(row_valid_ptr + q1 * n_rows + rows, mask=row_ok, other=0) != 0
    if COL_TERM:
        row_key = tl.load(row_key_ptr + m * n_rows + rows, mask=row_ok, other=0) != 0
    dscale0 = tl.zeros([BLOCK_M], tl.float32)
    dscale1 = tl.zeros([BLOCK_M], tl.float32)

    for col_tile in range(0, tl.cdiv(n_cols, BLOCK_N)):
        cols = col_tile * BLOCK_N + offs_n
        col_ok = cols < n_cols
        y0_rows = y0_base + cols.to(tl.int64)[:, None] * DIM  # [BN, 1]
        y1_rows = y1_base + cols.to(tl.int64)[:, None] * DIM
        g0 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        g1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d_start in range(0, DIM, BLOCK_D):  # recompute both directions' x . y; the x tile is loaded once for both
            dd = d_start + offs_d
            d_ok = dd < DIM
            x = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            y0 = tl.load(y0_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            y1 = tl.load(y1_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            g0 = tl.dot(x, tl.trans(y0), g0, input_precision=INPUT_PRECISION)
            g1 = tl.dot(x, tl.trans(y1), g1, input_precision=INPUT_PRECISION)
        logits0 = g0 * s0
        logits1 = g1 * s1
        is_target = (rows[:, None] + row_offset) == (cols[None, :] + col_offset)
        # dl0, dl1: d loss / d logits of the tile, divided by c_p
        dl0 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dl1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if ROW_TERM:
            key0 = col_ok & (tl.load(col_key_ptr + q0 * n_cols + cols, mask=col_ok, other=0) != 0)
            key1 = col_ok & (tl.load(col_key_ptr + q1 * n_cols + cols, mask=col_ok, other=0) != 0)
            keep0 = valid0[:, None] & key0[None, :]
            keep1 = valid1[:, None] & key1[None, :]
            dl0 += tl.where(valid0[:, None], _softmax_minus_target(logits0, lse0[:, None], keep0, is_target), 0.0)
            dl1 += tl.where(valid1[:, None], _softmax_minus_target(logits1, lse1[:, None], keep1, is_target), 0.0)
        if COL_TERM:
            # the columns as queries: direction (q0, 1) is the transpose of (m, 0), (q1, 0) that of (m, 1)
            c_lse0 = tl.load(col_lse_ptr + (q0 * 2 + 1) * n_cols + cols, mask=col_ok, other=0.0)
            c_lse1 = tl.load(col_lse_ptr + (q1 * 2) * n_cols + cols, mask=col_ok, other=0.0)
            c_valid0 = tl.load(col_valid_ptr + m * n_cols + cols, mask=col_ok, other=0) != 0
            c_valid1 = tl.load(col_valid_ptr + q1 * n_cols + cols, mask=col_ok, other=0) != 0
            keep0 = row_key[:, None] & c_valid0[None, :]
            keep1 = row_key[:, None] & c_valid1[None, :]
            dl0 += tl.where(c_valid0[None, :], _softmax_minus_target(logits0, c_lse0[None, :], keep0, is_target), 0.0)
            dl1 += tl.where(c_valid1[None, :], _softmax_minus_target(logits1, c_lse1[None, :], keep1, is_target), 0.0)
        dscale0 += tl.sum(dl0 * g0, 1)
        dscale1 += tl.sum(dl1 * g1, 1)
        # d rows_m[tile] += c s D @ Y, one D-chunk at a time through the fp32 buffer this program owns
        dl0 = dl0.to(row_ptr.dtype.element_ty)
        dl1 = dl1.to(row_ptr.dtype.element_ty)
        for d_start in range(0, DIM, BLOCK_D):
            dd = d_start + offs_d
            d_ok = dd < DIM
            y0 = tl.load(y0_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            y1 = tl.load(y1_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            update = tl.dot(dl0, y0, input_precision=INPUT_PRECISION) * f0
            update += tl.dot(dl1, y1, input_precision=INPUT_PRECISION) * f1
            out = dx_rows + dd[None, :]
            out_mask = row_ok[:, None] & d_ok[None, :]
            tl.store(out, tl.load(out, mask=out_mask, other=0.0) + update, mask=out_mask)
        # the next column tile reads these rows back, maybe from other threads of the program
        tl.debug_barrier()

    n_row_tiles = tl.num_programs(0)
    tl.store(dscale_ptr + (m * 2) * n_row_tiles + row_tile, tl.sum(dscale0, 0))
    tl.store(dscale_ptr + (m * 2 + 1) * n_row_tiles + row_tile, tl.sum(dscale1, 0))


# --- launchers -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one launch. max_programs bounds the persistent grid of the full-batch forward (and with it the
    [max_programs, 3, B] partial column buffer); backward, where given, is the backward launches' own config (the
    forward's otherwise)."""

    block_m: int = 64
    block_n: int = 64
    block_d: int = 64
    num_warps: int = 4
    max_programs: int = 1 << 30
    num_stages: int = 3  # Triton's default on CUDA (software-pipelined loads); ignored when interpreted
    backward: "TileConfig | None" = None


# the kernels were compiled for the Triton interpreter (TRITON_INTERPRET=1 when triton was first imported): numpy on CPU
INTERPRETED = type(_trimodal_ce_fwd_kernel).__name__ == "InterpretedFunction"


def default_tile_config(
    n_rows: int, n_cols: int, dim: int, dtype: torch.dtype, device: torch.device, symmetric: bool = True
) -> TileConfig:
    """Tile sizes as a small function of the shape (no autotune: it cannot run interpreted); symmetric: the
    full-batch form (no gathered columns).

    Interpreted (numpy), the cost is per operation, not per element: the biggest tiles the test shapes fill. On GPUs,
    :func:`gpu_tile_config`."""
    if INTERPRETED:

        def fit(n: int) -> int:
            return max(16, min(128, triton.next_power_of_2(n)))

        return TileConfig(fit(n_rows), fit(n_cols), fit(dim), 4)
    properties = torch.cuda.get_device_properties(device)
    hopper = (properties.major, properties.minor) >= (9, 0)
    return gpu_tile_config(dtype, properties.multi_processor_count, symmetric, hopper)


def gpu_tile_config(dtype: torch.dtype, n_sm: int, symmetric: bool = True, hopper: bool = True) -> TileConfig:
    """The GPU tiles, chosen by timing on an H200 (benchmarks/tune_contrastive.py; results in
    benchmarks/results/gpu-h200-tune-contrastive-{1,2}.json: B=32768, D=512, bf16, the full-batch form, 32 runs of 29
    configs): forward 64 x 128 tiles with 4 warps (20 ms), backward 64 x 128 with 8 warps (71 ms), both D-chunks of
    64 and 3 stages, against 40 + 111 ms for the untimed 64 x 64 / 8 warps used before (64 x 256: backward 91.5 ms
    with 8 warps and 2 stages, out of shared memory at 3 stages, 310 ms with 4 warps). The rectangular forward
    (gathered columns) keeps two accumulators, as the backward does, so it takes the backward's 8 warps (not timed).
    fp16 takes the bf16 tiles (not timed). Only on Hopper (``hopper``: compute capability >= 9.0), where they were
    measured: the 64 x 128 backward at 3 stages may need more shared memory than an sm_86 / sm_89 block has, so older
    GPUs, and fp32 everywhere, keep 64 x 64 tiles with 8 warps (D-chunks of 32 for fp32), at which ptxas reports no
    spills for sm_90 at D = 512."""
    # the 3 modalities are the second grid axis: 4 * n_sm / 3 row programs give about 4 programs per SM
    max_programs = max(1, 4 * n_sm // 3)
    if dtype == torch.float32:
        return TileConfig(64, 64, 32, 8, max_programs=max_programs)
    if not hopper:
        return TileConfig(64, 64, 64, 8, max_programs=max_programs)
    backward = TileConfig(64, 128, 64, 8, num_stages=3)
    return TileConfig(64, 128, 64, 4 if symmetric else 8, max_programs, num_stages=3, backward=backward)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own setting: IEEE fp32 dots under "highest" (torch's default), TF32 otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # for 16-bit inputs only the name of the default: their dots are exact, accumulated in fp32


def trimodal_ce_fwd(
    rows: torch.Tensor,
    cols: torch.Tensor | None,
    scales: torch.Tensor,
    row_keys: torch.Tensor,
    col_keys: torch.Tensor,
    row_offset: int,
    tiles: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: [3, b, D] local features; cols: [3, B, D] gathered features or None (full batch: the rows are the
    columns); scales: [3] fp32; row_keys: [3, b] int8, col_keys: [3, B] int8 (valid as keys).
    Returns lse, pos: [3, 2, b] fp32: per direction (m, k) the logsumexp over valid keys and the positive logit."""
    symmetric = cols is None
    cols = rows if symmetric else cols
    _, n_rows, dim = rows.shape
    n_cols = cols.shape[1]
    lse = torch.empty(3, 2, n_rows, dtype=torch.float32, device=rows.device)
    pos = torch.empty_like(lse)
    n_row_tiles = triton.cdiv(n_rows, tiles.block_m)
    n_programs = min(n_row_tiles, tiles.max_programs) if symmetric else n_row_tiles
    col_lse = torch.full((n_programs, 3, n_cols) if symmetric else (1,), float("-inf"), device=rows.device)
    _trimodal_ce_fwd_kernel[(n_programs, 3)](
        rows, cols, scales, col_keys, row_keys, lse, pos, col_lse, n_rows, n_cols, row_offset,
        DIM=dim, SYMMETRIC=symmetric, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        INPUT_PRECISION=_input_precision(rows.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if symmetric:  # combine the per-program column statistics in a fixed order: direction ((m+1)%3, 1) = (m, 0).T
        lse[:, 1] = torch.logsumexp(col_lse, dim=0).roll(1, dims=0)  # row q of the result is pair (q-1)%3
        pos[:, 1] = pos[:, 0].roll(1, dims=0)
    return lse, pos


def trimodal_ce_bwd(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scales: torch.Tensor,
    factors: torch.Tensor,
    lse: tuple[torch.Tensor | None, torch.Tensor | None],
    valid: tuple[torch.Tensor | None, torch.Tensor | None],
    keys: tuple[torch.Tensor, torch.Tensor],
    offsets: tuple[int, int],
    tiles: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the loss with respect to `rows` ([3, n_rows, D]) against the keys/queries `cols` ([3, n_cols, D]).

    lse = (row_lse [3, 2, n_rows] or None, col_lse [3, 2, n_cols] or None): a side's lse given means that side's
    queries are differentiated here (None turns that term off); valid: the matching [3, n] int8 pair validities;
    keys: (row_keys [3, n_rows], col_keys [3, n_cols]) int8; offsets: (row_offset, col_offset) of the targets;
    factors: [3] fp32 c_p. Returns grad [3, n_rows, D] fp32 and dscale [3, 2, n_row_tiles] fp32."""
    _, n_rows, dim = rows.shape
    n_cols = cols.shape[1]
    grad = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    n_row_tiles = triton.cdiv(n_rows, tiles.block_m)
    dscale = torch.empty(3, 2, n_row_tiles, dtype=torch.float32, device=rows.device)
    dummy = factors  # an unused pointer argument of a term that is off
    row_lse, col_lse = lse
    row_valid, col_valid = valid
    _trimodal_ce_bwd_kernel[(n_row_tiles, 3)](
        rows, cols, grad, dscale, scales, factors,
        dummy if row_lse is None else row_lse, dummy if row_valid is None else row_valid, keys[0],
        dummy if col_lse is None else col_lse, dummy if col_valid is None else col_valid, keys[1],
        n_rows, n_cols, offsets[0], offsets[1],
        DIM=dim, ROW_TERM=row_lse is not None, COL_TERM=col_lse is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, INPUT_PRECISION=_input_precision(rows.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return grad, dscale


# --- autograd --------------------------------------------------------------------------------------------------------


def _direction_valid(pair_valid: torch.Tensor) -> torch.Tensor:
    """[3 pairs, n] -> [3, 2, n]: the validity of direction (m, k); (m, 0) is pair m, (m, 1) pair (m+2)%3."""
    return torch.stack([pair_valid, pair_valid.roll(1, dims=0)], dim=1)


class TriModalContrastiveFunction(torch.autograd.Function):
    """Tri-modal loss on stacked features: rows [3, b, D] (local), cols [3, B, D] or None (full batch)."""

    @staticmethod
    def forward(ctx, rows, cols, scales, masks, global_masks, row_offset, tiles):
        """masks: [3, b] bool (local), global_masks: [3, B] bool (the columns'); scales: [3] fp32. -> scalar fp32."""
        scales = scales.float().contiguous()
        row_keys = masks.to(torch.int8)
        col_keys = global_masks.to(torch.int8)
        pair_valid = masks & masks.roll(-1, dims=0)  # [3, b]: pair p = (p, (p+1)%3)
        n_pair = (global_masks & global_masks.roll(-1, dims=0)).sum(1)  # [3]
        lse, pos = trimodal_ce_fwd(rows, cols, scales, row_keys, col_keys, row_offset, tiles)
        valid = _direction_valid(pair_valid)  # [3, 2, b]
        terms = torch.where(valid, lse - pos, 0.0)  # [3, 2, b]: a row that does not count may be inf
        per_pair = terms[:, 0].sum(1) + terms[:, 1].sum(1).roll(-1, dims=0)  # pair p: (p, 0) + ((p+1)%3, 1)
        loss = (0.5 * per_pair / n_pair.clamp(min=1)).sum()
        ctx.save_for_backward(rows, cols, scales, row_keys, col_keys, pair_valid, n_pair, torch.where(valid, lse, 0.0))
        ctx.row_offset, ctx.tiles = row_offset, tiles.backward or tiles
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        rows, cols, scales, row_keys, col_keys, pair_valid, n_pair, lse = ctx.saved_tensors
        factors = (grad_output.float() * 0.5 / n_pair.clamp(min=1)).contiguous()  # [3] c_p
        row_valid = pair_valid.to(torch.int8)
        d_cols = None
        if cols is None:  # full batch: each program takes its rows' row AND column terms
            d_rows, dscale = trimodal_ce_bwd(
                rows, rows, scales, factors, (lse, lse), (row_valid, row_valid), (row_keys, row_keys), (0, 0),
                ctx.tiles,
            )  # fmt: skip
            dscale_pair = dscale[:, 0].sum(1)  # (m, 0) and ((m+1)%3, 1) hold the same tile transposed: count once
        else:  # local rows as queries; then the gathered columns, with the local rows as their queries
            d_rows, dscale = trimodal_ce_bwd(
                rows, cols, scales, factors, (lse, None), (row_valid, None), (row_keys, col_keys),
                (ctx.row_offset, 0), ctx.tiles,
            )  # fmt: skip
            d_cols, _ = trimodal_ce_bwd(
                cols, rows, scales, factors, (None, lse), (None, row_valid), (col_keys, row_keys),
                (0, ctx.row_offset), ctx.tiles,
            )  # fmt: skip
            dscale_pair = dscale[:, 0].sum(1) + dscale[:, 1].sum(1).roll(-1, dims=0)
        d_scales = factors * dscale_pair
        d_cols = None if d_cols is None else d_cols.to(cols.dtype)
        return d_rows.to(rows.dtype), d_cols, d_scales, None, None, None, None


def trimodal_contrastive_triton(
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    logit_scale: torch.Tensor,
    masks: torch.Tensor,
    global_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    global_masks: torch.Tensor,
    row_offset: int,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """features: 3 x [b, D] (one dtype); logit_scale: [3]; masks: [3, b] bool; global_features: 3 x [B, D] or None;
    global_masks: [3, B] bool. Stacks the modalities (one O(B * D) copy) and runs the kernels. Returns a scalar."""
    rows = torch.stack(features)  # [3, b, D]
    cols = None if global_features is None else torch.stack(global_features)  # [3, B, D]
    if tiles is None:
        n_cols = rows.shape[1] if cols is None else cols.shape[1]
        tiles = default_tile_config(rows.shape[1], n_cols, rows.shape[2], rows.dtype, rows.device, cols is None)
    loss = TriModalContrastiveFunction.apply(rows, cols, logit_scale, masks, global_masks, row_offset, tiles)
    return loss
