"""`synergy towers` for audio: the audio families listed, the real aisfx folder written from the installed wheel with
its licence, and a missing wheel answered with the pip command."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from synergy.cli import main
from synergy.core import pretrained_folders

ROOT = Path(__file__).resolve().parents[3]  # the folder that holds the `synergy` package


def test_towers_list_names_the_audio_families_without_importing_torch():
    code = "import sys; from synergy.cli import main; main(['towers', 'list'], standalone_mode=False); "
    done = subprocess.run(
        [sys.executable, "-c", code + "print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    audio = [line for line in done.stdout.splitlines() if line.startswith("audio")]
    assert len(audio) == 3
    assert "AST" in audio[0] and "wav2vec2 / HuBERT" in audio[1] and "aisfx" in audio[2]
    for text in ("Wav2Vec2FeatureExtractor", "synergy towers aisfx --out DIR"):
        assert text in done.stdout, text
    assert done.stdout.splitlines()[-1] == "False"  # torch never imported


def test_towers_aisfx_writes_the_pinned_cnn_with_its_licence(tmp_path):
    out = tmp_path / "aisfx"
    result = CliRunner().invoke(main, ["towers", "aisfx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"sha256 {pretrained_folders.AISFX.sha256} (verified)" in result.output
    assert "licence CC-BY-4.0" in result.output and f"model.audio.pretrained={out}" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "aisfx" and config["weights_licence"]["licence"] == "CC-BY-4.0"
    assert (out / "model.safetensors").is_file() and (out / "LICENSE").is_file()


def test_towers_aisfx_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    absent = dataclasses.replace(pretrained_folders.AISFX, distribution="aisfx-not-installed")
    monkeypatch.setattr(pretrained_folders, "AISFX", absent)
    result = CliRunner().invoke(main, ["towers", "aisfx", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "pip install --no-deps aisfx-not-installed" in result.output
    assert not (tmp_path / "a").exists()
