"""Fixtures for the serve/ tests: the runtime tests' tiny bundle (built by ``tests/runtime/conftest.py``'s
``build_bundle``, reused, not copied), audio / image files, and real ``synergy serve`` processes on free loopback
ports (no mocks: every test talks HTTP to a server that runs the bundle)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "synergy_tests_runtime_conftest", Path(__file__).resolve().parents[1] / "runtime" / "conftest.py"
)
runtime_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_fixtures)

SAMPLE_RATE = runtime_fixtures.SAMPLE_RATE
LABELS = runtime_fixtures.LABELS
tone, audio_bytes, picture = runtime_fixtures.tone, runtime_fixtures.audio_bytes, runtime_fixtures.picture


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-bundle") / "tiny"
    runtime_fixtures.build_bundle(folder)
    return folder


@pytest.fixture(scope="session")
def library(bundle):
    """The library the server must agree with: the same bundle, opened in this process."""
    from synergy.runtime import Runtime

    rt = Runtime.open(bundle, threads=1)
    yield rt
    rt.close()


def clip_bytes(seconds: float, freq: float) -> bytes:
    return audio_bytes(tone(seconds, freq=freq))


def image_bytes(width: int, height: int, seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    picture(width, height, seed).save(buffer, format="PNG")
    return buffer.getvalue()


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')  # a Prometheus label pair, escapes included


class Server:
    """A ``synergy serve`` child process on a free port (``--port 0``; the port is read from its first line).
    ``bundle``: a folder, or a list of ``--bundle`` values (``NAME=DIR``) to serve several; ``env``: variables added
    to the child's environment."""

    def __init__(self, bundle: Path | list[str], *options: str, labels: Path | None = None, env: dict | None = None):
        bundles = [bundle] if isinstance(bundle, (str, Path)) else bundle
        command = [sys.executable, "-m", "synergy.cli", "serve", *(f"--bundle={b}" for b in bundles), "--port", "0"]
        command += ["--threads", "1", *options, *(["--labels", str(labels)] if labels else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        line = self.process.stderr.readline()
        if "listening on http://" not in line:
            self.process.kill()
            raise RuntimeError(f"the server did not start: {line}{self.process.stderr.read()}")
        self.url = line.split("listening on ")[1].split()[0]
        self.started = line.strip()  # the listening line: bundles and the engine each runs on
        self.lines: list[str] = []  # the rest of stderr, drained so that a chatty server never blocks on the pipe
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + 60
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout=60,
        headers: dict | None = None,
    ):
        """-> (status, headers, parsed JSON or text)."""
        headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, raw = error.code, error.headers, error.read()
        kind = headers.get("content-type", "")
        return status, headers, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def post(self, path: str, payload, headers: dict | None = None) -> tuple:
        return self.request("POST", path, json.dumps(payload).encode(), "application/json", headers=headers)

    def get(self, path: str, headers: dict | None = None) -> tuple:
        try:
            return self.request("GET", path, timeout=5, headers=headers)
        except OSError:
            return 0, {}, None

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def log(self) -> str:
        """stderr after the first line, so far (all of it once the process has exited)."""
        if self.process.poll() is not None:
            self._drain.join(10)
        return "".join(self.lines)

    def rss_mb(self) -> float:
        """The server's resident memory now (VmRSS from /proc), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.split("//")[1].rsplit(":", 1)
        return host, int(port)

    def metric(self, selector: str, headers: dict | None = None) -> float:
        """The sum of the series ``name{label="value",...}`` selects: its name, and at least its labels (so
        ``synergy_items_total{modality="audio"}`` adds up every model's audio items)."""
        name, _, wanted = selector.partition("{")
        wanted = set(LABEL.findall(wanted))
        total = 0.0
        for line in self.get("/metrics", headers)[2].splitlines():
            series, _, value = line.rpartition(" ")
            if not line.startswith("#") and series.partition("{")[0] == name and wanted <= set(LABEL.findall(series)):
                total += float(value)
        return total

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._drain.join(10)


@pytest.fixture(scope="session")
def labels_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "animals.txt"
    path.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(bundle, labels_file):
    """The shared server: default batching, a 1 MiB body limit and 8 items per request (to test the limits)."""
    running = Server(bundle, "--max-body-mb", "1", "--max-items", "8", "--max-wait-ms", "5", labels=labels_file)
    yield running
    assert running.stop() == 0
