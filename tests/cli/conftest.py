"""Fixtures for the cli/ tests: the runtime tests' tiny bundle, built by ``tests/runtime/conftest.py``'s
``build_bundle`` (reused, not copied), and its audio and image makers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "synergy_tests_runtime_conftest", Path(__file__).resolve().parents[1] / "runtime" / "conftest.py"
)
runtime_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_fixtures)

SAMPLE_RATE = runtime_fixtures.SAMPLE_RATE
LABELS = runtime_fixtures.LABELS
tone, picture = runtime_fixtures.tone, runtime_fixtures.picture


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """(bundle folder, {"towers": torch modules, "tokenizer": Tokenizer}). Read-only: copy it to change it."""
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    reference = runtime_fixtures.build_bundle(folder)
    return folder, reference
