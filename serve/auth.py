"""Who may call the server: API keys (``Authorization: Bearer KEY``, ``--api-key`` or ``SYNERGY_API_KEY``) and the
browser origins CORS lets in (``--cors-origin``). Both wrap the app as plain ASGI middleware, outside the routes.

No TLS here: a key sent over plain HTTP can be read on the way, so a server reachable beyond loopback sits behind a
proxy that terminates TLS (nginx, Caddy, a cloud load balancer). Keys are compared as SHA-256 digests with
``hmac.compare_digest``, against every key each time, so neither a key's bytes nor its length nor which key matched
shows in the answer's timing; a refused request is counted (``synergy_unauthorized_total``), never logged with its
token, and the keys themselves are never printed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware

from .metrics import Metrics
from .problems import Problem, problem_response

# Open without a key. /healthz and /readyz are probed by orchestrators and load balancers (a kubelet probe, a cloud
# health check) that mostly carry no secret, and they tell only whether the process is up and its towers loaded (the
# /readyz body names the models, nothing more). /metrics needs the key unless --metrics-public: it shows the models
# and their traffic. Prometheus itself can send a key (scrape_config `authorization: {credentials: KEY}`), but many
# scrapers and sidecars cannot, so the flag opens it for them (then let the proxy in front not pass /metrics on).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """The keys as given, refused when they could never be sent in a header (the message never quotes one)."""
    from synergy.runtime import InferUsageError

    for number, key in enumerate(keys, 1):
        if not key or key != key.strip() or any(c.isspace() or not c.isprintable() for c in key):
            raise InferUsageError(
                f"API key #{number} is empty or holds spaces or control characters; a Bearer token is one word"
            )
    return tuple(keys)


class RequireKey:
    """ASGI middleware: every HTTP request but ``open_paths`` needs ``Authorization: Bearer KEY`` with one of
    ``keys``; otherwise 401 with ``WWW-Authenticate: Bearer`` and the usual JSON error."""

    def __init__(self, app, keys: Sequence[str], open_paths: frozenset[str], metrics: Metrics):
        self.app = app
        self.digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)
        self.open_paths = open_paths
        self.metrics = metrics
        metrics.describe("synergy_unauthorized_total", "counter", "Requests refused 401: no or a wrong API key.")
        metrics.inc("synergy_unauthorized_total", 0)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is not None and self.accepts(token):
            await self.app(scope, receive, send)
            return
        self.metrics.inc("synergy_unauthorized_total")
        message = (
            "this server needs an API key: send the header 'Authorization: Bearer KEY'"
            if token is None
            else "the API key is not valid"
        )
        refused = Problem(401, "Unauthorized", message, {"WWW-Authenticate": "Bearer"})
        await problem_response(refused)(scope, receive, send)

    def accepts(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        matched = False
        for known in self.digests:  # no early exit: the time does not say which key matched, or whether one did
            matched |= hmac.compare_digest(known, digest)
        return matched


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The token of ``Authorization: Bearer TOKEN`` (the scheme in any case, RFC 7235), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def guard(app, metrics: Metrics, keys: Sequence[str] = (), cors_origins: Sequence[str] = (), metrics_public=False):
    """The app behind the key check (when there are keys) and CORS (when there are origins). CORS is outside: a
    browser's preflight carries no key, and the 401s need the CORS headers for the page to read them."""
    if keys:
        app = RequireKey(app, check_keys(keys), OPEN_PATHS | ({"/metrics"} if metrics_public else set()), metrics)
    if cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "Server-Timing"],
        )
    return app
