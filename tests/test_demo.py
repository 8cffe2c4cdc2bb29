"""`make demo` end to end, shortened to a few training steps: every stage runs on real files and a re-run resumes.
The demo is orchestration at the package root: the training package imports no exporter and no demo."""

import ast
import json
from pathlib import Path

import pytest

from synergy import demo
from synergy.runtime import Runtime

PACKAGE = Path(__file__).resolve().parents[1]


def test_training_imports_neither_export_nor_demo():
    """DESIGN: train -> core -> kernels (and the runtime's decoding, the ground floor)."""
    for path in sorted((PACKAGE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("synergy.export", "synergy.demo", "synergy.serve")), f"{path}: {name}"


@pytest.mark.slow
def test_demo_runs_every_stage_and_reruns(tmp_path, capsys):
    run = tmp_path / "demo"
    demo.main(["--run", str(run), "--steps", "3"])
    out = capsys.readouterr().out
    assert "[5/5]" in out and "runtime audio -> label top-1 on val" in out
    report = json.loads((run / "eval.json").read_text())
    assert {"val", "heldout"} <= set(report)
    labels = (run / "labels.txt").read_text(encoding="utf-8").splitlines()
    classes = json.loads((run / "data" / "classes.json").read_text())
    assert labels == classes["train_classes"] + classes["heldout_classes"]
    assert f"--labels {run / 'labels.txt'}" in out
    with Runtime.open(run / "bundle") as runtime:  # the bundle the demo points `synergy infer` at
        assert runtime.embed_text(["red circle"]).shape == (1, runtime.manifest.embed_dim)

    demo.main(["--run", str(run), "--steps", "3"])  # a finished run is reused, not redone
    out = capsys.readouterr().out
    assert "reusing the data set" in out and "(resuming)" in out
