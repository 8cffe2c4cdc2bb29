"""One tower as an ONNX Runtime session.

Execution providers in priority order: on ``device="cuda"``, TensorRT EP, then CUDA EP, then CPU for the ops they
do not take; on ``device="cpu"``, CPU only. Asking for CUDA on an onnxruntime build without a GPU provider is an
error (a silent fall back to CPU would hide a 10-100x slow-down).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BackendError
from .manifest import BundleError, TowerSpec

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def trt_cache_dir() -> Path:
    """Where the TensorRT EP keeps the engines it builds (the bundle folder may be read-only)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "synergy" / "ort-tensorrt"


def select_providers(available: list[str], device: str, tensorrt_options: dict | None = None) -> list:
    """Execution providers for ``device`` among those this onnxruntime build has, best first."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        trt_cache_dir().mkdir(parents=True, exist_ok=True)
        providers.append(("TensorrtExecutionProvider", tensorrt_options or {}))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    if not providers:
        import onnxruntime

        raise BackendError(
            f"device='cuda' but onnxruntime {onnxruntime.__version__} here has only {available}; "
            "install the GPU build (pip uninstall onnxruntime && pip install onnxruntime-gpu) or use device='cpu'"
        )
    return [*providers, "CPUExecutionProvider"]


def tensorrt_profile(spec: TowerSpec, max_batch: int, max_dim: int) -> dict:
    """TensorRT EP options: one optimisation profile covering batch 1..max_batch and every other dynamic dim
    1..max_dim (the text length, the clip samples), so the EP builds its engine once rather than for every new
    shape; engines cached on disk."""

    def shape(tensor, batch: int, low: bool) -> str:
        dims = [batch] + [d if isinstance(d, int) else (1 if low else max_dim) for d in tensor.shape[1:]]
        return f"{tensor.name}:" + "x".join(str(d) for d in dims)

    def profile(batch: int, low: bool) -> str:
        return ",".join(shape(t, batch, low) for t in spec.inputs)

    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(trt_cache_dir()),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": spec.precision == "fp16",
        "trt_profile_min_shapes": profile(1, low=True),
        "trt_profile_opt_shapes": profile(max_batch, low=False),
        "trt_profile_max_shapes": profile(max_batch, low=False),
    }


class OnnxRuntimeTower:
    """``run(feeds) -> embedding [B, D]`` for one tower's ONNX graph."""

    def __init__(self, path: Path, spec: TowerSpec, device: str, threads: int | None, tensorrt_options: dict):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: keep `synergy infer` output clean
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = select_providers(onnxruntime.get_available_providers(), device, tensorrt_options)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:
            if not isinstance(providers[0], tuple):
                raise BundleError(f"{path}: onnxruntime cannot load this graph ({error}); re-export it") from error
            # the TensorRT EP is listed whenever onnxruntime-gpu is installed, even without TensorRT's libraries
            providers = providers[1:]
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        if device == "cuda" and not set(GPU_PROVIDERS) & set(self.providers):
            raise BackendError(f"{path}: onnxruntime fell back to {self.providers}; check the CUDA installation")
        graph_inputs = [i.name for i in self.session.get_inputs()]
        wanted = [t.name for t in spec.inputs]
        if sorted(graph_inputs) != sorted(wanted):
            raise BundleError(f"{path}: graph inputs are {graph_inputs} but the manifest says {wanted}; re-export it")
        self.output_name = spec.outputs[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], feeds)[0]
