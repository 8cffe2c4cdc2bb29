"""A bundle folder on disk -> its checked manifest and verified bytes: containment, sha256, static shapes.

Every file the runtime opens in a bundle comes through ``bundle_path``: relative, inside the (resolved) folder and,
unless the caller trusts the bundle, listed in ``manifest.json`` with its sha256. The files a ``Runtime`` loads (tower
graphs or engines, their external weights, the tokenizer) are read once by ``read_bundle_file`` and hashed on the
bytes that load, so what was hashed is what runs; every other listed file is hashed by ``check_files`` at open.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path

from .files import NotARegularFile, open_regular, read_regular
from .manifest import MANIFEST_NAME, BundleError, Manifest, relative_path
from .prompts import check_template

ENGINE_SUFFIXES = (".plan", ".engine")
MAX_GRAPH_BYTES = 64 << 30  # a tower file (graph, external weights or engine) larger than this is refused
MAX_TOKENIZER_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 64 << 20


def open_bundle(bundle: Path, trust_unverified: bool) -> Manifest:
    """``read_manifest`` plus what a runtime needs before it loads anything: the graphs' fixed dims agree with the
    preprocessing, and every prompt template has its placeholder. (Files are checked by ``check_files`` once the
    backend, and so the files it hashes on load, are known.)"""
    manifest = read_manifest(bundle, trust_unverified=trust_unverified)
    if trust_unverified:
        warnings.warn(
            f"{bundle}: trusting an unverified bundle: its files are not checked against sha256 hashes",
            stacklevel=3,  # the caller of Runtime.open
        )
    check_static_shapes(bundle, manifest)
    for template in manifest.text.prompt_templates:
        try:
            check_template(template)
        except ValueError as error:
            raise BundleError(f"{bundle}: {error}; fix manifest.json's text.prompt_templates") from error
    return manifest


def read_manifest(bundle: str | Path, trust_unverified: bool = False) -> Manifest:
    """Read and validate ``bundle/manifest.json`` (no other file is read): every field range-checked; every path it
    names relative and inside the bundle. Unless ``trust_unverified``, the files the runtime may open (tower graphs,
    the tokenizer) must be listed in ``files``, and a manifest without ``files`` is refused."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; pass the bundle folder that `synergy export` wrote")
    if not os.path.lexists(path):
        raise BundleError(f"{bundle}: no {MANIFEST_NAME}; this is not a Synergy bundle (run `synergy export`)")
    try:
        text = read_regular(path, MAX_MANIFEST_BYTES).decode("utf-8")
        data = json.loads(text, parse_constant=_refuse_constant)
    except NotARegularFile as error:
        raise BundleError(f"{path}: {error.problem}; a bundle's manifest must be a regular JSON file") from error
    except UnicodeDecodeError as error:
        raise BundleError(f"{path}: not UTF-8 ({error.reason} at byte {error.start}); re-export the bundle") from error
    except (json.JSONDecodeError, ValueError, RecursionError) as error:
        raise BundleError(f"{path}: not valid JSON ({error}); re-export the bundle") from error
    manifest = Manifest.from_dict(data)
    if not manifest.files and not trust_unverified:
        raise BundleError(
            f"{bundle}: manifest.json lists no files with their sha256, so nothing in this bundle can be verified; "
            "re-export it with `synergy export`, or, only if you built it yourself, open it with "
            "trust_unverified=True (--trust-unverified)"
        )
    for rel in [*(t.file for t in manifest.towers.values()), manifest.tokenizer]:
        bundle_path(bundle, rel, manifest, trust_unverified)
    return manifest


def load_manifest(bundle: str | Path, verify: bool = True, trust_unverified: bool = False) -> Manifest:
    """Read and validate ``bundle/manifest.json`` (``read_manifest``) and check every file it lists
    (``check_files``): inside the bundle, present, a regular file and, with ``verify``, matching its sha256."""
    manifest = read_manifest(bundle, trust_unverified)
    check_files(bundle, manifest, verify)
    return manifest


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    (Path(bundle) / MANIFEST_NAME).write_text(manifest.to_json() + "\n")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------------------------------------- containment


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (resolved: symlinks followed) lies inside the folder ``root`` (resolved)."""
    try:
        path.resolve(strict=False).relative_to(root)
    except (ValueError, RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False
    return True


def bundle_path(bundle: Path, rel: str, manifest: Manifest, trust_unverified: bool = False) -> Path:
    """The file ``rel`` of the bundle, refused unless it resolves inside the bundle folder and (unless
    ``trust_unverified``) is listed in ``files`` with its sha256. Every file the runtime opens comes through here."""
    relative_path(rel, repr(rel))
    path = Path(bundle) / rel
    if not inside(Path(bundle).resolve(), path):
        raise BundleError(f"{bundle}: {rel} resolves outside the bundle (a symbolic link?); refusing it")
    if rel not in manifest.files and not trust_unverified:
        raise BundleError(
            f"{bundle}: {rel} is not listed with its sha256 in manifest.json's files, so it cannot be verified; "
            "re-export the bundle (or open it with trust_unverified=True / --trust-unverified if you built it)"
        )
    return path


def check_static_shapes(bundle: Path, manifest: Manifest) -> None:
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


# ---------------------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(
    bundle: str | Path, manifest: Manifest, verify: bool = True, hashed_on_load: Collection[str] = ()
) -> None:
    """Every file listed in ``files``: inside the bundle, present and a regular file; with ``verify``, its sha256
    checked. The files in ``hashed_on_load`` are not read here: their reader (``read_bundle_file``: tower graphs,
    their external weights, the tokenizer) hashes the very bytes it loads, so each file is read and hashed once
    and there is no window between the check and the use (hashing here too would read them twice)."""
    bundle = Path(bundle)
    root = bundle.resolve()
    for rel, expected in manifest.files.items():
        file = bundle / rel
        if not inside(root, file):
            raise BundleError(f"{bundle}: manifest lists {rel!r}, which resolves outside the bundle; refusing it")
        if not os.path.lexists(file):
            raise BundleError(f"{bundle}: {rel} is missing; the bundle is incomplete, re-export it")
        try:
            if verify and rel not in hashed_on_load:
                if sha256_file(file) != expected:
                    raise BundleError(
                        f"{bundle}: {rel} has changed since export (sha256 mismatch); re-export the bundle"
                    )
            else:
                open_regular(file).close()  # a FIFO or a device is refused now, not when it is read
        except NotARegularFile as error:
            raise BundleError(f"{bundle}: {rel} {error.problem}; a bundle holds regular files only") from error


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


# ---------------------------------------------------------------------------------------------- tower files


def tower_file(bundle: Path, manifest: Manifest, modality: str, engine: bool) -> Path:
    """The file of a tower for a backend that runs engines (``engine``) or ONNX graphs: the manifest's, or its
    sibling listed in the bundle (the ONNX source of an engine for onnxruntime, ``<tower>.plan`` beside an ONNX
    graph for TensorRT)."""
    file = Path(manifest.towers[modality].file)
    is_engine = file.suffix in ENGINE_SUFFIXES
    if engine and not is_engine:
        siblings, fix = ENGINE_SUFFIXES, "export engines with `synergy export --format trt` on the GPU machine"
    elif not engine and is_engine:
        siblings, fix = (".onnx",), "use backend='tensorrt', device='cuda', or export with `--format onnx`"
    else:
        return bundle_path(bundle, file.as_posix(), manifest, trust_unverified=True)  # listing: read_manifest's
    listed = [file.with_suffix(s).as_posix() for s in siblings if file.with_suffix(s).as_posix() in manifest.files]
    if not listed:
        kind = "TensorRT engine" if engine else "ONNX graph"
        raise BundleError(f"{bundle}: no {kind} for the {modality} tower (only {file}); {fix}")
    return bundle_path(bundle, listed[0], manifest)


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


def files_hashed_on_load(bundle: Path, manifest: Manifest, engine: bool) -> set[str]:
    """The bundle files a runtime on a backend that runs engines (``engine``) or ONNX graphs reads and hashes
    itself, on the bytes it loads (``towers.Towers``): each tower's graph or engine, an ONNX graph's external
    weights, the tokenizer."""
    files = set()
    for modality in manifest.towers:
        rel = tower_file(bundle, manifest, modality, engine).relative_to(bundle).as_posix()
        files.add(rel)
        if not engine:
            files.update(external_data_files(rel, manifest))
    if "text" in manifest.towers:
        files.add(manifest.tokenizer)
    return files
