"""The export's OpenVINO bf16 check: an fp32 bundle verified on OpenVINO with the bf16 hint records it in the
manifest, and ``--backend auto`` then runs the bundle there (right answers, on OpenVINO); a check that misses its
thresholds is recorded as failed, never fails the export, and keeps onnxruntime; without OpenVINO nothing is recorded.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synergy.core.checkpoint import load_checkpoint, save_checkpoint
from synergy.export import export_bundle
from synergy.export.verify import BUILTIN_LABELS
from synergy.runtime.bundle import load_manifest
from synergy.runtime.prompts import fill_prompt
from synergy.runtime.towers import choose_backend

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None  # found, not imported: the parent collects this too
LABELS = BUILTIN_LABELS[:6]
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 70, 230), (240, 220, 30), (200, 40, 220), (30, 210, 220))


def needs_openvino(test):
    """Skipped without the extra; run in a child pytest, as OpenVINO's native libraries stay out of the suite's
    process (the ``isolated`` marker, tests/conftest.py)."""
    reason = "the openvino extra is not installed: pip install '.[openvino]'"
    return pytest.mark.isolated(pytest.mark.skipif(not HAS_OPENVINO, reason=reason)(test))


def cpu_runs_bf16() -> bool:
    """Whether OpenVINO runs bfloat16 here (AVX-512 BF16 or AMX); elsewhere its bf16 hint compiles as f32."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _pictures(folder, size: int) -> list:
    """One picture per label: a colour field with a darker square, ``size`` x ``size`` (the tiny preset's input)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, colour in enumerate(COLOURS):
        picture = np.empty((size, size, 3), np.uint8)
        picture[:] = colour
        picture[size // 4 : size // 2 + index, size // 4 : size // 2 + index] = np.asarray(colour) // 3
        paths.append(folder / f"{LABELS[index].replace(' ', '_')}.png")
        Image.fromarray(picture).save(paths[-1])
    return paths


def _label_matrix(model, tokenizer) -> torch.Tensor:
    """[labels, D]: the normalised mean of each label's normalised prompt embeddings, as the runtime builds it."""
    templates = model.config.prompt_templates
    encodings = tokenizer.encode_batch([fill_prompt(t, label) for label in LABELS for t in templates])
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        prompts = model.encode_text(ids, mask).view(len(LABELS), len(templates), -1)
    return F.normalize(prompts.mean(1), dim=-1)


def _train_pictures(checkpoint, out, pictures) -> None:
    """The tiny checkpoint with its image tower trained until each picture's nearest label is its own by a clear
    margin, so that "the right top-1" is a fact of the model and not a float tie an engine may break either way."""
    from synergy.runtime.image import load_image, preprocess_with

    model, tokenizer = load_checkpoint(checkpoint, attn_implementation="sdpa")
    spec = model.config.image.preprocessing()
    pixels = torch.from_numpy(np.stack([preprocess_with(load_image(p), spec) for p in pictures]))
    labels, targets = _label_matrix(model, tokenizer), torch.arange(len(LABELS))
    parameters = [*model.image_tower.parameters(), *model.image_projection.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    # until the margin holds, checked every 20 steps (60 steps had sufficed until a fresh install's packages left the
    # margin at 0.036), at most 300
    for step in range(1, 301):
        loss = F.cross_entropy(20 * model.encode_image(pixels) @ labels.T, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            with torch.no_grad():
                scores = model.encode_image(pixels) @ labels.T  # [pictures, labels]
            best = scores.topk(2, dim=1).values
            if scores.argmax(1).tolist() == targets.tolist() and (best[:, 0] - best[:, 1]).min() > 0.05:
                break
    assert scores.argmax(1).tolist() == targets.tolist() and (best[:, 0] - best[:, 1]).min() > 0.05, scores
    save_checkpoint(out, model.eval(), tokenizer)


@pytest.fixture(scope="module")
def picture_bundle(checkpoint, tmp_path_factory, one_thread):
    """(bundle, report, picture paths): the tiny checkpoint trained on six pictures, exported fp32."""
    root = tmp_path_factory.mktemp("openvino-check")
    size = load_checkpoint(checkpoint, attn_implementation="sdpa")[0].config.image.preprocessing().size
    pictures = _pictures(root / "pictures", size)
    one_thread(lambda: _train_pictures(checkpoint, root / "checkpoint", pictures))
    report = one_thread(lambda: export_bundle(root / "checkpoint", root / "bundle"))
    return root / "bundle", report, pictures


@needs_openvino
def test_fp32_export_records_a_passed_openvino_check(picture_bundle):
    bundle, report, _ = picture_bundle
    manifest = load_manifest(bundle, verify=True)
    record = manifest.extra["openvino_bf16"]
    assert record["target"].startswith("OpenVINO ") and "bf16" in record["target"]
    assert record["thresholds"] == {"max_abs_error": None, "min_cosine": 0.99, "min_agreement": 0.99}  # int8's gate
    (onnxruntime_check,) = manifest.extra["verification"]  # the gate that decides the export is onnxruntime's
    assert onnxruntime_check["target"].startswith("onnxruntime") and onnxruntime_check["min_cosine"] > 0.9999
    if not cpu_runs_bf16():  # measured at f32, the check says nothing of bf16: not passed, onnxruntime stays
        assert record["passed"] is False and record["inference_precision"] == "f32", record
        assert "this CPU has no bfloat16" in report and choose_backend("auto", "cpu", manifest) == "onnxruntime"
        return
    assert record["passed"] is True and record["inference_precision"] == "bf16", record
    assert 0.99 <= record["min_cosine"] < 1.0  # bf16 moved something: it ran, and at bf16
    assert "OpenVINO bf16 check passed: --backend auto runs this bundle on openvino-bf16" in report
    assert "in synergy serve; one-shot calls (synergy infer, embed) stay on onnxruntime" in report  # a tiny bundle
    assert choose_backend("auto", "cpu", manifest) == "openvino-bf16"


@needs_openvino
def test_auto_runs_the_fp32_bundle_on_openvino_with_the_right_answers(picture_bundle, monkeypatch):
    from synergy.runtime import Runtime, towers

    bundle, _, pictures = picture_bundle
    # a tiny bundle stays on onnxruntime (OpenVINO's start-up outweighs it: towers.OPENVINO_MIN_GRAPH_BYTES) ...
    with Runtime.open(bundle, backend="auto", threads=1) as runtime:
        assert runtime.backend == "onnxruntime"
    engine = "openvino-bf16" if cpu_runs_bf16() else "onnxruntime"
    # ... except in a server, which pays the start-up once (synergy serve opens its bundles long-lived) ...
    with Runtime.open(bundle, backend="auto", threads=1, long_lived=True) as runtime:
        assert runtime.backend == engine
    # ... and one past the size where OpenVINO pays for itself runs there when its record passed
    monkeypatch.setattr(towers, "OPENVINO_MIN_GRAPH_BYTES", 0)
    with Runtime.open(bundle, backend="auto", threads=1) as runtime:
        answers = [p.top[0].label for p in runtime.classify(list(LABELS), image=pictures, top_k=1)]
        assert runtime.backend == engine
        if engine == "openvino-bf16":
            (name,) = runtime.providers["image"]
            assert name.startswith("OpenVINO ") and name.endswith("CPU (bf16)")
    assert answers == list(LABELS)  # each picture's trained label (PyTorch's top-1 by a margin > 0.05)


@needs_openvino
def test_a_failed_record_keeps_onnxruntime_and_a_passed_one_picks_openvino(picture_bundle):
    from dataclasses import replace

    manifest = load_manifest(picture_bundle[0])
    record = manifest.extra["openvino_bf16"]
    failed = replace(manifest, extra={**manifest.extra, "openvino_bf16": {**record, "passed": False}})
    passed = replace(manifest, extra={**manifest.extra, "openvino_bf16": {**record, "passed": True}})
    assert choose_backend("auto", "cpu", failed) == "onnxruntime"
    assert choose_backend("auto", "cpu", passed) == "openvino-bf16"
    unrecorded = replace(manifest, extra={k: v for k, v in manifest.extra.items() if k != "openvino_bf16"})
    assert choose_backend("auto", "cpu", unrecorded) == "onnxruntime"  # fp32 without a record: as before


@needs_openvino
def test_a_check_below_its_threshold_is_recorded_and_does_not_fail_the_export(checkpoint, tmp_path, one_thread):
    """--min-cosine 0.99999: onnxruntime's fp32 graphs meet it (cosine 1.0000000), OpenVINO's bf16 cannot (about
    3 significant digits per activation: 0.9999 on the tiny preset). The export succeeds and stays on onnxruntime."""
    out = tmp_path / "bundle"
    report = one_thread(lambda: export_bundle(checkpoint, out, min_cosine=0.99999))
    manifest = load_manifest(out, verify=True)
    record = manifest.extra["openvino_bf16"]
    assert record["passed"] is False and record["thresholds"]["min_cosine"] == 0.99999
    if record["inference_precision"] == "bf16":
        assert record["min_cosine"] < 0.99999
        assert "FAILED: " in report[report.index("verification vs PyTorch fp32: OpenVINO") :]  # its own lines
    assert "--backend auto keeps onnxruntime for this bundle" in report
    assert choose_backend("auto", "cpu", manifest) == "onnxruntime"


def test_without_openvino_nothing_is_recorded_and_the_report_says_so(checkpoint, tmp_path, monkeypatch, one_thread):
    """An environment without the extra: ``sys.modules[name] = None`` is how Python spells "not installed" to
    ``importlib.util.find_spec`` and ``import`` alike."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    out = tmp_path / "bundle"
    report = one_thread(lambda: export_bundle(checkpoint, out, openvino_check=True))  # asked, whatever the env says
    manifest = load_manifest(out, verify=True)
    assert "openvino_bf16" not in manifest.extra
    (line,) = [line for line in report.splitlines() if "OpenVINO" in line]
    assert "not run, the openvino extra is not installed" in line and "auto runs onnxruntime" in line
    assert choose_backend("auto", "cpu", manifest) == "onnxruntime"


def test_the_check_is_skipped_when_not_asked(checkpoint, tmp_path, monkeypatch, one_thread):
    """`synergy export --no-openvino-check` (and SYNERGY_OPENVINO_CHECK=0, which this suite's own process sets so
    that OpenVINO's native libraries stay out of it): nothing recorded, one report line, onnxruntime."""
    from click.testing import CliRunner

    from synergy.cli import main

    monkeypatch.setenv("SYNERGY_OPENVINO_CHECK", "1")  # the flag alone decides
    out = tmp_path / "bundle"
    command = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--no-openvino-check"]
    done = one_thread(lambda: CliRunner().invoke(main, command))
    assert done.exit_code == 0, done.output
    manifest = load_manifest(out, verify=True)
    assert "openvino_bf16" not in manifest.extra
    (line,) = [line for line in done.output.splitlines() if "OpenVINO" in line]
    assert "not run, not asked" in line and "auto runs onnxruntime" in line
    assert choose_backend("auto", "cpu", manifest) == "onnxruntime"


def test_fp16_bundles_are_not_checked(exports):
    bundle, report = exports["fp16"]
    assert "openvino_bf16" not in load_manifest(bundle).extra and "OpenVINO" not in report
