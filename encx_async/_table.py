"""Plain-text tables, for the command line and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numbers_right: bool = False,
    rule: bool = False,
) -> str:
    """Columns two spaces apart, left-aligned; with ``numbers_right`` every
    column but the first is right-aligned, as columns of figures read best, and
    with ``rule`` a line of dashes under the headers."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        align = str.rjust if numbers_right else str.ljust
        rest = (align(cell, width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    lines = [line(headers), *(line(row) for row in rows)]
    if rule:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
