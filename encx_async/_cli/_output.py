"""What a command reports, and how it reaches the user: text, or one JSON document."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from ._errors import Failure

__all__ = ["Report", "emit", "emit_failure", "emit_warning"]


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


def emit_warning(text: str, *, stream: TextIO | None = None) -> None:
    """A note on stderr that does not stop the command (a deprecated flag, say)."""
    err = stream if stream is not None else sys.stderr
    err.write(f"encx-async: warning: {text}\n")
    err.flush()
