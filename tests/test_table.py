"""The plain-text tables of the command line and the benchmarks."""

from __future__ import annotations

from encx_async._table import table


def test_columns_are_left_aligned_and_lines_unpadded() -> None:
    text = table(["VERSION", "STATE"], [["1", "retired"], ["12", ""]])
    assert text.splitlines() == ["VERSION  STATE", "1        retired", "12"]


def test_figures_right_aligned_under_a_rule() -> None:
    text = table(
        ["path", "ops/s"], [["raw", "1,000"], ["encx", "52"]], numbers_right=True, rule=True
    )
    assert text.splitlines() == ["path  ops/s", "----  -----", "raw   1,000", "encx     52"]
