"""``Runtime``: a bundle -> embeddings, zero-shot labels and nearest neighbours, without torch.

    rt = Runtime.open("runs/demo/bundle")                       # checks the manifest; sha256 checked on read
    rt.embed_audio(["dog.wav", (wave, 44_100)])                 # [2, D], L2-normalised
    rt.classify("labels.txt", audio=["dog.wav"], image=["dog.png"], top_k=3)   # fused: one answer per pair
    rt.search(["a dog barking"], corpus, top_k=10)

Choices, documented here once:

- Batching: inputs are decoded, then run ``batch_size`` at a time; text is padded to each batch's longest
  sequence. A bad item is a typed ``InputError`` for that item: ``embed_batch`` returns it beside the others'
  vectors and ``classify`` returns it in that item's ``Prediction``; the strict ``embed_*`` raise it.
- Long audio: windows of the model's clip (``audio_overlap``, default 0.5) whose embeddings are averaged and
  re-normalised; short audio is one window that keeps its real length, which the audio graph takes beside the
  samples, so padding never changes an embedding (see ``audio.py``).
- Labels: each label's embedding is the normalised mean of its normalised prompt embeddings (the manifest's
  templates); cached per label for the life of the runtime.
- Several modalities for one item (``classify(audio=..., image=...)``): the item's embedding is the normalised mean
  of the modalities' normalised embeddings; its logit scale is the mean of the modalities' scales. Audio -> label
  uses ``text_audio``, image -> label ``image_text``; text -> label (a pair the model never trained) uses the
  mean of the two. Probabilities are ``softmax(scale * cosine)`` over the labels.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .audio import DEFAULT_MAX_SECONDS, DEFAULT_OVERLAP, cut_window, describe_audio, load_audio, window_spans
from .batcher import MicroBatcher
from .errors import BackendError, InferUsageError, InputError, RuntimeClosed, UnsupportedText, UnsupportedVideo
from .files import NotARegularFile, read_regular
from .image import describe_image, load_image, preprocess_image
from .labels import check_template, label_prompts, read_labels
from .manifest import MODALITIES, BundleError, Manifest, bundle_path, check_files, read_manifest
from .text import check_text, load_tokenizer, tokenize
from .video import DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_FRAMES, describe_video, load_video

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
ENGINE_SUFFIXES = (".plan", ".engine")
LABEL_SCALE_PAIRS = {"audio": ("text_audio",), "image": ("image_text",), "text": ("image_text", "text_audio")}
MAX_GRAPH_BYTES = 64 << 30  # a tower file (graph, external weights or engine) larger than this is refused
MAX_TOKENIZER_BYTES = 1 << 30


@dataclass(frozen=True)
class EmbedResult:
    """Per-item embeddings of one call: ``vectors`` [N, D] float32 (NaN rows where ``errors[i]`` is set)."""

    vectors: np.ndarray
    errors: tuple[InputError | None, ...]
    sources: tuple[str, ...]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    similarity: float  # cosine between the item's and the label's embeddings


@dataclass(frozen=True)
class Prediction:
    """One item's zero-shot answer: the ``top`` labels, best first, or the ``error`` that stopped it."""

    source: str
    top: tuple[LabelScore, ...] = ()
    error: InputError | None = None
    modalities: tuple[str, ...] = ()  # a video's: the streams it was classified from ("image", "audio")

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class VideoEmbeddings:
    """Per-video embeddings [N, D] float32: the pooled frames, the soundtrack, and both fused; NaN rows where a video
    has no such stream or failed (``errors[i]``). ``modalities[i]``: the streams video i was embedded from."""

    image: np.ndarray
    audio: np.ndarray
    fused: np.ndarray
    modalities: tuple[tuple[str, ...], ...]
    errors: tuple[InputError | None, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class SearchHit:
    index: int  # row of the corpus
    score: float  # cosine similarity


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _not_finite(modality: str, source: str, what: str = "embedding") -> InputError:
    """A NaN or Inf embedding is never an answer: the item fails alone, with what usually causes it."""
    from .errors import UnsupportedAudio, UnsupportedImage

    error_type = {"audio": UnsupportedAudio, "image": UnsupportedImage}.get(modality, UnsupportedText)
    hint = {
        "audio": "samples far outside [-1, 1] (float audio must be normalised)",
        "image": "pixel values the model cannot represent",
        "text": "a text the model cannot represent",
    }.get(modality, "an input the model cannot represent")
    return error_type(source, f"the model gives non-finite {what} for this input ({hint}); check or re-encode it")


def _as_items(modality: str, items) -> list:
    """One item or a sequence of items -> a list. A tuple is one waveform for audio; a 3-D array one image."""
    if isinstance(items, (str, Path, bytes, bytearray, memoryview)):
        return [items]
    if modality == "audio" and isinstance(items, tuple):
        return [items]
    if isinstance(items, np.ndarray):
        if modality == "image" and items.ndim in (2, 3):
            return [items]
        if modality == "image" and items.ndim == 4:
            return list(items)
        if modality == "audio":
            raise InferUsageError("a bare array is not audio: pass (waveform, sample_rate) tuples, the rate explicit")
        return list(items)
    if modality == "image" and hasattr(items, "getbands"):  # a PIL image
        return [items]
    return list(items)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def fuse_embeddings(per_modality: Sequence[np.ndarray]) -> np.ndarray:
    """Several modalities' embeddings of the same items, each [N, D] -> the normalised mean [N, D] (NaN rows stay
    NaN: an item that failed in one modality fails)."""
    with np.errstate(invalid="ignore"):
        return l2_normalise(np.mean(per_modality, axis=0))


def cosine_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D], corpus [N, D] (normalised) -> (indices [Q, k'], scores [Q, k']), k' = min(k, N), best
    first. The corpus is scanned in blocks so that memory stays O(Q * block)."""
    k = min(k, corpus.shape[0])
    best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_index = np.zeros((queries.shape[0], 0), np.int64)
    for start in range(0, corpus.shape[0], block):
        scores = queries @ corpus[start : start + block].T  # [Q, b]
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        best_index = np.concatenate([best_index, part + start], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores, best_index = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_index, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_index, order, 1), np.take_along_axis(best_scores, order, 1)


def _check_static_shapes(bundle: Path, manifest: Manifest) -> None:
    """Fixed (integer) graph dims must agree with the preprocessing the manifest asks for."""
    expected = {
        "image": {2: manifest.image.size, 3: manifest.image.size},
        "audio": {1: round(manifest.audio.clip_seconds * manifest.audio.sample_rate)},
    }
    for modality, dims in expected.items():
        spec = manifest.towers.get(modality)
        shape = spec.inputs[0].shape if spec else ()
        for axis, want in dims.items():
            if axis < len(shape) and isinstance(shape[axis], int) and shape[axis] != want:
                raise BundleError(
                    f"{bundle}: the {modality} graph's input {spec.inputs[0].name} has a fixed dim {axis} of "
                    f"{shape[axis]}, but the preprocessing gives {want}; re-export the bundle"
                )


def tower_file(bundle: Path, manifest: Manifest, modality: str, backend: str) -> Path:
    """The file of a tower for ``backend``: the manifest's, or its sibling listed in the bundle (the ONNX source of
    an engine for onnxruntime, ``<tower>.plan`` beside an ONNX graph for TensorRT)."""
    file = Path(manifest.towers[modality].file)
    is_engine = file.suffix in ENGINE_SUFFIXES
    if backend == "tensorrt" and not is_engine:
        siblings, fix = ENGINE_SUFFIXES, "export engines with `synergy export --format trt` on the GPU machine"
    elif backend == "onnxruntime" and is_engine:
        siblings, fix = (".onnx",), "use backend='tensorrt', device='cuda', or export with `--format onnx`"
    else:
        return bundle_path(bundle, file.as_posix(), manifest, trust_unverified=True)  # listing: load_manifest's
    listed = [file.with_suffix(s).as_posix() for s in siblings if file.with_suffix(s).as_posix() in manifest.files]
    if not listed:
        kind = "TensorRT engine" if backend == "tensorrt" else "ONNX graph"
        raise BundleError(f"{bundle}: no {kind} for the {modality} tower (only {file}); {fix}")
    return bundle_path(bundle, listed[0], manifest)


def read_bundle_file(bundle: Path, rel: str, manifest: Manifest, trusted: bool, limit: int) -> bytes:
    """The bytes of one bundle file, read once and checked against the manifest's sha256 (unless ``trusted``):
    what was hashed is what runs, even if the file is replaced after ``Runtime.open``."""
    path = bundle_path(bundle, rel, manifest, trusted)
    try:
        data = read_regular(path, limit)
    except NotARegularFile as error:
        raise BundleError(f"{bundle}: {rel} {error.problem}; a bundle holds regular files only") from error
    expected = manifest.files.get(rel)
    if expected is not None and not trusted and hashlib.sha256(data).hexdigest() != expected:
        raise BundleError(f"{bundle}: {rel} has changed since export (sha256 mismatch); re-export the bundle")
    return data


def external_data_files(graph: str, manifest: Manifest) -> list[str]:
    """The listed side files of an ONNX graph (its external weights): the files in the graph's folder whose name
    starts with the graph's stem (``audio.onnx.data`` for ``audio.onnx``), other graphs and engines excepted."""
    folder, stem = Path(graph).parent, Path(graph).name.split(".")[0]
    names = [rel for rel in manifest.files if Path(rel).parent == folder and rel != graph]
    graphs = (".onnx", *ENGINE_SUFFIXES)
    return [rel for rel in names if Path(rel).name.startswith(stem) and Path(rel).suffix not in graphs]


def external_data(bundle: Path, graph: str, manifest: Manifest, trusted: bool) -> dict[str, bytes]:
    """The bytes of ``external_data_files``, each checked against its sha256, keyed by its name relative to the
    graph's folder, as the graph's ``location`` fields name them. onnxruntime is given these bytes and no path, so a
    graph can read no weights from anywhere else (an unlisted or outside location is a load error)."""
    names = external_data_files(graph, manifest)
    return {Path(rel).name: read_bundle_file(bundle, rel, manifest, trusted, MAX_GRAPH_BYTES) for rel in names}


def files_hashed_on_load(bundle: Path, manifest: Manifest, backend: str) -> set[str]:
    """The bundle files a ``Runtime`` on ``backend`` reads and hashes itself, on the bytes it loads (``_tower``,
    ``_text_tokenizer``): each tower's graph or engine, an ONNX graph's external weights, the tokenizer."""
    files = set()
    for modality in manifest.towers:
        rel = tower_file(bundle, manifest, modality, backend).relative_to(bundle).as_posix()
        files.add(rel)
        if backend == "onnxruntime":
            files.update(external_data_files(rel, manifest))
    if "text" in manifest.towers:
        files.add(manifest.tokenizer)
    return files


class Runtime:
    """A loaded bundle. Thread-safe: sessions are shared, the label cache is locked. Open with ``Runtime.open``."""

    def __init__(self, bundle: Path, manifest: Manifest, backend: str, device: str, threads: int | None, **options):
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend
        self.device = device
        self.threads = threads
        self.batch_size: int = options["batch_size"]
        self.audio_overlap: float = options["audio_overlap"]
        self.max_audio_seconds: float = options["max_audio_seconds"]
        self._towers: dict = {}
        self._tokenizer = None
        self._labels: dict[str, np.ndarray] = {}  # label -> [D] embedding
        self._lock = threading.Lock()
        self._closed = False
        self.trust_unverified: bool = options.get("trust_unverified", False)

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        *,
        batch_size: int = 32,
        audio_overlap: float = DEFAULT_OVERLAP,
        max_audio_seconds: float = DEFAULT_MAX_SECONDS,
        trust_unverified: bool = False,
        verify: bool = True,
    ) -> Runtime:
        """Read and check a bundle: every manifest field range-checked, every file it names inside the bundle, a
        regular file, listed in ``files`` and matching its sha256; the tokenizer loaded. Problems are a one-line
        ``BundleError`` naming the file and the field. Each file is read and hashed once: a tower's graph (or
        engine) and external weights when the tower loads (first use, or ``load()``), on the very bytes handed to
        onnxruntime / TensorRT, so a file changed after ``open`` is refused then; the tokenizer and every file this
        backend never loads, here.

        ``trust_unverified``: open a bundle whose files are not listed with hashes (or do not match them), with a
        warning; for bundles you built yourself, never for ones you were sent. ``verify=False`` is its old name.
        Containment (no file outside the bundle, no FIFOs or devices) is checked either way.

        ``backend``: "onnxruntime" (ONNX graphs; on ``device="cuda"`` through the TensorRT EP, then the CUDA EP),
        "tensorrt" (the bundle's ``*.plan`` engines, natively), or "auto" (the engines of a TensorRT bundle on
        ``device="cuda"``, else onnxruntime, on the engines' ONNX sources where the bundle has only engines).
        ``threads``: CPU threads per session (None: onnxruntime's default). Towers are loaded on first use, so a
        call that needs only audio and text never loads the image graph.
        """
        if backend not in BACKENDS:
            raise BackendError(f"backend {backend!r} is not one of {BACKENDS}")
        if device not in DEVICES:
            raise BackendError(f"device {device!r} is not one of {DEVICES}")
        if batch_size < 1:
            raise InferUsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= audio_overlap < 1.0:
            raise InferUsageError(f"audio_overlap must be in [0, 1), got {audio_overlap}")
        bundle = Path(bundle)
        trust_unverified = trust_unverified or not verify
        manifest = read_manifest(bundle, trust_unverified=trust_unverified)
        if trust_unverified:
            warnings.warn(
                f"{bundle}: trusting an unverified bundle: its files are not checked against sha256 hashes",
                stacklevel=2,
            )
        _check_static_shapes(bundle, manifest)
        for template in manifest.text.prompt_templates:
            try:
                check_template(template)
            except ValueError as error:
                raise BundleError(f"{bundle}: {error}; fix manifest.json's text.prompt_templates") from error
        engines = [Path(t.file).suffix in ENGINE_SUFFIXES for t in manifest.towers.values()]
        if backend == "auto":
            backend = "tensorrt" if engines and all(engines) and device == "cuda" else "onnxruntime"
        if backend == "tensorrt":
            from .tensorrt_backend import import_tensorrt

            if device != "cuda":
                raise BackendError("backend='tensorrt' runs on device='cuda' only; use backend='onnxruntime' on CPU")
            import_tensorrt()  # fail now, with the install hint, rather than on the first batch
        elif device == "cuda":
            import onnxruntime

            from .onnxruntime_backend import select_providers

            select_providers(onnxruntime.get_available_providers(), device)
        # every tower has a file this backend runs; the files this runtime loads are hashed as they load, on the
        # bytes that load (each read once, no window between check and use); every other listed file is hashed now
        loaded = files_hashed_on_load(bundle, manifest, backend)
        check_files(bundle, manifest, verify=not trust_unverified, hashed_on_load=loaded)
        runtime = cls(
            bundle,
            manifest,
            backend,
            device,
            threads,
            batch_size=batch_size,
            audio_overlap=audio_overlap,
            max_audio_seconds=max_audio_seconds,
            trust_unverified=trust_unverified,
        )
        if "text" in manifest.towers:
            runtime._text_tokenizer()  # cheap, and a broken tokenizer is a bundle error now, not on the first text
        return runtime

    # ----------------------------------------------------------------------------------------------------- towers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosed(f"{self.bundle}: this Runtime is closed; open the bundle again with Runtime.open")

    def _tower(self, modality: str):
        with self._lock:
            self._check_open()
            if modality in self._towers:
                return self._towers[modality]
            if modality not in self.manifest.towers:
                raise BundleError(f"{self.bundle}: this bundle has no {modality} tower; re-export it with one")
            spec = self.manifest.towers[modality]
            path = tower_file(self.bundle, self.manifest, modality, self.backend)
            rel = path.relative_to(self.bundle).as_posix()
            if self.backend == "tensorrt":
                from .tensorrt_backend import TensorRTTower

                # TensorRT deserializes the bytes that were hashed, not the path (which could change in between)
                engine = read_bundle_file(self.bundle, rel, self.manifest, self.trust_unverified, MAX_GRAPH_BYTES)
                tower = TensorRTTower(path, spec, self.device, engine)
            else:
                from .onnxruntime_backend import OnnxRuntimeTower, tensorrt_profile

                largest = {
                    "audio": round(self.manifest.audio.clip_seconds * self.manifest.audio.sample_rate),
                    "image": self.manifest.image.size,
                    "text": self.manifest.text.max_length,
                }
                profile = tensorrt_profile(spec, self.batch_size, largest[modality])
                graph = read_bundle_file(self.bundle, rel, self.manifest, self.trust_unverified, MAX_GRAPH_BYTES)
                weights = external_data(self.bundle, rel, self.manifest, self.trust_unverified)
                tower = OnnxRuntimeTower(path, spec, self.device, self.threads, profile, graph, weights)
            self._probe(modality, tower, path)
            self._towers[modality] = tower
            return tower

    def _probe(self, modality: str, tower, path: Path) -> None:
        """One forward pass at the largest input the manifest allows (a full clip, ``text.max_length`` tokens of
        the tokenizer's largest id), when the tower loads: a graph whose position table or vocabulary is smaller
        than the manifest and tokenizer say, or whose output is not [B, embed_dim] and finite, is a ``BundleError``
        now rather than a raw onnxruntime error on some later input."""
        spec, m = self.manifest.towers[modality], self.manifest
        batch = self._fixed_batch(modality) or 1
        if modality == "image":
            feeds = {spec.inputs[0].name: np.zeros((batch, 3, m.image.size, m.image.size), np.float32)}
            what = f"a {m.image.size} x {m.image.size} image"
        elif modality == "audio":
            clip = round(m.audio.clip_seconds * m.audio.sample_rate)
            feeds = {spec.inputs[0].name: np.zeros((batch, clip), np.float32)}
            feeds[spec.inputs[1].name] = np.full(batch, clip, np.int64)
            what = f"one clip of {clip} samples (audio.clip_seconds x audio.sample_rate)"
        else:
            ids_name, mask_name = self._text_input_names(spec)
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
                f"{path}: the {modality} graph fails on {what}: {_first_line(error)}; the manifest, tokenizer and "
                "graph do not belong together, re-export the bundle"
            ) from error
        if out.shape != (batch, m.embed_dim) or not np.isfinite(out).all():
            problem = f"shape {out.shape}" if out.shape != (batch, m.embed_dim) else "non-finite values"
            raise BundleError(
                f"{path}: the {modality} graph gives {problem} for {what}; expected finite [{batch}, {m.embed_dim}] "
                "(embed_dim); re-export the bundle"
            )

    def _text_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                spec = self.manifest.towers.get("text")
                length = spec.inputs[0].shape[1] if spec and len(spec.inputs[0].shape) > 1 else None
                fixed = length if isinstance(length, int) else None
                rel = self.manifest.tokenizer
                data = read_bundle_file(self.bundle, rel, self.manifest, self.trust_unverified, MAX_TOKENIZER_BYTES)
                self._tokenizer = load_tokenizer(self.bundle / rel, self.manifest.text.max_length, fixed, data)
            return self._tokenizer

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers of each loaded onnxruntime tower (empty until a tower is used)."""
        return {m: t.providers for m, t in self._towers.items() if hasattr(t, "providers")}

    def load(self, *modalities: str) -> Runtime:
        """Load towers now instead of on first use (all of the bundle's when none are named): graph problems are
        then a ``BundleError`` here, before any input is decoded."""
        for modality in modalities or tuple(self.manifest.towers):
            self._tower(modality)
        if "text" in (modalities or self.manifest.towers):
            self._text_tokenizer()
        return self

    # -------------------------------------------------------------------------------------------------- decoding

    def _decode(self, modality: str, items: list) -> tuple[list, list[InputError | None], list[str]]:
        """items -> (model-ready values or None, errors or None, display names). Audio: (waveform [T], window
        spans); image: [3, S, S]; text: the string."""
        decoded, errors, sources = [], [], []
        size, mean, std = self.manifest.image.size, self.manifest.image.mean, self.manifest.image.std
        rate = self.manifest.audio.sample_rate
        clip = round(self.manifest.audio.clip_seconds * rate)
        for index, item in enumerate(items):
            try:
                if modality == "audio":
                    name = describe_audio(item, index)
                    wave = load_audio(item, rate, name=name, max_seconds=self.max_audio_seconds)
                    value = (wave, window_spans(wave.shape[0], clip, self.audio_overlap))
                elif modality == "image":
                    name = describe_image(item, index)
                    value = preprocess_image(load_image(item, name=name), size, mean, std)
                else:
                    name = item if isinstance(item, str) and len(item) <= 60 else f"<text #{index}>"
                    value = check_text(item, name)
                decoded.append(value)
                errors.append(None)
            except InputError as error:
                decoded.append(None)
                errors.append(error)
            sources.append(name)
        return decoded, errors, sources

    # ---------------------------------------------------------------------------------------------------- models

    def _fixed_batch(self, modality: str) -> int | None:
        dim = self.manifest.towers[modality].inputs[0].shape[0] if modality in self.manifest.towers else None
        return dim if isinstance(dim, int) else None

    def _run(self, modality: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One forward pass; pads the batch to the graph's static batch size if it has one. -> [B, D] float32."""
        batch = next(iter(feeds.values())).shape[0]
        fixed = self._fixed_batch(modality)
        if fixed is not None and batch < fixed:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed - batch, 0)]) for k, v in feeds.items()}
        tower = self._tower(modality)
        try:
            out = tower.run(feeds)
        except (InferUsageError, BundleError, MemoryError):
            raise
        except Exception as error:  # inputs were checked and the graph passed its probe: the bundle is at fault
            raise BundleError(
                f"{self.bundle}: the {modality} graph failed on a batch of {batch}: {_first_line(error)}; "
                "re-export the bundle"
            ) from error
        return np.asarray(out[:batch], dtype=np.float32)

    def _compute(self, modality: str, values: list, batch_size: int) -> np.ndarray:
        """Model-ready values (all good) -> embeddings [N, D]."""
        spec = self.manifest.towers.get(modality)
        if spec is None:
            raise BundleError(f"{self.bundle}: this bundle has no {modality} tower; re-export it with one")
        batch_size = min(batch_size, self._fixed_batch(modality) or batch_size)
        dim = self.manifest.embed_dim
        if not values:
            return np.zeros((0, dim), np.float32)
        if modality == "audio":
            clip = round(self.manifest.audio.clip_seconds * self.manifest.audio.sample_rate)
            windows = [(owner, span) for owner, (_, spans) in enumerate(values) for span in spans]
            wave_name, lengths_name = (t.name for t in spec.inputs)
            pooled = np.zeros((len(values), dim), np.float64)
            for i in range(0, len(windows), batch_size):
                chunk = windows[i : i + batch_size]
                cut = [cut_window(values[owner][0], span, clip) for owner, span in chunk]
                feeds = {wave_name: np.stack([w for w, _ in cut]), lengths_name: np.array([n for _, n in cut])}
                np.add.at(pooled, [owner for owner, _ in chunk], self._run("audio", feeds))  # feeds: [b, clip], [b]
            return l2_normalise(pooled).astype(np.float32)  # mean of the window embeddings, re-normalised
        if modality == "image":
            name = spec.inputs[0].name
            chunks = [np.stack(values[i : i + batch_size]) for i in range(0, len(values), batch_size)]
            return np.concatenate([self._run("image", {name: c}) for c in chunks])
        tokenizer = self._text_tokenizer()
        ids_name, mask_name = self._text_input_names(spec)
        out = []
        for i in range(0, len(values), batch_size):
            ids, mask = tokenize(tokenizer, values[i : i + batch_size])
            dtypes = {t.name: t.dtype for t in spec.inputs}
            feeds = {ids_name: ids.astype(dtypes[ids_name]), mask_name: mask.astype(dtypes[mask_name])}
            out.append(self._run("text", feeds))
        return np.concatenate(out)

    @staticmethod
    def _text_input_names(spec) -> tuple[str, str]:
        """(ids, mask) input names: by the contract's names when used, else the manifest's order."""
        names = [t.name for t in spec.inputs]
        if len(names) != 2:
            raise BundleError(f"the text tower has inputs {names}; expected token ids and an attention mask")
        masks = [n for n in names if "mask" in n]
        if len(masks) == 1:
            return next(n for n in names if n != masks[0]), masks[0]
        return names[0], names[1]

    # ------------------------------------------------------------------------------------------------ embeddings

    def embed_batch(self, modality: str, items, batch_size: int | None = None) -> EmbedResult:
        """Embed a batch where a bad item fails alone: ``EmbedResult`` with NaN rows and typed errors for it."""
        if modality not in MODALITIES:
            raise InferUsageError(f"modality {modality!r} is not one of {MODALITIES}")
        self._check_open()
        items = _as_items(modality, items)
        decoded, errors, sources = self._decode(modality, items)
        good = [i for i, e in enumerate(errors) if e is None]
        vectors = np.full((len(items), self.manifest.embed_dim), np.nan, np.float32)
        if good:
            vectors[good] = self._compute(modality, [decoded[i] for i in good], batch_size or self.batch_size)
        for i in good:
            if not np.isfinite(vectors[i]).all():
                errors[i] = _not_finite(modality, sources[i])
                vectors[i] = np.nan
        return EmbedResult(vectors, tuple(errors), tuple(sources))

    def _embed_strict(self, modality: str, items, batch_size: int | None) -> np.ndarray:
        self._check_open()
        items = _as_items(modality, items)
        decoded, errors, sources = self._decode(modality, items)
        for error in errors:
            if error is not None:
                raise error
        vectors = self._compute(modality, decoded, batch_size or self.batch_size)
        for i, row in enumerate(vectors):
            if not np.isfinite(row).all():
                raise _not_finite(modality, sources[i])
        return vectors

    def embed_audio(self, audio, batch_size: int | None = None) -> np.ndarray:
        """Paths, audio-file bytes or ``(waveform, sample_rate)`` tuples -> [N, D]. Raises ``UnsupportedAudio``
        for the first bad item (use ``embed_batch`` to keep going past bad items)."""
        return self._embed_strict("audio", audio, batch_size)

    def embed_image(self, images, batch_size: int | None = None) -> np.ndarray:
        """Paths, image-file bytes, PIL images or uint8 [H, W, 3] arrays -> [N, D]. Raises ``UnsupportedImage``."""
        return self._embed_strict("image", images, batch_size)

    def embed_text(self, texts, batch_size: int | None = None) -> np.ndarray:
        """Strings -> [N, D]. Text longer than the model's max length is truncated."""
        return self._embed_strict("text", texts, batch_size)

    # ---------------------------------------------------------------------------------------------- zero-shot

    def label_embeddings(self, labels) -> np.ndarray:
        """A labels file or list -> [K, D]: per label, the normalised mean of its prompt ensemble. Cached."""
        labels = read_labels(labels)
        with self._lock:
            missing = [label for label in labels if label not in self._labels]
        if missing:
            templates = self.manifest.text.prompt_templates
            prompts = [label_prompts(label, templates) for label in missing]
            flat = self.embed_text([p for group in prompts for p in group])  # [sum P, D]
            offsets = np.cumsum([0] + [len(group) for group in prompts])
            means = np.stack([flat[offsets[i] : offsets[i + 1]].mean(axis=0) for i in range(len(missing))])
            with self._lock:
                self._labels.update(zip(missing, l2_normalise(means).astype(np.float32)))
        with self._lock:
            return np.stack([self._labels[label] for label in labels])

    def label_scale(self, modalities: Sequence[str]) -> float:
        """The logit scale for these query modalities against text labels (see the module docstring)."""
        scales = self.manifest.logit_scales
        per_modality = [np.mean([scales[p] for p in LABEL_SCALE_PAIRS[m]]) for m in modalities]
        return float(np.mean(per_modality))

    def rank_labels(
        self,
        labels: Sequence[str],
        label_matrix: np.ndarray,
        fused: np.ndarray,
        modalities: Sequence[Sequence[str]],
        sources: Sequence[str],
        errors: Sequence[InputError | None],
        top_k: int,
    ) -> list[Prediction]:
        """The zero-shot arithmetic of ``classify``, ``classify_video`` and the server's ``/v1/classify``, on
        embeddings already computed. ``label_matrix`` [K, D]: ``label_embeddings(labels)``. ``fused`` [N, D]: each
        item's (normalised) embedding, NaN rows where ``errors[i]`` is set. ``modalities[i]``: what item i was
        embedded from (its logit scale: ``label_scale``). -> one ``Prediction`` per item: ``errors[i]`` where set;
        else its ``top_k`` labels by ``softmax(scale * cosine)``, best first, or, where the similarities or
        probabilities are not finite, an error blamed on its first modality (NaN is never an answer)."""
        scales = [self.label_scale(m) if error is None else np.nan for m, error in zip(modalities, errors)]
        with np.errstate(invalid="ignore"):  # failed items are NaN rows; they are reported, not scored
            similarity = fused @ label_matrix.T  # [N, K]
            probabilities = softmax(np.asarray(scales, np.float32)[:, None] * similarity)
        top_k = min(top_k, len(labels))
        predictions = []
        for i, source in enumerate(sources):
            if errors[i] is not None:
                predictions.append(Prediction(source, error=errors[i]))
            elif not (np.isfinite(probabilities[i]).all() and np.isfinite(similarity[i]).all()):
                predictions.append(Prediction(source, error=_not_finite(modalities[i][0], source, "probabilities")))
            else:
                order = np.argsort(-probabilities[i], kind="stable")[:top_k]
                top = tuple(LabelScore(labels[j], float(probabilities[i, j]), float(similarity[i, j])) for j in order)
                predictions.append(Prediction(source, top))
        return predictions

    def classify(
        self, labels, audio=None, image=None, text=None, top_k: int = 5, batch_size: int | None = None, video=None
    ):
        """Zero-shot classification -> one ``Prediction`` per item, in order.

        ``labels``: a labels file path or a sequence of strings. ``audio`` / ``image`` / ``text``: one item or a
        sequence; when several are given, they must have the same length and item i of each describes the same
        thing (fused: see the module docstring). A bad item gets ``Prediction.error``; the others go on.
        """
        if top_k < 1:
            raise InferUsageError(f"top_k must be >= 1, got {top_k}")
        if video is not None:  # a video fuses its own frames and soundtrack: see classify_video
            if audio is not None or image is not None or text is not None:
                raise InferUsageError("classify(video=...) classifies videos on their own: pass no audio/image/text")
            return self.classify_video(labels, video, top_k=top_k, batch_size=batch_size)
        labels = read_labels(labels)
        given = {m: _as_items(m, x) for m, x in (("audio", audio), ("image", image), ("text", text)) if x is not None}
        if not given:
            raise InferUsageError("classify needs audio=, image= or text= inputs")
        counts = {m: len(v) for m, v in given.items()}
        if len(set(counts.values())) > 1:
            raise InferUsageError(f"fused inputs must pair one to one, but the counts differ: {counts}")
        label_matrix = self.label_embeddings(labels)  # [K, D]
        results = {m: self.embed_batch(m, items, batch_size) for m, items in given.items()}
        count = next(iter(counts.values()))
        fused = fuse_embeddings([r.vectors for r in results.values()])  # [N, D]
        sources = [" + ".join(r.sources[i] for r in results.values()) for i in range(count)]
        errors = [next((r.errors[i] for r in results.values() if r.errors[i] is not None), None) for i in range(count)]
        return self.rank_labels(labels, label_matrix, fused, [list(given)] * count, sources, errors, top_k)

    # -------------------------------------------------------------------------------------------------- video
    # A video is its frames (images) and its soundtrack (audio), decoded by ``video.load_video``: the image embedding
    # is the normalised mean of the frames' normalised embeddings (CLIP4VLA's pooling), the audio embedding the
    # soundtrack through the long-audio windows, and the two are fused as ``classify(audio=, image=)`` fuses them.

    video_max_frames: int = DEFAULT_MAX_FRAMES
    video_frames_per_second: float = DEFAULT_FRAMES_PER_SECOND

    def embed_video_batch(self, videos, batch_size: int | None = None) -> VideoEmbeddings:
        """Paths or video-file bytes -> ``VideoEmbeddings``; a bad video fails alone (NaN rows, its error)."""
        items = [videos] if isinstance(videos, (str, Path, bytes, bytearray, memoryview)) else list(videos)
        batch_size = batch_size or self.batch_size
        size, mean, std = self.manifest.image.size, self.manifest.image.mean, self.manifest.image.std
        rate = self.manifest.audio.sample_rate
        clip = round(self.manifest.audio.clip_seconds * rate)
        frames, sounds, errors, sources = [], [], [], []  # frames: (video, [3, S, S]); sounds: (video, value)
        present = np.zeros((len(items), 2), bool)  # [N, (image, audio)]: the streams each video decoded
        for index, item in enumerate(items):
            name = describe_video(item, index)
            try:
                video = load_video(
                    item,
                    rate,
                    name=name,
                    max_frames=self.video_max_frames,
                    frames_per_second=self.video_frames_per_second,
                    max_seconds=self.max_audio_seconds,
                    frame_transform=lambda image: preprocess_image(image, size, mean, std),
                    frames="image" in self.manifest.towers,
                    audio="audio" in self.manifest.towers,
                )
                if not video.frames and video.audio is None:
                    raise UnsupportedVideo(name, "has no stream this bundle's towers can embed")
                frames += [(index, f) for f in video.frames]
                present[index] = bool(video.frames), video.audio is not None
                if video.audio is not None:
                    sounds.append((index, (video.audio, window_spans(video.audio.shape[0], clip, self.audio_overlap))))
                errors.append(None)
            except InputError as error:
                errors.append(error)
            sources.append(name)
        dim = self.manifest.embed_dim
        image = np.full((len(items), dim), np.nan, np.float32)
        audio = np.full((len(items), dim), np.nan, np.float32)
        if frames:
            owners = np.array([owner for owner, _ in frames])
            pooled = np.zeros((len(items), dim), np.float64)
            np.add.at(pooled, owners, self._compute("image", [f for _, f in frames], batch_size))  # [F, D] -> [N, D]
            with_frames = np.unique(owners)
            image[with_frames] = l2_normalise(pooled[with_frames])
        if sounds:
            audio[[owner for owner, _ in sounds]] = self._compute("audio", [v for _, v in sounds], batch_size)
        for index in np.flatnonzero(present.any(1)):  # a decoded stream with a non-finite embedding fails its video
            rows = zip(("image", "audio"), (image[index], audio[index]), present[index])
            bad = [modality for modality, row, decoded in rows if decoded and not np.isfinite(row).all()]
            if bad:
                errors[index] = _not_finite(bad[0], sources[index])
                present[index] = False
        modalities = tuple(tuple(m for m, on in zip(("image", "audio"), row) if on) for row in present)
        both = np.where(present[:, :, None], np.stack([image, audio], axis=1), 0.0).sum(1)  # [N, D]
        with np.errstate(invalid="ignore"):
            fused = np.where(present.any(1)[:, None], l2_normalise(both), np.nan).astype(np.float32)
        return VideoEmbeddings(image, audio, fused, modalities, tuple(errors), tuple(sources))

    def embed_video(self, videos, batch_size: int | None = None) -> VideoEmbeddings:
        """Paths or video-file bytes -> ``VideoEmbeddings`` (``image``, ``audio``, ``fused``: [N, D]; a row is NaN
        where the video has no such stream). Raises ``UnsupportedVideo`` for the first bad video."""
        result = self.embed_video_batch(videos, batch_size)
        for error in result.errors:
            if error is not None:
                raise error
        return result

    def classify_video(self, labels, videos, top_k: int = 5, batch_size: int | None = None) -> list[Prediction]:
        """Zero-shot classification of videos: frames + soundtrack fused (image-only or audio-only where the video
        has one stream), the logit scale of the streams used. ``Prediction.modalities`` names them."""
        if top_k < 1:
            raise InferUsageError(f"top_k must be >= 1, got {top_k}")
        labels = read_labels(labels)
        label_matrix = self.label_embeddings(labels)  # [K, D]
        r = self.embed_video_batch(videos, batch_size)
        predictions = self.rank_labels(labels, label_matrix, r.fused, r.modalities, r.sources, r.errors, top_k)
        return [replace(p, modalities=m) if p.ok else p for p, m in zip(predictions, r.modalities)]

    # ------------------------------------------------------------------------------------------------- search

    def search(self, queries, corpus_embeddings: np.ndarray, top_k: int = 5) -> list[list[SearchHit]]:
        """Nearest corpus rows by cosine similarity. ``queries``: embeddings [D] or [Q, D], or strings (embedded as
        text). ``corpus_embeddings``: [N, D] (e.g. from ``embed_image``). -> per query, up to ``top_k`` hits."""
        if isinstance(queries, str) or (isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str)):
            queries = self.embed_text(queries)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        corpus = np.asarray(corpus_embeddings, dtype=np.float32)
        if corpus.ndim != 2 or queries.ndim != 2 or corpus.shape[1] != queries.shape[1]:
            shapes = f"{queries.shape} and {corpus.shape}"
            raise InferUsageError(f"search needs queries [Q, D] and a corpus [N, D] with the same D; got {shapes}")
        if top_k < 1:
            raise InferUsageError(f"top_k must be >= 1, got {top_k}")
        if corpus.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        indices, scores = cosine_top_k(l2_normalise(queries), l2_normalise(corpus), top_k)
        return [[SearchHit(int(i), float(s)) for i, s in zip(row_i, row_s)] for row_i, row_s in zip(indices, scores)]

    # -------------------------------------------------------------------------------------------- micro-batcher

    def batcher(
        self, modality: str, *, max_batch: int | None = None, max_wait_ms: float = 2.0, max_queue: int = 1024
    ) -> MicroBatcher:
        """A ``MicroBatcher`` whose ``submit(item)`` futures resolve to the item's embedding [D] (or raise its
        ``InputError``). Close it (or use ``with``) when done."""

        def process(items: list) -> list:
            result = self.embed_batch(modality, items)
            return [error if error is not None else vector for vector, error in zip(result.vectors, result.errors)]

        return MicroBatcher(
            process, max_batch=max_batch or self.batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue
        )

    def close(self) -> None:
        """Release the graphs. Closed is closed: a later call raises ``RuntimeClosed`` (open the bundle again with
        ``Runtime.open``); calls already running finish with the sessions they hold. Closing twice is fine."""
        with self._lock:
            self._closed = True
            for tower in self._towers.values():
                if hasattr(tower, "close"):
                    tower.close()
            self._towers.clear()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Runtime({str(self.bundle)!r}, backend={self.backend!r}, device={self.device!r})"
