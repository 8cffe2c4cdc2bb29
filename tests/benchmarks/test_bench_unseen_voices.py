"""benchmarks/bench_unseen_voices.py --quick: data, a 3-step training run and the heard/unseen evaluation in a
subprocess (under a minute on an idle machine); the JSON has every split and query in range and says which code ran."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository root, which is the `synergy` package


def test_the_quick_run_writes_heard_and_unseen_numbers(tmp_path, run_benchmark):
    out = tmp_path / "quick.json"
    done = run_benchmark("bench_unseen_voices.py", "--quick", "--work", str(tmp_path), "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
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


def test_merge_keeps_an_earlier_merge_and_refuses_a_clashing_group(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_unseen_voices import merge
    finally:
        sys.path.pop(0)

    def result(label, seed, unseen):
        run = {
            "seed": seed,
            "val": {"audio": 99.0, "image": 9.0, "rows": 1},
            "unseen": {"audio": unseen, "image": 8.0, "rows": 1},
        }
        setup = {"preset": "small", "model_overrides": {}, "steps": 600}
        return {"label": label, "setup": setup, "runs": [run], "environment": {"commit": "c" * 40}, "command": label}

    earlier = merge([result("old", 0, 70.0), result("old", 1, 80.0)])
    merged = merge([earlier, result("new", 0, 60.0), result("new", 1, 90.0)])
    assert list(merged["groups"]) == ["old", "new"]
    assert merged["groups"]["old"]["summary"]["unseen"]["audio"]["mean"] == 75.0
    assert merged["groups"]["new"]["summary"]["unseen"]["audio"] == {"mean": 75.0, "min": 60.0, "max": 90.0}
    assert [s["command"] for s in merged["sources"]] == ["old", "old", "new", "new"]
    # a run of an existing group's label adds a seed to it; the same group in two merged files is refused
    grown = merge([merge([result("old", 0, 70.0), result("old", 1, 80.0)]), result("old", 2, 30.0)])
    assert [run["seed"] for run in grown["groups"]["old"]["runs"]] == [0, 1, 2]
    assert grown["groups"]["old"]["summary"]["unseen"]["audio"]["mean"] == 60.0
    with pytest.raises(SystemExit, match="old"):
        merge([earlier, merge([result("old", 2, 50.0)])])
