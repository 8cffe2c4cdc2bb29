"""GPU backends on the tiny bundle: native TensorRT engines built from its ONNX graphs, and onnxruntime's CUDA/TensorRT
execution providers. Both must give the CPU embeddings. They skip, with the reason, on machines without them.

The TensorRT tower's own logic (buffers, batch splitting, the lock shared by run and close) also runs on CPU against
a fake TensorRT + CUDA runtime whose "device memory" is host memory that is really freed: a launch on a freed buffer
fails there as it would on the GPU."""

import ctypes
import dataclasses
import hashlib
import shutil
import threading

import numpy as np
import pytest

from synergy.runtime import Runtime, tensorrt_backend
from synergy.runtime.bundle import load_manifest, sha256_file, write_manifest
from synergy.runtime.errors import BackendError, BundleError
from synergy.runtime.manifest import TensorSpec, TowerSpec

from .conftest import EMBED_DIM, SAMPLE_RATE, picture, tone
from .test_hostile_bundles import record_hashes


def _inputs():
    return {
        "audio": [(tone(0.2, freq=300), SAMPLE_RATE), (tone(1.3, freq=900), SAMPLE_RATE)],
        "image": [picture(40, 60, 1), picture(90, 37, 2), picture(37, 37, 3)],
        "text": ["a dog barking in the rain", "piano", ""],
    }


def _embed_all(runtime) -> dict:
    inputs = _inputs()
    return {
        "audio": runtime.embed_audio(inputs["audio"]),
        "image": runtime.embed_image(inputs["image"]),
        "text": runtime.embed_text(inputs["text"]),
    }


def _build_engines(bundle, max_batch: int = 8) -> None:
    """Build one ``<tower>.plan`` per ONNX graph (fp32, TF32 off, batch 1..max_batch) and list them in the
    manifest beside the ONNX files."""
    trt = pytest.importorskip(
        "tensorrt", reason="needs the TensorRT Python package (pip install 'synergy-clip[tensorrt]')"
    )
    manifest = load_manifest(bundle)
    logger = trt.Logger(trt.Logger.WARNING)
    files = dict(manifest.files)
    for spec in manifest.towers.values():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse((bundle / spec.file).read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 math, so the comparison with the CPU stays tight
        profile = builder.create_optimization_profile()
        for tensor in spec.inputs:
            low = [1 if isinstance(d, str) else d for d in tensor.shape]
            high = [max_batch, *(16 if isinstance(d, str) else d for d in tensor.shape[1:])]
            profile.set_shape(tensor.name, low, high, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        assert plan is not None, "TensorRT could not build the engine"
        name = spec.file.replace(".onnx", ".plan")
        (bundle / name).write_bytes(bytes(plan))
        files[name] = sha256_file(bundle / name)
    write_manifest(bundle, dataclasses.replace(manifest, files=files))


@pytest.mark.requires_cuda
@pytest.mark.tensorrt
def test_native_tensorrt_engines_match_cpu(bundle_copy, tiny_bundle):
    with Runtime.open(tiny_bundle[0], threads=1) as cpu:
        expected = _embed_all(cpu)
    _build_engines(bundle_copy)
    # batch_size above the engines' max batch: the backend splits batches to fit the profile
    with Runtime.open(bundle_copy, backend="tensorrt", device="cuda", batch_size=32) as gpu:
        got = _embed_all(gpu)
    for modality, vectors in expected.items():
        np.testing.assert_allclose(got[modality], vectors, atol=1e-4, err_msg=modality)


@pytest.mark.requires_cuda
@pytest.mark.tensorrt
def test_engine_only_bundle_selects_tensorrt_automatically(bundle_copy):
    _build_engines(bundle_copy)
    manifest = load_manifest(bundle_copy)
    towers = {m: dataclasses.replace(t, file=t.file.replace(".onnx", ".plan")) for m, t in manifest.towers.items()}
    for spec in manifest.towers.values():
        (bundle_copy / spec.file).unlink()
    files = {k: v for k, v in manifest.files.items() if not k.endswith(".onnx")}
    write_manifest(bundle_copy, dataclasses.replace(manifest, towers=towers, files=files, backend="tensorrt"))
    with Runtime.open(bundle_copy, device="cuda") as runtime:
        assert runtime.backend == "tensorrt"
        assert runtime.embed_text(["dog"]).shape == (1, manifest.embed_dim)


@pytest.mark.requires_cuda
def test_onnxruntime_gpu_providers_match_cpu(tiny_bundle, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    with Runtime.open(bundle, threads=1) as cpu:
        expected = _embed_all(cpu)
    with Runtime.open(bundle, device="cuda") as gpu:
        got = _embed_all(gpu)
        assert all(p[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider") for p in gpu.providers.values())
    for modality, vectors in expected.items():
        np.testing.assert_allclose(got[modality], vectors, atol=2e-3, err_msg=modality)  # TF32 convolutions on GPU


# --- the TensorRT tower on CPU, against fakes -------------------------------------------------------------------------


class FakeCudart:
    """cuda-python's runtime calls as the tower uses them; device memory is a dict of bytearrays, freed for real."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.events: list[str] = []
        self._next = 1

    def cudaStreamCreate(self):
        return 0, "stream"

    def cudaMalloc(self, nbytes):
        pointer, self._next = self._next, self._next + 1
        self.memory[pointer] = bytearray(nbytes)
        return 0, pointer

    def cudaFree(self, pointer):
        self.events.append("free")
        del self.memory[pointer]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)  # KeyError: a freed buffer
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        self.events.append("destroy stream")
        return (0,)

    def cudaGetErrorString(self, error):
        return 0, b"fake error"


class FakeContext:
    """An engine computing y = 2 x, x: [batch, 4] float32; `before_execute` lets a test hold a batch in flight."""

    def __init__(self, cudart):
        self.cudart, self.shapes, self.addresses = cudart, {}, {}
        self.before_execute = lambda: None

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream):
        self.before_execute()
        memory = self.cudart.memory
        x = np.frombuffer(bytes(memory[self.addresses["x"]]), np.float32)  # KeyError: launched on a freed buffer
        memory[self.addresses["y"]][: x.nbytes] = (2 * x).tobytes()
        self.cudart.events.append("executed")
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, cudart):
        self.context = FakeContext(cudart)

    def create_execution_context(self):
        return self.context

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 4), (4, 4), (8, 4)]  # min, opt, max: batches of up to 8


class FakeTensorRT:
    __version__ = "10.0.0"

    class TensorIOMode:
        INPUT = "input"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, cudart):
        self.engine = FakeEngine(cudart)
        self.deserialized: list[bytes] = []
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.deserialized.append(bytes(data))
                return fake.engine

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


class WatchedLock:
    """A lock that records that a thread had to wait for it (a deterministic "close is blocked" signal)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.waiting.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


@pytest.fixture
def fake_tower(monkeypatch, tmp_path):
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: (trt, cudart))
    (tmp_path / "tower.plan").write_bytes(b"engine")
    spec = TowerSpec(
        "tower.plan", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),)
    )
    tower = tensorrt_backend.TensorRTTower(tmp_path / "tower.plan", spec, "cuda")
    return tower, cudart, trt.engine.context


def test_tensorrt_tower_runs_and_splits_batches_over_the_profile(fake_tower):
    tower, _, _ = fake_tower
    x = np.arange(40, dtype=np.float32).reshape(10, 4)  # 10 rows, the profile takes 8: two launches
    np.testing.assert_array_equal(tower.run({"x": x}), 2 * x)


def test_tensorrt_close_waits_for_a_batch_in_flight_and_closed_stays_closed(fake_tower):
    """close() used to free the device buffers without the tower's lock: with a batch inside execute_async_v3 in
    another thread, the engine then ran on freed memory. Now close waits for the batch, and a run after close is a
    BackendError instead of a launch on freed buffers."""
    tower, cudart, context = fake_tower
    tower._lock = lock = WatchedLock()
    entered, release = threading.Event(), threading.Event()

    def hold_the_batch():
        entered.set()
        assert release.wait(timeout=60), "the test never released the batch"

    context.before_execute = hold_the_batch
    x = np.ones((3, 4), np.float32)
    results, errors = [], []

    def run():
        try:
            results.append(tower.run({"x": x}))
        except Exception as error:  # reported below, with the events
            errors.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert entered.wait(timeout=60), "run never reached execute_async_v3"
    closer = threading.Thread(target=tower.close, daemon=True)
    closer.start()
    # wait until close either blocks on the lock (the fix) or has already returned (the bug); not a timing assertion
    while not lock.waiting.wait(timeout=0.01) and closer.is_alive():
        pass
    assert "free" not in cudart.events, "close freed the buffers while a batch was in flight"
    release.set()
    runner.join(timeout=60)
    closer.join(timeout=60)
    assert not errors, errors
    np.testing.assert_array_equal(results[0], 2 * x)
    assert cudart.events == ["executed", "free", "free", "destroy stream"], cudart.events
    assert not cudart.memory  # every buffer freed once
    context.before_execute = lambda: None
    with pytest.raises(BackendError, match="closed"):
        tower.run({"x": x})
    tower.close()  # closing twice is fine
    assert cudart.events.count("free") == 2


def test_tensorrt_tower_deserializes_the_bytes_it_is_given(fake_tower, monkeypatch, tmp_path):
    _, cudart, _ = fake_tower
    trt = FakeTensorRT(cudart)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: (trt, cudart))
    spec = TowerSpec("t.plan", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),))
    tensorrt_backend.TensorRTTower(tmp_path / "absent.plan", spec, "cuda", b"verified engine")  # the path is not read
    assert trt.deserialized == [b"verified engine"]


def test_runtime_hands_tensorrt_the_engine_bytes_it_hashed(bundle_copy, monkeypatch):
    """The engine used to be hashed at open, hashed again at load, then re-read by path for TensorRT (a file swapped
    in between was not caught). Now each engine is read once, hashed, and those bytes are deserialized."""
    manifest = load_manifest(bundle_copy)
    files = dict(manifest.files)
    for modality, spec in manifest.towers.items():
        plan = spec.file.replace(".onnx", ".plan")
        (bundle_copy / plan).write_bytes(f"{modality} engine".encode())
        files[plan] = sha256_file(bundle_copy / plan)
    write_manifest(bundle_copy, dataclasses.replace(manifest, files=files))
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: (None, None))
    loaded = {}

    class Tower:  # records what the runtime hands the TensorRT tower; answers with unit vectors
        def __init__(self, path, spec, device, engine=None):
            loaded[path.name] = engine

        def run(self, feeds):
            return np.full((len(next(iter(feeds.values()))), EMBED_DIM), EMBED_DIM**-0.5, np.float32)

    monkeypatch.setattr(tensorrt_backend, "TensorRTTower", Tower)
    digests = record_hashes(monkeypatch)
    runtime = Runtime.open(bundle_copy, backend="tensorrt", device="cuda")
    runtime.load()
    assert loaded == {name: (bundle_copy / name).read_bytes() for name in ("image.plan", "text.plan", "audio.plan")}
    assert sorted(digests) == sorted(files.values()), "each file (ONNX sources at open, engines at load) hashed once"
    assert {hashlib.sha256(engine).hexdigest() for engine in loaded.values()} <= set(digests)

    loaded.clear()
    runtime = Runtime.open(bundle_copy, backend="tensorrt", device="cuda")
    (bundle_copy / "audio.plan").write_bytes(b"another engine")  # swapped after open: refused when it loads
    with pytest.raises(BundleError, match=r"audio.plan has changed since export"):
        runtime.load("audio")
    assert "audio.plan" not in loaded
