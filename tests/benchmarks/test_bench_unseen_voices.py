"""benchmarks/bench_unseen_voices.py --quick: data, a 3-step training run and the heard/unseen evaluation in a
subprocess under a minute; the JSON has every split and query in range and says which code ran."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root, which is the `synergy` package


def test_the_quick_run_writes_heard_and_unseen_numbers(tmp_path):
    out = tmp_path / "quick.json"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_unseen_voices.py"), "--quick", "--work", str(tmp_path),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 60, f"--quick took {seconds:.0f} s; CI needs it under a minute"
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["environment"]["commit"]
    assert Path(result["environment"]["synergy_path"]) == ROOT.resolve()
    assert len(result["setup"]["words"]) == 12 and len(result["runs"]) == len(result["setup"]["seeds"]) == 1
    for run in result["runs"]:
        for split in ("val", "unseen"):
            assert run[split]["rows"] == 12 * (6 if split == "val" else 3)
            assert all(0 <= run[split][query] <= 100 for query in ("audio", "image"))
    for split in ("val", "unseen"):
        s = result["summary"][split]["audio"]
        assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 100
    assert "| mean (min-max) |" in done.stdout
