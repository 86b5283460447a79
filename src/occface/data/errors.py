"""Errors raised for bad input data."""
from __future__ import annotations

from ..errors import InputError


class DataError(InputError):
    """Bad input data: the message names the file(s) and the problem."""


class DataProblems(DataError):
    """Every problem a validation pass found, one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found\n{shown}{more}")
