"""export_bundle end to end on the tiny preset: ORT parity per tower, dynamic dims, graph checks, manifest,
relocation, and the errors that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

from synergy.export import ExportError, export_bundle
from synergy.export import verify as verify_module
from synergy.export.bundle import check_output
from synergy.export.graphs import FORBIDDEN_OPS
from synergy.runtime.bundle import load_manifest
from synergy.runtime.manifest import FORMAT_VERSION, PAIRS, BundleError

TOLERANCES = {"fp32": (1e-4, 0.9999), "fp16": (None, 0.999)}  # (max abs error, min cosine)

_torch = verify_module._torch_embeddings  # PyTorch's fp32 embeddings, as the export's verification has them


def _session(path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs: threads only contend on a shared runner
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(model, modality: str, batch: int, length: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh inputs, not the export's evaluation set: pixels, token ids with padded rows, or waveforms."""
    rng = np.random.default_rng(seed)
    config = model.config
    if modality == "image":
        size = model.image_tower.config.image_size
        return {"pixel_values": rng.standard_normal((batch, 3, size, size), dtype=np.float32)}
    if modality == "text":
        length = length or config.text.max_length
        ids = rng.integers(4, config.text.vocab_size, (batch, length))
        mask = np.ones((batch, length), dtype=np.int64)
        for row in range(1, batch):  # ragged rows: padding at the end, as the tokenizer pads
            keep = 1 + row % length
            mask[row, keep:] = 0
            ids[row, keep:] = 0
        return {"input_ids": ids.astype(np.int64), "attention_mask": mask}
    samples = length or round(config.audio.clip_seconds * config.audio.sample_rate)
    real = np.full(batch, samples, np.int64)
    real[1::2] = rng.integers(samples // 4, samples, real[1::2].shape)  # ragged rows: padding past their length
    return {"waveform": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32), "waveform_lengths": real}


def _assert_close(got: np.ndarray, want: np.ndarray, precision: str) -> None:
    max_abs, min_cos = TOLERANCES[precision]
    assert got.shape == want.shape and got.dtype == np.float32
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= min_cos, cosine.min()
    if max_abs is not None:
        assert np.abs(got - want).max() <= max_abs


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_onnxruntime_matches_pytorch_per_tower(exports, reference_model, precision, modality):
    model, _ = reference_model
    bundle, _ = exports[precision]
    manifest = load_manifest(bundle)
    assert manifest.precision == precision and manifest.towers[modality].precision == precision
    session = _session(bundle / manifest.towers[modality].file)
    feeds = _inputs(model, modality, batch=5, seed=1)
    _assert_close(session.run(["embedding"], feeds)[0], _torch(model, modality, feeds), precision)


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_dynamic_batch_and_lengths(exports, reference_model, modality):
    model, _ = reference_model
    bundle, _ = exports["fp32"]
    session = _session(bundle / f"{modality}.onnx")
    clip = round(model.config.audio.clip_seconds * model.config.audio.sample_rate)
    lengths = {"image": [None], "text": [4, model.config.text.max_length], "audio": [clip // 2, clip]}[modality]
    for batch in (1, 3, 17):
        for length in lengths:
            feeds = _inputs(model, modality, batch, length, seed=batch)
            got = session.run(["embedding"], feeds)[0]
            assert got.shape == (batch, model.config.embed_dim)
            _assert_close(got, _torch(model, modality, feeds), "fp32")


def test_graph_io_declares_the_dynamic_dims(exports):
    bundle, _ = exports["fp32"]
    expected = {
        "image": {"pixel_values": ["batch", 3, 30, 30]},
        "text": {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]},
        "audio": {"waveform": ["batch", "samples"], "waveform_lengths": ["batch"]},
    }
    for modality, inputs in expected.items():
        graph = onnx.load(bundle / f"{modality}.onnx").graph
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert {i.name: dims(i) for i in graph.input} == inputs
        assert [(o.name, dims(o)) for o in graph.output] == [("embedding", ["batch", 24])]


def test_no_stft_or_dft_in_any_graph(exports):
    for bundle, _ in exports.values():
        manifest = load_manifest(bundle)
        for modality, tower in manifest.towers.items():
            ops = {node.op_type for node in onnx.load(bundle / tower.file).graph.node}
            assert not ops & FORBIDDEN_OPS, (bundle.name, modality)
            if modality == "audio":
                assert "Conv" in ops  # the front end's framing + DFT as one strided Conv1d
            onnx.checker.check_model(str(bundle / tower.file), full_check=True)


def test_fp16_graph_keeps_io_and_sensitive_ops_in_float32(exports):
    bundle, _ = exports["fp16"]
    for modality in ("image", "text", "audio"):
        model = onnx.shape_inference.infer_shapes(onnx.load(bundle / f"{modality}.onnx"))
        graph = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
        types.update({t.name: t.data_type for t in graph.initializer})
        float_inputs = [i for i in graph.input if i.type.tensor_type.elem_type != onnx.TensorProto.INT64]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in float_inputs)
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        half = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert sum(onnx.numpy_helper.to_array(t).size for t in half) > 1000  # the weights are fp16
        matmul_types = {types[n.output[0]] for n in graph.node if n.op_type == "MatMul"}
        assert onnx.TensorProto.FLOAT16 in matmul_types
        for node in graph.node:
            if node.op_type in ("LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "Log", "Pow"):
                assert types[node.output[0]] == onnx.TensorProto.FLOAT, (modality, node.op_type)
    audio = onnx.load(bundle / "audio.onnx").graph
    conv_weights = {n.input[1] for n in audio.node if n.op_type == "Conv"}
    dtypes = {t.data_type for t in audio.initializer if t.name in conv_weights}
    # the front end's DFT conv stays fp32, the AST patch embedding goes fp16
    assert dtypes == {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


def test_verification_report_is_printed_and_saved(exports):
    for name in ("fp32", "fp16"):
        bundle, report = exports[name]
        extra = load_manifest(bundle).extra
        (verification,) = extra["verification"]
        assert verification["passed"] and verification["precision"] == name
        assert set(verification["towers"]) == {"image", "text", "audio"}
        for tower in verification["towers"].values():
            assert {1, 3, 17} <= set(tower["batch_sizes"])
        assert len(verification["towers"]["text"]["lengths"]) >= 2
        assert len(verification["towers"]["audio"]["lengths"]) >= 2
        assert "min cos" in report and "passed" in report and extra["report"] in report
        if name == "fp16":  # the checkpoint's labels are separated, so the agreement gate applies
            assert verification["zero_shot_gate_applied"]
            assert verification["zero_shot_top1_agreement_decided"] >= 0.99


def test_manifest_schema_and_sha256(exports, checkpoint, reference_model):
    model, _ = reference_model
    bundle, _ = exports["fp32"]
    manifest = load_manifest(bundle, verify=True)
    assert manifest.format_version == FORMAT_VERSION and manifest.backend == "onnx"
    assert manifest.embed_dim == 24
    scales = model.logit_scales().tolist()
    assert manifest.logit_scales == pytest.approx(dict(zip(PAIRS, scales)))
    assert manifest.image.size == 30 and manifest.image.mean == pytest.approx(model.config.image.mean)
    assert (manifest.audio.sample_rate, manifest.audio.clip_seconds) == (16000, 0.5)
    assert manifest.text.max_length == 13 and manifest.text.prompt_templates == model.config.prompt_templates
    text = manifest.towers["text"]
    assert [(t.name, t.dtype, t.shape) for t in text.inputs] == [
        ("input_ids", "int64", ("batch", "length")),
        ("attention_mask", "int64", ("batch", "length")),
    ]
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest.files) == on_disk - {"manifest.json"}
    assert (bundle / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(manifest.versions)
    json.loads((bundle / "manifest.json").read_text())  # plain JSON

    tampered = bundle.parent / "tampered"
    shutil.copytree(bundle, tampered)
    with open(tampered / "text.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_manifest(tampered)


def test_relocated_bundle_loads_and_runs(exports, reference_model, tmp_path):
    """External data (Triton directory layout) and plain files: move the folder, it still verifies and runs."""
    model, _ = reference_model
    for name in ("fp32", "triton_external_fp16"):
        source, _ = exports[name]
        copy = tmp_path / "a" / name
        shutil.copytree(source, copy)
        moved = tmp_path / "elsewhere" / "renamed"
        moved.parent.mkdir(exist_ok=True)
        shutil.move(copy, moved)
        manifest = load_manifest(moved)
        precision = manifest.precision
        for modality, tower in manifest.towers.items():
            feeds = _inputs(model, modality, batch=2, seed=3)
            _assert_close(
                _session(moved / tower.file).run(["embedding"], feeds)[0], _torch(model, modality, feeds), precision
            )
        shutil.rmtree(moved)


def test_runtime_opens_the_bundle(exports, reference_model):
    """The torch-free runtime reads what the exporter writes, and its text path matches PyTorch."""
    from synergy.runtime import Runtime

    model, tokenizer = reference_model
    bundle, _ = exports["fp16"]
    texts = ["a dog", "the sound of a red circle"]
    got = Runtime.open(bundle).embed_text(texts)
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    _assert_close(got.astype(np.float32), _torch(model, "text", feeds), "fp16")


def test_fp16_bundle_keeps_a_named_tower_fp32(checkpoint, reference_model, tmp_path):
    """--fp32-towers in an fp16 bundle: that tower's graph stays float32 throughout (fp32's own tolerance), the
    others are half, and the runtime runs the mixed bundle."""
    from synergy.runtime import Runtime

    export_bundle(checkpoint, tmp_path / "bundle", precision="fp16", fp32_towers=["text"])
    manifest = load_manifest(tmp_path / "bundle")
    assert {m: t.precision for m, t in manifest.towers.items()} == {"image": "fp16", "text": "fp32", "audio": "fp16"}
    types = {m: {t.data_type for t in onnx.load(tmp_path / "bundle" / f"{m}.onnx").graph.initializer}
             for m in ("text", "audio")}  # fmt: skip
    assert onnx.TensorProto.FLOAT16 not in types["text"] and onnx.TensorProto.FLOAT16 in types["audio"]
    model, tokenizer = reference_model
    texts = ["a dog", "the sound of a red circle"]
    encodings = tokenizer.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}  # fmt: skip
    got = Runtime.open(tmp_path / "bundle", backend="onnxruntime").embed_text(texts)
    _assert_close(got.astype(np.float32), _torch(model, "text", feeds), "fp32")


# ---------------------------------------------------------------------------------------------------- errors


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fmt="tflite"), "unknown format 'tflite'"),
        (dict(precision="int4"), "unknown precision 'int4'"),
        (dict(precision="int8", fmt="trt", int8_method="dynamic"), "TensorRT builds int8 engines from QDQ graphs"),
        (dict(precision="int8", fmt="triton", triton_platform="tensorrt", int8_method="dynamic"), "--quantize static"),
        (dict(opset=11), "opset 11"),
        (dict(precision="int8", fp32_towers=["text", "video"]), "--fp32-towers: unknown tower video"),
        (dict(fp32_towers=["text"]), "this export is fp32 already"),
        (dict(fmt="triton", triton_platform="pytorch"), "unknown Triton platform"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_bundle(checkpoint, tmp_path / "out", **kwargs)
    assert _leftovers(tmp_path) == []


def test_bad_checkpoint(tmp_path):
    with pytest.raises(ExportError, match="no such checkpoint folder"):
        export_bundle(tmp_path / "missing", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="missing model.safetensors, tokenizer.json"):
        export_bundle(broken, tmp_path / "out")
    assert _leftovers(tmp_path) == ["broken"]


def test_existing_output_needs_force_and_must_be_a_bundle(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle(checkpoint, out)
    with pytest.raises(ExportError, match="not a Synergy bundle"):
        export_bundle(checkpoint, out, force=True)
    with pytest.raises(ExportError, match="overlaps the checkpoint"):
        export_bundle(checkpoint, checkpoint, force=True)
    assert _leftovers(out) == ["notes.txt"]


def test_failed_verification_leaves_the_old_bundle_and_no_temp_folder(checkpoint, exports, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    shutil.copytree(exports["fp32"][0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    impossible = verify_module.Thresholds(max_abs_error=0.0, min_cosine=1.1, min_agreement=None)
    monkeypatch.setitem(verify_module.THRESHOLDS, "fp32", impossible)
    with pytest.raises(ExportError, match="verification failed, nothing written"):
        export_bundle(checkpoint, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == ["bundle"]


def _killed_export(exports, tmp_path, swap_done: bool):
    """The folders SIGKILL leaves in ``tmp_path`` when it stops an export to ``tmp_path / "bundle"``: a dead writer's
    half-written temp folder and the previous bundle renamed aside to ``.bundle.old``; ``swap_done``: the kill fell
    after the new bundle was in place (only the old one's removal cut short), else between the swap's two renames
    (no ``bundle`` at all). -> the previous bundle's files."""
    previous = exports["fp32"][0]
    shutil.copytree(previous, tmp_path / ".bundle.old")
    if swap_done:
        shutil.copytree(exports["fp16"][0], tmp_path / "bundle")
    dead = tmp_path / ".bundle.k1ll3d.tmp"
    dead.mkdir()
    (dead / "image.onnx").write_bytes(b"half an onnx graph")
    return {p.name: p.read_bytes() for p in previous.iterdir()}


def test_an_export_killed_between_the_renames_is_put_back_by_the_next_one(checkpoint, exports, tmp_path):
    """No bundle, the previous one as .bundle.old: the next export (and the CLI's check before torch loads) first
    puts the previous bundle back, so it refuses without --force as for any bundle, and the dead temp folder goes."""
    previous = _killed_export(exports, tmp_path, swap_done=False)
    with pytest.raises(ExportError, match="already exists; pass --force"):
        check_output(checkpoint, tmp_path / "bundle", force=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()} == previous
    assert _leftovers(tmp_path) == ["bundle"]
    assert load_manifest(tmp_path / "bundle", verify=True).towers["image"].file == "image.onnx"


def test_an_export_after_a_killed_one_leaves_only_its_bundle(checkpoint, exports, tmp_path):
    """Both kill points, then ``export --force``: one whole new bundle and nothing else in the folder."""
    for swap_done in (False, True):
        _killed_export(exports, tmp_path, swap_done)
        export_bundle(checkpoint, tmp_path / "bundle", force=True)
        assert _leftovers(tmp_path) == ["bundle"], swap_done
        manifest = load_manifest(tmp_path / "bundle", verify=True)
        assert manifest.towers["image"].file == "image.onnx" and manifest.precision == "fp32"
        shutil.rmtree(tmp_path / "bundle")


def test_force_replaces_a_bundle(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    export_bundle(checkpoint, out, fmt="triton")
    report = export_bundle(checkpoint, out, force=True)
    assert "passed" in report
    assert load_manifest(out).towers["image"].file == "image.onnx"
    assert not (out / "synergy_image").exists()
    assert _leftovers(tmp_path) == ["bundle"]


def test_trt_without_tensorrt_names_the_extra(checkpoint, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message shown without it")
    except ImportError:
        pass
    with pytest.raises(ExportError, match=r"pip install 'synergy-clip\[tensorrt\]'"):
        export_bundle(checkpoint, tmp_path / "out", fmt="trt")
    assert _leftovers(tmp_path) == []


def test_cli_reports_errors_without_traceback(checkpoint, tmp_path):
    from synergy.cli import main

    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2 and "already exists; pass --force" in result.output  # a usage error
    result = CliRunner().invoke(
        main, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "tflite"]
    )
    assert result.exit_code == 2 and "tflite" in result.output
