"""Reconstruction heads: shapes sized from the tiny preset (odd sizes: 30 px images, 48 x 24 log-mels, 13 tokens,
vocabulary 131), the grid plan, SSIM against scikit-image's on the same arrays, and the losses."""

import numpy as np
import pytest
import torch

from synergy.core.model import create_model
from synergy.core.reconstruction import (
    TARGETS,
    build_reconstructor,
    grid_plan,
    present_modalities,
    reconstruction_config,
    reconstruction_loss,
    ssim,
)

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the dev extra's independent SSIM")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny heads on tiny batches: a second intra-op thread only spins (10x the CPU time of one on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny")


def _features(model, target: str, batch: int):
    widths = {"image": 36, "text": 36, "audio": 36}
    return [torch.randn(batch, widths[m]) for m in present_modalities(target)]


@pytest.mark.parametrize("target", TARGETS)
def test_head_shapes_follow_the_checkpoint(tiny, target):
    config = reconstruction_config(
        tiny, target, vocab_size=131, fusion_width=37, bottleneck=11, text_width=21, text_heads=3, decoder_channels=19
    )
    head = build_reconstructor(config)
    out = head(*_features(tiny, target, 7))
    expected = {"image": (7, 3, 30, 30), "audio": (7, 48, 24), "text": (7, 13, 131)}[target]
    assert tuple(out.shape) == expected
    loss = reconstruction_loss(
        target,
        out,
        torch.randint(0, 131, (7, 13)) if target == "text" else torch.rand_like(out),
        torch.ones(7, 13) if target == "text" else None,
        audio_range=3.7,
    )
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())


def _distinct_targets(target: str, rows: int, generator: torch.Generator):
    """-> (truth, token mask or None): ``rows`` targets that differ where a head must tell them apart. Images: a
    0.9 square on 0.1 at a different place in each row; log-mels: a per-row level and slope over the mel bins;
    text: random tokens."""
    if target == "image":
        truth = torch.full((rows, 3, 30, 30), 0.1)
        for i in range(rows):
            truth[i, :, 4 * i : 4 * i + 12, 16 - 3 * i : 28 - 3 * i] = 0.9
        return truth, None
    if target == "audio":
        level, slope = torch.randn(rows, 1, 1, generator=generator), torch.randn(rows, 1, 1, generator=generator)
        return (level + slope * torch.linspace(-1, 1, 24)).expand(rows, 48, 24).contiguous(), None
    return torch.randint(3, 131, (rows, 13), generator=generator), torch.ones(rows, 13)


@pytest.mark.parametrize("target", TARGETS)
def test_each_head_learns_a_small_batch_row_by_row(tiny, target):
    """The heads can learn, not only run: 100 Adam steps on 5 fixed (features, target) pairs bring the loss under a
    tenth of its start, and each row's reconstruction is its own target's, not the batch mean (for text: every
    token). The image head's sigmoid reaches the target's two levels: above 0.7 on the squares, below 0.3 off them."""
    torch.manual_seed(0)
    config = reconstruction_config(
        tiny, target, vocab_size=131, fusion_width=37, bottleneck=11, text_width=21, text_heads=3, decoder_channels=19
    )
    head = build_reconstructor(config)
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(5, 36, generator=generator) for _ in present_modalities(target)]
    truth, token_mask = _distinct_targets(target, 5, generator)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = reconstruction_loss(target, head(*features), truth, token_mask, audio_range=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        out = head(*features)
    if target == "text":
        assert out.argmax(-1).eq(truth).all()
        return
    distances = (out[:, None] - truth[None]).square().flatten(2).mean(-1)  # [5 outputs, 5 targets]
    assert distances.argmin(1).tolist() == list(range(5)), distances
    if target == "image":
        square = truth > 0.5
        assert out[square].mean() > 0.7 and out[~square].mean() < 0.3, (out[square].mean(), out[~square].mean())


def test_present_modalities():
    assert present_modalities("image") == ("text", "audio")
    assert present_modalities("audio") == ("image", "text")
    assert present_modalities("text") == ("image", "audio")
    with pytest.raises(ValueError, match="choose one of"):
        present_modalities("video")


@pytest.mark.parametrize(
    "size, plan", [((30, 30), (3, 4, 4)), ((64, 64), (4, 4, 4)), ((98, 64), (4, 7, 4)), ((1024, 128), (5, 32, 4))]
)
def test_grid_plan(size, plan):
    blocks, h, w = grid_plan(*size)
    assert (blocks, h, w) == plan and h * 2**blocks >= size[0] and w * 2**blocks >= size[1]


@pytest.mark.parametrize("shape, data_range", [((3, 30, 37), 1.0), ((1, 48, 24), 3.7), ((3, 11, 11), 1.0)])
def test_ssim_matches_scikit_image(shape, data_range):
    rng = np.random.default_rng(7)
    truth = rng.random(shape) * data_range
    noisy = np.clip(truth + 0.15 * data_range * rng.standard_normal(shape), 0, data_range)
    ours = ssim(torch.tensor(noisy)[None], torch.tensor(truth)[None], data_range).item()
    theirs = skimage_metrics.structural_similarity(
        noisy,
        truth,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=0,
    )
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ssim(torch.tensor(truth)[None], torch.tensor(truth)[None], data_range).item() == pytest.approx(1.0)


def test_ssim_data_range_matters_for_log_mels():
    """A z-scored log-mel spans several units: SSIM at range 1.0 (Synergy-CLIP's) scores noise differently."""
    rng = np.random.default_rng(0)
    truth = torch.tensor(rng.standard_normal((1, 48, 24)) * 1.5)
    noisy = truth + 0.5 * torch.randn_like(truth)
    data_range = (truth.max() - truth.min()).item()
    assert ssim(noisy, truth, data_range).item() != pytest.approx(ssim(noisy, truth, 1.0).item(), abs=1e-3)


def test_text_loss_ignores_padding():
    logits = torch.randn(2, 5, 9)
    ids = torch.tensor([[1, 4, 2, 0, 0], [1, 5, 6, 2, 0]])
    mask = (ids != 0).long()
    loss = reconstruction_loss("text", logits, ids, mask)
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(2, 9)  # the padded positions: anything goes
    assert reconstruction_loss("text", changed, ids, mask).item() == pytest.approx(loss.item())
    real = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0][mask.bool()]
    assert loss.item() == pytest.approx(-real.mean().item(), rel=1e-5)
