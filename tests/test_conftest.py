"""The suite on a GPU machine, simulated on this one: tests/conftest.py sees an `nvidia-smi`, so the pytest process
compiles triton (no TRITON_INTERPRET) and the tests marked `interpreted` must run, and pass, in a child process
with the interpreter. Before the child processes existed they raised "needs TRITON_INTERPRET=1" there."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest_as_on_a_gpu_machine(tmp_path, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI (fake, for the test)'\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # on a real GPU machine hide the GPU from this simulation, so its requires_cuda test skips as it does here
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_interpreted_tests_run_in_a_child_process_where_nvidia_smi_exists(tmp_path):
    junit = tmp_path / "junit.xml"
    result = _pytest_as_on_a_gpu_machine(
        tmp_path,
        f"--junitxml={junit}",
        "tests/kernels/test_attention.py::test_strided_inputs_as_transformers_passes_them",  # interpreted
        "tests/kernels/test_attention.py::test_padding_semantics_exact_zeros_and_no_nan",  # interpreted
        "tests/kernels/test_attention.py::test_dispatch_and_errors",  # runs in the parent
        "tests/kernels/test_attention.py::test_cuda_fp32_and_auto_dispatch",  # requires_cuda: skips (no CUDA here)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # one child on a small machine, up to 4 on a many-core GPU host (tests/conftest.py sizes them by cpu_count)
    children = r"2 interpreted kernel tests ran in [12] child process\(es\) with TRITON_INTERPRET=1"
    assert re.search(children, output), output[-3000:]
    assert "3 passed, 1 skipped" in output, output[-3000:]
    # the replayed reports reach the other plugins too: junit lists each interpreted test as passed
    xml = junit.read_text()
    assert 'name="test_strided_inputs_as_transformers_passes_them"' in xml and 'failures="0"' in xml, xml


MINI_SUITE = """
import os

import pytest


@pytest.mark.interpreted
def test_in_the_child():
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CUDA_VISIBLE_DEVICES") == ""


@pytest.mark.interpreted
def test_fails_in_the_child():
    assert 1 + 1 == 3, "wrong arithmetic, reported from the child"


def test_in_the_parent():
    assert "TRITON_INTERPRET" not in os.environ
"""


def test_child_failures_and_environment_reach_the_parent(tmp_path):
    """A mini suite with this conftest: the interpreted tests see TRITON_INTERPRET=1 and no GPU, the parent's test
    does not, and a failure in the child fails the parent's run with the child's assertion message."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (suite / "test_mini.py").write_text(MINI_SUITE)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    interpreted: run under TRITON_INTERPRET=1\n")
    result = _pytest_as_on_a_gpu_machine(tmp_path, "--rootdir", str(suite), "-c", str(suite / "pytest.ini"), str(suite))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 failed, 2 passed" in output, output
    failed = [line for line in output.splitlines() if line.startswith("FAILED ")]
    # under CI=true pytest appends " - <message>" to the short summary line: compare the test id only
    assert len(failed) == 1 and failed[0].split(" - ")[0].endswith("test_mini.py::test_fails_in_the_child"), output
    assert "wrong arithmetic, reported from the child" in output, output
    assert re.search(r"2 interpreted kernel tests ran in [12] child process\(es\)", output), output


SKIPPING_SUITE = {
    "test_hardware.py": """
import pytest


@pytest.mark.skip(reason="requires an NVIDIA GPU with CUDA; none is visible to torch on this machine")
def test_on_a_gpu():
    pass


def test_with_tensorrt():
    pytest.skip("needs the TensorRT Python package (pip install 'synergy-clip[tensorrt]')")


@pytest.mark.xfail(reason="a known bug, not a skip")
def test_known_bug():
    assert False


def test_runs():
    pass
""",
    "test_extra.py": """
import pytest

pytest.importorskip("a_module_nobody_installed", reason="synergy[serve] is not installed")


def test_the_server():
    pass
""",
    "test_other.py": """
import pytest


def test_skipped_for_a_reason_ci_does_not_accept():
    pytest.skip("flaky on Tuesdays")
""",
}


def _run_skipping_suite(tmp_path, ci: str | None):
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    for name, text in SKIPPING_SUITE.items():
        (suite / name).write_text(text)
    (suite / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--rootdir", str(suite)]
    command += ["-c", str(suite / "pytest.ini"), str(suite)]
    return subprocess.run(command, cwd=suite, env=env, capture_output=True, text=True, timeout=300)


def test_under_ci_a_skip_for_a_missing_extra_fails_the_run(tmp_path):
    """CI=true: the file skipped for a missing extra and the test skipped for another reason fail the run, each named
    with its reason; the GPU and TensorRT skips (and an xfail) do not. Without CI the same suite passes."""
    result = _run_skipping_suite(tmp_path, "true")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    section = output.split("skips CI does not accept", 1)[1]
    assert "test_extra.py: synergy[serve] is not installed" in section, output
    assert "test_other.py::test_skipped_for_a_reason_ci_does_not_accept: flaky on Tuesdays" in section, output
    assert "2 skip(s) for a reason other than CUDA, GPU, TensorRT" in section, output
    assert "test_on_a_gpu" not in section and "test_with_tensorrt" not in section and "known_bug" not in section
    for ci in (None, "false"):
        result = _run_skipping_suite(tmp_path, ci)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "skips CI does not accept" not in output and "1 passed, 4 skipped, 1 xfailed" in output, output


ISOLATED_LAST = {
    "test_a.py": """
import pytest


@pytest.fixture(scope="module")
def resource():
    yield "open"


def test_here(resource):
    assert resource == "open"


@pytest.mark.isolated
def test_apart():
    assert True
""",
    "test_b.py": """
def test_next_module():
    assert True
""",
}


def test_a_module_whose_last_test_is_isolated_is_torn_down_before_the_next_module(tmp_path):
    """The isolated test runs in a child; the parent must still tear down the module's fixtures after it (pytest
    failed the next module's first test with "previous item was not torn down properly" before)."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    for name, text in ISOLATED_LAST.items():
        (suite / name).write_text(text)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    isolated: run in a child pytest\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite)]
    result = subprocess.run(
        [*command, "-c", str(suite / "pytest.ini"), str(suite)], cwd=suite, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "3 passed" in output, output
