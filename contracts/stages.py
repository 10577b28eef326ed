"""Typed results of the retraining stages: the references one stage hands the next.

Airflow passes plain JSON through XCom, so every result converts with `to_dict()` and back with
`from_dict()`. `from_dict` names the stage and the missing field instead of a bare KeyError
deep inside the next stage, and keeps fields it does not know in `extra`, so a round trip loses
nothing. Field names are the keys the stages have always returned.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

R = TypeVar("R", bound="StageResult")


class StageResultError(ValueError):
    """A stage result lacks a field the next stage needs."""


@dataclass
class StageResult:
    """Base: JSON-dict conversion shared by every stage result."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise StageResultError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        known = [f for f in fields(cls) if f.name != "extra"]
        missing = [f.name for f in known if f.name not in data
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise StageResultError(f"{cls.__name__} lacks {', '.join(missing)} (got {sorted(data)})")
        names = {f.name for f in known}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})


@dataclass
class IngestResult(StageResult):
    """`pipeline.ingest.ingest`: the manifest written (or reused) for this listing."""

    manifest_key: str
    ingest_id: str
    reused: bool = False
    total: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    unassigned: int = 0  # objects outside the spec's class folders
    errors: int = 0  # objects recorded as undecodable or too large
    relabeled: int = 0
    fingerprinted: int = 0  # rows of an older manifest given their near-duplicate fingerprint
    reviewed: int = 0  # new or changed objects that are reviewed images joined by screening feedback
    deleted_keys: list[str] = field(default_factory=list)  # the first REPORT_LIMIT
    unassigned_keys: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0


@dataclass
class ValidateResult(StageResult):
    """`pipeline.validate.validate`: the rows that passed, and where the verdict is saved."""

    validated_key: str
    summary_key: str
    gx_result_key: str
    run_id: str
    kept: int = 0
    quarantined: int = 0
    duplicates_dropped: int = 0
    bad_fraction: float = 0.0
    reused: bool = False  # the saved verdict for this manifest and these checks
    status: str = "passed"


@dataclass
class PreprocessResult(StageResult):
    """`pipeline.preprocess.preprocess`: the processed dataset version (created or already there)."""

    dataset_version: str
    prefix: str
    created: bool = False  # False: this version already existed, nothing was written
    message: str = ""
    counts: dict[str, dict[str, int]] | None = None  # split -> label -> images (when created)
    per_split: dict[str, int] | None = None


@dataclass
class TrainResult(StageResult):
    """`training.train.train_candidate`: the candidate version, or why none was trained."""

    run_id: str | None
    model_version: str | None
    skipped: bool = False
    resumed: bool = False
    reason: str = ""
    model_name: str = ""
    dataset_version: str = ""


@dataclass
class GateDecision(StageResult):
    """`training.gate.decide_gate`: promote or keep the champion, and why."""

    passed: bool
    reason: str
    needs_review: bool = False
    compared_champion: str | None = None  # what apply_gate checks @champion against
    reviewed: dict[str, Any] | None = None  # {n, candidate, champion} metrics on reviewed images; not gated on


@dataclass
class GateApplied(StageResult):
    """`training.registry.apply_gate` (the promote or keep_champion task): what the registry recorded."""

    event: str  # promoted | rejected | already_champion
    version: str | None = None
    champion: str | None = None  # @champion after the event
    reason: str = ""


@dataclass
class NotifyResult(StageResult):
    """`ops.notify.notify_serving`: whether serving reloaded the champion (a failure is not fatal)."""

    notified: bool
    url: str = ""
    status: int | None = None
    detail: str = ""


# Which result type each field of RunResults holds (the report reads them by stage, not by task id).
RUN_RESULT_TYPES: dict[str, type[StageResult]] = {
    "ingest": IngestResult, "validate": ValidateResult, "preprocess": PreprocessResult, "train": TrainResult,
    "gate": GateDecision, "applied": GateApplied, "notify": NotifyResult,
}


@dataclass
class RunResults:
    """Everything one retraining run produced, for its report; None for a stage that did not run."""

    ingest: IngestResult | None = None
    validate: ValidateResult | None = None
    preprocess: PreprocessResult | None = None
    train: TrainResult | None = None
    gate: GateDecision | None = None
    applied: GateApplied | None = None
    notify: NotifyResult | None = None

    def to_dict(self) -> dict[str, dict[str, Any] | None]:
        return {name: None if (r := getattr(self, name)) is None else r.to_dict() for name in RUN_RESULT_TYPES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        unknown = sorted(set(data) - set(RUN_RESULT_TYPES))
        if unknown:
            raise StageResultError(f"RunResults: unknown stages {unknown} (known: {sorted(RUN_RESULT_TYPES)})")
        return cls(**{name: None if data.get(name) is None else kind.from_dict(data[name])
                      for name, kind in RUN_RESULT_TYPES.items()})
