"""Tri-modal contrastive loss: the reference against a naive loop, the Triton kernels (interpreted on CPU) against the
reference in float64, the rectangular (distributed) form, masks, dispatch and errors.

Tolerances (max |error| relative to the largest entry of the expected tensor, one number per tensor):
  loss: 2e-5 relative, every dtype (logits, logsumexps and the final sums are fp32 in the kernels).
  gradients (features, gathered features, scales): fp32 5e-5 (IEEE fp32 dots; a logit near 21 carries an fp32
  rounding of 2e-6 that exp() turns into a relative error of the softmax; measured <= 1.5e-5);
  fp16 3e-3 (the softmax tile is rounded to fp16 before its gradient dot, 2^-11 relative; measured <= 6e-4);
  bf16 (GPU only) 2e-2 (2^-8 rounding of the same tile).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from synergy.kernels.contrastive import (
    PAIRS,
    TriModalContrastiveLoss,
    trimodal_contrastive_loss,
    trimodal_contrastive_loss_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

SCALES = (14.3, 9.0, 21.0)  # distinct per pair, so a pair/scale mix-up cannot hide
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LOSS_RTOL = 2e-5


def make_features(batch: int, dim: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Three [batch, dim] L2-normalised embeddings that share a per-row component, so the positives stand out and
    the softmax is far from uniform (a gradient test on uniform softmaxes checks little)."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return [F.normalize(shared + 1.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
            for _ in range(3)]  # fmt: skip


def random_masks(batch: int, seed: int, p: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, generator=gen) < p for _ in range(3))


def naive_trimodal_loss(feats, scales, masks) -> torch.Tensor:
    """Full batch, every matrix materialised, every term a loop: the definition written out, nothing shared with the
    reference's vectorised code."""
    batch = feats[0].shape[0]
    index = {"image": 0, "text": 1, "audio": 2}
    total = torch.zeros((), dtype=torch.float64)
    for p, (x_name, y_name) in enumerate(PAIRS):
        x, y = index[x_name], index[y_name]
        logits = scales[p] * feats[x] @ feats[y].T  # [B, B]
        valid = [bool(masks[x][r]) and bool(masks[y][r]) for r in range(batch)]
        if not any(valid):
            continue
        pair = torch.zeros((), dtype=torch.float64)
        for r in range(batch):
            if valid[r]:
                row = torch.stack([logits[r, c] for c in range(batch) if masks[y][c]])
                col = torch.stack([logits[c, r] for c in range(batch) if masks[x][c]])
                pair = pair + (row.logsumexp(0) - logits[r, r]) + (col.logsumexp(0) - logits[r, r])
        total = total + 0.5 * pair / sum(valid)
    return total


def loss_and_grads(fn, feats, scales, global_feats=None, **kwargs):
    """fn(*feats, scales, global_features=..., **kwargs) -> (loss, [d feats], [d global feats] or None, d scales)."""
    feats = [f.detach().clone().requires_grad_() for f in feats]
    scales = scales.detach().clone().requires_grad_()
    if global_feats is not None:
        global_feats = [g.detach().clone().requires_grad_() for g in global_feats]
        kwargs["global_features"] = tuple(global_feats)
    loss = fn(*feats, scales, **kwargs)
    loss.backward()

    def grad(t):  # a leaf the loss does not reach (the naive loop with no valid rows) has zero gradient
        return torch.zeros_like(t) if t.grad is None else t.grad

    global_grads = None if global_feats is None else [grad(g) for g in global_feats]
    return loss.detach(), [grad(f) for f in feats], global_grads, grad(scales)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(expected.abs().max().item(), 1e-12)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({tol} x largest entry)"


def reference64(feats, scales, global_feats=None, **kwargs):
    f64 = [f.double() for f in feats]
    g64 = None if global_feats is None else [g.double() for g in global_feats]
    return loss_and_grads(trimodal_contrastive_loss_reference, f64, scales.double(), g64, **kwargs)


def assert_matches_reference(feats, scales, dtype, global_feats=None, tiles=None, **kwargs):
    """Run the Triton kernels (interpreted on CPU) and compare loss and every gradient with the fp64 reference."""
    from synergy.kernels.contrastive import triton as kernels

    def triton_loss(image, text, audio, logit_scale, **kw):
        if tiles is None:
            return trimodal_contrastive_loss(image, text, audio, logit_scale, impl="triton", **kw)
        b = image.shape[0]
        masks = kw.get("masks") or (torch.ones(b, dtype=torch.bool),) * 3
        glob = kw.get("global_features")
        all_columns = masks if glob is None else (torch.ones(glob[0].shape[0], dtype=torch.bool),) * 3
        global_masks = kw.get("global_masks") or all_columns
        return kernels.trimodal_contrastive_triton(
            (image, text, audio), logit_scale, torch.stack(masks), glob, torch.stack(global_masks),
            kw.get("row_offset", 0), tiles,
        )  # fmt: skip

    loss, grads, global_grads, dscale = loss_and_grads(triton_loss, feats, scales, global_feats, **kwargs)
    ref_loss, ref_grads, ref_global, ref_dscale = reference64(feats, scales, global_feats, **kwargs)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * max(abs(ref_loss.item()), 1.0), (loss, ref_loss)
    for name, g, r in zip(("image", "text", "audio"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close_rel(g, r, GRAD_TOL[dtype], f"d {name}")
    if global_feats is not None:
        for name, g, r in zip(("image", "text", "audio"), global_grads, ref_global):
            assert_close_rel(g, r, GRAD_TOL[dtype], f"d global {name}")
    assert_close_rel(dscale, ref_dscale, GRAD_TOL[dtype], "d logit_scale")
    return loss, grads, global_grads, dscale


# --- the reference against the naive definition ------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 20])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_naive(batch, masked):
    feats = make_features(batch, 12, torch.float64, seed=batch)
    scales = torch.tensor(SCALES, dtype=torch.float64)
    masks = random_masks(batch, seed=batch) if masked else tuple(torch.ones(batch, dtype=torch.bool) for _ in range(3))
    loss, grads, _, dscale = loss_and_grads(trimodal_contrastive_loss, feats, scales, masks=masks, impl="torch")
    naive_loss, naive_grads, _, naive_dscale = loss_and_grads(
        lambda *f, masks: naive_trimodal_loss(f[:3], f[3], masks), feats, scales, masks=masks
    )
    torch.testing.assert_close(loss, naive_loss, rtol=1e-12, atol=1e-12)
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dscale, naive_dscale, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("splits", [(7, 7, 7), (5, 16)])
def test_reference_rectangular_ranks_add_up_to_full_batch(splits):
    """Simulate R ranks by slicing one batch: each rank's loss uses its rows against all columns (the same leaf
    tensors, as all_gather with gradient would), and the per-rank losses and gradients add up to the full batch."""
    batch = sum(splits)
    feats = [f.requires_grad_() for f in make_features(batch, 12, torch.float64, seed=3)]
    scales = torch.tensor(SCALES, dtype=torch.float64, requires_grad=True)
    masks = random_masks(batch, seed=4)
    total, offset = 0.0, 0
    for b in splits:
        local = [f[offset : offset + b] for f in feats]
        total = total + trimodal_contrastive_loss(
            *local, scales, masks=tuple(m[offset : offset + b] for m in masks), global_features=tuple(feats),
            global_masks=masks, row_offset=offset, impl="torch",
        )  # fmt: skip
        offset += b
    grads = torch.autograd.grad(total, [*feats, scales])
    full = naive_trimodal_loss([f for f in feats], scales, masks)
    full_grads = torch.autograd.grad(full, [*feats, scales])
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    for g, n in zip(grads, full_grads):
        torch.testing.assert_close(g, n, rtol=1e-10, atol=1e-12)


def test_reference_empty_pairs_add_exactly_zero():
    feats = [f.requires_grad_() for f in make_features(6, 8, torch.float64, seed=5)]
    scales = torch.tensor(SCALES, dtype=torch.float64, requires_grad=True)
    image = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    masks = (image, ~image, torch.zeros(6, dtype=torch.bool))  # image-text disjoint, audio missing
    loss = trimodal_contrastive_loss(*feats, scales, masks=masks, impl="torch")
    loss.backward()
    assert loss.item() == 0.0
    for t in (*feats, scales):
        assert torch.equal(t.grad, torch.zeros_like(t))


# --- the Triton kernels (TRITON_INTERPRET=1 on CPU) against the fp64 reference -------------------------------------

# Not the full cross product: the interpreter is slow; each B, D and dtype appears, masked and not, small and large.
KERNEL_CASES = [
    (1, 32, torch.float32, False),
    (1, 100, torch.float16, False),
    (7, 100, torch.float16, True),
    (7, 256, torch.float32, False),
    (64, 32, torch.float16, True),
    (64, 100, torch.float32, True),
    (64, 256, torch.float16, False),
    (129, 32, torch.float32, True),
    (129, 100, torch.float16, False),
    (129, 256, torch.float32, False),
]


@pytest.mark.interpreted
@pytest.mark.parametrize(("batch", "dim", "dtype", "masked"), KERNEL_CASES)
def test_triton_matches_reference(batch, dim, dtype, masked):
    feats = make_features(batch, dim, dtype, seed=batch + dim)
    masks = random_masks(batch, seed=batch) if masked else None
    assert_matches_reference(feats, torch.tensor(SCALES), dtype, masks=masks)


@pytest.mark.interpreted
def test_triton_small_tiles_persistent_grid():
    """16 x 16 x 16 tiles on B=37, D=40: several row and column tiles with ragged edges, three D chunks, and a
    persistent forward grid of 2 programs per modality that walks several row tiles (the partial column buffer)."""
    from synergy.kernels.contrastive.triton import TileConfig

    feats = make_features(37, 40, torch.float32, seed=6)
    tiles = TileConfig(block_m=16, block_n=16, block_d=16, max_programs=2)
    assert_matches_reference(feats, torch.tensor(SCALES), torch.float32, masks=random_masks(37, seed=7), tiles=tiles)


@pytest.mark.interpreted
def test_triton_backward_tiles_of_its_own(monkeypatch):
    """TileConfig.backward (the GPU default: the backward's best tiles differ from the forward's): full batch and
    rectangular, the backward launches get the 16 x 32 tiles and the forward the 32 x 16, and both match the
    reference."""
    from synergy.kernels.contrastive import triton as kernels
    from synergy.kernels.contrastive.triton import TileConfig

    launched = []
    backward_launch = kernels.trimodal_ce_bwd

    def recording(*args, **kwargs):
        launched.append(args[-1])  # tiles: the launcher's last argument
        return backward_launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "trimodal_ce_bwd", recording)
    feats = make_features(45, 24, torch.float32, seed=16)
    masks = random_masks(45, seed=17)
    tiles = TileConfig(block_m=32, block_n=16, block_d=16, max_programs=1, backward=TileConfig(16, 32, 16))
    assert_matches_reference(feats, torch.tensor(SCALES), torch.float32, masks=masks, tiles=tiles)
    local = [f[10:30] for f in feats]
    assert_matches_reference(
        local, torch.tensor(SCALES), torch.float32, global_feats=feats, tiles=tiles,
        masks=tuple(m[10:30] for m in masks), global_masks=masks, row_offset=10,
    )  # fmt: skip
    assert launched == [TileConfig(16, 32, 16)] * 3  # one full-batch launch, two rectangular ones


@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_missing_modality_and_empty_pair(dtype):
    """Audio missing everywhere (text-audio and audio-image have no rows) and image/text never on the same row
    (image-text has none either) -> loss exactly 0, zero gradients, no NaN; then audio missing alone."""
    batch = 20
    feats = make_features(batch, 32, dtype, seed=8)
    image = torch.arange(batch) % 2 == 0
    none = torch.zeros(batch, dtype=torch.bool)
    loss, grads, _, dscale = assert_matches_reference(feats, torch.tensor(SCALES), dtype, masks=(image, ~image, none))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads) and torch.equal(dscale, torch.zeros(3))
    all_rows = torch.ones(batch, dtype=torch.bool)
    masks = (all_rows, all_rows, none)
    loss, grads, _, dscale = assert_matches_reference(feats, torch.tensor(SCALES), dtype, masks=masks)
    assert loss.item() > 0 and torch.equal(grads[2], torch.zeros_like(grads[2]))
    assert dscale[0] != 0 and dscale[1] == 0 and dscale[2] == 0


RECTANGULAR_CASES = [((21, 21, 22), 100, torch.float32), ((24, 40), 32, torch.float16), ((1, 6), 32, torch.float32)]


@pytest.mark.interpreted
@pytest.mark.parametrize(("splits", "dim", "dtype"), RECTANGULAR_CASES)
def test_triton_rectangular_matches_reference(splits, dim, dtype):
    """Each rank's local rows against the gathered columns (separate leaves, as all_gather with gradient gives):
    loss, local, gathered and scale gradients against the fp64 reference of that rank."""
    batch = sum(splits)
    feats = make_features(batch, dim, dtype, seed=9)
    masks = random_masks(batch, seed=10)
    offset = 0
    for b in splits:
        local = [f[offset : offset + b] for f in feats]
        assert_matches_reference(
            local, torch.tensor(SCALES), dtype, global_feats=feats, masks=tuple(m[offset : offset + b] for m in masks),
            global_masks=masks, row_offset=offset,
        )  # fmt: skip
        offset += b


@pytest.mark.interpreted
def test_triton_rectangular_small_tiles():
    from synergy.kernels.contrastive.triton import TileConfig

    feats = make_features(40, 24, torch.float32, seed=11)
    masks = random_masks(40, seed=12)
    tiles = TileConfig(block_m=16, block_n=16, block_d=16)
    local = [f[13:31] for f in feats]  # 18 local rows: two row tiles, the targets straddle column tiles
    assert_matches_reference(
        local, torch.tensor(SCALES), torch.float32, global_feats=feats, tiles=tiles,
        masks=tuple(m[13:31] for m in masks), global_masks=masks, row_offset=13,
    )  # fmt: skip


@pytest.mark.interpreted
def test_triton_is_deterministic():
    feats = make_features(40, 32, torch.float16, seed=13)
    runs = [loss_and_grads(trimodal_contrastive_loss, feats, torch.tensor(SCALES), impl="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][3], runs[1][3])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


COMPILE_FOR_HOPPER = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from synergy.kernels.contrastive import triton as kernels

def signature(fn, dtype, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in ("row_ptr", "col_ptr"):
            return "*" + dtype
        if name.endswith("_ptr"):
            return "*i8" if ("key" in name or "valid" in name) else "*fp32"
        return "i32"
    return {name: kind(name) for name in fn.arg_names}

fwd, bwd = kernels._trimodal_ce_fwd_kernel, kernels._trimodal_ce_bwd_kernel
variants = [(fwd, dict(SYMMETRIC=True)), (fwd, dict(SYMMETRIC=False))]
variants += [(bwd, dict(ROW_TERM=True, COL_TERM=True)), (bwd, dict(ROW_TERM=False, COL_TERM=True))]
for dtype, precision, torch_dtype in (("bf16", "tf32", torch.bfloat16), ("fp32", "ieee", torch.float32)):
    for fn, flags in variants if dtype == "bf16" else variants[2:3]:
        # the tiles the GPU gets: gpu_tile_config's, per form and direction (132 SMs: an H100 / H200)
        tiles = kernels.gpu_tile_config(torch_dtype, 132, symmetric=flags.get("SYMMETRIC", True))
        tiles = (tiles.backward or tiles) if fn is bwd else tiles
        constexprs = dict(DIM=100, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
                          INPUT_PRECISION=precision, **flags)
        source = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
        options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert len(compiled.asm["cubin"]) > 0, (fn.__name__, dtype, flags)
print("compiled")
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs Python, not the compiler: compile every kernel variant to an sm_90 (H100) cubin with the
    local Triton (no GPU needed), so type or layout errors that only the compiler sees fail here, not on the GPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real every time, and leave ~/.triton alone
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# --- public API: dispatch, module, errors --------------------------------------------------------------------------


def test_auto_on_cpu_is_the_reference_and_module_wraps_it():
    feats = make_features(9, 16, torch.float32, seed=14)
    scales = torch.tensor(SCALES)
    masks = random_masks(9, seed=15)
    ref = trimodal_contrastive_loss_reference(*feats, scales, masks=masks)
    assert torch.equal(trimodal_contrastive_loss(*feats, scales, masks=masks), ref)
    module = TriModalContrastiveLoss(impl="torch")
    assert torch.equal(module(*feats, scales, masks=masks), ref)
    assert "impl='torch'" in repr(module)


def test_bad_arguments_say_what_to_do():
    x = torch.randn(4, 8)
    scales = torch.ones(3)
    with pytest.raises(ValueError, match="impl must be one of"):
        trimodal_contrastive_loss(x, x, x, scales, impl="cuda")
    with pytest.raises(ValueError, match="one shape"):
        trimodal_contrastive_loss(x, x, torch.randn(5, 8), scales)
    with pytest.raises(ValueError, match=r"logit_scale must be \[3\]"):
        trimodal_contrastive_loss(x, x, x, torch.ones(1))
    masks = tuple(torch.ones(4, dtype=torch.bool) for _ in range(3))
    gathered = tuple(torch.randn(8, 8) for _ in range(3))
    with pytest.raises(ValueError, match="needs global_masks"):
        trimodal_contrastive_loss(x, x, x, scales, masks=masks, global_features=gathered)
    with pytest.raises(ValueError, match="outside"):
        trimodal_contrastive_loss(x, x, x, scales, global_features=gathered, row_offset=6)
    with pytest.raises(ValueError, match="needs global_features"):
        trimodal_contrastive_loss(x, x, x, scales, row_offset=2)
    with pytest.raises(ValueError, match="global_masks goes with global_features"):
        trimodal_contrastive_loss(x, x, x, scales, global_masks=masks)


def test_tensors_on_another_device_than_the_features_are_an_error():
    """A CPU logit_scale or CPU masks with CUDA features hand a kernel a host pointer (an illegal address, or garbage):
    the boundary names the tensor. The meta device stands in for "another device" on a machine without a GPU."""
    x = F.normalize(torch.randn(4, 8), dim=-1)
    scales = torch.ones(3)
    masks = tuple(torch.ones(4, dtype=torch.bool) for _ in range(3))
    elsewhere = torch.device("meta")
    with pytest.raises(ValueError, match="logit_scale is on meta but the image features are on cpu"):
        trimodal_contrastive_loss(x, x, x, scales.to(elsewhere))
    with pytest.raises(ValueError, match=r"masks\[2\] \(audio\) is on meta"):
        trimodal_contrastive_loss(x, x, x, scales, masks=(*masks[:2], masks[2].to(elsewhere)))
    with pytest.raises(ValueError, match="text is on meta"):
        trimodal_contrastive_loss(x, x.to(elsewhere), x, scales)
    gathered = tuple(torch.randn(8, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"global_features\[0\] \(image\) is on meta"):
        trimodal_contrastive_loss(x, x, x, scales, global_features=(gathered[0].to(elsewhere), *gathered[1:]))
    global_masks = tuple(torch.ones(8, dtype=torch.bool) for _ in range(3))
    with pytest.raises(ValueError, match=r"global_masks\[1\] \(text\) is on meta"):
        trimodal_contrastive_loss(
            x, x, x, scales, global_features=gathered, global_masks=(global_masks[0], global_masks[1].to(elsewhere),
                                                                       global_masks[2]),
        )  # fmt: skip


def test_local_masks_default_to_their_slice_of_the_global_masks():
    feats = make_features(12, 8, torch.float64, seed=16)
    masks = random_masks(12, seed=17)
    local = [f[4:8] for f in feats]
    kwargs = dict(global_features=tuple(feats), global_masks=masks, row_offset=4, impl="torch")
    explicit = trimodal_contrastive_loss(*local, torch.tensor(SCALES), masks=tuple(m[4:8] for m in masks), **kwargs)
    assert torch.equal(trimodal_contrastive_loss(*local, torch.tensor(SCALES), **kwargs), explicit)


# --- GPU (skipped with a reason on CPU) -----------------------------------------------------------------------------


def _cuda_features(batch, dim, dtype, seed=0):
    return [f.cuda() for f in make_features(batch, dim, dtype, seed)]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("batch", "dim"), [(1, 16), (1000, 512), (4099, 768), (2048, 1024)])
def test_cuda_matches_reference(batch, dim, dtype):
    feats = _cuda_features(batch, dim, dtype, seed=batch)
    masks = tuple(m.cuda() for m in random_masks(batch, seed=1, p=0.9))
    scales = torch.tensor(SCALES, device="cuda")
    loss, grads, _, dscale = loss_and_grads(trimodal_contrastive_loss, feats, scales, masks=masks, impl="triton")
    ref_loss, ref_grads, _, ref_dscale = reference64(feats, scales, masks=masks)
    assert abs(loss.item() - ref_loss.item()) <= 10 * LOSS_RTOL * max(abs(ref_loss.item()), 1.0)
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, GRAD_TOL[dtype], "d features")
    assert_close_rel(dscale, ref_dscale, GRAD_TOL[dtype], "d logit_scale")


@pytest.mark.requires_cuda
def test_cuda_rectangular_bf16_and_deterministic():
    feats = _cuda_features(3000, 512, torch.bfloat16, seed=2)
    masks = tuple(m.cuda() for m in random_masks(3000, seed=3, p=0.9))
    scales = torch.tensor(SCALES, device="cuda")
    kwargs = dict(masks=tuple(m[1000:2000] for m in masks), global_masks=masks, row_offset=1000)
    local = [f[1000:2000] for f in feats]
    runs = [loss_and_grads(trimodal_contrastive_loss, local, scales, feats, impl="triton", **kwargs) for _ in range(2)]
    ref = reference64(local, scales, feats, **kwargs)
    for grads, ref_grads in ((runs[0][1], ref[1]), (runs[0][2], ref[2])):
        for g, r in zip(grads, ref_grads):
            assert_close_rel(g, r, GRAD_TOL[torch.bfloat16], "d features")
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][3], runs[1][3])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]))


@pytest.mark.requires_cuda
def test_cuda_memory_is_linear_in_batch():
    """B = 32768, D = 512, bf16: a single fp32 B x B matrix would be 4 GiB; the kernels must stay far below."""
    batch, dim = 32768, 512
    feats = [f.requires_grad_() for f in _cuda_features(batch, dim, torch.bfloat16)]
    scales = torch.tensor(SCALES, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    trimodal_contrastive_loss(*feats, scales, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1 << 30, f"{extra / 2**20:.0f} MiB above the inputs"
    assert all(torch.isfinite(f.grad).all() for f in feats)
