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
_ORT_TYPES = {"float32": "float", "float16": "float16", "int64": "int64", "int32": "int32", "bfloat16": "bfloat16"}


def trt_cache_dir(graph_key: str = "") -> Path:
    """Where the TensorRT EP keeps the engines it builds for one graph (the bundle folder may be read-only): a
    folder per ``graph_key``, the sha256 of the graph and its weights. The EP names its engines by a hash of the
    graph's structure and names, not its weights, so one folder shared by all bundles would run one bundle's engine
    for another of the same preset, past every sha256 check. ("": the shared root, never used by ``Runtime``.)"""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synergy" / "ort-tensorrt"
    return root / graph_key if graph_key else root


def select_providers(available: list[str], device: str, tensorrt_options: dict | None = None) -> list:
    """Execution providers for ``device`` among those this onnxruntime build has, best first."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        Path((tensorrt_options or {}).get("trt_engine_cache_path") or trt_cache_dir()).mkdir(
            parents=True, exist_ok=True
        )
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


def tensorrt_profile(spec: TowerSpec, max_batch: int, max_dim: int, graph_key: str = "") -> dict:
    """TensorRT EP options: one optimisation profile covering batch 1..max_batch and every other dynamic dim
    1..max_dim (the text length, the clip samples), so the EP builds its engine once rather than for every new
    shape; engines and timing cached on disk in the graph's own folder, ``trt_cache_dir(graph_key)``. A pure
    function: no GPU needed to build or check these options."""

    def shape(tensor, batch: int, low: bool) -> str:
        dims = [batch] + [d if isinstance(d, int) else (1 if low else max_dim) for d in tensor.shape[1:]]
        return f"{tensor.name}:" + "x".join(str(d) for d in dims)

    def profile(batch: int, low: bool) -> str:
        return ",".join(shape(t, batch, low) for t in spec.inputs)

    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(trt_cache_dir(graph_key)),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(trt_cache_dir(graph_key)),
        "trt_fp16_enable": spec.precision == "fp16",
        "trt_profile_min_shapes": profile(1, low=True),
        "trt_profile_opt_shapes": profile(max_batch, low=False),
        "trt_profile_max_shapes": profile(max_batch, low=False),
    }


class OnnxRuntimeTower:
    """``run(feeds) -> embedding [B, D]`` for one tower's ONNX graph."""

    def __init__(
        self,
        path: Path,
        spec: TowerSpec,
        device: str,
        threads: int | None,
        tensorrt_options: dict,
        graph: bytes | None = None,
        external_data: dict[str, bytes] | None = None,
    ):
        """``graph``: the graph's bytes, already read and verified by the caller (None: onnxruntime reads
        ``path``). ``external_data``: its external weights by location name; with ``graph``, onnxruntime is given
        these and no folder, so it reads nothing from disk (a location not among them is a load error)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: keep `synergy infer` output clean
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if graph is not None:
            # never empty: with a table, onnxruntime looks external weights up in it instead of on disk
            table = external_data or {"\0no-external-data": b"\0"}
            names = list(table)
            options.add_external_initializers_from_files_in_memory(
                names, list(table.values()), [len(table[n]) for n in names]
            )
        providers = select_providers(onnxruntime.get_available_providers(), device, tensorrt_options)
        source = graph if graph is not None else str(path)
        try:
            try:
                self.session = onnxruntime.InferenceSession(source, options, providers=providers)
            except Exception:
                if not isinstance(providers[0], tuple):
                    raise
                # the TensorRT EP is listed whenever onnxruntime-gpu is installed, even without TensorRT's libraries
                providers = providers[1:]
                self.session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            hint = " (external weights must be listed in manifest.json's files, beside the graph)" * (
                "xternal" in problem
            )
            if "opset" in problem.lower() or "Attention" in problem:  # `synergy export` writes opset 23 by default
                hint = (
                    f" (onnxruntime {onnxruntime.__version__}; a bundle at opset 23, the export's default, needs "
                    "onnxruntime >= 1.23: pip install -U onnxruntime, or export the bundle with --opset 18)"
                )
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({problem}){hint}; re-export it") from error
        self.providers = self.session.get_providers()
        if device == "cuda" and not set(GPU_PROVIDERS) & set(self.providers):
            raise BackendError(f"{path}: onnxruntime fell back to {self.providers}; check the CUDA installation")
        graph_inputs = [i.name for i in self.session.get_inputs()]
        wanted = [t.name for t in spec.inputs]
        if sorted(graph_inputs) != sorted(wanted):
            raise BundleError(f"{path}: graph inputs are {graph_inputs} but the manifest says {wanted}; re-export it")
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if spec.outputs[0].name not in graph_outputs:
            raise BundleError(
                f"{path}: graph outputs are {graph_outputs} but the manifest says {spec.outputs[0].name!r}; "
                "re-export it"
            )
        for tensor in self.session.get_inputs():
            want = next(t for t in spec.inputs if t.name == tensor.name)
            if tensor.type != f"tensor({_ORT_TYPES.get(want.dtype, want.dtype)})":
                raise BundleError(
                    f"{path}: graph input {tensor.name} is {tensor.type} but the manifest says {want.dtype}; "
                    "re-export it"
                )
        self.output_name = spec.outputs[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], feeds)[0]
