"""Real pictures and sounds from three Debian packages, as a tri-modal set with categories held out of training.

The packages (``apt-get install openclipart-png sonic-pi-samples sound-theme-freedesktop``):

    openclipart-png          /usr/share/openclipart/png/<category folders>/<title>_<author>_NN.png   public domain
    sonic-pi-samples         /usr/share/sonic-pi/samples/<family>_<name>.flac (bd_808, guit_em9, ...) CC0 / MIT
    sound-theme-freedesktop  /usr/share/sounds/freedesktop/stereo/<event>.oga (bell, phone-...)     GPL-2 / CC-BY(-SA)

``CATEGORIES`` maps each label to the pictures and sounds that show it (globs inside the packages): some categories
have only pictures (``dog``: animals/mammals/dogs), some only sounds (``tabla``: tabla_*), and where a category
naturally has both (``drum``, ``guitar``, ``telephone``, ``bell``, ``vinyl record``, ``robot``, ``camera``) its
pictures and sounds are paired into tri-modal rows. ``HELDOUT_CATEGORIES`` never appear in training: zero-shot on
them asks whether the towers and the text tower carry the category, not whether the set taught it. Both were chosen
from the packages' contents before any model was trained on them. Within every other category a quarter of the
items (``VAL_SHARE``, at least one) are held out of training too. Three splits:

    train.csv     seen categories, training items
    val.csv       seen categories, items never seen in training              ("held-out items")
    heldout.csv   HELDOUT_CATEGORIES, all their items                       ("held-out categories")

Rows: an image row ``img_path,,label,caption`` per picture, an audio row ``,wav_path,label,caption`` per sound; in a
category with both, the first min(pictures, sounds) of each are paired into one row, so every item is in exactly one
row of its split. Captions are the category with the picture's title (its file name, up to the author) or the
sample's name. Pictures are stored with the longest edge at most ``MAX_EDGE`` (alpha kept: the runtime composites it
onto white); sounds are copied as they are (FLAC, Ogg Vorbis: soundfile reads both). Every file is decoded by the
runtime's own decoders while the set is built; what fails (a 19 ms click, an oversized or blank picture) is left out
and listed. The packages ship some files twice (a picture in two folders or under two titles; freedesktop's
camera-shutter and screen-capture are one sound): each is kept once, in the first category, so no item is both trained
on and tested (``camera`` is left with one sound, too few to split: its pictures stay, its sound goes). The same bytes
for the same packages and seed. Layout::

    out/images/<label>/<name>.png   out/audio/<label>/<name>.flac|.oga
    out/train.csv  out/val.csv  out/heldout.csv   # written last (temp + rename): a CSV present = its files exist
    out/labels.txt                                # every category, one per line
    out/debian.json                               # settings, categories per split, row counts, skipped files
    out/licenses/<package>.copyright              # each package's /usr/share/doc/<package>/copyright
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synergy.runtime.audio import load_audio
from synergy.runtime.errors import UnsupportedAudio, UnsupportedImage
from synergy.runtime.image import load_image

PACKAGES = ("openclipart-png", "sonic-pi-samples", "sound-theme-freedesktop")
INSTALL = "apt-get install " + " ".join(PACKAGES)
# where each package puts its files, under the filesystem root (a test points the root at a fake tree)
PICTURES = "usr/share/openclipart/png"
SOUND_FOLDERS = {"sonic-pi": "usr/share/sonic-pi/samples", "freedesktop": "usr/share/sounds/freedesktop/stereo"}
DOCS = "usr/share/doc"


@dataclass(frozen=True)
class Category:
    """A label and where it is shown: globs under the openclipart folder, and ``<package>:<glob>`` sound globs."""

    pictures: tuple[str, ...] = ()
    sounds: tuple[str, ...] = ()


# decided from the packages' file lists, before any training (the names say what a picture or sample shows)
CATEGORIES = {
    # pictures only
    "bird": Category(pictures=("animals/birds/*.png", "animals/birds/penguin/*.png")),
    "fish": Category(pictures=("animals/fish/*.png",)),
    "insect": Category(pictures=("animals/bugs/*.png",)),
    "dinosaur": Category(pictures=("animals/dinosaurs/*.png",)),
    "bear": Category(pictures=("animals/mammals/bears/*.png",)),
    "big cat": Category(pictures=("animals/mammals/big_cats/*.png",)),
    "dog": Category(pictures=("animals/mammals/dogs/*.png", "animals/mammals/dog_*.png")),
    "horse": Category(pictures=("animals/mammals/horses/*.png",)),
    "cat": Category(pictures=("animals/mammals/housecats/*.png",)),
    "fruit": Category(pictures=("food/fruit/*.png",)),
    "dessert": Category(pictures=("food/desserts/*.png",)),
    "drink": Category(pictures=("food/beverages/*.png",)),
    "bread": Category(pictures=("food/breads_and_carbs/*.png",)),
    "flower": Category(pictures=("plants/flowers/*.png",)),
    "tree": Category(pictures=("plants/trees/*.png", "plants/trees/evergreen/*.png")),
    "house": Category(pictures=("buildings/homes/*.png",)),
    "book": Category(pictures=("education/books/*.png",)),
    "light bulb": Category(pictures=("electronics/bulb/*.png",)),
    "hat": Category(pictures=("people/clothing/hats/*.png",)),
    "smiley face": Category(pictures=("people/smilies/*.png",)),
    "flag": Category(pictures=("signs_and_symbols/flags/*/*.png",)),
    "clock": Category(pictures=("signs_and_symbols/clocks/*.png",)),
    "playing card": Category(pictures=("recreation/games/cards/*.png",)),
    "chess piece": Category(pictures=("recreation/games/chess/*.png",)),
    "boat": Category(pictures=("transportation/boating/*.png",)),
    "car": Category(pictures=("transportation/vehicles/*.png",)),
    "road sign": Category(pictures=("transportation/roadsigns/*.png",)),
    "trumpet": Category(pictures=("recreation/music/trumpet*.png",)),
    "piano": Category(pictures=("recreation/music/piano*.png",)),
    "musical note": Category(
        pictures=("recreation/music/*note*.png", "recreation/music/*croche*.png", "recreation/music/quaver*.png")
    ),
    # pictures and sounds: tri-modal rows
    "drum": Category(
        pictures=(
            "recreation/music/drums_*.png",
            "recreation/music/africandrum*.png",
            "recreation/music/war_drum*.png",
            "recreation/music/djambf*.png",
            "recreation/music/derbouk*.png",
        ),
        sounds=(
            "sonic-pi:bd_*",
            "sonic-pi:sn_*",
            "sonic-pi:drum_bass_*",
            "sonic-pi:drum_heavy_kick*",
            "sonic-pi:drum_snare_*",
            "sonic-pi:drum_tom_*",
            "sonic-pi:drum_roll*",
            "sonic-pi:elec_*snare*",
            "sonic-pi:elec_*_kick*",
            "sonic-pi:elec_fuzz_tom*",
        ),
    ),
    "guitar": Category(pictures=("recreation/music/*guitar*.png",), sounds=("sonic-pi:guit_*",)),
    "telephone": Category(
        pictures=("office/telephone/*.png", "office/handphone*.png", "office/*cell_phone*.png"),
        sounds=("sonic-pi:mehackit_phone*", "freedesktop:phone-*"),
    ),
    "bell": Category(
        pictures=("recreation/holiday/christmas/*bell*.png", "computer/icons/flat-theme/*/bell.png"),
        sounds=(
            "sonic-pi:perc_bell*",
            "sonic-pi:elec_bell*",
            "sonic-pi:drum_cowbell*",
            "sonic-pi:elec_chime*",
            "freedesktop:bell.*",
        ),
    ),
    "vinyl record": Category(
        pictures=("recreation/music/45_rpm*.png", "recreation/music/vinyl*.png"), sounds=("sonic-pi:vinyl_*",)
    ),
    "robot": Category(
        pictures=("electronics/*robot*.png", "recreation/toys/robot*.png"),
        sounds=("sonic-pi:mehackit_robot*", "sonic-pi:glitch_robot*"),
    ),
    "camera": Category(
        pictures=("electronics/camera*.png", "computer/hardware/digital*camera*.png", "computer/icons/camera*.png"),
        sounds=("freedesktop:camera-shutter.*", "freedesktop:screen-capture.*"),
    ),
    # sounds only
    "cymbal": Category(sounds=("sonic-pi:drum_cymbal_*", "sonic-pi:drum_splash_*", "sonic-pi:elec_cymbal*")),
    "tabla": Category(sounds=("sonic-pi:tabla_*", "sonic-pi:loop_tabla*")),
    "drum loop": Category(
        sounds=(
            "sonic-pi:loop_amen*",
            "sonic-pi:loop_breakbeat*",
            "sonic-pi:loop_compus*",
            "sonic-pi:loop_perc*",
            "sonic-pi:loop_industrial*",
            "sonic-pi:loop_safari*",
        )
    ),
    "synth bass": Category(sounds=("sonic-pi:bass_*", "sonic-pi:glitch_bass_*")),
    "ambient drone": Category(
        sounds=tuple(
            f"sonic-pi:ambi_{name}*"
            for name in ("choir", "drone", "glass_hum", "glass_rub", "haunted_hum", "lunar_land", "sauna", "soft_buzz")
        )
    ),
    "whoosh": Category(
        sounds=("sonic-pi:ambi_swoosh*", "sonic-pi:ambi_dark_woosh*", "sonic-pi:perc_swoosh*", "sonic-pi:perc_swash*")
    ),
    "electronic blip": Category(
        sounds=tuple(
            f"sonic-pi:elec_{name}*"
            for name in ("beep", "blip", "blup", "bong", "ping", "plip", "pop", "twip", "flip", "twang", "tick")
        )
    ),
    "notification sound": Category(
        sounds=tuple(
            f"freedesktop:{name}*"
            for name in (
                "message",
                "dialog-",
                "complete",
                "window-",
                "service-",
                "device-",
                "power-",
                "network-",
                "audio-volume-change",
                "suspend-error",
            )
        )
    ),
    "voice": Category(sounds=("freedesktop:audio-channel-*",)),  # a voice naming the loudspeaker
    "glitch": Category(sounds=("sonic-pi:glitch_perc*",)),
    "impact": Category(sounds=("sonic-pi:perc_impact*", "sonic-pi:misc_cineboom*")),
    "finger snap": Category(sounds=("sonic-pi:perc_snap*",)),
}
# never in training: 6 picture categories (4 pictures only, 2 with sounds) and 5 sound categories (3 sounds only)
HELDOUT_CATEGORIES = ("horse", "flower", "boat", "hat", "telephone", "bell", "cymbal", "whoosh", "voice")
VAL_SHARE = 0.25  # of each seen category's pictures and of its sounds: held-out items (at least one of each)
MIN_ITEMS = 2  # a seen category's modality needs one item for training and one held out, or it is left out
MAX_EDGE = 256  # stored pictures: longest edge in pixels (>= the 224 of ImageNet towers)
MAX_SOURCE_PIXELS = 40_000_000  # bigger pictures are left out, not decoded (one package picture is 231 M pixels)
CHECK_SAMPLE_RATE = 16_000  # sounds are decoded at this rate while building, as a model at 16 kHz would read them
SPLITS = ("train", "val", "heldout")
GENERATOR = "synergy.train.datasets.debian"


class DebianError(RuntimeError):
    """The packages are missing, or the output folder is in the way."""


@dataclass(frozen=True)
class DebianSummary:
    """Where :func:`build_debian` wrote things, and how many rows (and pictures / sounds) each split has."""

    root: Path
    rows: dict  # split -> {"rows", "images", "audio", "trimodal", "categories"}
    skipped: list  # [(source path, reason)]

    def __str__(self) -> str:
        lines = [f"wrote {self.root}"]
        for split in SPLITS:
            n = self.rows[split]
            lines.append(f"  {split + '.csv':<12} {n['rows']:>5} rows ({n['images']} pictures, {n['audio']} sounds, "
                         f"{n['trimodal']} tri-modal) in {n['categories']} categories")  # fmt: skip
        lines.append(f"  {'labels.txt':<12} {len(CATEGORIES):>5} categories; licences in licenses/")
        if self.skipped:
            lines.append(f"  left out {len(self.skipped)} unusable file(s) (debian.json: skipped)")
        return "\n".join(lines)


def build_debian(
    out: str | Path,
    *,
    seed: int = 0,
    max_per_category: int = 24,
    system_root: str | Path = "/",
    overwrite: bool = False,
) -> DebianSummary:
    """Write the set into ``out`` from the packages installed under ``system_root``. ``max_per_category``: pictures
    and sounds kept per category (each; drawn by ``seed``), so the set trains on a CPU in minutes. ``out`` must be new
    or empty unless ``overwrite``."""
    system = Path(system_root)
    missing = [p for p in PACKAGES if not (system / DOCS / p / "copyright").is_file()]
    folders = [system / PICTURES, *(system / f for f in SOUND_FOLDERS.values())]
    if missing or not all(f.is_dir() for f in folders):
        raise DebianError(f"Debian package(s) {', '.join(missing or PACKAGES)} not installed under {system}; "
                          f"install them: {INSTALL}")  # fmt: skip
    if max_per_category < MIN_ITEMS:
        raise ValueError(f"max_per_category must be at least {MIN_ITEMS}, got {max_per_category}")
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace a set there")
    root.mkdir(parents=True, exist_ok=True)
    (root / "licenses").mkdir(exist_ok=True)
    for package in PACKAGES:
        shutil.copyfile(system / DOCS / package / "copyright", root / "licenses" / f"{package}.copyright")
    skipped: list = []
    # openclipart ships some pictures twice: in several folders (the same bytes), or under two titles or as _01 and
    # _02 (the same pixels): one copy each, in the first category, so no picture is both trained on and tested
    seen_bytes: set = set()
    seen_pixels: set = set()
    items = {}
    for index, (label, category) in enumerate(CATEGORIES.items()):
        rng = np.random.default_rng([seed, index])
        pictures = _draw(_unique(_glob(system / PICTURES, category.pictures), seen_bytes), max_per_category, rng)
        sounds = _draw(_unique(_sound_files(system, category.sounds), seen_bytes), max_per_category, rng)
        items[label] = (
            [p for p in (_store_picture(f, root, label, seen_pixels, skipped) for f in pictures) if p],
            [s for s in (_store_sound(f, root, label, skipped) for f in sounds) if s],
        )
    splits = _split(items)
    counts = {}
    for split in SPLITS:
        lines = [row for label, (pictures, sounds) in splits[split].items() for row in _rows(label, pictures, sounds)]
        _write_csv(root / f"{split}.csv", lines)
        counts[split] = {
            "rows": len(lines),
            "images": sum(1 for r in lines if r[0]),
            "audio": sum(1 for r in lines if r[1]),
            "trimodal": sum(1 for r in lines if r[0] and r[1]),
            "categories": len({r[2] for r in lines}),
        }
    (root / "labels.txt").write_text("\n".join(CATEGORIES) + "\n", encoding="utf-8")
    info = {
        "generator": GENERATOR,
        "seed": seed,
        "max_per_category": max_per_category,
        "packages": _versions(system),
        "categories": {
            split: {label: {"images": len(p), "audio": len(s)} for label, (p, s) in splits[split].items()}
            for split in SPLITS
        },
        "heldout_categories": list(HELDOUT_CATEGORIES),
        "rows": counts,
        "skipped": [[str(path), reason] for path, reason in skipped],
        "licenses": {
            "openclipart-png": "public domain (Creative Commons Public Domain Dedication)",
            "sonic-pi-samples": "CC0 for the samples it lists, MIT for the rest (licenses/sonic-pi-samples.copyright)",
            "sound-theme-freedesktop": "GPL-2, GPL-2+, CC-BY-3.0 or CC-BY-SA-3.0 per sound "
            "(licenses/sound-theme-freedesktop.copyright)",
        },
    }
    (root / "debian.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return DebianSummary(root, counts, skipped)


# ------------------------------------------------------------------------------------------------ finding files


def _glob(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})


def _sound_files(system: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = set()
    for pattern in patterns:
        package, glob = pattern.split(":", 1)
        found |= set(_glob(system / SOUND_FOLDERS[package], (glob,)))
    return sorted(found)


def _unique(paths: list[Path], seen_bytes: set) -> list[Path]:
    kept = []
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen_bytes:
            seen_bytes.add(digest)
            kept.append(path)
    return kept


def _draw(paths: list[Path], most: int, rng: np.random.Generator) -> list[Path]:
    """A seeded order of the paths (the split takes its held-out items from the front), at most ``most`` of them."""
    return [paths[i] for i in rng.permutation(len(paths))[:most]]


# ------------------------------------------------------------------------------------------------ storing files


def _store_picture(source: Path, root: Path, label: str, seen_pixels: set, skipped: list) -> tuple[str, str] | None:
    """-> (path relative to root, title) of the stored PNG; None for pixels stored before, or (with a reason in
    ``skipped``) for a picture that cannot be read or is blank."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_SOURCE_PIXELS:
                    skipped.append((source, f"{image.width} x {image.height} pixels, over {MAX_SOURCE_PIXELS:,}"))
                    return None
                image.load()
                picture = image.convert("RGBA") if image.mode != "RGB" else image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # Pillow's limit, from the header
        skipped.append((source, f"too many pixels to decode safely: {error}"))
        return None
    except OSError as error:
        skipped.append((source, f"cannot be read: {error}"))
        return None
    digest = hashlib.sha256(repr((picture.mode, picture.size)).encode() + picture.tobytes()).hexdigest()
    if digest in seen_pixels:
        return None
    seen_pixels.add(digest)
    picture.thumbnail((MAX_EDGE, MAX_EDGE), Image.Resampling.LANCZOS)
    relative = f"images/{_slug(label)}/{source.stem}.png"
    copies = 1
    while (root / relative).exists():  # two folders' bell.png: both kept, under two names
        copies += 1
        relative = f"images/{_slug(label)}/{source.stem}_{copies}.png"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    picture.save(root / relative, optimize=False)
    try:
        decoded = load_image(root / relative)  # the runtime's decoder, as training and `synergy infer` will read it
        if all(low == high for low, high in decoded.getextrema()):
            raise UnsupportedImage(str(source), "a blank picture: every pixel has one colour")
    except UnsupportedImage as error:
        (root / relative).unlink()
        skipped.append((source, str(error)))
        return None
    return relative, picture_title(source.stem)


def _store_sound(source: Path, root: Path, label: str, skipped: list) -> tuple[str, str] | None:
    """-> (path relative to root, the sample's name in words) of the copied sound, or None if the runtime's decoder
    refuses it (the reason in ``skipped``)."""
    try:
        load_audio(source, CHECK_SAMPLE_RATE)
    except UnsupportedAudio as error:
        skipped.append((source, str(error)))
        return None
    relative = f"audio/{_slug(label)}/{source.name}"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, root / relative)
    return relative, sound_name(source.stem)


def picture_title(stem: str) -> str:
    """openclipart's file name -> its title in words: ``jingle_bells_01`` -> ``jingle bells``. The name is the title
    and the author cut to 24 characters, so a title may end in part of a name (``guitar jarno vasamaa``)."""
    words = [w for w in re.split(r"[_\-\s.]+", stem.lower()) if w and not w.isdigit()]
    return " ".join(re.sub(r"\d+$", "", w) or w for w in words)


# sonic-pi's sample families (the part of the name before the first underscore) in words
SAMPLE_FAMILIES = {"bd": "bass drum", "sn": "snare drum", "elec": "electronic", "guit": "guitar", "ambi": "ambient",
                   "perc": "percussion", "mehackit": "", "misc": "", "glitch": "glitch", "loop": "loop"}  # fmt: skip


def sound_name(stem: str) -> str:
    """A sample's name in words: ``bd_808`` -> ``bass drum 808``, ``phone-incoming-call`` -> ``phone incoming call``."""
    family, _, rest = stem.partition("_")
    words = [SAMPLE_FAMILIES.get(family, family), *re.split(r"[_\-]+", rest)] if rest else re.split(r"[_\-]+", stem)
    return " ".join(w for w in words if w)


def _slug(label: str) -> str:
    return label.replace(" ", "_")


# ------------------------------------------------------------------------------------------------ splits and rows


def _split(items: dict) -> dict:
    """-> {split: {label: (pictures, sounds)}}: held-out categories whole into ``heldout``; in every other category
    the first ``VAL_SHARE`` of each modality's (seeded) items into ``val``, the rest into ``train``. A seen category's
    modality with fewer than ``MIN_ITEMS`` items is left out (it could not be both trained and tested)."""
    splits = {split: {} for split in SPLITS}
    for label, (pictures, sounds) in items.items():
        if label in HELDOUT_CATEGORIES:
            splits["heldout"][label] = (pictures, sounds)
            continue
        pictures = pictures if len(pictures) >= MIN_ITEMS else []
        sounds = sounds if len(sounds) >= MIN_ITEMS else []
        if not pictures and not sounds:
            continue
        held = [max(1, round(VAL_SHARE * len(kind))) if kind else 0 for kind in (pictures, sounds)]
        splits["val"][label] = (pictures[: held[0]], sounds[: held[1]])
        splits["train"][label] = (pictures[held[0] :], sounds[held[1] :])
    return splits


def _rows(label: str, pictures: list, sounds: list) -> list[tuple]:
    """One row per item: the first min(pictures, sounds) of each paired (tri-modal), the rest alone."""
    rows = []
    for i in range(max(len(pictures), len(sounds))):
        picture = pictures[i] if i < len(pictures) else None
        sound = sounds[i] if i < len(sounds) else None
        a_label = f"{'an' if label[0] in 'aeiou' else 'a'} {label}"
        title = _words(picture[1], label) if picture else ""
        name = _words(sound[1], label) if sound else ""
        if picture and sound:
            drawing = f"a drawing of {title}" if title else "a drawing"
            caption = f"{a_label}: {drawing}, and {f'the sound {name}' if name else 'its sound'}."
        elif picture:
            caption = f"a clip-art drawing of {a_label}" + (f": {title}." if title else ".")
        else:
            caption = f"the sound of {a_label}" + (f": {name}." if name else ".")
        rows.append((picture[0] if picture else "", sound[0] if sound else "", label, caption))
    return rows


HELDOUT_WORDS = re.compile(r"\b(" + "|".join(re.escape(c) for c in HELDOUT_CATEGORIES) + r")s?\b")


def _words(words: str, label: str) -> str:
    """A title or sample name for a caption, or nothing where a seen category's item names a held-out category (a
    road sign titled 'horse'): that word would reach training and the category would no longer be unseen."""
    return "" if label not in HELDOUT_CATEGORIES and HELDOUT_WORDS.search(words) else words


def _versions(system: Path) -> dict:
    """Each package's version from dpkg's status file, where there is one (a fake tree has none)."""
    status = system / "var/lib/dpkg/status"
    if not status.is_file():
        return dict.fromkeys(PACKAGES)
    versions = dict.fromkeys(PACKAGES)
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version): (.+)$", stanza, flags=re.M))
        if fields.get("Package") in versions:
            versions[fields["Package"]] = fields.get("Version")
    return versions


def _write_csv(path: Path, lines: list[tuple]) -> None:
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("img_path", "wav_path", "label", "caption"))
        writer.writerows(lines)
    temporary.replace(path)
