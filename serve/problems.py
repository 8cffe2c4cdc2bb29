"""A request error and its JSON answer, ``{"error": {"type", "message"}}``, shared by the endpoints, the model
routing and the API-key check."""

from __future__ import annotations

from starlette.responses import JSONResponse


class Problem(Exception):
    """A request error: answered as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def problem_response(problem: Problem) -> JSONResponse:
    body = {"error": {"type": problem.kind, "message": problem.message}}
    return JSONResponse(body, status_code=problem.status, headers=problem.headers)
