"""The benchmark scripts' smoke tests run each script as a user does: a subprocess of this Python, the repository's
package on its path, one OpenMP thread (2-core runners)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository root, which is the `synergy` package


@pytest.fixture(scope="session")
def run_benchmark():
    """``run_benchmark(script, *args, timeout=...)`` -> the finished ``benchmarks/<script>`` process, its output
    captured as text."""

    def run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"},
        )

    return run
