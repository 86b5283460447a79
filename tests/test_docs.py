"""The front door and the documentation: a short README whose runnable blocks parse, a docstring for
everything the API reference shows, a description for every configuration key."""
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def api_members() -> list[tuple[str, str]]:
    """(module, member) for every member docs/api.md shows (a module without a list: its public names)."""
    text = (DOCS / "api.md").read_text()
    found = []
    for module, options in re.findall(r"^::: ([\w.]+)\n((?:    .*\n)*)", text, re.M):
        listed = re.search(r"members: \[([^\]]*)\]", options)
        if listed:
            found += [(module, name.strip()) for name in listed.group(1).split(",")]
        else:
            imported = importlib.import_module(module)
            found += [(module, name) for name, value in vars(imported).items()
                      if not name.startswith("_") and getattr(value, "__module__", None) == module]
    return found


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_screen = "\n".join(text.splitlines()[:60])
    for needed in ("pip install torch==2.13.0", "occface demo", "pytest"):
        assert needed in first_screen, needed
    for topic in ("occface match", "occface serve", "occface search", "occface models", "occface train",
                  "occface export"):
        assert topic in text, topic
    sys.path.insert(0, str(DOCS))
    try:
        from check_readme import blocks
    finally:
        sys.path.remove(str(DOCS))
    runnable = blocks(ROOT / "README.md")
    assert len(runnable) >= 4 and "occface demo" in runnable[0]
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # every page the README links exists
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("module,member", api_members())
def test_everything_in_the_api_reference_has_a_docstring(module, member):
    value = getattr(importlib.import_module(module), member)
    if not (inspect.isclass(value) or inspect.isfunction(value)):
        return  # a constant: described on its module's page
    assert inspect.getdoc(value), f"{module}.{member} has no docstring"
    if inspect.isclass(value):
        for name, method in vars(value).items():
            if inspect.isfunction(method) and not name.startswith("_"):
                assert inspect.getdoc(method), f"{module}.{member}.{name} has no docstring"


def test_every_configuration_key_is_described():
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    rows = [line for line in hooks.reference().splitlines() if line.startswith("| `")]
    from occface.config import Config
    import dataclasses

    assert len(rows) == sum(len(dataclasses.fields(f.type if isinstance(f.type, type) else
                                                   getattr(importlib.import_module("occface.config"), f.type)))
                            for f in dataclasses.fields(Config))
    assert not [row for row in rows if not row.split("|")[4].strip()], "keys without a description"
