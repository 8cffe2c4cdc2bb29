"""benchmarks/bench_pretrained.py --quick: the whole measurement at toy size in a subprocess, under a minute, and the
JSON it writes has the full run's shape (every tower, split, query and curve point; numbers are percentages)."""

import json
import time

TOWERS = ("scratch", "minilm_locked", "minilm_last2")
SPLITS = ("val", "heldout", "val_unseen", "heldout_unseen")
QUERIES = ("audio", "image", "audio+image")


def test_the_quick_run_writes_every_number_in_range(tmp_path, run_benchmark):
    out = tmp_path / "quick.json"
    started = time.perf_counter()
    done = run_benchmark("bench_pretrained.py", "--quick", "--work", str(tmp_path), "--out", str(out), timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 60, f"--quick took {seconds:.0f} s; CI needs it under a minute"
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["environment"]["commit"]
    assert {"device", "torch", "transformers", "python"} <= set(result["environment"])
    setup = result["setup"]
    assert (
        setup["preset"] == "tiny"
        and setup["minilm"]["sha256"]
        and setup["text_towers"]["minilm_last2"]
        == {
            "lock": ["text"],
            "unlock_last_layers": {"text": 2},
        }
    )
    assert len(result["unseen_phrasings"]) == 20 == len(setup["classes"]["seen"]) + len(setup["classes"]["heldout"])
    assert set(result["side_by_side"]) == set(TOWERS)
    seeds = len(setup["seeds"])
    for tower, entry in result["side_by_side"].items():
        assert len(entry["runs"]) == seeds
        for run in entry["runs"]:
            assert run["tower"] == tower and run["steps"] == setup["steps"][str(max(setup["rows_per_class"]))]
            for split in SPLITS:
                assert all(0 <= run[split][q] <= 100 for q in QUERIES), (tower, split, run[split])
        for split in SPLITS:
            for query in QUERIES:
                s = entry["summary"][split][query]
                assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 100
    curve = result["learning_curve"]
    assert set(curve) == {"scratch", "minilm_locked"}
    for points in curve.values():
        assert list(points) == [str(k) for k in setup["rows_per_class"]]
        assert [p["runs"][0]["rows"] for p in points.values()] == [k * 16 for k in setup["rows_per_class"]]
    assert "### learning curve" in done.stdout and "| minilm_last2 |" in done.stdout
