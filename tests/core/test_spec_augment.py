"""CLIP4VLA's intra-audio contrast: SpecAugment masks on the log-mel inside the model, the NT-Xent against a plain
reference computation, and the training step's loss = tri-modal + weight x intra (both paths: one batch and
GradCache accumulation give the same gradient)."""

import math

import pytest
import torch
import torch.nn.functional as F

from synergy.core.audio_frontend import LogMelFrontend
from synergy.core.model import create_model
from synergy.core.spec_augment import AUDIO_INTRA_SCALE, SpecAugment, audio_intra_loss
from synergy.kernels.contrastive import trimodal_contrastive_loss


def test_spec_augment_masks_bands_and_spans_only_inside_real_frames():
    log_mel = torch.randn(7, 70, 29) + 5.0  # no zeros of its own
    frames = torch.tensor([70, 70, 40, 10, 1, 0, 55])
    out = SpecAugment(2, 6, 2, 9, fill=0.467)(log_mel, frames, torch.Generator().manual_seed(0))
    masked = out == 0.467
    assert masked.any()
    # a frequency mask is a whole band (every frame of those bins), a time mask a whole span of frames
    freq = masked.all(1)  # [B, mels]
    for row in range(7):
        left = masked[row] & ~freq[row][None, :]
        time_masked = left.any(1)
        assert (left[time_masked] | freq[row][None, :]).all()  # a time-masked frame is masked in every bin
        assert not time_masked[frames[row] :].any()  # never past the row's real frames
        assert freq[row].sum() <= 12 and time_masked.sum() <= 18
    torch.testing.assert_close(out[~masked], log_mel[~masked])


def test_masks_hold_the_value_the_front_end_gives_padding():
    """A masked cell reads as a padding frame does: the front end's own output past a short clip's end, +0.467 with
    AST's AudioSet normalisation (0 would be the normalised mean, a loud-ish frame, not silence)."""
    frontend = LogMelFrontend(16_000, n_mels=29, num_frames=70)  # AST's default mean and std
    wave = torch.randn(2, frontend.num_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    lengths = torch.tensor([frontend.num_samples, 3000])
    log_mel = frontend(wave, lengths)  # [2, 70, 29]
    real = int((frontend.frame_ends <= 3000).sum())
    padding = log_mel[1, real:]  # the short clip's padding frames, as the front end computes them
    assert padding.numel() > 0 and torch.all(padding == padding[0, 0])
    assert frontend.padding_value == pytest.approx(padding[0, 0].item(), abs=1e-6)
    assert frontend.padding_value == pytest.approx(4.2677393 / (2 * 4.5689974))
    frames = (frontend.frame_ends[None, :] <= lengths[:, None]).sum(-1)
    augment = SpecAugment(2, 9, 2, 9, fill=frontend.padding_value)
    out = augment(log_mel, frames, torch.Generator().manual_seed(1))
    changed = out != log_mel
    assert changed.any()
    torch.testing.assert_close(out[changed], torch.full_like(out[changed], padding[0, 0].item()), atol=1e-6, rtol=0)


def test_audio_intra_loss_matches_a_reference_nt_xent():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(7, 5), dim=-1), F.normalize(torch.randn(7, 5), dim=-1)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    expected = []
    rows = mask.nonzero().flatten().tolist()
    for direction in ((a, b), (b, a)):
        q, k = direction
        for i in rows:  # -log softmax of the positive among the kept rows, per anchor
            logits = [AUDIO_INTRA_SCALE * float(q[i] @ k[j]) for j in rows]
            positive = AUDIO_INTRA_SCALE * float(q[i] @ k[i])
            expected.append(math.log(sum(math.exp(x) for x in logits)) - positive)
    reference = sum(expected) / len(expected)
    assert audio_intra_loss(a, b, mask).item() == pytest.approx(reference, rel=1e-5)
    assert audio_intra_loss(a, b, torch.zeros(7, dtype=torch.bool)).item() == 0.0


def test_encode_audio_with_augment_changes_only_the_copy():
    model = create_model("tiny").eval()
    wave, lengths = torch.randn(3, 8000) * 0.1, torch.tensor([8000, 5000, 800])
    plain = model.encode_audio(wave, lengths)
    torch.manual_seed(0)
    copy = model.encode_audio(wave, lengths, augment=SpecAugment(1, 9, 1, 9, model.audio_frontend.padding_value))
    torch.testing.assert_close(model.encode_audio(wave, lengths), plain)
    assert not torch.allclose(copy, plain) and torch.allclose(copy.norm(dim=-1), torch.ones(3))


def _batch(b=6):
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(b, 3, 30, 30, generator=g),
        "input_ids": torch.randint(3, 131, (b, 9), generator=g),
        "attention_mask": torch.ones(b, 9, dtype=torch.long),
        "waveform": torch.randn(b, 8000, generator=g) * 0.1,
        "waveform_lengths": torch.tensor([8000, 7000, 6000, 5000, 4000, 3000])[:b],
        "image_mask": torch.ones(b, dtype=torch.bool),
        "text_mask": torch.ones(b, dtype=torch.bool),
        "audio_mask": torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)[:b],
    }


@pytest.mark.parametrize("accumulation", [1, 2])
def test_train_step_adds_the_weighted_term_and_its_gradient(accumulation):
    import contextlib

    from synergy.train.loop import audio_copies, train_step

    batch, weight = _batch(), 0.7
    model = create_model("tiny")
    torch.manual_seed(5)
    loss = train_step(model, batch, accumulation, 0, 1, contextlib.nullcontext, audio_intra_weight=weight)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = create_model("tiny")
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    inputs = [batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "waveform", "waveform_lengths")]
    masks = tuple(batch[f"{m}_mask"] for m in ("image", "text", "audio"))
    if accumulation == 1:
        *features, scales = reference(*inputs)
        copies = audio_copies(reference, inputs)
    else:  # micro-batch i's SpecAugment draws follow its forward, as the step draws them
        halves = [torch.tensor_split(x, 2) for x in inputs]
        parts = []
        for i in range(2):
            out = reference(*(h[i] for h in halves))
            parts.append((*out, audio_copies(reference, [h[i] for h in halves])))
        features = [torch.cat([p[m] for p in parts]) for m in range(3)]
        scales, copies = parts[0][3], torch.cat([p[4] for p in parts])
    expected = trimodal_contrastive_loss(*features, scales, masks=masks) + weight * audio_intra_loss(
        features[2], copies, masks[2]
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=2e-4, atol=2e-6, msg=name)


def test_the_copy_from_the_forwards_log_mel_equals_encode_audio_with_augment():
    """The training step hands the forward's own log-mel to the SpecAugment copy (no second front end): the copy is
    bit for bit encode_audio's augmented path, the same masks drawn from the same random state."""
    from synergy.train.loop import audio_copies, kept_log_mel

    batch = _batch()
    model = create_model("tiny").eval()
    inputs = [batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "waveform", "waveform_lengths")]
    with torch.no_grad():
        torch.manual_seed(3)
        expected = audio_copies(model, inputs)  # no log-mel given: encode_audio(..., augment=SpecAugment(...))
        with kept_log_mel(model) as kept:
            model(*inputs)
        assert len(kept) == 1 and torch.equal(kept[0], model.audio_frontend(inputs[3], inputs[4]))
        torch.manual_seed(3)
        copies = audio_copies(model, inputs, kept[0])
        torch.manual_seed(4)
        other = audio_copies(model, inputs, kept[0])
    assert torch.equal(copies, expected)
    assert not torch.equal(other, expected)  # the test can fail: other draws, other masks


@pytest.mark.parametrize(("accumulation", "front_ends"), [(1, 1), (2, 4)])
def test_the_intra_audio_step_runs_the_front_end_once_per_forward(accumulation, front_ends):
    """With the intra-audio term on, the front end runs once per forward of the towers (accumulation 2: two
    micro-batches, each in the cached pass and the re-forward), not a second time for the SpecAugment copy."""
    import contextlib

    from synergy.train.loop import train_step

    model = create_model("tiny")
    calls = []
    model.audio_frontend.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    train_step(model, _batch(), accumulation, 0, 1, contextlib.nullcontext, audio_intra_weight=0.7)
    assert len(calls) == front_ends and sum(calls) == 6 * front_ends // accumulation
