"""Fused attention in the default bundle: `synergy export` writes opset 23 for the runtime's engines, so attention is
ONNX's own Attention op, which survives onnxruntime's graph optimiser as one fused kernel (no MatMul + Softmax +
IsNaN/Where chain), gives PyTorch's embeddings on padded batches, and reads in OpenVINO; TensorRT and Triton
bundles stay at opset 18."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from synergy.export import export_bundle
from synergy.export.graphs import PORTABLE_OPSET, RUNTIME_OPSET, default_opset
from synergy.runtime.bundle import load_manifest

MODALITIES = ("image", "text", "audio")


@pytest.fixture(scope="module")
def default_bundle(checkpoint, tmp_path_factory):
    """A bundle exported with no --opset: what `synergy export --checkpoint C --out B` writes."""
    out = tmp_path_factory.mktemp("default") / "bundle"
    export_bundle(checkpoint, out)
    return out


def _optimized_ops(path, tmp_path) -> collections.Counter:
    """Op types of the graph onnxruntime runs: its optimiser's output at the session's default level (ALL)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}-optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load_model(options.optimized_model_filepath).graph.node)


def test_default_opset_by_format():
    assert default_opset("onnx") == RUNTIME_OPSET == 23
    assert default_opset("trt") == default_opset("triton") == PORTABLE_OPSET == 18


def test_onnxruntime_runs_one_fused_attention_per_layer(default_bundle, reference_model, tmp_path):
    model, _ = reference_model
    manifest = load_manifest(default_bundle, verify=True)
    assert manifest.extra["opset"] == RUNTIME_OPSET
    layers = {
        "image": model.image_tower.config.num_hidden_layers,
        "text": model.text_tower.config.num_hidden_layers,
        "audio": model.config.audio.layers,
    }
    for modality in MODALITIES:
        path = default_bundle / manifest.towers[modality].file
        ops = _optimized_ops(path, tmp_path)
        assert ops["Attention"] == layers[modality], (modality, dict(ops))
        # what the opset-18 export leaves unfused: scores, softmax and its NaN guard as separate ops
        assert not {"Softmax", "IsNaN"} & set(ops), (modality, dict(ops))


def test_constant_masks_are_dropped_and_input_masks_kept(default_bundle):
    """transformers hands the image and audio towers an all-True mask (Expand of a constant): the export drops it,
    so OpenVINO and onnxruntime take their mask-free attention; the text tower's mask comes from its input."""
    manifest = load_manifest(default_bundle)
    for modality in MODALITIES:
        graph = onnx.load_model(default_bundle / manifest.towers[modality].file).graph
        masks = {len(n.input) > 3 and bool(n.input[3]) for n in graph.node if n.op_type == "Attention"}
        assert masks == {modality == "text"}, (modality, masks)
        bool_constants = [t for t in graph.initializer if t.data_type == onnx.TensorProto.BOOL]
        assert modality == "text" or not bool_constants, (modality, [t.name for t in bool_constants])  # none left


# not the module's last test: tests/conftest.py runs an isolated test in a child and skips its teardown here, so a
# module ending with one leaves its fixtures set up and the next module's first test errors
@pytest.mark.isolated  # OpenVINO's native libraries run away from torch (tests/conftest.py)
def test_openvino_reads_the_default_bundle(default_bundle):
    pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install '.[openvino]'")
    from synergy.runtime import Runtime

    rng = np.random.default_rng(3)
    manifest = load_manifest(default_bundle)
    rate = manifest.audio.sample_rate
    clips = [(0.1 * rng.standard_normal(n).astype(np.float32), rate) for n in (rate // 3, rate, 2 * rate // 3)]
    texts = ["a dog", "the sound of rain on a roof", "piano"]
    embeddings = {}
    for backend in ("onnxruntime", "openvino"):
        with Runtime.open(default_bundle, backend=backend, threads=1, batch_size=3) as runtime:
            embeddings[backend] = (runtime.embed_audio(clips), runtime.embed_text(texts))
    for got, want in zip(embeddings["openvino"], embeddings["onnxruntime"]):
        assert _cosines(got, want).min() >= 0.9999


def _padded_text(model, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = model.config.text.max_length
    ids = rng.integers(4, model.config.text.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):  # every row padded to a different length, as a tokenizer pads a batch
        keep = 1 + (row * 5) % length
        mask[row, keep:] = 0
        ids[row, keep:] = 1
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


def _padded_audio(model, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    clip = round(model.config.audio.clip_seconds * model.config.audio.sample_rate)
    lengths = np.linspace(clip // 10, clip, batch).astype(np.int64)
    waves = (0.1 * rng.standard_normal((batch, clip))).astype(np.float32)
    waves[np.arange(clip)[None] >= lengths[:, None]] = 0.0  # zero past each row's real samples
    return {"waveform": waves, "waveform_lengths": lengths}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_fused_attention_matches_torch_on_padded_batches(default_bundle, reference_model, modality):
    model, _ = reference_model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(default_bundle / f"{modality}.onnx"), options, providers=["CPUExecutionProvider"]
    )
    for batch, seed in ((7, 0), (3, 1)):
        feeds = _padded_text(model, batch, seed) if modality == "text" else _padded_audio(model, batch, seed)
        got = session.run(["embedding"], feeds)[0]
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            encode = model.encode_text if modality == "text" else model.encode_audio
            want = encode(*tensors.values()).numpy()
        assert _cosines(got, want).min() >= 0.9999, (modality, batch, _cosines(got, want))
        # padding never changes an embedding: each padded row alone gives the same vector
        for row in (1, batch - 1):
            alone = {k: v[row : row + 1] for k, v in feeds.items()}
            assert _cosines(session.run(["embedding"], alone)[0], got[row : row + 1])[0] >= 0.9999
