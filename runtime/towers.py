"""Towers: a bundle's verified bytes -> a loaded and probed tower per modality, through a registry of backends.

``BACKENDS`` maps each backend's name to how it checks this machine (``check(device)``: a ``BackendError`` naming
what to install) and how it loads one tower (``load(TowerSource)`` -> an object with ``run(feeds) -> [B, D]``).
The engines are ``onnxruntime_backend.py``, ``openvino_backend.py`` (CPU; f32 or bf16 inside the graph) and
``tensorrt_backend.py``, imported on first use; ``choose_backend`` resolves "auto" by what was measured fastest
and what the bundle's export verified.
``Towers`` holds one open bundle's per-bundle caches: the towers loaded so far (each on first use, probed once at
the largest input the manifest allows) and the tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import (
    ENGINE_SUFFIXES,
    MAX_GRAPH_BYTES,
    MAX_TOKENIZER_BYTES,
    external_data,
    external_data_files,
    read_bundle_file,
    tower_file,
)
from .errors import BackendError, InferUsageError, RuntimeClosed
from .manifest import BundleError, Manifest, TowerSpec
from .text import load_tokenizer

DEVICES = ("cpu", "cuda")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: the default thread count of every engine. A second
    hyper-thread of a core adds no matmul throughput, and the engines' own defaults count the whole machine's cores,
    not the ones a container or ``taskset`` grants (so they oversubscribe there)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs topology (macOS, Windows, some sandboxes): count logical CPUs
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


@dataclass(frozen=True)
class TowerSource:
    """What a backend gets to load one tower: the verified bytes (never a path to re-read) and how to run them."""

    path: Path  # names the file in messages only
    spec: TowerSpec
    data: bytes  # the graph or engine, as hashed
    external_data: dict  # an ONNX graph's external weights by location name, as hashed ({} for engines)
    device: str
    threads: int | None
    max_batch: int
    max_dim: int  # the largest dynamic dim (clip samples, image side, text length), for the TensorRT EP's profile
    graph_key: str  # the sha256 of the graph and its weights: keys on-disk engine caches (``Towers.graph_key``)


@dataclass(frozen=True)
class Backend:
    """One way to run towers: ``check(device)`` raises ``BackendError`` unless it runs here; ``load(source)``."""

    runs_engines: bool  # TensorRT engines (``*.plan``) rather than ONNX graphs
    check: Callable[[str], None]
    load: Callable[[TowerSource], object]


def _check_onnxruntime(device: str) -> None:
    if device == "cuda":
        import onnxruntime

        from .onnxruntime_backend import select_providers

        select_providers(onnxruntime.get_available_providers(), device)


def tensorrt_ep_options(source: TowerSource) -> dict:
    """The onnxruntime TensorRT EP's options for one tower (its profile; its engine cache keyed by the graph)."""
    from .onnxruntime_backend import tensorrt_profile

    return tensorrt_profile(source.spec, source.max_batch, source.max_dim, source.graph_key)


def _load_onnxruntime(source: TowerSource):
    from .onnxruntime_backend import OnnxRuntimeTower

    options = tensorrt_ep_options(source)
    return OnnxRuntimeTower(
        source.path, source.spec, source.device, source.threads, options, source.data, source.external_data
    )


def _check_tensorrt(device: str) -> None:
    from .tensorrt_backend import import_tensorrt

    if device != "cuda":
        raise BackendError("backend='tensorrt' runs on device='cuda' only; use backend='onnxruntime' on CPU")
    import_tensorrt()  # fail now, with the install hint, rather than on the first batch


def _load_tensorrt(source: TowerSource):
    from .tensorrt_backend import TensorRTTower

    return TensorRTTower(source.path, source.spec, source.device, source.data)  # the bytes that were hashed


def _check_openvino(device: str) -> None:
    from .openvino_backend import check_device

    check_device(device)


def _openvino_loader(precision: str) -> Callable[[TowerSource], object]:
    def load(source: TowerSource):
        from .openvino_backend import OpenVINOTower

        return OpenVINOTower(source.path, source.spec, source.data, source.external_data, source.threads, precision)

    return load


BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend(runs_engines=False, check=_check_onnxruntime, load=_load_onnxruntime),
    "openvino": Backend(runs_engines=False, check=_check_openvino, load=_openvino_loader("f32")),
    "openvino-bf16": Backend(runs_engines=False, check=_check_openvino, load=_openvino_loader("bf16")),
    "tensorrt": Backend(runs_engines=True, check=_check_tensorrt, load=_load_tensorrt),
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def check_choice(backend: str, device: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"backend {backend!r} is not one of {BACKEND_CHOICES}")
    if device not in DEVICES:
        raise BackendError(f"device {device!r} is not one of {DEVICES}")


# "auto" leaves bundles whose graphs total less than this on onnxruntime, whatever their OpenVINO record says.
# OpenVINO's start-up (import 0.28-0.37 s against onnxruntime's 0.15-0.18, plus compiling) is paid by every process,
# and small towers never earn it back in a one-shot call: on the demo bundle (7.6 MB of graphs), `synergy infer` on its
# 320 val clips took 0.8 s on OpenVINO bf16 and 0.5 s on onnxruntime, one clip 0.75 s against 0.33 s. The base audio
# tower (347 MB) gains 0.5 s per clip on OpenVINO from the first one; all-MiniLM-L6-v2 (90 MB) about 12 ms a sentence.
# A server pays the start-up once: `synergy serve` opens its bundles long-lived (``Runtime.open(long_lived=True)``),
# without this floor.
OPENVINO_MIN_GRAPH_BYTES = 64 << 20


def choose_backend(backend: str, device: str, manifest: Manifest, graph_bytes: int | None = None) -> str:
    """ "auto" -> the engines of a TensorRT bundle on ``device="cuda"``; on the CPU, OpenVINO with the bf16 hint
    where its export verified it, the openvino extra is installed (:func:`runs_best_on_openvino`) and the bundle's
    graphs (``graph_bytes``, their total size at fp32; None: not considered) reach ``OPENVINO_MIN_GRAPH_BYTES``; else
    onnxruntime. The backend is checked on this machine (``BackendError`` now, with the install hint, rather than on
    the first batch)."""
    if backend == "auto":
        engines = [Path(t.file).suffix in ENGINE_SUFFIXES for t in manifest.towers.values()]
        big_enough = graph_bytes is None or graph_bytes >= OPENVINO_MIN_GRAPH_BYTES
        if engines and all(engines) and device == "cuda":
            backend = "tensorrt"
        elif device == "cpu" and big_enough and runs_best_on_openvino(manifest):
            backend = "openvino-bf16"
        else:
            backend = "onnxruntime"
    BACKENDS[backend].check(device)
    return backend


# an int8 graph's file is about a quarter of the fp32 graph it was quantized from, and its work is that graph's
FP32_BYTES_PER_BYTE = {"int8": 4, "fp16": 2}


def graph_bytes(bundle: Path, manifest: Manifest) -> int:
    """Total size of the towers' graph (or engine) files at fp32, the size ``OPENVINO_MIN_GRAPH_BYTES`` weighs: an
    int8 tower's file counts four times (the fp32 graph it stands for; the export's default int8 method weighs those,
    ``export.bundle.resolved_int8_method``), an fp16 one's twice; lstat's sizes (a missing file counts 0: the checks
    that follow name it)."""
    total = 0
    for tower in manifest.towers.values():
        with contextlib.suppress(OSError):
            total += (bundle / tower.file).lstat().st_size * FP32_BYTES_PER_BYTE.get(tower.precision, 1)
    return total


def runs_best_on_openvino(manifest: Manifest) -> bool:
    """Whether "auto" runs this bundle on OpenVINO with the bf16 precision hint (on the CPU): single-file ONNX graphs,
    the openvino extra installed (looked up, not imported: `synergy infer` on other bundles does not pay for it), and

    - the manifest's ``extra["openvino_bf16"]`` record, where the export wrote one: its check of these graphs on
      OpenVINO bf16 against PyTorch fp32 passed (int8's gate by default, min cosine 0.99 and 99% top-1 agreement;
      ``export/bundle.py``). A recorded failure keeps onnxruntime, even for a static int8 bundle;
    - without a record (bundles of earlier exports, or exported where OpenVINO was not installed): a static (QDQ) int8
      bundle only, the rule before the record existed: its export was gated at int8's 0.99 already, and the bf16 hint
      moved its min cosine little (0.99881 -> 0.99866); an fp32 bundle was verified at cosine 0.9999, which an
      unchecked bf16 run could miss, so it stays on onnxruntime.

    Why OpenVINO bf16: on this CPU (Intel Xeon with AMX, 2 cores), base audio tower, one interleaved run at d5409c5
    (benchmarks/README.md, "Engines and precisions on the base audio tower"), batch 1 / 8: OpenVINO with the bf16
    hint ran our plain fp32 graph at 6.6 / 7.2 clips/s and the static int8 graph at 8.7 / 9.5, against onnxruntime
    fp32 1.5 / 1.5 and torch bf16 autocast 3.9 / 5.8, at min cosines 0.99994 and 0.99896 to torch fp32. Its price is
    start-up (about 0.4 s more than onnxruntime for a one-shot `synergy infer`)."""
    graphs = [t.file for t in manifest.towers.values()]
    if not graphs or any(Path(g).suffix != ".onnx" or external_data_files(g, manifest) for g in graphs):
        return False  # OpenVINO reads graphs from memory, one file each
    record = manifest.extra.get("openvino_bf16")
    if record is not None:
        verified = isinstance(record, dict) and record.get("passed") is True
    else:
        int8 = manifest.extra.get("int8")
        verified = manifest.precision == "int8" and isinstance(int8, dict) and int8.get("method") == "static"
    return verified and importlib.util.find_spec("openvino") is not None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def text_input_names(spec: TowerSpec) -> tuple[str, str]:
    """(ids, mask) input names: by the contract's names when used, else the manifest's order."""
    names = [t.name for t in spec.inputs]
    if len(names) != 2:
        raise BundleError(f"the text tower has inputs {names}; expected token ids and an attention mask")
    masks = [n for n in names if "mask" in n]
    if len(masks) == 1:
        return next(n for n in names if n != masks[0]), masks[0]
    return names[0], names[1]


class Towers:
    """The towers of one open bundle on one backend, loaded on first use and probed, and its tokenizer.
    Thread-safe: towers are shared; loading and closing hold the lock. Closed is closed (``RuntimeClosed``)."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        backend: str,
        device: str,
        threads: int | None,
        batch_size: int,
        trusted: bool,
    ):
        self.bundle, self.manifest, self.backend, self.device = bundle, manifest, backend, device
        self.threads, self.batch_size, self.trusted = threads, batch_size, trusted
        self._loaded: dict = {}
        self._tokenizer = None
        self._lock = threading.Lock()
        self._closed = False

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeClosed(f"{self.bundle}: this Runtime is closed; open the bundle again with Runtime.open")

    def get(self, modality: str):
        """The ``modality`` tower, loaded from verified bytes and probed on first use."""
        with self._lock:
            self.check_open()
            if modality in self._loaded:
                return self._loaded[modality]
            source = self.source(modality)
            tower = BACKENDS[self.backend].load(source)
            self._probe(modality, tower, source.path)
            self._loaded[modality] = tower
            return tower

    def source(self, modality: str) -> TowerSource:
        """What the backend's ``load`` gets for the ``modality`` tower: its file's bytes (and an ONNX graph's
        external weights), read once and checked against the manifest's sha256, and how to run them."""
        if modality not in self.manifest.towers:
            raise BundleError(f"{self.bundle}: this bundle has no {modality} tower; re-export it with one")
        backend, m = BACKENDS[self.backend], self.manifest
        path = tower_file(self.bundle, m, modality, backend.runs_engines)
        rel = path.relative_to(self.bundle).as_posix()
        largest = {
            "audio": round(m.audio.clip_seconds * m.audio.sample_rate),
            "image": m.image.size,
            "text": m.text.max_length,
        }
        data = read_bundle_file(self.bundle, rel, m, self.trusted, MAX_GRAPH_BYTES)
        weights = {} if backend.runs_engines else external_data(self.bundle, rel, m, self.trusted)
        key = self.graph_key(rel, data, weights)
        spec = m.towers[modality]
        return TowerSource(
            path,
            spec,
            data,
            weights,
            self.device,
            self.threads or (physical_cores() if self.device == "cpu" else None),
            self.batch_size,
            largest[modality],
            key,
        )

    def graph_key(self, rel: str, data: bytes, weights: dict[str, bytes]) -> str:
        """A graph's identity for on-disk engine caches: its sha256, combined with its external weights' when it
        has any. Taken from the manifest, where ``read_bundle_file`` checked it against these very bytes; a trusted
        bundle's listing may be stale, so its bytes are hashed here, on CUDA only (the one place such a cache is
        used)."""
        if self.trusted:
            if self.device != "cuda":
                return ""
            digests = [hashlib.sha256(data).hexdigest()] + [
                hashlib.sha256(weights[n]).hexdigest() for n in sorted(weights)
            ]
        else:
            digests = [self.manifest.files[rel]] + [
                self.manifest.files[r] for r in sorted(external_data_files(rel, self.manifest))
            ]
        if len(digests) == 1:
            return digests[0]
        return hashlib.blake2b(",".join(digests).encode(), digest_size=32).hexdigest()  # a key, not a file hash

    def tokenizer(self):
        """The bundle's tokenizer (read, verified and configured on first use)."""
        with self._lock:
            if self._tokenizer is None:
                spec = self.manifest.towers.get("text")
                length = spec.inputs[0].shape[1] if spec and len(spec.inputs[0].shape) > 1 else None
                fixed = length if isinstance(length, int) else None
                rel = self.manifest.tokenizer
                data = read_bundle_file(self.bundle, rel, self.manifest, self.trusted, MAX_TOKENIZER_BYTES)
                self._tokenizer = load_tokenizer(self.bundle / rel, self.manifest.text.max_length, fixed, data)
            return self._tokenizer

    def fixed_batch(self, modality: str) -> int | None:
        dim = self.manifest.towers[modality].inputs[0].shape[0] if modality in self.manifest.towers else None
        return dim if isinstance(dim, int) else None

    def run(self, modality: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One forward pass; pads the batch to the graph's static batch size if it has one. -> [B, D] float32."""
        batch = next(iter(feeds.values())).shape[0]
        fixed = self.fixed_batch(modality)
        if fixed is not None and batch < fixed:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed - batch, 0)]) for k, v in feeds.items()}
        tower = self.get(modality)
        try:
            out = tower.run(feeds)
        except (InferUsageError, BundleError, MemoryError):
            raise
        except Exception as error:  # inputs were checked and the graph passed its probe: the bundle is at fault
            raise BundleError(
                f"{self.bundle}: the {modality} graph failed on a batch of {batch}: {first_line(error)}; "
                "re-export the bundle"
            ) from error
        return np.asarray(out[:batch], dtype=np.float32)

    def _probe(self, modality: str, tower, path: Path) -> None:
        """One forward pass at the largest input the manifest allows (a full clip, ``text.max_length`` tokens of
        the tokenizer's largest id), when the tower loads: a graph whose position table or vocabulary is smaller
        than the manifest and tokenizer say, or whose output is not [B, embed_dim] and finite, is a ``BundleError``
        now rather than a raw onnxruntime error on some later input."""
        spec, m = self.manifest.towers[modality], self.manifest
        batch = self.fixed_batch(modality) or 1
        if modality == "image":
            feeds = {spec.inputs[0].name: np.zeros((batch, 3, m.image.size, m.image.size), np.float32)}
            what = f"a {m.image.size} x {m.image.size} image"
        elif modality == "audio":
            clip = round(m.audio.clip_seconds * m.audio.sample_rate)
            feeds = {spec.inputs[0].name: np.zeros((batch, clip), np.float32)}
            feeds[spec.inputs[1].name] = np.full(batch, clip, np.int64)
            what = f"one clip of {clip} samples (audio.clip_seconds x audio.sample_rate)"
        else:
            ids_name, mask_name = text_input_names(spec)
            length = spec.inputs[0].shape[1] if isinstance(spec.inputs[0].shape[1], int) else m.text.max_length
            top = self._tokenizer.get_vocab_size(with_added_tokens=True) - 1 if self._tokenizer is not None else 0
            dtypes = {t.name: t.dtype for t in spec.inputs}
            feeds = {
                ids_name: np.full((batch, length), top, dtypes[ids_name]),
                mask_name: np.ones((batch, length), dtypes[mask_name]),
            }
            what = f"{length} tokens (text.max_length) of id {top} (the tokenizer's largest)"
        try:
            out = np.asarray(tower.run(feeds))
        except (InferUsageError, BundleError):
            raise
        except Exception as error:
            raise BundleError(
                f"{path}: the {modality} graph fails on {what}: {first_line(error)}; the manifest, tokenizer and "
                "graph do not belong together, re-export the bundle"
            ) from error
        if out.shape != (batch, m.embed_dim) or not np.isfinite(out).all():
            problem = f"shape {out.shape}" if out.shape != (batch, m.embed_dim) else "non-finite values"
            raise BundleError(
                f"{path}: the {modality} graph gives {problem} for {what}; expected finite [{batch}, {m.embed_dim}] "
                "(embed_dim); re-export the bundle"
            )

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers of each loaded onnxruntime tower (empty until a tower is used)."""
        return {m: t.providers for m, t in self._loaded.items() if hasattr(t, "providers")}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for tower in self._loaded.values():
                if hasattr(tower, "close"):
                    tower.close()
            self._loaded.clear()
