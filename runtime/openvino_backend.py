"""One tower as an OpenVINO compiled model on the CPU: the bundle's verified ONNX bytes, compiled in memory.

OpenVINO reads our ONNX graphs as they are (no conversion step, no file it re-reads) and compiles them for this CPU's
instruction set: oneDNN kernels with AVX-512, VNNI and, with the ``bf16`` precision hint, bfloat16 matmuls on
AVX-512 BF16 / AMX. Two registry entries use it (``towers.BACKENDS``): ``openvino`` (f32: the precision the
bundle was verified at) and ``openvino-bf16`` (bfloat16 inside the graph, float32 in and out: about 3 significant
digits per activation, cosine to f32 >= 0.9999 on the tests' tiny bundle; a CPU without bf16 runs it as f32).

An optional extra (``pip install 'synergy-clip[openvino]'``), CPU only, and torch-free like the rest of the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BackendError
from .manifest import BundleError, TowerSpec

INSTALL_HINT = "pip install 'synergy-clip[openvino]' (or use backend='onnxruntime')"
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16"}
_OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32"}


def import_openvino():
    """The ``openvino`` module, or a ``BackendError`` that says what to install."""
    try:
        import openvino
    except ImportError as error:
        raise BackendError(f"backend='openvino' needs the OpenVINO package: {INSTALL_HINT}") from error
    return openvino


def check_device(device: str) -> None:
    if device != "cpu":
        raise BackendError(
            "backend='openvino' runs on device='cpu' here; on NVIDIA GPUs use backend='tensorrt' or 'onnxruntime'"
        )
    import_openvino()  # fail now, with the install hint, rather than on the first batch


class OpenVINOTower:
    """``run(feeds) -> embedding [B, D]`` for one tower's ONNX graph, compiled by OpenVINO for the CPU."""

    def __init__(
        self, path: Path, spec: TowerSpec, graph: bytes, external_data: dict, threads: int | None, precision: str
    ):
        """``graph``: the graph's bytes, already read and verified by the caller. ``precision``: "f32" or "bf16"
        (OpenVINO's inference precision hint). ``threads``: CPU threads (None: OpenVINO's default, all cores)."""
        ov = import_openvino()
        if external_data:
            raise BackendError(
                f"{path}: backend='openvino' reads single-file graphs from memory, and this graph keeps its weights "
                "in a side file; re-export without --external-data, or use backend='onnxruntime'"
            )
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            model = core.read_model(model=graph)
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BundleError(f"{path}: OpenVINO cannot compile this graph ({problem[:500]}); re-export it") from error
        self.providers = [f"OpenVINO {ov.__version__} CPU ({precision})"]
        # what the compiled model runs at: "bf16" asked of a CPU without bfloat16 instructions compiles as "f32"
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._check_io(path, spec)
        self.output = self.compiled.output(spec.outputs[0].name)

    def _check_io(self, path: Path, spec: TowerSpec) -> None:
        inputs = {port.get_any_name(): port for port in self.compiled.inputs}
        wanted = [t.name for t in spec.inputs]
        if sorted(inputs) != sorted(wanted):
            raise BundleError(f"{path}: graph inputs are {sorted(inputs)} but the manifest says {wanted}; re-export it")
        outputs = {name for port in self.compiled.outputs for name in port.get_names()}
        if spec.outputs[0].name not in outputs:
            raise BundleError(
                f"{path}: graph outputs are {sorted(outputs)} but the manifest says {spec.outputs[0].name!r}; "
                "re-export it"
            )
        for tensor in spec.inputs:
            got = inputs[tensor.name].get_element_type().get_type_name()
            if _OV_TYPES.get(got, got) != tensor.dtype:
                raise BundleError(
                    f"{path}: graph input {tensor.name} is {got} but the manifest says {tensor.dtype}; re-export it"
                )

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # a request per call: towers are shared by the server's threads, and a request holds one call's buffers
        request = self.compiled.create_infer_request()
        return np.array(request.infer(feeds)[self.output], dtype=np.float32)
