"""User-facing problems: collected, never raised one at a time.

Each problem names the recipe file, the key path, the line (or the CLI
override that set the value), the bad value and a fix.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Where:
    """Where a value came from: a file and line, or a command-line override."""

    file: str | None = None
    line: int | None = None
    override: str | None = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"override '{self.override}'"
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        return self.file or "<recipe>"


@dataclass
class Problem:
    """One mistake in a recipe, its overrides or arguments."""

    key: str
    message: str
    fix: str = ""
    where: Where = field(default_factory=Where)
    value: Any = None
    has_value: bool = False

    def format(self) -> str:
        head = f"{self.where}: {self.key}: {self.message}" if self.key else f"{self.where}: {self.message}"
        lines = [head]
        if self.has_value:
            lines.append(f"    value: {self.value!r}")
        if self.fix:
            lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)


class RecipeError(Exception):
    """One or more user problems; the CLI prints them all and exits with 2."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found:"
        return "\n".join([head] + [p.format() for p in self.problems])


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or '' when nothing is close."""
    opts = [str(o) for o in options]
    close = difflib.get_close_matches(str(word), opts, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""

