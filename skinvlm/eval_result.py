"""What `skinvlm eval` returns and writes to metrics.json, as types mypy checks: the figures (`Metrics`, from
`evaluate.metrics`) and the run around them (`EvalResult`). The report, the console table, the checklist and the
model card read these keys; a key misspelt or dropped in one of them is a type error, not a KeyError at a
clinic. metrics.json read back from disk is the same object (`as_result`)."""

from typing import Any, NotRequired, TypedDict, cast


class ClassFigures(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(TypedDict):
    n: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    per_class: dict[str, ClassFigures]
    per_view: dict[str, float]
    labels: list[str]  # the classes only: what scikit-learn's `labels=` takes (unparsed is counted apart)
    macro_over: list[str]  # the classes macro figures average: those with photos in this set
    predicted_labels: list[str]  # the confusion matrix's columns: the classes, then unparsed
    confusion_matrix: list[list[int]]
    unparsed: int
    latency_p50: float
    latency_p95: float
    throughput: float | None
    image_tokens: dict[str, int] | None
    answers_cut: int
    patients: int | None
    ci_method: str
    design_effect: float
    minimal_detectable_difference: float
    intervals: dict[str, Any]  # stats.intervals, with per_view
    probabilities: dict[str, Any] | None
    selective: dict[str, Any] | None  # the referral threshold (with class probabilities only)
    subgroups: dict[str, Any]


class EvalResult(Metrics):
    name: str
    backend: str
    constrained: bool
    label_corrections: int
    failed: int
    failure_reasons: dict[str, int]
    from_cache: int
    asked: int
    endpoints: list[dict[str, Any]]
    key: str
    output_dir: str
    external: NotRequired[dict[str, Any]]  # photos from elsewhere (eval --dataset)
    leakage: NotRequired[dict[str, Any] | None]  # the workspace's own photos: the last audit's leak check
    explanation: NotRequired[dict[str, Any]]
    judge: NotRequired[dict[str, Any]]
    notes: NotRequired[list[str]]
    skinvlm_version: NotRequired[str]
    checklist: NotRequired[list[dict[str, str]]]


def as_result(metrics: dict[str, Any]) -> EvalResult:
    """A metrics.json read back (`Workspace.read_eval`): what eval wrote, so its type."""
    return cast(EvalResult, metrics)
