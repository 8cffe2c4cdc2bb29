"""The house's rooms say what they are for: every module of the package opens with a docstring whose first line says
in one line what the file is for (issue: no grab-bags; a newcomer reads the first line of each file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "core", "export", "kernels", "runtime", "serve", "train")
MODULES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_opens_with_what_it_is_for(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and docstring.strip(), f"{path.relative_to(ROOT)} has no opening docstring"
    first = docstring.strip().splitlines()[0]
    assert len(first.split()) >= 4, f"{path.relative_to(ROOT)}: the first line says too little: {first!r}"


def test_no_grab_bag_names():
    bags = [p.relative_to(ROOT).as_posix() for p in MODULES if p.stem in {"utils", "helpers", "misc", "common"}]
    assert not bags, f"grab-bag modules: {bags}; name each file for its job"
