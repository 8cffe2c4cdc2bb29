"""Every shell command and Python block of README.md runs, so the README cannot rot.

The commands run in a temporary folder in README order, as a user would type them, with two adjustments that keep the
test at CI size: the commands in ``SHRINK`` get extra arguments appended (the tiny preset, 2 training steps, a few
files per class), and the commands in ``NOT_RUN`` are skipped for the reason given there. Both lists must name README
commands exactly: a command that changes in the README and not here fails the test. The files the README shows
(``train.json``, ``mine.json``, ``my_data/train.csv``) are written from the README's own blocks. The ``runs/demo``
commands (``make demo``'s output) run against the walkthrough's data, checkpoint and bundle, linked there.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

TINY_TRAINING = ["--set", "model=tiny", "--set", "steps=2", "--set", "batch_size=8", "--set", "warmup_steps=1"]
SHRINK = {  # README command -> arguments appended to run it at test size
    "synergy data synth --out data/synth --seed 0": [
        "--train-per-class",
        "2",
        "--val-per-class",
        "1",
        "--heldout-per-class",
        "1",
    ],
    "synergy train --config train.json": TINY_TRAINING,
    "synergy train --config mine.json": [*TINY_TRAINING[:4], "--set", "batch_size=3", "--set", "warmup_steps=1"],
    "synergy train --config mine.json --set model.text.pretrained=towers/minilm --set lock=text --set "
    "out=runs/mine-lit": [*TINY_TRAINING[:4], "--set", "batch_size=3", "--set", "warmup_steps=1"],
    "synergy train --set data=data/clips/train_videos.csv --set out=runs/video --set audio_intra_weight=0.1": [
        *TINY_TRAINING
    ],
}
NOT_RUN = {  # README command -> why this test does not run it
    "make install": "the suite runs inside the venv it makes",
    "python3 -m venv .venv && . .venv/bin/activate": "the suite runs inside the venv `make install` made, the same "
    "install",
    "pip install torch==2.13.0 && pip install -e '.[export,serve,video]'": "needs a package registry; the suite runs "
    "inside a venv with these installed",
    "pip install '.[serve]'": "needs a package registry; tests/test_packaging.py installs the wheel with this extra "
    "into a fresh venv and runs infer and serve there without torch",
    "make demo": "8-9 minutes of training; tests/test_demo.py runs the demo end to end with 3 steps",
    "make test": "the suite this test is part of",
    "make demo-mmr": "about 3.5 minutes of MMR training on make demo's checkpoint; the three synergy mmr commands "
    "below it run here at tiny size, and tests/train/test_mmr.py covers the CLI",
    "torchrun --nproc-per-node 2 -m synergy.cli train --config train.json": "two processes; tests/train runs DDP "
    "under torchrun",
    "synergy export --checkpoint runs/train/checkpoint --out runs/train/bundle-trt --format trt --precision fp16": (
        "needs TensorRT and an NVIDIA GPU"
    ),
    "synergy embed '/data/clips/**/*.wav' --bundle /data/bundle --out /data/clips.parquet --engine ray "
    "--ray-address auto --workers 64 --threads 2": "needs a Ray cluster and synergy-clip[ray]; "
    "tests/serve/test_corpus.py runs the Ray engine on a local instance with 2 workers",
    "synergy serve --bundle runs/train/bundle --port 8000 --labels data/synth/labels.txt": "a server runs until it is "
    "stopped; tests/serve/test_server.py starts it on a free port and sends these requests",
    'curl -s localhost:8000/v1/embeddings -H \'Content-Type: application/json\' -d \'{"modality": "text", '
    '"input": ["the sound of a red circle"]}\'': "needs the server above; tests/serve/test_server.py",
    "curl -s localhost:8000/v1/embeddings -F modality=audio -F input=@data/synth/audio/val/red_circle_0000.wav": (
        "needs the server above; tests/serve/test_server.py sends the same multipart form"
    ),
    "SYNERGY_API_KEY=change-me synergy serve --bundle small=runs/train/bundle --port 8000 --cors-origin "
    "https://app.example.com": "a server runs until it is stopped; tests/serve/test_auth.py starts one with keys from "
    "SYNERGY_API_KEY and a CORS origin",
    'curl -s http://127.0.0.1:8000/v1/embeddings -H "Authorization: Bearer change-me" -H "Content-Type: '
    'application/json" -d \'{"model": "small", "input": ["the sound of a red circle"]}\'': "needs the server above; "
    "tests/serve/test_auth.py sends Bearer keys",
    "curl -s localhost:8000/v1/classify -F labels=labels -F audio=@data/synth/audio/val/red_circle_0000.wav "
    "-F top_k=3": "needs the server above; tests/serve/test_server.py sends the same multipart form",
}
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")  # every shell block counts, whatever its fence says
DEMO_LINKS = {  # runs/demo/<name> -> the walkthrough's file or folder with the same layout
    "data": "data/synth",
    "checkpoint": "runs/train/checkpoint",
    "bundle": "runs/train/bundle",
    "labels.txt": "data/synth/labels.txt",
}


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """-> [(language, body, the paragraph before the block)] for every ``` block."""
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        before = text[: match.start()].rstrip().rsplit("\n\n", 1)[-1]
        found.append((match.group(1), match.group(2), before))
    return found


def shell_commands(text: str) -> list[str]:
    """Each command of the shell blocks (```bash, ```sh, ...), without its trailing comment; a line continued with a
    backslash is one command, its spacing collapsed."""
    commands = []
    for language, body, _ in fenced_blocks(text):
        if language in SHELL_LANGUAGES:
            for line in re.sub(r"\s*\\\n\s*", " ", body).splitlines():
                command = re.sub(r"\s+#\s.*$", "", line).strip()
                if command and not command.startswith("#"):
                    commands.append(command)
    return commands


def named_files(text: str) -> dict[str, str]:
    """JSON and CSV blocks whose paragraph names a file (`train.json` ...:) -> {file name: content}."""
    files = {}
    for language, body, before in fenced_blocks(text):
        name = re.search(r"`([\w./-]+\.(?:json|csv))`", before)
        if language in ("json", "csv") and name:
            files[name.group(1)] = body
    return files


def test_lists_name_readme_commands_exactly():
    commands = shell_commands(README.read_text(encoding="utf-8"))
    stale = sorted((set(SHRINK) | set(NOT_RUN)) - set(commands))
    assert not stale, f"tests/test_readme.py names commands the README no longer has: {stale}"
    assert not set(SHRINK) & set(NOT_RUN)


def test_config_keys_table_matches_train_config():
    from synergy.train.config import TrainConfig

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Train on your own data") :]
    documented = re.findall(r"^\| `(\w+)`", section, flags=re.M)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert documented == fields, "README's config key table and synergy.train.config.TrainConfig differ"


def _materialise_own_data(root: Path, manifest: str) -> None:
    """The files the README's 3-row CSV names, made from synthetic ones in the formats the names say."""
    import soundfile
    from PIL import Image

    picture = next((root / "data/synth/images/val").glob("*.png"))
    wave, rate = soundfile.read(next((root / "data/synth/audio/val").glob("*.wav")))
    folder = root / "my_data"
    folder.mkdir()
    (folder / "train.csv").write_text(manifest, encoding="utf-8")
    for row in csv.DictReader(manifest.splitlines()):
        if row["img_path"]:
            (folder / row["img_path"]).parent.mkdir(parents=True, exist_ok=True)
            Image.open(picture).convert("RGB").save(folder / row["img_path"])  # format from the suffix
        if row["wav_path"]:
            (folder / row["wav_path"]).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(folder / row["wav_path"], wave, rate)


def _run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_every_readme_command_and_python_block_runs(tmp_path):
    text = README.read_text(encoding="utf-8")
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)  # `.venv/bin/synergy`, as after `make install`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `synergy` and `python`, as in an activated venv
    files = named_files(text)
    for name in ("train.json", "mine.json"):
        (tmp_path / name).write_text(files[name], encoding="utf-8")

    commands = [c for c in shell_commands(text) if c not in NOT_RUN]
    walkthrough = [c for c in commands if "runs/demo" not in c]
    demo = [c for c in commands if "runs/demo" in c]  # after the walkthrough has made what they read
    outputs = {}
    for command in walkthrough:
        if command == "synergy train --config mine.json":  # the first of the own-data commands
            _materialise_own_data(tmp_path, files["my_data/train.csv"])
        outputs[command] = _run(" ".join([command, *SHRINK.get(command, [])]), tmp_path, env)

    # what the walkthrough promises
    report = json.loads((tmp_path / "runs/train/eval.json").read_text())
    assert {split: r["classes"] for split, r in report.items()} == {"val": 20, "heldout": 20}  # the union of labels
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(
        r["ok"] and set(r["top"][0]) == {"label", "probability", "similarity"} for r in records
    )
    fused = next(out for c, out in outputs.items() if "--fuse" in c)
    assert "--fuse: 16 audio+image pair(s) by file stem" in fused.stderr
    assert fused.stderr.strip().splitlines()[-1].startswith("synergy infer: 16 inputs, 16 ok, 0 failed in ")
    assert (tmp_path / "runs/mine/checkpoint/model.safetensors").is_file()
    lit = json.loads((tmp_path / "runs/mine-lit/checkpoint/config.json").read_text())
    assert lit["locked"] == {"text": 0} and (tmp_path / "towers/minilm/model.safetensors").is_file(), lit.get("locked")

    (tmp_path / "runs/demo").mkdir()
    for name, target in DEMO_LINKS.items():
        (tmp_path / "runs/demo" / name).symlink_to(tmp_path / target)
    for command in demo:
        _run(command, tmp_path, env)

    python_blocks = [body for language, body, _ in fenced_blocks(text) if language == "python"]
    assert len(python_blocks) >= 3
    program = "\n".join(
        f"exec(compile({body!r}, 'README block {i}', 'exec'), {{}})" for i, body in enumerate(python_blocks)
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data/synth/audio/val/" in done.stdout  # the search block printed its hits
