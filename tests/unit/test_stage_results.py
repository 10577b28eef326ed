"""Typed stage results cross XCom as plain JSON and come back equal; a missing reference is named."""

from __future__ import annotations

import json

import pytest

from contracts.stages import (
    GateDecision,
    IngestResult,
    PreprocessResult,
    StageResultError,
    TrainResult,
    ValidateResult,
)


def test_results_round_trip_through_json_without_losing_fields():
    ingested = IngestResult(manifest_key="manifests/d/1.jsonl", ingest_id="1", total=3, new=3,
                            deleted_keys=["raw/d/a.png"])
    processed = PreprocessResult(dataset_version="v1", prefix="processed/d/v1/", created=True,
                                 counts={"train": {"normal": 2}}, per_split={"train": 2})
    for result in (ingested, processed):
        again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
        assert again == result
    # A field a newer stage adds is kept through the round trip, not dropped.
    raw = {"run_id": "r", "model_version": "3", "skipped": False, "metrics": {"accuracy": 0.9}}
    trained = TrainResult.from_dict(raw)
    assert trained.model_version == "3" and trained.extra == {"metrics": {"accuracy": 0.9}}
    assert trained.to_dict() == {**raw, "resumed": False, "reason": "", "model_name": "", "dataset_version": ""}


@pytest.mark.parametrize(("cls", "data", "missing"), [
    (IngestResult, {"ingest_id": "1"}, "manifest_key"),
    (ValidateResult, {"summary_key": "s", "gx_result_key": "g", "run_id": "r"}, "validated_key"),
    (PreprocessResult, {"prefix": "p"}, "dataset_version"),
    (TrainResult, {"run_id": "r"}, "model_version"),
    (GateDecision, {"reason": "floors"}, "passed"),
])
def test_a_missing_reference_is_a_clear_error(cls, data, missing):
    with pytest.raises(StageResultError, match=f"{cls.__name__} lacks {missing}"):
        cls.from_dict(data)


def test_not_a_dict_is_refused():
    with pytest.raises(StageResultError, match="expected a dict"):
        IngestResult.from_dict(None)
