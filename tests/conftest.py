"""Shared test set-up: one suite for CPU-only machines and machines with an NVIDIA GPU.

Triton reads TRITON_INTERPRET once, when a kernel is defined, so a process runs its kernels either interpreted
(numpy on CPU tensors) or compiled (CUDA tensors), never both. This file decides before any test module loads:

- No `nvidia-smi` and TRITON_INTERPRET unset: the interpreter (the CPU suite; an explicit value is respected).
- Otherwise (a GPU machine) the kernels compile, so the `requires_cuda` tests run the real GPU kernels here, and the
  tests marked `interpreted` (Triton kernels on CPU tensors, impl="triton") run in child pytest processes started with
  TRITON_INTERPRET=1 as soon as collection ends, side by side with the rest of the suite. Their reports (setup, call,
  teardown, with tracebacks) are replayed here under their own node ids, so -x, -ra, --junitxml and the exit status
  see them as if they had run in this process; a test without a report from its child fails with the child's output.
- `requires_cuda` tests skip with the reason where torch sees no CUDA device.
- Under CI (the environment variable CI set, as CI services and .ci/run set it) a skip is a failure unless its reason
  names hardware this machine lacks (ALLOWED_SKIP_REASONS): a missing extra skips whole test files, and a green run
  that tested nothing of the server must not pass as a test of it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED_HERE = os.environ.get("TRITON_INTERPRET") == "1"
# interpreted kernels do their tile products in numpy: OpenBLAS threads thrash on a busy 2-core machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPORTS_ENV = "SYNERGY_INTERPRETED_REPORTS"  # set for a child: the JSON-lines file its reports go to
# taken out of the environment, so that the subprocesses its tests start do not write there too
REPORTS_PATH = os.environ.pop(REPORTS_ENV, None)
_config: pytest.Config | None = None
_children: list["_InterpretedChild"] = []
_child_of: dict[str, "_InterpretedChild"] = {}
# skip reasons that CI accepts: hardware (or its SDK) a CPU machine cannot have; any other skip fails a CI run. The
# ffmpeg CLI is a system binary pip cannot install (the runtime decodes with PyAV; the CLI is only the reference its
# rotation tests compare against)
ALLOWED_SKIP_REASONS = ("CUDA", "GPU", "TensorRT", "the ffmpeg CLI is not installed")
_skips: list[tuple[str, str]] = []  # (node id, reason) of every skipped test and collected-then-skipped file
_unexpected_skips: list[tuple[str, str]] = []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config):
    global _config
    _config = config


def pytest_collection_modifyitems(config, items):
    if any("requires_cuda" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="requires an NVIDIA GPU with CUDA; none is visible to torch on this machine")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)


# --- interpreted kernel tests on a machine whose triton compiles: child processes ----------------------------------


class _InterpretedChild:
    """One `python -m pytest <node ids>` with TRITON_INTERPRET=1 and no visible GPU, writing its reports to a file."""

    def __init__(self, config: pytest.Config, nodeids: list[str], workdir: Path, index: int):
        self.nodeids = nodeids
        self.reports_path = workdir / f"reports-{index}.jsonl"
        self.log_path = workdir / f"output-{index}.txt"
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{REPORTS_ENV: str(self.reports_path)})
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(config.rootpath)]
        if config.inipath is not None:
            command += ["-c", str(config.inipath)]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [*command, *nodeids], cwd=config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.reports: dict[str, list[dict]] | None = None

    def wait(self) -> dict[str, list[dict]]:
        if self.reports is None:
            self.process.wait()
            self.reports = {}
            if self.reports_path.exists():
                for line in self.reports_path.read_text().splitlines():
                    data = json.loads(line)
                    self.reports.setdefault(data["nodeid"], []).append(data)
        return self.reports

    def output_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def pytest_collection_finish(session):
    if INTERPRETED_HERE or REPORTS_PATH or session.config.option.collectonly:
        return
    routed = [item.nodeid for item in session.items if item.get_closest_marker("interpreted")]
    if not routed:
        return
    workdir = Path(tempfile.mkdtemp(prefix="synergy-interpreted-"))
    # interpreted tests are single-threaded numpy: a few children use a many-core GPU host; one on a small machine
    n_children = max(1, min(4, (os.cpu_count() or 2) // 4, len(routed)))
    for index in range(n_children):
        child = _InterpretedChild(session.config, routed[index::n_children], workdir, index)
        _children.append(child)
        _child_of.update(dict.fromkeys(child.nodeids, child))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    child = _child_of.get(item.nodeid)
    if child is None:
        return None  # runs here, as usual
    hook, config = item.ihook, item.config
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = child.wait().get(item.nodeid)
    if reports:
        for data in reports:
            hook.pytest_runtest_logreport(report=config.hook.pytest_report_from_serializable(config=config, data=data))
    else:
        longrepr = (
            f"this interpreted test ran in a child pytest (TRITON_INTERPRET=1), which exited with status "
            f"{child.process.returncode} without a report for it; the end of its output:\n{child.output_tail()}"
        )
        report = pytest.TestReport(
            item.nodeid, item.location, keywords={}, outcome="failed", longrepr=longrepr, when="call"
        )
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


# --- under CI: a skip needs an allowed reason -----------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report) -> str:
    """A skipped report's reason: pytest keeps (path, line, "Skipped: <reason>") for skips."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def unexpected_skips(skips: list[tuple[str, str]], allowed=ALLOWED_SKIP_REASONS) -> list[tuple[str, str]]:
    return [(nodeid, reason) for nodeid, reason in skips if not any(word in reason for word in allowed)]


def pytest_collectreport(report):
    if report.skipped:  # a module-level importorskip: the whole file
        _skips.append((report.nodeid, skip_reason(report)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if not in_ci() or REPORTS_PATH:  # a child's skips are replayed, and judged, in its parent
        return
    _unexpected_skips.extend(unexpected_skips(_skips))
    if _unexpected_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skips CI does not accept", sep="=", red=True, bold=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line(
            f"{len(_unexpected_skips)} skip(s) for a reason other than {', '.join(ALLOWED_SKIP_REASONS)}: under CI "
            "(CI is set) they fail the run. Install what they name (make install takes every extra: pip install -e "
            "'.[export,dev]'), or fix the test."
        )
    if _children:
        n = sum(len(child.nodeids) for child in _children)
        terminalreporter.write_line(
            f"{n} interpreted kernel tests ran in {len(_children)} child process(es) with TRITON_INTERPRET=1 "
            "(this process compiles triton for the GPU)"
        )


def pytest_unconfigure(config):
    for child in _children:  # an interrupted session leaves no orphan children
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


# --- every report: skips noted (for CI); in a child, also written where the parent reads them -------------------------


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, skip_reason(report)))
    if REPORTS_PATH and _config is not None:
        data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
        with open(REPORTS_PATH, "a") as out:
            out.write(json.dumps(data) + "\n")
