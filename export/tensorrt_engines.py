"""ONNX graphs -> TensorRT engines (``*.plan``) with the TensorRT Python API, 10.x and 11.x.

- Precision: TensorRT 10 builds the float32 graph with builder flags (``FP16`` plus float32 constraints on the
  layers that must not run in half: normalisations, softmax, reductions, exp/log/pow, and the audio front end),
  ``TF32`` cleared for fp32 engines so they meet the fp32 tolerance. TensorRT 11 removed weak typing: every
  network is strongly typed, so it is fed the float16 graph that :mod:`synergy.export.fp16` wrote, whose casts
  already say where float32 is kept.
- int8 (explicit quantization): the static QDQ graph (:mod:`synergy.export.quantize`, activation scales calibrated
  by onnxruntime on the export's verification rows, the same rows the gate then checks the engine on) is built as a
  strongly typed network on TensorRT 10 and 11 alike, with no precision flags, as TensorRT's documentation asks for
  Q/DQ networks: the weight MatMuls run int8 x int8, everything else in the graph's float32 (a graph with float16
  casts around them would be faster on the GPU; not built).
- One optimisation profile per engine: batch min/opt/max from the caller, text length 1..max_length (opt: max),
  audio fixed at one clip (the runtime cuts long audio into clips), image fixed.
- A persisted timing cache (``$XDG_CACHE_HOME/synergy/tensorrt/timing.cache``) makes rebuilds fast, and built
  engines are cached under a key of ONNX sha256 + TensorRT version + GPU compute capability + precision +
  profiles: the same graph on the same GPU and TensorRT is never built twice.

TensorRT is imported lazily: without it, ``--format trt`` stops before the (slow) export with the install hint.
Not exercised on the machines this was written on (no GPU, no TensorRT wheels), int8 included; tests are marked
``tensorrt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from synergy.export.errors import ExportError
from synergy.runtime.manifest import TensorSpec

INSTALL_HINT = "pip install 'synergy-clip[tensorrt]' (TensorRT >= 10 and cuda-python; needs an NVIDIA GPU and driver)"
# TensorRT layer types kept in float32 by weakly typed (TensorRT 10) fp16 builds; names resolved lazily
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
FP32_UNARY_OPS = ("EXP", "LOG", "SQRT", "RECIP")


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of the engines' optimisation profile (and Triton's max_batch_size / preferred batch)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(
                f"batch profile needs 1 <= min <= opt <= max, got min={self.min}, opt={self.opt}, max={self.max}"
            )


def import_tensorrt():
    """-> the ``tensorrt`` module, or an ExportError that says what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise ExportError(
            f"TensorRT engines need the TensorRT Python package (not installed): {INSTALL_HINT}"
        ) from error
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise ExportError(f"TensorRT {tensorrt.__version__} is too old; Synergy builds engines with TensorRT >= 10")
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def compute_capability() -> str:
    """The current CUDA device's compute capability, e.g. "9.0"; engines only run on the GPU kind they were
    built for."""
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "TensorRT engines are built on the GPU that will run them, and no CUDA device is visible; export ONNX "
            "(--format onnx) here and build engines on the GPU machine"
        )
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def input_profiles(inputs: tuple[TensorSpec, ...], batch: BatchProfile, max_length: int, clip_samples: int) -> dict:
    """input name -> (min, opt, max) shapes for the one optimisation profile."""
    ranges = {"batch": (batch.min, batch.opt, batch.max), "length": (1, max_length, max_length)}
    ranges["samples"] = (clip_samples, clip_samples, clip_samples)
    profiles = {}
    for spec in inputs:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in spec.shape]
        profiles[spec.name] = tuple(tuple(dim[k] for dim in dims) for k in range(3))
    return profiles


def engine_key(onnx_sha256: str, trt_version: str, capability: str, precision: str, profiles: dict) -> str:
    """What makes an engine reusable: the graph, the TensorRT version, the GPU kind, precision and profiles."""
    payload = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "compute_capability": capability,
        "precision": precision,
        "profiles": {name: [list(shape) for shape in shapes] for name, shapes in sorted(profiles.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "synergy" / "tensorrt"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pin_fp32_layers(trt, network, fp32_nodes: Collection[str]) -> int:
    """Weakly typed fp16 builds: ask for float32 on the layers that overflow or lose the signal in half. The ONNX
    parser names a layer after its node; only exact names are matched (a prefix rule would also catch
    ``node_div_2`` for ``node_div``), so a helper layer the parser adds under another name may stay fp16: the
    fp16 verification of the engine then fails the export rather than shipping it."""
    layer_types = {getattr(trt.LayerType, n) for n in FP32_LAYER_TYPES if hasattr(trt.LayerType, n)}
    unary = {getattr(trt.UnaryOperation, n) for n in FP32_UNARY_OPS if hasattr(trt.UnaryOperation, n)}
    names = set(fp32_nodes)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        keep = layer.type in layer_types or layer.name in names
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            keep = keep or layer.op in unary
        elif layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            keep = keep or layer.op == trt.ElementWiseOperation.POW
        if not keep:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in (trt.float32, trt.float16):
                layer.set_output_type(output, trt.float32)
        pinned += 1
    return pinned


def build_engine(
    trt,
    onnx_path: Path,
    plan_path: Path,
    *,
    onnx_sha256: str,
    precision: str,
    profiles: dict,
    fp32_nodes: Collection[str] = (),
    capability: str,
    cache: Path | None = None,
) -> dict:
    """Build (or take from the engine cache) the engine of ``onnx_path`` and write it to ``plan_path``.

    ``onnx_path`` is the float32 graph on TensorRT 10 and the float16 graph on TensorRT 11 for fp16 engines, and
    the static QDQ graph for int8 ones.
    Returns what the manifest records: engine key, TensorRT version, compute capability, profiles, cache hit.
    """
    cache = cache or cache_dir()
    strongly_typed = tensorrt_major(trt) >= 11 or precision == "int8"  # QDQ graphs: explicit quantization
    key = engine_key(onnx_sha256, trt.__version__, capability, precision, profiles)
    info = {
        "engine_key": key,
        "tensorrt": trt.__version__,
        "compute_capability": capability,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
        "source": Path(onnx_path).name,
    }
    cached = cache / "engines" / f"{key}.plan"
    if cached.is_file():
        plan_path.write_bytes(cached.read_bytes())
        return {**info, "from_cache": True}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weights relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls miss the fp32 tolerance; fp16 engines do not use it
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        info["fp32_layers"] = _pin_fp32_layers(trt, network, fp32_nodes)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    timing_path = cache / "timing.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build {Path(onnx_path).name}; see its log above")
    engine = bytes(serialized)
    plan_path.write_bytes(engine)
    _write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
    _write_atomic(cached, engine)
    return {**info, "from_cache": False}
