"""Hostile and careless bundles (issue 16): each damaged copy of the tiny bundle ends in a one-line ``BundleError``
naming the file and the field, and `synergy infer` exits 2 with no traceback; nothing outside the bundle is opened,
and nothing runs unverified unless ``--trust-unverified`` is given."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from synergy import cli
from synergy.runtime import BundleError, Runtime, RuntimeClosed

from .conftest import EMBED_DIM, LABELS, SAMPLE_RATE, build_tokenizer, tone


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle, manifest):
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit(change):
    """A case that edits manifest.json's parsed JSON in place."""

    def apply(bundle):
        manifest = _manifest(bundle)
        change(manifest)
        _write(bundle, manifest)

    return apply


def _rehash(bundle, *names):
    manifest = _manifest(bundle)
    for name in names:
        manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    _write(bundle, manifest)


def _outside_tower(bundle):
    shutil.copy(bundle / "audio.onnx", bundle.parent / "x.onnx")
    _edit(lambda m: m["towers"]["audio"].update(file="../x.onnx"))(bundle)


def _absolute_tower(bundle):
    shutil.copy(bundle / "audio.onnx", bundle.parent / "x.onnx")
    _edit(lambda m: m["towers"]["audio"].update(file=str(bundle.parent / "x.onnx")))(bundle)


def _symlinked_tower(bundle):
    """audio.onnx replaced by a link to a file outside the bundle (same bytes: the hash alone would pass)."""
    shutil.move(bundle / "audio.onnx", bundle.parent / "x.onnx")
    os.symlink(bundle.parent / "x.onnx", bundle / "audio.onnx")


def _unlisted_tower(bundle):
    shutil.copy(bundle / "audio.onnx", bundle / "other.onnx")
    _edit(lambda m: m["towers"]["audio"].update(file="other.onnx"))(bundle)


def _fifo_tower(bundle):
    (bundle / "audio.onnx").unlink()
    os.mkfifo(bundle / "audio.onnx")


def _fifo_manifest(bundle):
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")


def _garbage(name):
    def apply(bundle):
        (bundle / name).write_bytes(b"\x08\x07garbage, not a graph" * 10)
        _rehash(bundle, name)

    return apply


def _other_vocabulary(bundle):
    """A well-formed tokenizer with a much larger vocabulary than the text graph's table (listed and hashed)."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"word{i}" for i in range(500)])
    tokenizer.save(str(bundle / "tokenizer.json"))
    _rehash(bundle, "tokenizer.json")


def _renamed_input(bundle):
    _edit(lambda m: m["towers"]["text"]["inputs"][0].update(name="ids"))(bundle)


def _not_utf8(bundle):
    (bundle / "manifest.json").write_bytes(b'{"format_version": 2, "x": "\xff\xfe"}')


def _nan_scale(bundle):
    text = (bundle / "manifest.json").read_text()
    manifest = _manifest(bundle)
    old = json.dumps(manifest["logit_scales"]["text_audio"])
    (bundle / "manifest.json").write_text(text.replace(f'"text_audio": {old}', '"text_audio": NaN', 1))


def _drop_files(m):
    del m["files"]


# (case id, damage, message regex). Every case: Runtime.open (or the first use) raises BundleError, infer exits 2.
CASES = [
    ("tower ../x.onnx", _outside_tower, r"towers.audio.file is '../x.onnx'; every file must be a relative path"),
    ("tower absolute path", _absolute_tower, r"towers.audio.file is '/.*'; every file must be a relative path"),
    ("tower symlinked outside", _symlinked_tower, r"audio.onnx resolves outside the bundle"),
    ("tower not listed", _unlisted_tower, r"other.onnx is not listed with its sha256"),
    ("tower is a FIFO", _fifo_tower, r"audio.onnx is a FIFO"),
    ("tokenizer /etc/passwd", _edit(lambda m: m.update(tokenizer="/etc/passwd")), r"tokenizer is '/etc/passwd'"),
    ("tokenizer ../", _edit(lambda m: m.update(tokenizer="../tokenizer.json")), r"tokenizer is '../tokenizer.json'"),
    ("files {}", _edit(lambda m: m.update(files={})), r"lists no files with their sha256.*--trust-unverified"),
    ("no files key", _edit(_drop_files), r"lists no files with their sha256"),
    ("manifest is a FIFO", _fifo_manifest, r"manifest.json: is a FIFO"),
    ("manifest not UTF-8", _not_utf8, r"manifest.json: not UTF-8"),
    ("manifest a list", lambda b: (b / "manifest.json").write_text("[2]"), r"manifest.json is a JSON list"),
    ("towers a list", _edit(lambda m: m.update(towers=["image.onnx"])), r"towers is a list; expected an object"),
    ("negative logit scale", _edit(lambda m: m["logit_scales"].update(text_audio=-30.0)), r"text_audio is -30.0"),
    ("zero logit scale", _edit(lambda m: m["logit_scales"].update(image_text=0)), r"image_text is 0"),
    ("NaN logit scale", _nan_scale, r"not valid JSON \(NaN is not a JSON number"),
    ("logit scale a string", _edit(lambda m: m["logit_scales"].update(image_text="50")), r"image_text is '50'"),
    ("missing logit pair", _edit(lambda m: m["logit_scales"].pop("audio_image")), r"logit_scales has keys"),
    ("format_version 0", _edit(lambda m: m.update(format_version=0)), r"format version 0 is older"),
    ("format_version -1", _edit(lambda m: m.update(format_version=-1)), r"format version -1 is older"),
    ("format_version true", _edit(lambda m: m.update(format_version=True)), r"format_version is True, not an int"),
    ("format_version 2.0", _edit(lambda m: m.update(format_version=2.0)), r"format_version is 2.0, not an int"),
    ("embed_dim 0", _edit(lambda m: m.update(embed_dim=0)), r"embed_dim is 0; expected an integer in \[1,"),
    ("embed_dim vs graph", _edit(lambda m: m.update(embed_dim=EMBED_DIM + 1)), r"has 21 features but embed_dim"),
    ("clip_seconds 0", _edit(lambda m: m["audio"].update(clip_seconds=0)), r"audio.clip_seconds is 0"),
    ("clip_seconds tiny", _edit(lambda m: m["audio"].update(clip_seconds=0.001)), r"shorter than one 25 ms"),
    ("sample_rate 10**6", _edit(lambda m: m["audio"].update(sample_rate=10**6)), r"audio.sample_rate is 1000000"),
    ("sample_rate string", _edit(lambda m: m["audio"].update(sample_rate="8000")), r"audio.sample_rate is '8000'"),
    ("max_length 0", _edit(lambda m: m["text"].update(max_length=0)), r"text.max_length is 0"),
    ("mean of 2", _edit(lambda m: m["image"].update(mean=[0.5, 0.5])), r"image.mean is \[0.5, 0.5\]; expected 3"),
    ("std 0", _edit(lambda m: m["image"].update(std=[0.2, 0, 0.2])), r"image.std is \[0.2, 0, 0.2\]"),
    ("std negative", _edit(lambda m: m["image"].update(std=[0.2, -0.2, 0.2])), r"image.std is"),
    ("image size 0", _edit(lambda m: m["image"].update(size=0)), r"image.size is 0"),
    ("resize stretch", _edit(lambda m: m["image"].update(resize="stretch")), r"image.resize is 'stretch'; expected"),
    ("resize below crop", _edit(lambda m: m["image"].update(resize_size=1)), r"image.resize_size is 1; expected an"),
    ("resize_size huge", _edit(lambda m: m["image"].update(resize_size=10**6)), r"image.resize_size is 1000000"),
    ("resample cubic", _edit(lambda m: m["image"].update(resample="cubic")), r"image.resample is 'cubic'; expected"),
    ("rescale 0", _edit(lambda m: m["image"].update(rescale_factor=0)), r"image.rescale_factor is 0; expected"),
    ("rescale 255", _edit(lambda m: m["image"].update(rescale_factor=255)), r"image.rescale_factor is 255"),
    ("version 3 no resize", _edit(lambda m: m["image"].pop("resize")), r"manifest.json has no image.resize"),
    ("licences a list", _edit(lambda m: m.update(licences=["MIT"])), r"licences must map towers"),
    ("licence not text", _edit(lambda m: m.update(licences={"image": {"text": 1}})), r"licences.image must be"),
    ("templates a string", _edit(lambda m: m["text"].update(prompt_templates="{}")), r"prompt_templates is a str"),
    ("bad sha256", _edit(lambda m: m["files"].update({"audio.onnx": "abc"})), r"files\['audio.onnx'\] is 'abc'"),
    ("files outside", _edit(lambda m: m["files"].update({"../x": "0" * 64})), r"files entry '../x' is '../x'"),
    ("tower file missing", lambda b: (b / "image.onnx").unlink(), r"image.onnx is missing"),
    (
        "input names",
        _renamed_input,
        r"graph inputs are \['input_ids', 'attention_mask'\] but the manifest says \['ids', 'attention_mask'\]",
    ),
    ("graph garbage", _garbage("audio.onnx"), r"audio.onnx: onnxruntime cannot load this graph"),
    ("tokenizer garbage", _garbage("tokenizer.json"), r"tokenizer.json: not a readable tokenizers file"),
    ("tokenizer of another vocabulary", _other_vocabulary, r"text graph fails on 13 tokens.*of id 5\d\d"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    soundfile.write(folder / "a.wav", tone(0.4), SAMPLE_RATE)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder


def _infer(bundle, inputs, *extra):
    args = ["infer", "--bundle", str(bundle), "--labels", str(inputs / "labels.txt"), "--audio", str(inputs / "a.wav")]
    return CliRunner().invoke(cli.main, [*args, *extra])


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_bundle_is_a_one_line_bundle_error_and_exit_2(bundle_copy, inputs, damage, message):
    damage(bundle_copy)
    with pytest.raises(BundleError, match=message) as caught, Runtime.open(bundle_copy, threads=1) as runtime:
        runtime.load()  # problems only a loaded graph shows are found here, not on some later input
    assert "\n" not in str(caught.value)
    result = _infer(bundle_copy, inputs)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_trust_unverified_opens_a_bundle_without_hashes_and_says_so(bundle_copy, inputs):
    _edit(lambda m: m.update(files={}))(bundle_copy)
    with pytest.warns(UserWarning, match="trusting an unverified bundle"):
        runtime = Runtime.open(bundle_copy, threads=1, trust_unverified=True)
    assert runtime.embed_audio([(tone(0.3), SAMPLE_RATE)]).shape == (1, EMBED_DIM)
    result = _infer(bundle_copy, inputs, "--trust-unverified", "--json")
    assert result.exit_code == 0, result.output
    assert "--trust-unverified: " in result.output and "not checked against sha256" in result.output
    # trusting skips hashes, never containment
    _edit(lambda m: m["towers"]["audio"].update(file="../x.onnx"))(bundle_copy)
    with pytest.raises(BundleError, match="relative path inside the bundle"):
        Runtime.open(bundle_copy, trust_unverified=True)


def test_a_file_replaced_after_open_is_refused_at_load(bundle_copy):
    """What was hashed is what runs: graphs are read once, re-hashed and handed to onnxruntime as bytes."""
    runtime = Runtime.open(bundle_copy, threads=1)
    with open(bundle_copy / "audio.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"audio.onnx has changed since export"):
        runtime.embed_audio([(tone(0.3), SAMPLE_RATE)])


def _external_weights(bundle, list_data: bool):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(bundle / "audio.onnx")
    onnx.save_model(
        model, bundle / "audio.onnx", save_as_external_data=True, location="audio.onnx.data", size_threshold=1024
    )  # fmt: skip (small constants stay inline, as the exporter writes them)
    manifest = _manifest(bundle)
    manifest["files"]["audio.onnx"] = hashlib.sha256((bundle / "audio.onnx").read_bytes()).hexdigest()
    if list_data:
        manifest["files"]["audio.onnx.data"] = hashlib.sha256((bundle / "audio.onnx.data").read_bytes()).hexdigest()
    _write(bundle, manifest)


def test_external_weights_must_be_listed_and_verified(bundle_copy, runtime):
    wave = [(tone(0.3), SAMPLE_RATE)]
    _external_weights(bundle_copy, list_data=True)
    with Runtime.open(bundle_copy, threads=1) as listed:
        np.testing.assert_allclose(listed.embed_audio(wave), runtime.embed_audio(wave), atol=1e-6)
    with open(bundle_copy / "audio.onnx.data", "r+b") as f:  # a changed weight file is caught when it loads
        f.seek(100)
        f.write(b"\1\2\3\4")
    with pytest.raises(BundleError, match=r"audio.onnx.data has changed since export"):
        Runtime.open(bundle_copy).load("audio")


def record_hashes(monkeypatch) -> list[str]:
    """Every sha256 computed from now on (by anyone), as its hex digest, in order."""
    digests, real = [], hashlib.sha256

    class Recording:
        def __init__(self, data=b""):
            self._hash = real(data)

        def update(self, data):
            self._hash.update(data)

        def hexdigest(self):
            digests.append(self._hash.hexdigest())
            return digests[-1]

    monkeypatch.setattr(hashlib, "sha256", Recording)
    return digests


@pytest.mark.parametrize("external", [False, True], ids=["inline weights", "external weights"])
def test_each_bundle_file_is_read_and_hashed_once(bundle_copy, monkeypatch, external):
    """Open used to hash every file, and loading a tower read and hashed its graph (and weights) again, the
    tokenizer twice within open: now the bytes that load are the ones hashed, once."""
    if external:
        _external_weights(bundle_copy, list_data=True)
    files = _manifest(bundle_copy)["files"]
    digests = record_hashes(monkeypatch)
    runtime = Runtime.open(bundle_copy, threads=1)
    assert digests == [files["tokenizer.json"]]  # the towers are hashed when they load
    runtime.load()
    assert sorted(digests) == sorted(files.values()), "every listed file hashed exactly once"
    assert runtime.embed_audio([(tone(0.3), SAMPLE_RATE)]).shape == (1, EMBED_DIM)
    assert len(digests) == len(files)  # nothing read again on use


def test_unlisted_external_weights_are_never_read(bundle_copy):
    _external_weights(bundle_copy, list_data=False)
    runtime = Runtime.open(bundle_copy, threads=1)
    with pytest.raises(BundleError, match=r"audio.onnx: onnxruntime cannot load this graph.*External.*listed"):
        runtime.embed_audio([(tone(0.3), SAMPLE_RATE)])


def test_closed_is_closed(tiny_bundle):
    runtime = Runtime.open(tiny_bundle[0], threads=1)
    runtime.embed_text(["dog"])
    runtime.close()
    with pytest.raises(RuntimeClosed, match=r"this Runtime is closed; open the bundle again"):
        runtime.embed_text(["dog"])
    with pytest.raises(RuntimeClosed):
        runtime.classify(["dog", "cat"], audio=[(tone(0.3), SAMPLE_RATE)])
    runtime.close()  # twice is fine
