"""Shared export fixtures: one tiny checkpoint per session and the bundles exported from it.

torch.export of the three towers is the slow part (~10-30 s on 2 cores); the exporter keeps the graphs of a
checkpoint for the life of the process, so the fp32, fp16 and Triton bundles below pay for it once. Every bundle
is still written, checked and verified against PyTorch by its own ``export_bundle`` call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from synergy.core.checkpoint import load_checkpoint, save_checkpoint
from synergy.core.model import create_model
from synergy.core.tokenizer import train_tokenizer
from synergy.export import export_bundle
from synergy.export.verify import BUILTIN_LABELS


@contextlib.contextmanager
def single_thread():
    """Tiny models on a shared 2-core runner: a second intra-op thread only adds spin-waiting (10x slower
    forwards under load), and the exporter's onnxruntime sessions follow torch's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    with single_thread():
        yield


def _separate_labels(model, tokenizer, steps: int = 10) -> None:
    """A few steps on the text tower so the built-in labels get distinct embeddings. An untrained text tower maps
    every prompt to nearly the same vector, so PyTorch would decide no zero-shot query by more than float
    rounding and the fp16 agreement gate could not apply (see synergy.export.verify)."""
    config = model.config
    templates = config.prompt_templates
    prompts = [t.format(label) for label in BUILTIN_LABELS for t in templates]
    encodings = tokenizer.encode_batch(prompts)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    optimizer = torch.optim.AdamW(model.text_tower.parameters(), lr=1e-2)
    targets = torch.arange(len(BUILTIN_LABELS))
    for _ in range(steps):
        labels = model.encode_text(ids, mask).view(len(BUILTIN_LABELS), len(templates), -1).mean(1)
        labels = F.normalize(labels, dim=-1)
        loss = F.cross_entropy(10 * labels @ labels.T, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    with single_thread():
        return _make_checkpoint(tmp_path_factory)


def _make_checkpoint(tmp_path_factory):
    model = create_model("tiny")
    config = model.config
    prompts = [t.format(label) for label in BUILTIN_LABELS for t in config.prompt_templates]
    tokenizer = train_tokenizer(prompts * 4, config.text.vocab_size, config.text.max_length)
    _separate_labels(model, tokenizer)
    return save_checkpoint(tmp_path_factory.mktemp("export") / "checkpoint", model.eval(), tokenizer)


@pytest.fixture(scope="session")
def reference_model(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint, attn_implementation="sdpa")
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def exports(checkpoint, tmp_path_factory):
    """name -> (bundle folder, printed report) for the bundles the tests read (never modify them)."""
    root = tmp_path_factory.mktemp("bundles")
    jobs = {
        "fp32": dict(fmt="onnx", precision="fp32"),
        "fp16": dict(fmt="onnx", precision="fp16"),
        "triton": dict(fmt="triton", precision="fp32"),
        "triton_external_fp16": dict(fmt="triton", precision="fp16", external_data=True),
    }
    with single_thread():
        return {name: (root / name, export_bundle(checkpoint, root / name, **job)) for name, job in jobs.items()}


# --- helpers of the tower-family parity tests (text and image) -------------------------------------------------------


def export_model(root, model, tokenizer):
    """``model`` saved as a checkpoint under ``root`` and exported (fp32 ONNX, verified) -> the bundle folder."""
    save_checkpoint(root / "checkpoint", model, tokenizer)
    export_bundle(root / "checkpoint", root / "bundle")
    return root / "bundle"


def cosines(a, b):
    """Row-wise cosine of two [N, D] arrays, in float64 (so that 1 - cosine resolves below float32's 6e-8)."""
    a, b = a.astype("float64"), b.astype("float64")
    return (a * b).sum(-1) / (((a * a).sum(-1) * (b * b).sum(-1)) ** 0.5)


@pytest.fixture(scope="session")
def model_exporter():
    """:func:`export_model`, for fixtures of any scope (test modules do not import conftest)."""
    return export_model


@pytest.fixture(scope="session")
def cosine():
    """:func:`cosines`."""
    return cosines


@pytest.fixture(scope="session")
def one_thread():
    """:func:`single_thread` as a call, for fixtures of any scope: ``one_thread(fn)`` -> ``fn()`` on one torch thread
    (the per-test autouse fixture does not reach module-scoped fixtures)."""

    def run(function):
        with single_thread():
            return function()

    return run
