"""How a figure is written, one way wherever it appears (the terminal, report.md, report.html): scores and shares
in [0, 1] with three decimals (an AUC of 1 is "1.000", never "1.0" beside "0.962"), seconds with two decimals and
a unit, rates per second with one, and a p-value that is never "0"."""

from __future__ import annotations


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def rate(value: float | None, unit: str = "images/s") -> str:
    return "-" if value is None else f"{value:,.1f} {unit}"


def p_value(value: float) -> str:
    """Exact tests give 0 only by underflow: below 1e-4 it is written as a bound."""
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"
