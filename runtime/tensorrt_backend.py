"""One tower as a native TensorRT engine (``*.plan``), through the TensorRT 10+ Python API and cuda-python.

Imports are lazy: ``import synergy.runtime`` works without TensorRT; asking for this backend without it is a
``BackendError`` that names the extra to install. An execution context is not thread-safe, so ``run`` holds the
tower's lock; batches larger than the engine's optimisation profile allows are split. ``close`` takes the same lock,
so it waits for a batch in flight instead of freeing the device buffers under it, and a closed tower stays closed:
a later ``run`` is a ``BackendError``, never a launch on freed memory.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .errors import BackendError
from .manifest import BundleError, TowerSpec

INSTALL_HINT = "pip install 'synergy-clip[tensorrt]' (TensorRT >= 10 and cuda-python; needs an NVIDIA GPU and driver)"


def import_tensorrt():
    """-> (tensorrt module, cuda runtime bindings), or a BackendError that says what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendError(f"backend='tensorrt' needs the TensorRT Python package: {INSTALL_HINT}") from error
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise BackendError(f"TensorRT {tensorrt.__version__} is too old; the runtime uses the TensorRT 10 API")
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as error:
            raise BackendError(f"backend='tensorrt' needs cuda-python: {INSTALL_HINT}") from error
    return tensorrt, cudart


def _check(cudart, result):
    """cuda-python calls return (error, *values): raise on error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        raise RuntimeError(f"CUDA error {error}: {text.decode() if isinstance(text, bytes) else text}")
    return values[0] if len(values) == 1 else values


class TensorRTTower:
    """``run(feeds) -> embedding [B, D]`` for one tower's serialized TensorRT engine."""

    def __init__(self, path: Path, spec: TowerSpec, device: str, engine: bytes | None = None):
        """``engine``: the serialized engine, already read and verified by the caller (``Runtime`` passes the bytes
        it hashed, so TensorRT deserializes exactly those); None: read from ``path``."""
        if device != "cuda":
            raise BackendError("the TensorRT backend runs on device='cuda' only; use backend='onnxruntime' on CPU")
        trt, cudart = import_tensorrt()
        self._trt, self._cudart = trt, cudart
        self._lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine if engine is not None else Path(path).read_bytes())
        if self.engine is None:
            raise BundleError(
                f"{path}: TensorRT {trt.__version__} cannot load this engine (built by another TensorRT version or "
                "for another GPU); rebuild the engines on this machine with `synergy export`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = spec.outputs[0].name
        if sorted(self.inputs) != sorted(t.name for t in spec.inputs) or self.output_name not in names:
            raise BundleError(f"{path}: engine tensors {names} do not match the manifest; rebuild the bundle")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # the largest batch every input's profile 0 accepts
        self.max_batch = min(self.engine.get_tensor_profile_shape(n, 0)[2][0] for n in self.inputs)
        self._stream = _check(cudart, cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._closed = False  # guarded by _lock, with the stream and the buffers

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                _check(self._cudart, self._cudart.cudaFree(pointer))
            pointer = _check(self._cudart, self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        batch = next(iter(feeds.values())).shape[0]
        if batch > self.max_batch:
            parts = [
                self.run({k: v[i : i + self.max_batch] for k, v in feeds.items()})
                for i in range(0, batch, self.max_batch)
            ]
            return np.concatenate(parts)
        cudart = self._cudart
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            if self._closed:
                raise BackendError("this TensorRT tower is closed (Runtime.close() was called); open the bundle again")
            for name in self.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                if not self.context.set_input_shape(name, array.shape):
                    raise ValueError(f"TensorRT engine rejects {name} of shape {array.shape} (outside its profile)")
                pointer = self._device_buffer(name, array.nbytes)
                copy = cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self._stream)
                _check(cudart, copy)
                self.context.set_tensor_address(name, pointer)
            output = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), self.dtypes[self.output_name])
            pointer = self._device_buffer(self.output_name, output.nbytes)
            self.context.set_tensor_address(self.output_name, pointer)
            if not self.context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
            _check(cudart, cudart.cudaMemcpyAsync(output.ctypes.data, pointer, output.nbytes, to_host, self._stream))
            _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        return output.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free the device buffers and the stream once no batch is in flight (idempotent)."""
        with self._lock:  # a run in another thread finishes its batch (synchronised) before its buffers go
            if self._closed:
                return
            self._closed = True
            for pointer, _ in self._buffers.values():
                self._cudart.cudaFree(pointer)
            self._buffers.clear()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
                self._stream = None
