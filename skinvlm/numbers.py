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


def bounds(pair: list[float]) -> str:
    return f"{pair[0]:.3f}-{pair[1]:.3f}"


def calibration_phrase(probabilities: dict[str, object]) -> str:
    """The ECE with its interval and the range a perfectly calibrated model scores on as many photos (a run
    scored before they were kept has the figure alone)."""
    said = f"expected calibration error {score(probabilities['ece'])}"  # type: ignore[arg-type]
    if "ece_interval" not in probabilities:
        return said
    return (f"{said} ({bounds(probabilities['ece_interval'])}; a perfectly calibrated model scores "  # type: ignore[arg-type]
            f"{bounds(probabilities['ece_if_calibrated'])} on {probabilities['n']} photos)")  # type: ignore[arg-type]  # fmt: skip


def auc_phrase(probabilities: dict[str, object]) -> str:
    """Macro AUC with its interval (a run scored before it was kept has the figure alone)."""
    said = f"macro AUC {score(probabilities['macro_auc'])}"  # type: ignore[arg-type]
    bounds_of = probabilities.get("macro_auc_interval")
    return f"{said} ({bounds(bounds_of)})" if bounds_of else said  # type: ignore[arg-type]
