"""MkDocs hook: the configuration reference, generated from occface's config dataclasses.

``docs/configuration.md`` holds the marker ``<!-- config-reference -->``; this hook replaces it with
one table a section (key, type, default, what it does), the descriptions taken from the comments
beside and above each field in ``occface/config.py``, so the reference cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

MARKER = "<!-- config-reference -->"


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment on the field's line, after the comment lines above it."""
    lines, _ = inspect.getsourcelines(cls)
    comments, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and not stripped.startswith(("def ", "@", '"""')):
            inline = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            comments[match.group(1)] = " ".join(part for part in (*above, inline) if part)
        above = []
    return comments


def type_name(hint) -> str:
    text = str(hint).replace("typing.", "")
    text = re.sub(r"<class '(\w+)'>", r"\1", text)
    return text.replace("NoneType", "None")


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "required"


def reference() -> str:
    from occface import config

    out = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        out += [f"## `{section.name}`", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            text = comments.get(field.name, "").replace("|", "\\|")
            kind = type_name(hints[field.name]).replace("|", "\\|")
            default = default_of(field).replace("|", "\\|")
            out.append(f"| `{section.name}.{field.name}` | `{kind}` | `{default}` | {text} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
