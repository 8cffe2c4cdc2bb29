"""Which served model a request is for: the bundles one server runs, by name (``--bundle NAME=PATH``, repeatable),
and the rules for a request's ``model`` field (OpenAI's): absent, the only model, or 400 when several are served;
unknown, 404 naming the served ones.

Each model is a ``Service`` of its own (service.py): its runtime, its micro-batchers and its ``model="..."`` metric
series, so a busy model fills its own queues, not the others'.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from synergy.runtime import InferUsageError

from .metrics import Metrics
from .problems import Problem

if TYPE_CHECKING:  # for the annotations only: the rules here need no runtime, batchers or starlette
    from .service import Service

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")  # a model id as clients send it: "tiny", "org/model-v2"


def bundles_by_name(values) -> dict[str, str]:
    """``--bundle`` values -> {name: path}. ``NAME=PATH`` names the model; a bare ``PATH`` (an existing folder is
    always bare, even with ``=`` in its name) is named after its folder, as one-bundle servers always were."""
    named: dict[str, str] = {}
    for value in values:
        if "=" in value and not Path(value).is_dir():
            name, path = value.split("=", 1)
            if not NAME.fullmatch(name) or not path:
                raise InferUsageError(
                    f"--bundle {value}: give NAME=PATH, NAME of letters, digits and . _ : / @ + - (a model id)"
                )
        else:
            name, path = Path(value).absolute().name, value
        if name in named:
            raise InferUsageError(
                f"--bundle {value}: two bundles are named {name!r}; name them apart with --bundle NAME=PATH"
            )
        named[name] = path
    if not named:
        raise InferUsageError("no --bundle given; serve at least one bundle folder")
    return named


class Models:
    """The served models in ``--bundle`` order, and the metrics they share (each series labelled by model)."""

    def __init__(self, services: dict[str, Service], metrics: Metrics):
        self.services = services
        self.metrics = metrics

    def __iter__(self) -> Iterator[Service]:
        return iter(self.services.values())

    def __len__(self) -> int:
        return len(self.services)

    def names(self) -> str:
        return ", ".join(repr(name) for name in self.services)

    def pick(self, asked) -> Service:
        """The service a request's ``model`` field names (None: the field is absent)."""
        if asked is None:
            if len(self.services) == 1:
                return next(iter(self.services.values()))
            raise Problem(
                400,
                "ModelRequired",
                f"this server serves several models ({self.names()}); name one in the request's 'model' field",
            )
        if not isinstance(asked, str):
            raise Problem(400, "BadRequest", f"model must be a string, one of {self.names()}; got {asked!r}")
        service = self.services.get(asked)
        if service is None:
            raise Problem(404, "ModelNotFound", f"no model named {asked!r}; this server serves {self.names()}")
        return service

    def start(self) -> None:
        for service in self:
            service.start()

    def stop(self) -> None:
        for service in self:
            service.draining = True  # every model refuses new work before any of them drains
        for service in self:
            service.stop()

    def unready(self) -> Problem | None:
        """Why /readyz is not 200 yet: it waits for every model's towers."""
        for service in self:
            if service.draining:
                return Problem(503, "ShuttingDown", "the server is shutting down")
            if service.load_error:
                return Problem(
                    503, "LoadFailed", f"the towers of {service.name!r} could not be loaded: {service.load_error}"
                )
        loading = [service.name for service in self if not service.ready.is_set()]
        if loading:
            return Problem(503, "NotReady", f"loading the towers of {', '.join(loading)}", {"Retry-After": "1"})
        return None
