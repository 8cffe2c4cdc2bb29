"""The distribution as a user installs it: the wheel, with the serve extra, in a fresh venv without torch.

`pip install 'synergy-clip[serve]'` must give a working `synergy infer` and `synergy serve` with torch and
transformers not importable (the core dependencies are the runtime's; torch comes only with the train / export
extras). The bundle is the runtime tests' tiny one, built here with torch and then used from the fresh venv.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("synergy_tests_runtime_conftest", ROOT / "tests/runtime/conftest.py")
runtime_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_fixtures)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv (no system site-packages) with the built wheel installed with its serve extra."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "synergy"  # a copy: setuptools builds in the source tree and would leave build/ in the checkout
    skipped = shutil.ignore_patterns(".venv", ".git", "runs", "data", "build", "*.egg-info")
    shutil.copytree(ROOT, source, ignore=skipped)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work), str(source)]
    )
    wheels = sorted(work.glob("synergy_clip-*.whl"))
    assert len(wheels) == 1, f"expected one synergy_clip wheel, got {[w.name for w in work.iterdir()]}"
    presets = {Path(n).name for n in zipfile.ZipFile(wheels[0]).namelist() if n.startswith("synergy/core/presets/")}
    assert presets == {p.name for p in (ROOT / "core/presets").glob("*.json")}, presets  # the factory's data
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", f"{wheels[0]}[serve]"])
    return venv


@pytest.mark.slow
def test_wheel_with_serve_extra_runs_infer_and_serve_without_torch(fresh_venv, tmp_path):
    python = fresh_venv / "bin/python"
    for module in ("torch", "transformers"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} is importable in the serve-only venv"
    installed = _run([str(python), "-c", "import synergy, importlib.metadata as m; print(m.version('synergy-clip'))"])
    assert installed.stdout.strip() == "0.1.0"

    bundle = tmp_path / "bundle"
    runtime_fixtures.build_bundle(bundle)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(runtime_fixtures.audio_bytes(runtime_fixtures.tone(0.5)))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(runtime_fixtures.LABELS) + "\n", encoding="utf-8")

    synergy = str(fresh_venv / "bin/synergy")
    infer = _run([synergy, "infer", "--bundle", str(bundle), "--audio", str(clip), "--labels", str(labels), "--json"])
    answer = json.loads(infer.stdout.splitlines()[0])
    assert answer["ok"] and answer["top"][0]["label"] in runtime_fixtures.LABELS

    server = subprocess.Popen(
        [synergy, "serve", "--bundle", str(bundle), "--port", "0", "--threads", "1"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stderr.readline()
        assert "listening on http://" in line, line + server.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not become ready"
            time.sleep(0.1)
        body = json.dumps({"modality": "text", "input": ["a red circle"]}).encode()
        request = urllib.request.Request(
            url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            embedding = json.loads(response.read())["data"][0]["embedding"]
        assert len(embedding) == runtime_fixtures.EMBED_DIM
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()
