"""Prompt templates: the one filler that training, evaluation, export verification, from-videos and the runtime use.

A template holds its label as ``{}`` or ``{label}`` (either, once or more: ``"a {label}, a sound of a {}"``); ``{{``
and ``}}`` are literal braces, as in ``str.format``. Any other field (``{0}``, ``{name}``, ``{label!r}``,
``{label:>9}``), an unmatched brace, or no placeholder at all is refused by ``check_template``, with the template
named, when a training config is built or a bundle is opened, so a template never trains and is refused later.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

PLACEHOLDERS = ("", "label")  # the field names of "{}" and "{label}"


def _parts(template: str) -> list[tuple[str, str | None]]:
    """template -> [(literal text, field name or None)], braces unescaped; ValueError naming the template."""
    if not isinstance(template, str):
        raise ValueError(f"prompt template {template!r} is a {type(template).__name__}; expected a string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"prompt template {template!r}: {error}; write a literal brace as '{{{{' or '}}}}'") from error
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in PLACEHOLDERS or spec or conversion):
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"prompt template {template!r} has the field {field!r}; the only placeholders are '{{}}' and "
                "'{label}' (write a literal brace as '{{' or '}}')"
            )
        parts.append((literal, name))
    return parts


def check_template(template: str) -> None:
    """Raise ``ValueError`` naming ``template`` unless it has a ``{}`` or ``{label}`` placeholder and no other
    field."""
    if not any(name is not None for _, name in _parts(template)):
        raise ValueError(f"prompt template {template!r} has no '{{}}' or '{{label}}' placeholder")


def fill_prompt(template: str, label: str) -> str:
    """``template`` with every ``{}`` and ``{label}`` replaced by ``label`` (``{{``/``}}`` -> literal braces)."""
    check_template(template)
    return "".join(literal + (label if name is not None else "") for literal, name in _parts(template))


def label_prompts(label: str, templates: Sequence[str]) -> list[str]:
    """The prompt ensemble of one label: each template filled with it (the label alone when there are none)."""
    if not templates:
        return [label]
    return [fill_prompt(t, label) for t in templates]
