"""Applications on the torch-free runtime: an HTTP server (``synergy serve``), corpus embedding into parquet
(``synergy embed``, locally or on Ray Data) and search over it (``synergy search``).

Nothing here imports torch, and nothing in ``synergy.runtime`` or ``synergy infer`` imports this package. Each module
needs its own optional extra: ``synergy-clip[serve]`` (starlette, uvicorn, python-multipart, pyarrow) and
``synergy-clip[ray]`` (ray[data]); a missing one is a ``MissingExtra`` error that names the pip command.
"""

from __future__ import annotations


class MissingExtra(ImportError):
    """An optional dependency of a serve/ module is not installed."""


def require(module: str, extra: str):
    """Import ``module`` or raise ``MissingExtra`` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{module} is not installed; pip install 'synergy-clip[{extra}]'") from error
