"""Run the HTTP server: open the bundles, bind the socket, hand both to uvicorn (the click command in
``cli/serve.py`` is a thin wrapper around ``serve``).

The socket is bound here, before uvicorn starts, so ``--port 0`` picks a free port and the line
``synergy serve: listening on http://HOST:PORT`` (stderr) says which. uvicorn installs the SIGTERM/SIGINT handlers:
it stops accepting connections, lets the requests in flight finish (up to ``drain_seconds``), then the app's
shutdown runs whatever is still queued in the batchers and closes the runtime; the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from synergy.runtime import InferUsageError, Runtime

from . import require
from .app import ServeLimits, create_app
from .auth import check_keys, guard
from .metrics import Metrics
from .routing import Models, bundles_by_name
from .service import Service


def labels_by_name(files) -> dict[str, Path]:
    """``--labels FILE`` (repeatable) -> {file stem: path}; a request names one by its stem ("animals")."""
    named: dict[str, Path] = {}
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise InferUsageError(f"--labels {file}: no such labels file")
        if path.stem in named:
            raise InferUsageError(f"--labels {file}: two labels files are named {path.stem!r}; rename one")
        named[path.stem] = path
    return named


def serve(
    bundles: str | tuple[str, ...],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    labels: tuple[str, ...] = (),
    threads: int | None = None,
    backend: str = "auto",
    device: str = "cpu",
    drain_seconds: float = 30.0,
    log_level: str = "warning",
    api_keys: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
    metrics_public: bool = False,
) -> int:
    """``bundles``: ``--bundle`` values, ``PATH`` or ``NAME=PATH`` (routing.py); ``api_keys``: the Bearer tokens
    accepted (none: no key needed); ``cors_origins``: the browser origins allowed (auth.py)."""
    uvicorn = require("uvicorn", "serve")
    limits = limits or ServeLimits()
    labels_files = labels_by_name(labels)
    named = bundles_by_name((bundles,) if isinstance(bundles, str) else bundles)
    api_keys = check_keys(api_keys)
    metrics = Metrics()
    models = open_models(named, limits, labels_files, metrics, backend=backend, device=device, threads=threads)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    from .connections import HEADER_LIMIT, bounded_h11, limit_headers  # imports uvicorn: after ``require``

    config = uvicorn.Config(
        limit_headers(guard(create_app(models, limits), metrics, api_keys, cors_origins, metrics_public)),
        http=bounded_h11(limits.read_timeout_s),  # h11, not httptools: see connections.py
        h11_max_incomplete_event_size=HEADER_LIMIT,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=drain_seconds,
        lifespan="on",
        backlog=2048,
    )
    server = uvicorn.Server(config)
    stopped_by: list[int] = []
    # uvicorn drains on SIGTERM/SIGINT, then restores the handlers it found and raises the signal again; these
    # handlers catch that second delivery, so a drained server exits 0 instead of dying by the signal
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopped_by.append(number))
    engines = {service.name: service.runtime.backend for service in models}  # what --backend auto chose, per bundle
    served = ", ".join(f"{name}={path} on {engines[name]}" for name, path in named.items())
    access = ", API key required" if api_keys else ""  # never the key itself
    print(f"synergy serve: listening on http://{host}:{bound} (bundles {served}{access})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print("synergy serve: stopped", file=sys.stderr, flush=True)
    return 0


def open_models(
    named: dict[str, str],
    limits: ServeLimits,
    labels_files: dict[str, Path],
    metrics: Metrics,
    backend: str,
    device: str,
    threads: int | None,
) -> Models:
    """Open every bundle ({name: path}) as a ``Service``; if one cannot be opened, the ones opened are closed."""
    services = {}
    try:
        for name, bundle in named.items():
            runtime = Runtime.open(
                bundle, backend=backend, device=device, threads=threads, batch_size=limits.max_batch, long_lived=True
            )  # a server: OpenVINO's start-up is paid once, so "auto" takes it for any bundle its export verified
            services[name] = Service(runtime, limits, name, labels_files, metrics)
    except BaseException:
        for service in services.values():
            service.runtime.close()
        raise
    return Models(services, metrics)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts (``--port 0``: a free port, read back by the caller)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        raise InferUsageError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port") from error
    return sock
