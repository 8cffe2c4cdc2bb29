"""``Runtime``: the one facade users call: a bundle -> embeddings, zero-shot labels and nearest neighbours, no torch.

    rt = Runtime.open("runs/demo/bundle")                       # checks the manifest; sha256 checked on read
    rt.embed_audio(["dog.wav", (wave, 44_100)])                 # [2, D], L2-normalised
    rt.classify("labels.txt", audio=["dog.wav"], image=["dog.png"], top_k=3)   # fused: one answer per pair
    rt.search(["a dog barking"], corpus, top_k=10)

The rooms behind it, each a public module: ``bundle`` (disk -> checked manifest and verified bytes), ``towers``
(bytes -> probed towers, the backend registry), ``embedding`` (inputs -> embeddings: decoding, batches, long-audio
windows), ``video_embedding``, ``zeroshot`` (label prompts, the label cache, ranking) and ``search`` (normalising,
fusing, top-k). A bad item is a typed ``InputError`` for that item: ``embed_batch`` returns it beside the others'
vectors and ``classify`` returns it in that item's ``Prediction``; the strict ``embed_*`` raise it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .audio import DEFAULT_MAX_SECONDS, DEFAULT_OVERLAP
from .batcher import MicroBatcher
from .bundle import check_files, files_hashed_on_load, open_bundle
from .embedding import EmbedResult, as_items, compute, decode
from .errors import InferUsageError, InputError, non_finite
from .labels import read_labels
from .manifest import MODALITIES, Manifest
from .search import SearchHit, fuse_embeddings, nearest
from .text import tokenize
from .towers import BACKENDS, Towers, check_choice, choose_backend, graph_bytes
from .video import DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_FRAMES
from .video_embedding import VideoEmbeddings, VideoSettings, embed_videos
from .zeroshot import LabelCache, Prediction, label_scale, rank_labels


class Runtime:
    """A loaded bundle. Thread-safe: towers are shared, the label cache is locked. Open with ``Runtime.open``."""

    video_max_frames: int = DEFAULT_MAX_FRAMES
    video_frames_per_second: float = DEFAULT_FRAMES_PER_SECOND

    def __init__(self, bundle: Path, manifest: Manifest, backend: str, device: str, threads: int | None, **options):
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend
        self.device = device
        self.threads = threads
        self.batch_size: int = options["batch_size"]
        self.audio_overlap: float = options["audio_overlap"]
        self.max_audio_seconds: float = options["max_audio_seconds"]
        self.trust_unverified: bool = options.get("trust_unverified", False)
        self._towers = Towers(bundle, manifest, backend, device, threads, self.batch_size, self.trust_unverified)
        self._labels = LabelCache()

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
        long_lived: bool = False,
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
        "openvino" / "openvino-bf16" (CPU, the optional extra; "auto" picks OpenVINO bf16 where the bundle's export
        verified it: ``towers.choose_backend``). ``long_lived``: this process answers many calls (a server), so
        "auto" does not weigh OpenVINO's start-up against the bundle's size (``towers.OPENVINO_MIN_GRAPH_BYTES``):
        it is paid once. ``threads``: CPU threads per session (None: the physical cores this process may use).
        Towers are loaded on first use, so a call that needs only audio and text never loads the image graph.
        """
        check_choice(backend, device)
        if batch_size < 1:
            raise InferUsageError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= audio_overlap < 1.0:
            raise InferUsageError(f"audio_overlap must be in [0, 1), got {audio_overlap}")
        bundle = Path(bundle)
        trust_unverified = trust_unverified or not verify
        manifest = open_bundle(bundle, trust_unverified)
        backend = choose_backend(backend, device, manifest, None if long_lived else graph_bytes(bundle, manifest))
        # every tower has a file this backend runs; the files this runtime loads are hashed as they load, on the
        # bytes that load (each read once, no window between check and use); every other listed file is hashed now
        loaded = files_hashed_on_load(bundle, manifest, BACKENDS[backend].runs_engines)
        check_files(bundle, manifest, verify=not trust_unverified, hashed_on_load=loaded)
        options = dict(batch_size=batch_size, audio_overlap=audio_overlap, max_audio_seconds=max_audio_seconds)
        runtime = cls(bundle, manifest, backend, device, threads, trust_unverified=trust_unverified, **options)
        if "text" in manifest.towers:
            runtime._text_tokenizer()  # cheap, and a broken tokenizer is a bundle error now, not on the first text
        return runtime

    def _text_tokenizer(self):
        return self._towers.tokenizer()

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the text tower sees for ``texts``, after the model's truncation (the OpenAI API's ``usage``)."""
        return int(tokenize(self._text_tokenizer(), list(texts))[1].sum())

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers of each loaded onnxruntime tower (empty until a tower is used)."""
        return self._towers.providers

    def load(self, *modalities: str) -> Runtime:
        """Load towers now instead of on first use (all of the bundle's when none are named): graph problems are
        then a ``BundleError`` here, before any input is decoded."""
        for modality in modalities or tuple(self.manifest.towers):
            self._towers.get(modality)
        if "text" in (modalities or self.manifest.towers):
            self._towers.tokenizer()
        return self

    # ------------------------------------------------------------------------------------------------ embeddings

    def embed_batch(self, modality: str, items, batch_size: int | None = None) -> EmbedResult:
        """Embed a batch where a bad item fails alone: ``EmbedResult`` with NaN rows and typed errors for it."""
        if modality not in MODALITIES:
            raise InferUsageError(f"modality {modality!r} is not one of {MODALITIES}")
        self._towers.check_open()
        items = as_items(modality, items)
        decoded, errors, sources = decode(self.manifest, modality, items, self.audio_overlap, self.max_audio_seconds)
        good = [i for i, e in enumerate(errors) if e is None]
        vectors = np.full((len(items), self.manifest.embed_dim), np.nan, np.float32)
        if good:
            values = [decoded[i] for i in good]
            vectors[good] = compute(self._towers, modality, values, batch_size or self.batch_size)
        for i in good:
            if not np.isfinite(vectors[i]).all():
                errors[i] = non_finite(modality, sources[i])
                vectors[i] = np.nan
        return EmbedResult(vectors, tuple(errors), tuple(sources))

    def _embed_strict(self, modality: str, items, batch_size: int | None) -> np.ndarray:
        self._towers.check_open()
        items = as_items(modality, items)
        decoded, errors, sources = decode(self.manifest, modality, items, self.audio_overlap, self.max_audio_seconds)
        for error in errors:
            if error is not None:
                raise error
        vectors = compute(self._towers, modality, decoded, batch_size or self.batch_size)
        for i, row in enumerate(vectors):
            if not np.isfinite(row).all():
                raise non_finite(modality, sources[i])
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
        return self._labels.embeddings(labels, self.manifest.text.prompt_templates, self.embed_text)

    def label_scale(self, modalities: Sequence[str]) -> float:
        """The logit scale for these query modalities against text labels (see ``zeroshot``)."""
        return label_scale(self.manifest.logit_scales, modalities)

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
        """The zero-shot arithmetic of ``classify``, ``classify_video`` and the server's ``/v1/classify`` on
        embeddings already computed (``label_matrix`` [K, D], ``fused`` [N, D] with NaN rows where ``errors[i]``
        is set): ``zeroshot.rank_labels`` with this bundle's logit scales."""
        scales = self.manifest.logit_scales
        return rank_labels(scales, labels, label_matrix, fused, modalities, sources, errors, top_k)

    def classify(
        self, labels, audio=None, image=None, text=None, top_k: int = 5, batch_size: int | None = None, video=None
    ):
        """Zero-shot classification -> one ``Prediction`` per item, in order.

        ``labels``: a labels file path or a sequence of strings. ``audio`` / ``image`` / ``text``: one item or a
        sequence; when several are given, they must have the same length and item i of each describes the same
        thing (fused: see ``zeroshot``). A bad item gets ``Prediction.error``; the others go on.
        """
        if top_k < 1:
            raise InferUsageError(f"top_k must be >= 1, got {top_k}")
        if video is not None:  # a video fuses its own frames and soundtrack: see classify_video
            if audio is not None or image is not None or text is not None:
                raise InferUsageError("classify(video=...) classifies videos on their own: pass no audio/image/text")
            return self.classify_video(labels, video, top_k=top_k, batch_size=batch_size)
        labels = read_labels(labels)
        given = {m: as_items(m, x) for m, x in (("audio", audio), ("image", image), ("text", text)) if x is not None}
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

    def embed_video_batch(self, videos, batch_size: int | None = None) -> VideoEmbeddings:
        """Paths or video-file bytes -> ``VideoEmbeddings``; a bad video fails alone (NaN rows, its error)."""
        settings = VideoSettings(
            batch_size or self.batch_size,
            self.audio_overlap,
            self.max_audio_seconds,
            self.video_max_frames,
            self.video_frames_per_second,
        )
        return embed_videos(self._towers, videos, settings)

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
        return nearest(queries, corpus_embeddings, top_k)

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
        self._towers.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Runtime({str(self.bundle)!r}, backend={self.backend!r}, device={self.device!r})"
