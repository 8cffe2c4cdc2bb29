"""benchmarks/bench_text_int8.py at smoke size in a subprocess: MiniLM exported at fp32 and int8, every configuration
measured, and the JSON says what the README quotes (the fp32 runtime embeds as torch does; int8 moves the vectors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root, which is the `synergy` package


def test_the_smoke_run_measures_every_configuration(tmp_path):
    out = tmp_path / "text.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_text_int8.py"), "--sentences", "16", "--budget", "0.2",
         "--rounds", "1", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sentences"] == 16 and result["environment"]["commit"]
    rows = {row["config"]: row for row in result["rows"]}
    wanted = {"torch", "torch-bf16", "fp32@onnxruntime", "int8-dynamic@onnxruntime", "int8-static@onnxruntime"}
    assert wanted <= set(rows)
    assert rows["torch"]["cosine_min"] > 0.99999 and rows["torch"]["speedup_vs_torch"] == 1.0
    assert rows["fp32@onnxruntime"]["cosine_min"] >= 0.9999  # the fp32 bundle embeds as torch does
    assert rows["int8-dynamic@onnxruntime"]["cosine_min"] < 0.99999  # int8 weights and activations move the vectors
    for row in rows.values():
        assert row["sentences_per_s"] > 0 and 0 <= row["nearest_agreement"] <= 1 and -1 <= row["cosine_mean"] <= 1
    for name in ("fp32", "int8-dynamic", "int8-static"):
        verification = result["exports"][name]["verification"][0]
        assert verification["precision"] == name.split("-")[0], verification
