"""`synergy infer` (cli.infer.run and the click command): files, folders and globs; table, JSON lines and
--out files; the closing summary line; explicit fusing by file stem; file names never cut; exit codes 0 / 1 / 2;
and no torch in the process (checked in subprocesses)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile

from synergy.cli.infer import InferInputs, InferOptions, run
from synergy.cli.infer_output import shorten_path
from synergy.runtime import InferUsageError, LabelsError

from .conftest import LABELS, SAMPLE_RATE, picture, tone


def infer(audio, image, labels, video=(), **options) -> int:
    """``run`` with the inputs and the options as keywords."""
    return run(InferInputs(audio, image, video), InferOptions(labels, **options))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """audio/ (3 good WAV/FLAC + 1 empty), images/ (3 PNG + 1 broken), labels.txt."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "audio").mkdir()
    (root / "images").mkdir()
    for i, freq in enumerate((220, 440, 880)):
        soundfile.write(
            root / "audio" / f"{i}.{'flac' if i == 1 else 'wav'}", tone(0.3 + 0.4 * i, freq=freq), SAMPLE_RATE
        )
        picture(40 + 10 * i, 50, seed=i).save(root / "images" / f"{i}.png")
    soundfile.write(root / "audio" / "3-empty.wav", np.zeros((0, 1), np.float32), SAMPLE_RATE)
    (root / "images" / "3-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "audio" / "notes.txt").write_text("not audio, and not picked up from the folder")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n\n", encoding="utf-8")
    return root


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _summary(err: str) -> str:
    """The last stderr line, which every run ends with."""
    return err.strip().splitlines()[-1]


def test_folder_as_json_lines_with_a_failure(inputs, tiny_bundle, capsys):
    code = infer(
        [str(inputs / "audio")], [], str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), top_k=3, as_json=True
    )
    out, err = capsys.readouterr()
    records = _json_lines(out)
    assert code == 1
    assert _summary(err).startswith("synergy infer: 4 inputs, 3 ok, 1 failed in ")
    assert [r["input"] for r in records] == [
        str(inputs / "audio" / n) for n in ("0.wav", "1.flac", "2.wav", "3-empty.wav")
    ]
    assert [r["ok"] for r in records] == [True, True, True, False]
    assert all(len(r["top"]) == 3 and r["top"][0]["label"] in LABELS for r in records[:3])
    assert records[3]["error"]["type"] == "UnsupportedAudio" and "0 frames" in records[3]["error"]["message"]


def test_table_for_people_and_exit_0(inputs, tiny_bundle, capsys):
    files = [str(inputs / "images" / f"{i}.png") for i in range(3)]
    code = infer([], files, str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), top_k=2, batch_size=2)
    out, err = capsys.readouterr()
    assert code == 0
    assert err.strip().splitlines() == [_summary(err)] and _summary(err).startswith(
        "synergy infer: 3 inputs, 3 ok, 0 failed"
    )
    assert _summary(err).endswith(" s on onnxruntime")  # the engine auto chose (this suite's exports: no OpenVINO)
    lines = out.splitlines()
    assert lines[0].split() == ["input", "#", "label", "probability", "similarity"]  # the JSON's words
    assert len(lines) == 1 + 3 * 2  # one header even across batches, then top-2 per image
    assert lines[1].split()[0].endswith("images/0.png") and lines[3].split()[0].endswith("images/1.png")
    assert lines[2].split()[0] == "2"  # the input is named once, on its first row


def test_audio_and_images_answer_one_by_one_by_default(inputs, tiny_bundle, capsys):
    audio = [str(inputs / "audio" / "*.wav"), str(inputs / "audio" / "1.flac")]  # 0, 2, 3-empty, then 1
    image = [str(inputs / "images" / "?.png")]  # 0, 1, 2: not as many as the audio files, and that is fine
    code = infer(audio, image, str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), as_json=True)
    out, err = capsys.readouterr()
    records = _json_lines(out)
    assert code == 1
    assert [(r["modality"], r["ok"]) for r in records] == [("audio", True)] * 2 + [("audio", False)] + [
        ("audio", True)
    ] + [("image", True)] * 3
    assert _summary(err).startswith("synergy infer: 7 inputs, 6 ok, 1 failed")


def test_fuse_pairs_by_stem_and_reports_the_unpaired(inputs, tiny_bundle, capsys):
    audio = [str(inputs / "audio" / "2.wav"), str(inputs / "audio" / "1.flac"), str(inputs / "audio" / "0.wav")]
    audio.append(str(inputs / "audio" / "3-empty.wav"))
    image = [str(inputs / "images" / "*.png")]  # 0, 1, 2, 3-broken: sorted, so not in the audio order
    code = infer(audio, image, str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), as_json=True, fuse=True)
    out, err = capsys.readouterr()
    records = _json_lines(out)
    assert code == 1
    assert "--fuse: 3 audio+image pair(s) by file stem; 2 file(s) without a partner" in err
    unpaired = [r for r in records if not r["ok"]]
    assert [(r["input"], r["error"]["type"]) for r in unpaired] == [
        (str(inputs / "audio" / "3-empty.wav"), "UnpairedInput"),
        (str(inputs / "images" / "3-broken.png"), "UnpairedInput"),
    ]
    assert "no image file named 3-empty.*" in unpaired[0]["error"]["message"]
    pairs = [r for r in records if r["ok"]]
    assert [(r["modality"], r["audio"], r["image"]) for r in pairs] == [
        ("audio+image", str(inputs / "audio" / f"{stem}.{ext}"), str(inputs / "images" / f"{stem}.png"))
        for stem, ext in (("2", "wav"), ("1", "flac"), ("0", "wav"))
    ]  # paired by name, in the audio order, never by position
    assert pairs[0]["input"] == f"{inputs / 'audio' / '2.wav'} + {inputs / 'images' / '2.png'}"
    assert _summary(err).startswith("synergy infer: 5 inputs, 3 ok, 2 failed")


def test_fuse_refuses_ambiguous_stems_and_no_pairs(inputs, tiny_bundle, tmp_path):
    labels, bundle = str(inputs / "labels.txt"), str(tiny_bundle[0])
    both = [str(inputs / "audio" / "1.flac"), str(tmp_path / "1.wav")]
    soundfile.write(tmp_path / "1.wav", tone(0.3), SAMPLE_RATE)
    with pytest.raises(InferUsageError, match=r"both audio named '1'; rename one"):
        infer(both, [str(inputs / "images" / "1.png")], labels, bundle=bundle, fuse=True)
    with pytest.raises(InferUsageError, match=r"no audio and image files with the same stem.*dog.wav \+ dog.png"):
        infer(
            [str(inputs / "audio" / "3-empty.wav")],
            [str(inputs / "images" / "0.png")],
            labels,
            bundle=bundle,
            fuse=True,
        )
    with pytest.raises(InferUsageError, match=r"give both --audio and --image"):
        infer([str(inputs / "audio")], [], labels, bundle=bundle, fuse=True)


def test_out_file_gets_the_records_and_the_terminal_only_failures_and_summary(inputs, tiny_bundle, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    code = infer([str(inputs / "audio")], [], str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), out=str(results))
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    records = _json_lines(results.read_text(encoding="utf-8"))
    assert [r["ok"] for r in records] == [True, True, True, False] and all(len(r["top"]) == 5 for r in records[:3])
    assert err.count("error: UnsupportedAudio") == 1
    assert _summary(err).endswith(f"; results in {results}")
    with pytest.raises(InferUsageError, match=r"is a folder; give a file name"):
        infer([str(inputs / "audio")], [], str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), out=str(tmp_path))


def test_shorten_path_drops_folders_never_the_file_name():
    assert shorten_path("a/b/c.wav", 60) == "a/b/c.wav"
    assert shorten_path("/data/very/long/folder/name/dog_barking.wav", 24) == "…/name/dog_barking.wav"
    name = "an_extremely_long_file_name_of_a_recording_made_in_the_field_2024.wav"
    assert shorten_path(f"/data/{name}", 30) == name  # overflows its column rather than losing its start


def test_table_shows_long_file_names_whole(inputs, tiny_bundle, tmp_path, capsys):
    deep = tmp_path / ("nested_" * 8) / "more"
    deep.mkdir(parents=True)
    name = "a_recording_whose_name_alone_is_longer_than_the_sixty_character_column.wav"
    soundfile.write(deep / name, tone(0.4), SAMPLE_RATE)
    code = infer([str(deep / name)], [], str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]), top_k=1)
    out, _ = capsys.readouterr()
    assert code == 0
    assert out.splitlines()[1].split()[0] == name


def test_missing_files_and_empty_globs_fail_alone(inputs, tiny_bundle, capsys):
    audio = [str(inputs / "audio" / "0.wav"), str(inputs / "nope.wav"), str(inputs / "*.mp3")]
    code = infer(audio, [], str(inputs / "labels.txt"), bundle=str(tiny_bundle[0]))
    out, err = capsys.readouterr()
    assert code == 1
    assert "0.wav" in out and "nope.wav" not in out
    assert "*.mp3: no files match this pattern" in err
    assert "nope.wav: no such file; check the path" in err
    assert _summary(err).startswith("synergy infer: 3 inputs, 1 ok, 2 failed")


def test_usage_errors(inputs, tiny_bundle, tmp_path, monkeypatch):
    labels, bundle = str(inputs / "labels.txt"), str(tiny_bundle[0])
    monkeypatch.chdir(tmp_path)  # the default bundle path is relative: `make demo` writes one in the checkout
    with pytest.raises(InferUsageError, match=r"no inputs"):
        infer([], [], labels, bundle=bundle)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(LabelsError, match=r"no labels"):
        infer([str(inputs / "audio")], [], str(empty), bundle=bundle)
    with pytest.raises(InferUsageError, match=r"not a folder.*make demo"):
        infer([str(inputs / "audio")], [], labels, bundle="runs/demo/bundle")
    with pytest.raises(InferUsageError, match=r"top-k"):
        infer([str(inputs / "audio")], [], labels, bundle=bundle, top_k=0)


def test_click_command_exit_codes_and_the_removed_spelling(inputs, tiny_bundle):
    from click.testing import CliRunner

    from synergy import cli

    labels = ["--labels", str(inputs / "labels.txt")]
    runner = CliRunner()
    ok = runner.invoke(
        cli.main,
        ["infer", *labels, "--bundle", str(tiny_bundle[0]), "--audio", str(inputs / "audio" / "0.wav"), "--json"],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[0])["ok"] is True
    old = runner.invoke(cli.main, ["infer", *labels, "--model", str(tiny_bundle[0]), "--audio", str(inputs / "audio")])
    assert old.exit_code == 2  # refused before anything ran
    assert f"Error: --model was removed; use --bundle {tiny_bundle[0]}" in old.stderr
    usage = runner.invoke(cli.main, ["infer", *labels, "--bundle", str(tiny_bundle[0])])
    assert usage.exit_code == 2 and "Error: no inputs" in usage.stderr
    bad_bundle = runner.invoke(cli.main, ["infer", *labels, "--bundle", str(inputs), "--audio", str(inputs / "audio")])
    assert bad_bundle.exit_code == 2 and "manifest" in bad_bundle.stderr


def test_real_process_with_fuse_and_out(inputs, tiny_bundle, tmp_path):
    """The installed `synergy` entry point, as a user runs it."""
    synergy = os.path.join(os.path.dirname(sys.executable), "synergy")
    results = tmp_path / "results.jsonl"
    command = [synergy, "infer", "--bundle", str(tiny_bundle[0]), "--labels", str(inputs / "labels.txt"), "--fuse"]
    command += ["--audio", str(inputs / "audio" / "0.wav"), "--image", str(inputs / "images"), "--out", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # 1.png, 2.png, 3-broken.png have no audio partner
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("synergy infer: 4 inputs, 1 ok, 3 failed in ")
    records = _json_lines(results.read_text(encoding="utf-8"))
    assert [r["modality"] for r in records if r["ok"]] == ["audio+image"]


def _no_torch_subprocess(code: str) -> subprocess.CompletedProcess:
    check = textwrap.dedent(code) + textwrap.dedent(
        """
        import sys
        heavy = sorted(m for m in ("torch", "transformers", "torchaudio", "torchvision") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env=env)


def test_import_and_inference_leave_torch_out(inputs, tiny_bundle):
    result = _no_torch_subprocess(
        f"""
        import synergy.runtime
        from synergy.runtime import Runtime
        from synergy.cli.infer import InferInputs, InferOptions, run
        inputs = InferInputs([{str(inputs / "audio" / "0.wav")!r}], [{str(inputs / "images" / "0.png")!r}])
        code = run(inputs, InferOptions({str(inputs / "labels.txt")!r}, bundle={str(tiny_bundle[0])!r}, as_json=True))
        assert code == 0, code
        """
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_cli_help_leaves_torch_out():
    result = _no_torch_subprocess(
        """
        from synergy.cli import main
        try:
            main(["infer", "--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        """
    )
    assert result.returncode == 0, result.stderr
    assert "--labels" in result.stdout and "--fuse" in result.stdout and "HEAVY []" in result.stdout, result.stdout
