"""Fused attention: the Triton kernel (interpreted on CPU) against the PyTorch reference, padding semantics, and the
transformers integration inside real towers ("synergy" vs "sdpa").

Tolerances: fp32 kernel vs fp32 reference atol 2e-5 / rtol 1e-4 (exact fp32 dot products, only the summation order
differs). fp16 kernel vs the reference evaluated in fp32 on the same fp16 inputs: atol 5e-3 / rtol 5e-3 (probabilities
and dS are rounded to fp16 before the tensor-core products; PyTorch's own fp16 attention is off by the same ~1e-3).
Towers (fp32, 2 layers): outputs atol 1e-5 / rtol 1e-4, parameter gradients rtol 1e-4 and atol 1e-5 x max(1, the
largest |gradient| of that parameter).
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synergy.kernels import attention
from synergy.kernels.attention import (
    attention_reference,
    fused_attention,
    register_attention,
    set_default_impl,
    synergy_attention_forward,
)

FP32 = (torch.float32, 2e-5, 1e-4)
FP16 = (torch.float16, 5e-3, 5e-3)


def _inputs(batch, heads, n, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _forward_backward(q, k, v, grad, **kw):
    out = fused_attention(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _reference_fp32(q, k, v, grad, **kw):
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = attention_reference(q32, k32, v32, **kw)
    return (out, *torch.autograd.grad(out, (q32, k32, v32), grad.float()))


@pytest.mark.interpreted
@pytest.mark.parametrize(
    ("shape", "causal", "lengths", "dtype_tol"),
    [
        ((2, 2, 70, 32), False, [70, 33], FP32),  # several query/key tiles, a padding edge inside a tile
        ((2, 1, 70, 80), True, [70, 17], FP32),  # head dim 80 padded to 128, causal diagonal + padding
        ((1, 2, 17, 32), False, None, FP32),
        ((3, 1, 17, 32), True, [0, 1, 17], FP32),  # empty, single-token and full sequences
        ((1, 1, 1, 32), True, None, FP32),
        ((2, 1, 70, 32), False, [70, 40], FP16),
        ((1, 2, 17, 80), True, [9], FP16),
    ],
)
def test_triton_matches_reference(shape, causal, lengths, dtype_tol):
    dtype, atol, rtol = dtype_tol
    q, k, v = _inputs(*shape, dtype)
    grad = torch.randn(shape).to(dtype)
    lengths = torch.tensor(lengths) if lengths is not None else None
    got = _forward_backward(q, k, v, grad, lengths=lengths, causal=causal, impl="triton")
    want = _reference_fp32(q, k, v, grad, lengths=lengths, causal=causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.interpreted
@pytest.mark.parametrize(
    ("shape", "causal", "lengths"), [((3, 1, 150, 64), True, [150, 70, 0]), ((2, 1, 100, 80), False, [100, 37])]
)
def test_gpu_tile_sizes_interpreted(monkeypatch, shape, causal, lengths):
    """The GPU tile sizes (BLOCK_M 128 > N, 128-key dK/dV tiles, ...) take other edge paths than the small test tiles:
    run them through the interpreter too."""
    from synergy.kernels.attention import triton as attention_triton

    gpu_tiles = attention_triton._tile_config
    monkeypatch.setattr(attention_triton, "_tile_config", lambda head_dim, interpreted: gpu_tiles(head_dim, False))
    q, k, v = _inputs(*shape, torch.float32, seed=2)
    grad = torch.randn(shape)
    lengths = torch.tensor(lengths)
    got = _forward_backward(q, k, v, grad, lengths=lengths, causal=causal, impl="triton")
    want = _reference_fp32(q, k, v, grad, lengths=lengths, causal=causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.interpreted
def test_padding_semantics_exact_zeros_and_no_nan():
    """Padded positions hold NaN: nothing of it may leak. Padded keys: dK = dV = 0 exactly; padded query rows:
    output 0 and dQ = 0 exactly; a length-0 sequence is all zeros; the valid part equals the clean reference."""
    lengths = torch.tensor([0, 5, 17])
    q, k, v = _inputs(3, 2, 17, 32, torch.float32, seed=1)
    pad = ~attention.key_padding_mask(lengths, 17)[:, None, :, None]  # [B, 1, N, 1]
    q_nan, k_nan, v_nan = (x.detach().masked_fill(pad, float("nan")).requires_grad_() for x in (q, k, v))
    grad = torch.randn(3, 2, 17, 32)
    out, dq, dk, dv = _forward_backward(q_nan, k_nan, v_nan, grad, lengths=lengths, impl="triton")
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
        assert (t.masked_select(pad) == 0).all()
    want = _reference_fp32(q, k, v, grad, lengths=lengths)
    for g, w in zip((out, dq, dk, dv), want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert (want[0][0] == 0).all() and (want[2].masked_select(pad) == 0).all()  # the reference agrees


@pytest.mark.interpreted
def test_strided_inputs_as_transformers_passes_them():
    """q, k, v as transposed views of one [B, N, 3, H, d] projection; the output is laid out [B, N, H, d]."""
    qkv = torch.randn(2, 17, 3, 2, 32, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d], not contiguous
    lengths = torch.tensor([17, 11])
    out = fused_attention(q, k, v, lengths=lengths, impl="triton")
    assert out.transpose(1, 2).is_contiguous()
    (grad_qkv,) = torch.autograd.grad(out.square().sum(), qkv)
    out_ref = attention_reference(q, k, v, lengths=lengths)
    (grad_ref,) = torch.autograd.grad(out_ref.square().sum(), qkv)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_qkv, grad_ref, atol=2e-5, rtol=1e-4)


def test_dispatch_and_errors():
    q, k, v = _inputs(1, 1, 5, 32, torch.float32)
    torch.testing.assert_close(fused_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # auto on CPU
    with pytest.raises(ValueError, match="one shape"):
        fused_attention(q, k[:, :, :3], v)
    with pytest.raises(ValueError, match="integer tensor"):
        fused_attention(q, k, v, lengths=torch.tensor([2.0]))
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_attention(q, k, v, impl="cuda")


# --- transformers integration -----------------------------------------------------------------------------------


@pytest.fixture
def fused_towers(monkeypatch):
    """Towers built with attn_implementation="synergy" run the Triton kernel (interpreted on CPU); counts launches."""
    from synergy.kernels.attention import triton as attention_triton

    register_attention("synergy")
    previous = set_default_impl("triton")
    launches = []
    real_fwd = attention_triton.attention_fwd
    monkeypatch.setattr(attention_triton, "attention_fwd", lambda *a: launches.append(a[3]) or real_fwd(*a))
    yield launches
    set_default_impl(previous)


def _compare_towers(build, inputs, loss_fn):
    results = {}
    for impl in ("sdpa", "synergy"):
        torch.manual_seed(0)
        model = build(impl)
        out = model(**inputs)
        loss = loss_fn(out)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results[impl] = (out, dict(zip([n for n, _ in model.named_parameters()], grads)))
    return results


def _assert_same(results, field, valid=None):
    a, b = results["sdpa"][0][field], results["synergy"][0][field]
    if valid is not None:
        a, b = a[valid], b[valid]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    for name, grad in results["sdpa"][1].items():
        if grad is None:  # a parameter the output does not use (AST's unused position rows)
            assert results["synergy"][1][name] is None, name
            continue
        scale = max(1.0, grad.abs().max().item())  # AST's zero-initialised tokens get gradients ~1e6
        torch.testing.assert_close(results["synergy"][1][name], grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.interpreted
def test_roberta_with_padding_matches_sdpa(fused_towers):
    from transformers import RobertaConfig, RobertaModel

    def build(impl):
        config = RobertaConfig(
            vocab_size=50, hidden_size=36, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        config._attn_implementation = impl
        return RobertaModel(config)

    ids = torch.randint(3, 50, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    valid = mask.bool()
    weight = torch.randn(3, 13, 36)
    # padded positions are garbage in both implementations (ours gives 0 there): the loss reads valid tokens only
    loss_fn = lambda out: (out.last_hidden_state * weight)[valid].sum() + out.pooler_output.sum()
    results = _compare_towers(build, dict(input_ids=ids, attention_mask=mask), loss_fn)
    _assert_same(results, "last_hidden_state", valid)
    torch.testing.assert_close(results["synergy"][0].pooler_output, results["sdpa"][0].pooler_output, atol=1e-5, rtol=0)
    assert len(fused_towers) == 2 and fused_towers[0].tolist() == [13, 9, 4]  # one launch per layer


@pytest.mark.interpreted
def test_clip_vision_and_ast_match_sdpa(fused_towers):
    from transformers import ASTConfig, ASTModel, CLIPVisionConfig, CLIPVisionModel

    def clip(impl):
        config = CLIPVisionConfig(
            hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7,
        )  # fmt: skip
        config._attn_implementation = impl
        return CLIPVisionModel(config)

    def ast(impl):
        config = ASTConfig(
            hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, num_mel_bins=32,
            max_length=40, patch_size=16, frequency_stride=10, time_stride=10,
        )  # fmt: skip
        config._attn_implementation = impl
        return ASTModel(config)

    weight = torch.randn(2, 17, 36)
    results = _compare_towers(
        clip, dict(pixel_values=torch.randn(2, 3, 28, 28)), lambda out: (out.last_hidden_state * weight).sum()
    )
    _assert_same(results, "last_hidden_state")
    weight = torch.randn(2, 8, 36)
    results = _compare_towers(
        ast, dict(input_values=torch.randn(2, 40, 32)), lambda out: (out.last_hidden_state * weight).sum()
    )
    _assert_same(results, "last_hidden_state")
    assert len(fused_towers) == 4 and all(lengths is None for lengths in fused_towers)


@pytest.mark.interpreted
def test_causal_text_tower_with_padding_matches_sdpa(fused_towers):
    """CLIP's text tower is causal: its padded mask (causal & key padding) must be read as causal + lengths."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def build(impl):
        config = CLIPTextConfig(
            vocab_size=50, hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=20, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        config._attn_implementation = impl
        return CLIPTextModel(config)

    ids = torch.randint(3, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0
    valid = mask.bool()
    weight = torch.randn(2, 11, 36)
    loss_fn = lambda out: (out.last_hidden_state * weight)[valid].sum()
    results = _compare_towers(build, dict(input_ids=ids, attention_mask=mask), loss_fn)
    _assert_same(results, "last_hidden_state", valid)
    assert len(fused_towers) == 2 and fused_towers[0].tolist() == [11, 6]


class _Attention(nn.Module):
    is_causal = False


@pytest.mark.interpreted
def test_non_padding_mask_falls_back_to_sdpa_and_logs_once(fused_towers, caplog):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (x.detach() for x in _inputs(2, 2, 9, 32, torch.float32))
    bias = torch.randn(2, 1, 9, 9)  # an additive mask that is a real bias, not 0 / -inf
    window = torch.ones(9, 9, dtype=torch.bool).triu(-2).tril(2).expand(2, 1, 9, 9)  # banded, not a padding mask
    module = _Attention().eval()
    attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger="synergy.kernels.attention"):
        for mask in (bias, window, window):
            got, _ = synergy_attention_forward(module, q, k, v, mask, scaling=0.3)
            want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
            torch.testing.assert_close(got, want)
    assert len(caplog.records) == 2 and all("falls back to SDPA" in r.getMessage() for r in caplog.records)
    assert fused_towers == []

    additive = torch.zeros(2, 1, 9, 9)
    additive[1, ..., 5:] = torch.finfo(torch.float32).min  # the eager-style additive padding mask: fused
    got, _ = synergy_attention_forward(module, q, k, v, additive)
    assert fused_towers[-1].tolist() == [9, 5]
    torch.testing.assert_close(got[1, :5], sdpa_attention_forward(module, q, k, v, additive)[0][1, :5])


@pytest.mark.interpreted
def test_attention_dropout_in_training_is_rejected(fused_towers):
    q, k, v = (x.detach() for x in _inputs(1, 2, 5, 32, torch.float32))
    module = _Attention().train()
    with pytest.raises(ValueError, match="attention dropout"):
        synergy_attention_forward(module, q, k, v, None, dropout=0.1)
    synergy_attention_forward(module.eval(), q, k, v, None, dropout=0.1)  # transformers passes 0 in eval anyway


def test_register_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert register_attention("synergy") == "synergy" == register_attention("synergy")
    assert AttentionInterface()["synergy"] is synergy_attention_forward
    assert "synergy" in ALL_MASK_ATTENTION_FUNCTIONS


@pytest.mark.interpreted
def test_export_traces_the_sdpa_path(fused_towers):
    """Even with the Triton path forced, torch.export sees SDPA (the kernel never runs while exporting)."""

    class Layer(nn.Module):
        is_causal = False

        def forward(self, q, k, v):
            return synergy_attention_forward(self, q, k, v, None)[0]

    q, k, v = (x.detach() for x in _inputs(1, 2, 5, 32, torch.float32))
    program = torch.export.export(Layer().eval(), (q, k, v))
    assert fused_towers == []
    torch.testing.assert_close(program.module()(q, k, v), F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


# --- GPU ------------------------------------------------------------------------------------------------------------


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    ("shape", "causal", "lengths"),
    [
        ((4, 12, 197, 64), False, None),
        ((2, 12, 852, 64), False, [852, 400]),
        ((3, 8, 77, 64), True, [77, 30, 1]),
        ((2, 4, 300, 80), False, [300, 150]),
        ((2, 4, 300, 96), True, [300, 0]),
        ((2, 4, 257, 128), False, [257, 129]),
        ((2, 4, 100, 32), True, None),
    ],
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 5e-3, 5e-3)])
def test_cuda_matches_reference(shape, causal, lengths, dtype, atol, rtol):
    q, k, v = (x.detach().cuda().requires_grad_() for x in _inputs(*shape, dtype))
    grad = torch.randn(shape, device="cuda").to(dtype)
    lengths = torch.tensor(lengths, device="cuda") if lengths is not None else None
    got = _forward_backward(q, k, v, grad, lengths=lengths, causal=causal, impl="triton")
    want = _reference_fp32(q, k, v, grad, lengths=lengths, causal=causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    again = _forward_backward(q, k, v, grad, lengths=lengths, causal=causal, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "the backward must be deterministic"


@pytest.mark.requires_cuda
def test_cuda_fp32_and_auto_dispatch():
    q, k, v = (x.detach().cuda().requires_grad_() for x in _inputs(2, 3, 130, 64, torch.float32))
    grad = torch.randn(2, 3, 130, 64, device="cuda")
    lengths = torch.tensor([130, 70], device="cuda")
    got = _forward_backward(q, k, v, grad, lengths=lengths, impl="auto")
    want = _reference_fp32(q, k, v, grad, lengths=lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
