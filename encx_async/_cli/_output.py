"""What a command reports, and how it reaches the user: text, or one JSON document."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ._errors import Failure

__all__ = ["Report", "emit", "emit_failure", "table"]


@dataclass(frozen=True, slots=True)
class Report:
    """A command's result: ``data`` for --json, ``text`` for people (None: say nothing)."""

    data: Mapping[str, Any] = field(default_factory=dict)
    text: str | None = None


def emit(report: Report, *, json_mode: bool, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stdout
    if json_mode:
        json.dump(report.data, out, indent=2, default=str)
        out.write("\n")
    elif report.text is not None:
        out.write(report.text.rstrip("\n") + "\n")
    out.flush()


def emit_failure(failure: Failure, *, stream: TextIO | None = None) -> None:
    err = stream if stream is not None else sys.stderr
    err.write(f"encx-async: error: {failure.message}\nhint: {failure.hint}\n")
    err.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns left-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return "\n".join(line(row).rstrip() for row in (headers, *rows))
