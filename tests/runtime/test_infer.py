"""`synergy infer` (runtime.infer.run and the click command): files, folders and globs; table and JSON lines;
exit codes 0 / 1 / 2; and no torch in the process (checked in subprocesses)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile

from synergy.runtime.errors import InferUsageError, LabelsError
from synergy.runtime.infer import run

from .conftest import LABELS, SAMPLE_RATE, picture, tone


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


def test_folder_as_json_lines_with_a_failure(inputs, tiny_bundle, capsys):
    code = run(
        [str(inputs / "audio")], [], str(inputs / "labels.txt"), model=str(tiny_bundle[0]), top_k=3, as_json=True
    )
    records = _json_lines(capsys.readouterr().out)
    assert code == 1
    assert [r["input"] for r in records] == [
        str(inputs / "audio" / n) for n in ("0.wav", "1.flac", "2.wav", "3-empty.wav")
    ]
    assert [r["ok"] for r in records] == [True, True, True, False]
    assert all(len(r["top"]) == 3 and r["top"][0]["label"] in LABELS for r in records[:3])
    assert records[3]["error"]["type"] == "UnsupportedAudio" and "0 frames" in records[3]["error"]["message"]


def test_table_for_people_and_exit_0(inputs, tiny_bundle, capsys):
    files = [str(inputs / "images" / f"{i}.png") for i in range(3)]
    code = run([], files, str(inputs / "labels.txt"), model=str(tiny_bundle[0]), top_k=2, batch_size=2)
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["input", "#", "label", "prob", "cos"]
    assert len(lines) == 1 + 3 * 2  # one header even across batches, then top-2 per image
    assert lines[1].split()[0].endswith("images/0.png") and lines[3].split()[0].endswith("images/1.png")
    assert lines[2].split()[0] == "2"  # the input is named once, on its first row


def test_globs_fusion_and_reported_failures(inputs, tiny_bundle, capsys):
    audio = [str(inputs / "audio" / "*.wav"), str(inputs / "audio" / "1.flac")]  # 0, 2, 3-empty, then 1
    image = [str(inputs / "images" / "*.png")]  # 0, 1, 2, 3-broken
    code = run(audio, image, str(inputs / "labels.txt"), model=str(tiny_bundle[0]), as_json=True, batch_size=3)
    records = _json_lines(capsys.readouterr().out)
    assert code == 1
    assert [r["ok"] for r in records] == [True, True, False, False]
    assert records[0]["modality"] == "audio+image"
    assert records[0]["input"] == f"{inputs / 'audio' / '0.wav'} + {inputs / 'images' / '0.png'}"
    assert records[2]["error"]["type"] == "UnsupportedAudio"  # 3-empty.wav, paired with 2.png
    assert records[3]["error"]["type"] == "UnsupportedImage"  # 1.flac with 3-broken.png


def test_missing_files_and_empty_globs_fail_alone(inputs, tiny_bundle, capsys):
    audio = [str(inputs / "audio" / "0.wav"), str(inputs / "nope.wav"), str(inputs / "*.mp3")]
    code = run(audio, [], str(inputs / "labels.txt"), model=str(tiny_bundle[0]))
    out, err = capsys.readouterr()
    assert code == 1
    assert "0.wav" in out and "nope.wav" not in out
    assert "*.mp3: no files match this pattern" in err
    assert "nope.wav: no such file; check the path" in err
    assert "2 of 3 inputs failed" in err


def test_usage_errors(inputs, tiny_bundle, tmp_path, monkeypatch):
    labels, model = str(inputs / "labels.txt"), str(tiny_bundle[0])
    monkeypatch.chdir(tmp_path)  # the default bundle path is relative: `make demo` writes one in the checkout
    with pytest.raises(InferUsageError, match=r"no inputs"):
        run([], [], labels, model=model)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(LabelsError, match=r"no labels"):
        run([str(inputs / "audio")], [], str(empty), model=model)
    with pytest.raises(InferUsageError, match=r"not a folder.*make demo"):
        run([str(inputs / "audio")], [], labels, model="runs/demo/bundle")
    with pytest.raises(InferUsageError, match=r"--audio gives 4 files and --image 3"):
        run([str(inputs / "audio")], [str(inputs / "images" / "?.png")], labels, model=model)
    with pytest.raises(InferUsageError, match=r"top-k"):
        run([str(inputs / "audio")], [], labels, model=model, top_k=0)


def test_unfused_classifies_each_file(inputs, tiny_bundle, capsys):
    code = run(
        [str(inputs / "audio" / "0.wav")],
        [str(inputs / "images" / "0.png"), str(inputs / "images" / "1.png")],
        str(inputs / "labels.txt"),
        model=str(tiny_bundle[0]),
        as_json=True,
        fuse=False,
    )
    assert code == 0
    assert [r["modality"] for r in _json_lines(capsys.readouterr().out)] == ["audio", "image", "image"]


def test_click_command_exit_codes(inputs, tiny_bundle):
    cli = pytest.importorskip("synergy.cli")
    from click.testing import CliRunner

    if "infer" not in cli.main.commands:
        pytest.skip("synergy.cli has no infer command yet")
    base = ["infer", "--labels", str(inputs / "labels.txt"), "--model", str(tiny_bundle[0])]
    runner = CliRunner()
    ok = runner.invoke(cli.main, [*base, "--audio", str(inputs / "audio" / "0.wav"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[0])["ok"] is True
    assert runner.invoke(cli.main, [*base, "--audio", str(inputs / "audio")]).exit_code == 1
    usage = runner.invoke(cli.main, ["infer", "--labels", str(inputs / "labels.txt"), "--model", str(tiny_bundle[0])])
    assert usage.exit_code == 2 and "no inputs" in usage.stderr


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
        from synergy.runtime.infer import run
        code = run([{str(inputs / "audio" / "0.wav")!r}], [{str(inputs / "images" / "0.png")!r}],
                   {str(inputs / "labels.txt")!r}, model={str(tiny_bundle[0])!r}, as_json=True)
        assert code == 0, code
        """
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_cli_help_leaves_torch_out():
    cli = pytest.importorskip("synergy.cli")
    if "infer" not in cli.main.commands:
        pytest.skip("synergy.cli has no infer command yet")
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
    assert "--labels" in result.stdout and "HEAVY []" in result.stdout, result.stdout
